"""What the trainers share about optimisation: the decoder trainers' learning-rate schedule (Llama 2
§2.2, InstructGPT's stages: linear warm-up, then cosine decay) and the AdamW parameter groups that
put weight decay on matrices only. The Transformer's own Eq. (3) schedule is paper content and lives
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


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decoupled weight decay (Loshchilov & Hutter 2019) on the weight
    matrices and embeddings (every parameter of 2 or more dimensions), none on biases and norm gains.
    Frozen parameters are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
