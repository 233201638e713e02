"""Benchmark: `transformer.dropout` against `torch.nn.functional.dropout` on the CPU.

    python benchmarks/dropout.py --threads 2

Forward + backward of inverted dropout (p = 0.1) over tensors the size of a Multi30k training
batch's activations (150 × 27 × 256 and 150 × 27 × 512 elements), in float32 and bfloat16, the two
one after the other on the same tensors in one process; reported is the median over --repeats of
milliseconds per million elements and the ratio (torch's time over ours).

Then attention with dropout on its weights (p again), forward + backward, at a Multi30k batch's
shape (150 sentences, 4 heads, 27 queries and keys of dimension 64; causal, as in the decoder):
`torch.nn.functional.scaled_dot_product_attention(dropout_p=p)`, which on a CPU falls back to
unfused math with a `bernoulli_` mask, against `transformer.attention.scaled_dot_product_attention`,
which takes Eq. 1 written out with the mask above there. Reported in milliseconds per call.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from transformer.attention import scaled_dot_product_attention  # noqa: E402
from transformer.dropout import dropout  # noqa: E402

SHAPES = [(150, 27, 256), (150, 27, 512)]
ATTENTION_SHAPE = (150, 4, 27, 64)


def time_one(fn, leaves, upstream: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of fn() forward and backward, the leaves' gradients cleared each time."""
    times = []
    for _ in range(repeats):
        for leaf in leaves:
            leaf.grad = None
        start = time.perf_counter()
        fn().backward(upstream)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def compare(theirs, ours, leaves, upstream: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Milliseconds per call of theirs and ours, after three warm-up calls of each."""
    for fn in (ours, theirs):
        time_one(fn, leaves, upstream, 3)
    return time_one(theirs, leaves, upstream, repeats), time_one(ours, leaves, upstream, repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per row (default: 50)")
    parser.add_argument("--p", type=float, default=0.1, help="drop probability (default: 0.1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__}, {args.threads} threads, p = {args.p}; ms per million elements"
    )
    print(f"{'shape':>16} {'dtype':>9} {'F.dropout':>10} {'ours':>8} {'ratio':>6}")
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dtype, requires_grad=True)
            upstream = torch.randn(shape, dtype=dtype)
            a, b = compare(
                lambda x=x: F.dropout(x, args.p),
                lambda x=x: dropout(x, args.p),
                [x], upstream, args.repeats,
            )  # fmt: skip
            a, b = (t / (x.numel() / 1e6) for t in (a, b))
            name = "×".join(map(str, shape))
            print(f"{name:>16} {str(dtype)[6:]:>9} {a:>10.2f} {b:>8.2f} {a / b:>5.1f}×")

    print(f"\nattention, causal, dropout p = {args.p}; ms per call, forward + backward")
    print(f"{'shape':>16} {'dtype':>9} {'F.sdpa':>10} {'ours':>8} {'ratio':>6}")
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(ATTENTION_SHAPE, dtype=dtype, requires_grad=True) for _ in range(3))
        upstream = torch.randn(ATTENTION_SHAPE, dtype=dtype)
        a, b = compare(
            lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                q, k, v, dropout_p=args.p, is_causal=True
            ),
            lambda q=q, k=k, v=v: scaled_dot_product_attention(q, k, v, None, True, args.p),
            [q, k, v], upstream, args.repeats,
        )  # fmt: skip
        name = "×".join(map(str, ATTENTION_SHAPE))
        print(f"{name:>16} {str(dtype)[6:]:>9} {a:>10.2f} {b:>8.2f} {a / b:>5.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
