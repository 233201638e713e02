"""Benchmark: FlashAttention's tiling in PyTorch against the explicit path and the fused kernel.

    python benchmarks/attention.py --threads 2                  # memory at 1k/4k/16k, then time

Causal self-attention, batch 1, one head of dimension 64, float32, forward + backward (the
gradients of q, k and v), through `transformer.attention.scaled_dot_product_attention` with each
kernel:
  reference  softmax(QKᵀ/√d)V written out: the T×T scores and probabilities are formed and saved
  flash      `flash_attention`, tiles of --block queries × --block keys: only O and the log-sum-exp
             are saved, the backward recomputes each tile
  fused      torch.nn.functional.scaled_dot_product_attention (PyTorch's own fused CPU kernel)

Memory: each (kernel, N) runs in a fresh process; reported is its peak resident memory during
forward + backward minus the peak before it (inputs and a warm-up included in the latter), so the
number is what the attention itself needed. Time: one process, the kernels interleaved, the
median over --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from transformer.attention import flash_attention, scaled_dot_product_attention  # noqa: E402

HEAD_DIM = 64


def inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, n, HEAD_DIM, generator=g).requires_grad_() for _ in range(3)]


def forward_backward(kernel: str, q, k, v, block: int) -> None:
    if kernel == "flash":
        out = flash_attention(q, k, v, is_causal=True, block_q=block, block_k=block)
    else:
        out = scaled_dot_product_attention(q, k, v, is_causal=True, kernel=kernel)
    out.sum().backward()


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_memory(kernel: str, n: int, block: int) -> dict:
    """Run in a child process: the extra peak resident memory of one forward + backward."""
    forward_backward(kernel, *inputs(256), block)  # warm-up: kernels, allocator, thread pools
    q, k, v = inputs(n)
    before = peak_mib()
    start = time.perf_counter()
    forward_backward(kernel, q, k, v, block)
    return {"peak_mib": peak_mib() - before, "seconds": time.perf_counter() - start}


def memory_table(sizes: list[int], block: int, threads: int, limit_mib: float) -> None:
    print("\n| N | reference: peak extra memory | flash | fused | T×T float32 matrix |")
    print("|---|---|---|---|---|")
    for n in sizes:
        cells = []
        for kernel in ("reference", "flash", "fused"):
            matrix_mib = n * n * 4 / 2**20
            if kernel == "reference" and 5 * matrix_mib > limit_mib:
                cells.append(f"not run (≈{5 * matrix_mib / 1024:.0f} GiB)")
                continue
            cmd = [sys.executable, __file__, "--child", kernel, str(n), "--block", str(block)]
            cmd += ["--threads", str(threads)]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            cells.append(f"{r['peak_mib']:.0f} MiB ({r['seconds']:.1f} s)")
        print(f"| {n:,} | {' | '.join(cells)} | {n * n * 4 / 2**20:.0f} MiB |")


def time_table(sizes: list[int], block: int, repeats: int) -> None:
    print(
        f"\n| N | reference (ms) | flash, tiles {block}×{block} (ms) | fused (ms) | flash / fused |"
    )
    print("|---|---|---|---|---|")
    for n in sizes:
        q, k, v = inputs(n)
        times = {kernel: [] for kernel in ("reference", "flash", "fused")}
        for kernel in times:
            forward_backward(kernel, q, k, v, block)  # warm-up
        for _ in range(repeats):
            for kernel in times:  # interleaved: every kernel sees the same load
                for t in (q, k, v):
                    t.grad = None
                start = time.perf_counter()
                forward_backward(kernel, q, k, v, block)
                times[kernel].append(time.perf_counter() - start)
        ms = {kernel: statistics.median(t) * 1e3 for kernel, t in times.items()}
        print(
            f"| {n:,} | {ms['reference']:.1f} | {ms['flash']:.1f} | {ms['fused']:.1f} | "
            f"{ms['flash'] / ms['fused']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--block", type=int, default=256, help="flash tile size (queries = keys)")
    parser.add_argument("--memory-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--time-sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--limit-mib",
        type=float,
        default=12 * 1024,
        help="skip the reference where about 5 T×T matrices would exceed this (MiB)",
    )
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("KERNEL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure_memory(args.child[0], int(args.child[1]), args.block)))
        return
    threads = torch.get_num_threads()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {threads} threads; causal, batch 1, 1 head, d {HEAD_DIM}"
    )
    if not args.skip_memory:
        memory_table(args.memory_sizes, args.block, threads, args.limit_mib)
    if not args.skip_time:
        time_table(args.time_sizes, args.block, args.repeats)


if __name__ == "__main__":
    main()
