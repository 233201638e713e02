"""Where and how a command runs: device, precision, seeding and `torchrun` process groups."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .errors import UserError


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is a user error.

    On the CPU it also calls `keep_freed_memory`.
    """
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps asked for, but MPS is not available")
    device = torch.device(name)
    if device.type == "cpu":
        keep_freed_memory()
    return device


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process; returns whether it could.

    By default glibc serves large blocks (every block above 32 MB, such as a batch's logits) with
    fresh `mmap` pages and hands them back on `free`, and trims the top of its heap: every step
    then faults its big tensors in again, page by page. Turning both off (`mallopt`, as
    `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` would at start-up) made the Multi30k training
    step 12% faster on 2 CPU cores (transformer/README.md); jemalloc or tcmalloc, which PyTorch's
    CPU performance notes suggest, do the same. Freed memory stays with the process until it
    exits. A no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl)
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from <malloc.h>
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def select_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast compute dtype: `auto` is bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass (weights stay float32); a no-op for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Distributed:
    """This process's place in a `torchrun` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """True if `setup_distributed` joined the process group for this object: only then does `close`
    leave it (a caller that joined first, e.g. a pipeline running several commands, keeps it)"""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Average a tensor over processes (for logging losses that each rank computed)."""
        if not self.enabled:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if `flag` is True on any (used to stop all ranks on the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device_name: str = "auto") -> tuple[Distributed, torch.device]:
    """Join the `torchrun` process group if launched by it (gloo on CPU, NCCL on GPU).

    Returns this process's `Distributed` and its device (cuda:LOCAL_RANK on GPU). Called again in
    the same process (several commands in one job), it reuses the group, and only the first
    `Distributed` closes it.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(), select_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return Distributed(rank, world, local_rank), device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Distributed(rank, world, local_rank, owns_group=True), device
