"""The learning-rate schedule the decoder trainers share (Llama 2 §2.2, InstructGPT's stages):
linear warm-up, then cosine decay. The Transformer's own Eq. (3) schedule is paper content and lives
in `transformer.model`."""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    step: int,
    total: int,
    peak: float,
    final: float,
    warmup: int = 0,
    progress: float | None = None,
) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to `final` at step `total`.

    `progress` in [0, 1] (e.g. the fraction of a time budget used) replaces the step-based
    progress (step − warmup) / (total − warmup) after the warm-up.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, max(0.0, progress))
    return final + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - final)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
