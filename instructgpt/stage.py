"""What SFT, reward modelling, PPO and DPO do identically before and around their loops (flags,
distributed start, AdamW and the run directory, DDP, the optimizer step), so that each stage's
module is its paper's algorithm plus the loop."""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict

import torch
from torch.nn.parallel import DistributedDataParallel

from transformer.lora import LoRAConfig, adapters_disabled
from transformer.training import (
    ConfigError,
    Distributed,
    TrainingRun,
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    non_negative_int,
    seed_everything,
    select_dtype,
    setup_distributed,
)
from xllama import LlamaConfig
from xllama.tokenization import keep_tokenizer

from .checkpoints import model_config


def check_k(config) -> None:
    """A ranking needs at least two responses to compare."""
    if config.k < 2:
        raise ConfigError(f"{type(config).__name__}.k must be at least 2, got {config.k}")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


class AdaptersOff:
    """The frozen reference of DPO and PPO when the policy trains LoRA adapters: the policy itself
    with its adapters switched off, in eval mode and without gradients. That is W₀, the model the
    policy started from, so the reference costs no second copy of the weights."""

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        was_training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad(), adapters_disabled(self.policy):
                return self.policy(*args, **kwargs)
        finally:
            self.policy.train(was_training)


def reference_model(policy: torch.nn.Module, args):
    """What the policy is kept close to, taken before `start_run` (which may restore trained
    weights): with `--lora-rank`, the policy's base with its adapters off (no copy; the adapters
    go on in `start_run`), else a frozen copy of the policy as it is now."""
    if dataclass_from_args(LoRAConfig, args).lora_rank:
        return AdaptersOff(policy)
    return frozen_copy(policy)


def add_training_arguments(
    parser: argparse.ArgumentParser, config_class, name: str, checkpoint_unit: str = "steps"
) -> None:
    """The flags every training stage ends with: its config dataclass's fields, --checkpoint-every
    and the shared --device --dtype --seed --out --resume --compile."""
    add_dataclass_arguments(parser, config_class, name)
    add_dataclass_arguments(parser, LoRAConfig, "LoRA (Hu et al. 2021): train adapters only")
    parser.add_argument(
        "--checkpoint-every",
        type=non_negative_int,
        default=0,
        help=f"{checkpoint_unit} between checkpoints",
    )
    add_common_arguments(parser)


def start_stage(args) -> tuple[Distributed, torch.device, torch.dtype]:
    """Join the torchrun group if there is one, pick the autocast dtype, and seed every RNG."""
    dist, device = setup_distributed(args.device)
    dtype = select_dtype(args.dtype, device)
    seed_everything(args.seed)
    return dist, device, dtype


def start_run(
    args,
    *,
    stage: str,
    config,
    model: torch.nn.Module,
    kind: str,
    llama: LlamaConfig,
    tokenizer,
    dist: Distributed,
    device: torch.device,
    lr: float,
    weight_decay: float,
    extra_config: dict,
) -> tuple[TrainingRun, torch.optim.AdamW]:
    """AdamW (β = 0.9, 0.95) over `model`, and the run directory `args.out` that checkpoints both
    (resumed from `args.resume`; `config.json` says `{"kind": kind, "llama": llama}` and
    `{"stage": stage, **config}`), with the tokenizer's file kept beside it by the main process
    and named in `config.json`.

    With `--lora-rank R`, LoRA adapters go on `model` first and only they train (and a reward or
    value model's scalar head, which starts untrained); `config.json` records them under "lora"."""
    lora = dataclass_from_args(LoRAConfig, args)
    if lora.lora_rank:
        lora.apply(model, trainable=("head",))
        extra_config = {**extra_config, "lora": asdict(lora)}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        weight_decay=weight_decay,
        betas=(0.9, 0.95),
    )
    run = TrainingRun(
        args.out,
        package="instructgpt",
        model_config=model_config(kind, llama),
        train_config={"stage": stage, **asdict(config)},
        model=model,
        optimizer=optimizer,
        dist=dist,
        device=device,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_every=getattr(args, "checkpoint_every", 0),
        extra_config={**extra_config, "tokenizer": tokenizer.spec()},
    )
    if dist.is_main:
        keep_tokenizer(tokenizer, run.out)
    return run, optimizer


def ddp(model: torch.nn.Module, dist: Distributed) -> torch.nn.Module:
    """`model` wrapped for data-parallel gradients under torchrun; `model` itself otherwise."""
    return DistributedDataParallel(model) if dist.enabled else model


def optimizer_step(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, model: torch.nn.Module
) -> None:
    """One gradient step on `loss`, with the global gradient norm of `model` clipped to 1."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
