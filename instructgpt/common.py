"""What every instructgpt command shares: tokenizers that travel with models, loading policies and
reward models from checkpoints (ours or xllama's), the set-up every training stage does alike
(flags, distributed start, AdamW and the run directory, DDP) and the data order of the loops.

A model written by an instructgpt command is a run directory of the shared `TrainingRun`
(`config.json`, `metrics.jsonl`, `checkpoints/step_N/`) with `tokenizer.bpe` beside them; its
`config.json` says `{"package": "instructgpt", "model": {"kind": "policy" | "reward",
"llama": LlamaConfig}}`. A base model may also be an xllama checkpoint (package "xllama").
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from transformer.training import (
    ConfigError,
    Distributed,
    TrainingRun,
    add_common_arguments,
    add_dataclass_arguments,
    find_checkpoint,
    load_weights,
    non_negative_int,
    read_config,
    seed_everything,
    select_dtype,
    setup_distributed,
)
from xllama import Llama, LlamaConfig

from .data import InstructGPTError
from .model import RewardModel

EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.bpe"


class TaskTokenizer:
    """A byte-level BPE tokenizer (the `tokenizer` package) with an end-of-sequence token.

    User text is always encoded as ordinary text: an "<|endoftext|>" written in a prompt stays text.
    """

    def __init__(self, bpe, path: Path | None = None):
        if EOS not in bpe.special_tokens:
            raise InstructGPTError(f"the tokenizer has no {EOS} token to end responses with")
        self.bpe, self.path = bpe, path
        self.eos_id = bpe.special_tokens[EOS]
        self.vocab_size = bpe.vocab_size

    @classmethod
    def train(cls, text: str, vocab_size: int) -> TaskTokenizer:
        from tokenizer import BPETokenizer

        return cls(BPETokenizer.train(text, vocab_size, special_tokens=[EOS], progress=False))

    @classmethod
    def load(cls, path: Path) -> TaskTokenizer:
        from tokenizer import BPETokenizer

        path = Path(path)
        return cls(BPETokenizer.load(path), path if path.is_file() else path / TOKENIZER_FILE)

    def save(self, directory: Path) -> Path:
        self.path = self.bpe.save(Path(directory) / TOKENIZER_FILE)
        return self.path

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.bpe.decode([i for i in ids if i != self.eos_id])

    def fingerprint(self) -> str:
        """A hash of the vocabulary: two models can share data only if these agree."""
        h = hashlib.sha256()
        for i in range(self.vocab_size):
            try:
                h.update(self.bpe.token_bytes(i) + b"\0")
            except Exception:  # ids the vocabulary skips
                h.update(b"\1")
        return h.hexdigest()[:16]


def find_tokenizer(path: Path) -> Path:
    """`tokenizer.bpe` in a checkpoint directory, its run directory, or `path` itself."""
    path = Path(path)
    for candidate in (path, path / TOKENIZER_FILE, path.parent.parent / TOKENIZER_FILE):
        if candidate.is_file() and candidate.name.endswith(".bpe"):
            return candidate
    raise InstructGPTError(
        f"no {TOKENIZER_FILE} found with {path} (looked in the checkpoint and its run directory)"
    )


def _llama_config(checkpoint: Path, kind: str | None) -> tuple[LlamaConfig, str]:
    config = read_config(checkpoint)
    package, model = config.get("package"), config.get("model", {})
    if package == "instructgpt":
        found = model.get("kind")
        if kind is not None and found != kind:
            raise InstructGPTError(f"{checkpoint} holds a {found} model, not a {kind} model")
        return LlamaConfig.from_dict(
            model.get("llama"), f"{checkpoint}/config.json: model.llama"
        ), found
    if package == "xllama":
        if kind == "reward":
            raise InstructGPTError(f"{checkpoint} is an xllama language model, not a reward model")
        llama = model.get("llama", model)
        return LlamaConfig.from_dict(llama, f"{checkpoint}/config.json: model"), "policy"
    raise InstructGPTError(
        f"{checkpoint} is a checkpoint of {package!r}; expected an instructgpt or xllama model"
    )


def load_policy(path: Path, device=None) -> tuple[Llama, TaskTokenizer, Path]:
    """A language model (base, SFT, PPO or DPO policy) and its tokenizer from a run or checkpoint
    directory. Returns (model, tokenizer, checkpoint directory)."""
    path = Path(path)
    if (path / "policy" / "model.safetensors").is_file():  # a PPO or DPO run directory
        path = path / "policy"
    checkpoint = find_checkpoint(path)
    config, _ = _llama_config(checkpoint, "policy")
    model = Llama(config)
    load_weights(checkpoint, model)
    return model.to(device or "cpu"), TaskTokenizer.load(find_tokenizer(checkpoint)), checkpoint


def load_reward_model(path: Path, device=None) -> tuple[RewardModel, TaskTokenizer, Path]:
    checkpoint = find_checkpoint(Path(path))
    config, _ = _llama_config(checkpoint, "reward")
    model = RewardModel(config)
    load_weights(checkpoint, model)
    return model.to(device or "cpu"), TaskTokenizer.load(find_tokenizer(checkpoint)), checkpoint


def model_config(kind: str, config: LlamaConfig) -> dict:
    return {"kind": kind, "llama": config.to_dict()}


def check_same_tokenizer(a: TaskTokenizer, b: TaskTokenizer, what_a: str, what_b: str) -> None:
    if a.fingerprint() != b.fingerprint():
        raise InstructGPTError(
            f"the {what_a} and the {what_b} use different tokenizers "
            f"({a.path} vs {b.path}); they must share one vocabulary"
        )


def check_k(config) -> None:
    """A ranking needs at least two responses to compare."""
    if config.k < 2:
        raise ConfigError(f"{type(config).__name__}.k must be at least 2, got {config.k}")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


# ------------------------------------------------------------------------------------------------
# Training-stage set-up: what SFT, reward modelling, PPO and DPO do identically before and around
# their loops, so that each stage's module is its paper's algorithm plus the loop.


def add_training_arguments(
    parser: argparse.ArgumentParser, config_class, name: str, checkpoint_unit: str = "steps"
) -> None:
    """The flags every training stage ends with: its config dataclass's fields, --checkpoint-every
    and the shared --device --dtype --seed --out --resume --compile."""
    add_dataclass_arguments(parser, config_class, name)
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
    stage: str,
    config,
    model: torch.nn.Module,
    kind: str,
    llama: LlamaConfig,
    tokenizer: TaskTokenizer,
    dist: Distributed,
    device: torch.device,
    *,
    lr: float,
    weight_decay: float,
    extra_config: dict,
) -> tuple[TrainingRun, torch.optim.AdamW]:
    """AdamW (β = 0.9, 0.95) over `model`, and the run directory `args.out` that checkpoints both
    (resumed from `args.resume`; `config.json` says `{"kind": kind, "llama": llama}` and
    `{"stage": stage, **config}`), with the tokenizer saved beside it by the main process."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95)
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
        extra_config=extra_config,
    )
    if dist.is_main:
        tokenizer.save(run.out)
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


# ------------------------------------------------------------------------------------------------
# Training-loop helpers


class EpochSampler:
    """Indices of a dataset in a fresh random order each epoch, resumable from a plain dict.

    `next_batch(n)` returns the next n indices of the global batch; every rank draws the same
    indices and takes its own slice (`rank_slice`), so a torchrun job sees the same data as one
    process.
    """

    def __init__(self, size: int, seed: int, state: dict | None = None):
        if size == 0:
            raise InstructGPTError("no training examples")
        self.size, self.seed = size, seed
        state = state or {}
        self.epoch, self.position = int(state.get("epoch", 0)), int(state.get("position", 0))
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next_batch(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(n - len(out), self.size - self.position)
            out += self._order[self.position : self.position + take]
            self.position += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def rank_slice(items: list, rank: int, world_size: int) -> list:
    """This rank's contiguous share of a global batch (its size must divide evenly)."""
    if len(items) % world_size:
        raise InstructGPTError(
            f"the batch size ({len(items)}) must be divisible by the number of processes "
            f"({world_size})"
        )
    per = len(items) // world_size
    return items[rank * per : (rank + 1) * per]


def cosine_lr(step: int, total: int, base: float, warmup: int = 0, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine decay from `base` to `floor · base`."""
    import math

    if warmup and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
