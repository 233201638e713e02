"""Dropout (Srivastava et al. 2014), the regulariser of §5.4, with a cheaper mask on CPUs.

During training each element is zeroed with probability p and the kept ones are scaled by the
inverse of the keep probability, so the expected output is the input ("inverted" dropout, as
`torch.nn.Dropout`); at evaluation the input passes unchanged.

The only difference from `torch.nn.functional.dropout` is how the mask is drawn on a CPU. PyTorch's
CPU kernel draws one random number per element (`bernoulli_`: 9 ms per million elements on a
2-core CPU, a fifth of a Transformer training step there). Here one 64-bit random word gives four
16-bit pieces, each masked to a uniform integer in [0, 2^15) (the generator's words have 63 random
bits); an element is dropped when its integer is below t = round(p · 2^15), and the kept ones are
scaled by 2^15 / (2^15 − t), the exact inverse of the keep probability. The drop probability is
t / 2^15, within 1.6e-5 of p (0.1000061 for p = 0.1), and the expectation stays exact. On other
devices torch's own kernel runs: on a GPU it is one fused kernel with a counter-based generator, and
the four operations here would only add memory traffic. `benchmarks/dropout.py` times the two on
a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LEVELS = 1 << 15  # uniform integers per draw: the drop probability is a multiple of 1 / LEVELS


def checked_rate(p: float) -> float:
    """p itself, or a ValueError when it is not a drop probability in [0, 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return p


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Zero each element of `x` with probability p and scale the rest by 1 / (1 − p)."""
    threshold = round(checked_rate(p) * LEVELS)
    if not training or threshold == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
    kept = (words.view(torch.int16)[:n].view(x.shape) & (LEVELS - 1)) >= threshold
    return torch.where(kept, x, 0).mul_(LEVELS / (LEVELS - threshold))


class Dropout(nn.Module):
    """`dropout` as a module: active in training mode, the identity in evaluation mode."""

    def __init__(self, p: float):
        super().__init__()
        self.p = checked_rate(p)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
