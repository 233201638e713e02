"""Supervised fine-tuning (InstructGPT §3.5 "SFT"): train the policy on prompt → demonstration pairs.

    python -m instructgpt.sft --model BASE_RUN --out runs/sft [--data demos.jsonl]

The loss is next-token cross-entropy on the response tokens only; prompt tokens are conditioning.
Without --data, the demonstrations are the embedded task's: openings of sentences from the Python
documentation and their real continuations (see instructgpt/data.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.nn.parallel import DistributedDataParallel

from transformer.cli import (
    add_common_arguments,
    add_dataclass_arguments,
    dataclass_from_args,
    run_command,
)
from transformer.run import TrainingRun
from transformer.runtime import autocast, seed_everything, select_dtype, setup_distributed

from .common import EpochSampler, cosine_lr, load_policy, model_config, rank_slice, set_lr
from .data import (
    Demonstration,
    InstructGPTError,
    collate,
    encode_pair,
    read_demonstrations,
    task_demonstrations,
    task_prompts,
)
from .model import sample_responses, sft_loss


@dataclass
class SFTConfig:
    steps: int = 300
    """optimizer steps"""
    batch_size: int = 32
    """demonstrations per step (the global batch, split over processes)"""
    lr: float = 3e-4
    """peak learning rate (cosine decay to a tenth)"""
    warmup: int = 20
    """linear warm-up steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_len: int = 64
    """longest prompt + response in tokens (longer responses are cut)"""
    padding_side: Literal["right", "left"] = "right"
    """pad batches on the right or left (results are the same; a flag for the tests)"""


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="base model: a run or checkpoint directory of xllama or instructgpt (with tokenizer.bpe)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help='JSONL of {"prompt", "response"} demonstrations (default: the embedded task)',
    )


def train_sft(
    args, config: SFTConfig, demonstrations: list[Demonstration] | None = None
) -> TrainingRun:
    dist, device = setup_distributed(args.device)
    dtype = select_dtype(args.dtype, device)
    seed_everything(args.seed)
    if config.steps < 1 or config.batch_size < 1 or config.lr <= 0:
        raise InstructGPTError("--steps, --batch-size and --lr must be positive")
    policy, tokenizer, base = load_policy(args.model, device)
    if demonstrations is None:
        demonstrations = read_demonstrations(args.data) if args.data else task_demonstrations()
    max_len = min(config.max_len, policy.config.max_seq_len)
    examples = [encode_pair(tokenizer, d.prompt, d.response, max_len) for d in demonstrations]
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95)
    )
    run = TrainingRun(
        args.out,
        package="instructgpt",
        model_config=model_config("policy", policy.config),
        train_config={"stage": "sft", **asdict(config)},
        model=policy,
        optimizer=optimizer,
        dist=dist,
        device=device,
        resume=args.resume,
        checkpoint_every=getattr(args, "checkpoint_every", 0),
        extra_config={"base_model": str(base), "data": str(args.data or "embedded task")},
    )
    if dist.is_main:
        tokenizer.save(run.out)
    model = DistributedDataParallel(policy) if dist.enabled else policy
    sampler = EpochSampler(len(examples), args.seed, run.data_state)
    policy.train()
    for step in run.steps(config.steps, desc="sft"):
        indices = rank_slice(sampler.next_batch(config.batch_size), dist.rank, dist.world_size)
        batch = collate([examples[i] for i in indices], tokenizer.eos_id, config.padding_side)
        batch = batch.to(device)
        set_lr(optimizer, cosine_lr(step, config.steps, config.lr, config.warmup))
        with autocast(device, dtype):
            logits = model(batch.tokens, attention_mask=batch.attention_mask)
        loss = sft_loss(logits, batch.tokens, batch.response_mask)
        run.check_finite(loss.detach(), step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        run.log(step, loss=dist.all_reduce_mean(loss.detach()).item(), epoch=sampler.epoch)
        run.end_of_step(step, sampler.state())
    run.save(config.steps, sampler.state())
    if dist.is_main:
        print_samples(run, policy, tokenizer, task_prompts("heldout")[:3], max_len)
    dist.close()
    return run


def print_samples(run, policy, tokenizer, prompts, max_len: int, max_new_tokens: int = 32) -> None:
    """Greedy continuations of a few held-out prompts, so a person can see what training did."""
    max_new_tokens = min(max_new_tokens, policy.config.max_seq_len - max_len // 2)
    ids = [tokenizer.encode(p) for p in prompts]
    outs = sample_responses(policy, ids, max_new_tokens, tokenizer.eos_id, temperature=0.0)
    for prompt, out in zip(prompts, outs):
        run.write(f"  {prompt!r} -> {tokenizer.decode(out)!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="instructgpt.sft", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_data_arguments(parser)
    add_dataclass_arguments(parser, SFTConfig, "SFT")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    config = dataclass_from_args(SFTConfig, args)
    train_sft(args, config)
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="instructgpt-sft"))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="instructgpt.sft"))
