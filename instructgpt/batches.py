"""The data order of the training loops: a resumable epoch sampler and each rank's share."""

from __future__ import annotations

import torch

from .data import InstructGPTError


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
