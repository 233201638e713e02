"""Speculative decoding against plain decoding of the target, same process, interleaved repeats.

    T=../shared/data/tinyshakespeare/input.txt
    C="--config shakespeare-char --text $T --tokenizer char --max-seq-len 128 --steps 100000"
    python -m xllama.train $C --dim 512 --n-layers 8 --n-heads 8 --n-kv-heads 8 --lr 1e-3 \\
        --min-lr 1e-4 --time-limit 25 --out runs/spec-target
    python -m xllama.train $C --n-layers 2 --time-limit 3 --out runs/spec-draft
    python benchmarks/speculative.py --target runs/spec-target --draft runs/spec-draft --text $T

For each k (tokens the draft proposes per round) and each temperature: the draft's acceptance
rate, the tokens made per target pass, tokens/s, and the speed-up over the target decoding alone
(`xllama.sampling.generate`, eager, the same prompts: 16-character windows of the validation text).
Greedy speculation gives exactly the target's tokens (checked here on every prompt).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xllama.convert import load_checkpoint  # noqa: E402
from xllama.data import read_texts, split_train_val  # noqa: E402
from xllama.sampling import generate  # noqa: E402
from xllama.speculative import speculative_generate  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True, help="the text both trained on")
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    parser.add_argument("--new", type=int, default=96, help="tokens generated per prompt")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, tokenizer, _ = load_checkpoint(args.target)
    draft, _, _ = load_checkpoint(args.draft)
    target.eval(), draft.eval()
    val = split_train_val(tokenizer.encode(read_texts([args.text])), 0.1)[1].tolist()
    prompts = [val[i * 1000 : i * 1000 + 16] for i in range(args.prompts)]
    print(f"target {target.num_params() / 1e6:.2f}M parameters, draft "
          f"{draft.num_params() / 1e6:.2f}M; {args.prompts} prompts x {args.new} new tokens, "
          f"{args.threads} threads")  # fmt: skip
    print()
    print(
        "| temperature | k | acceptance | tokens / target pass | tok/s | plain tok/s | speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for temperature in args.temperatures:
        times = {"plain": []} | {k: [] for k in args.ks}
        stats = {k: [] for k in args.ks}
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            for key in times:
                start = time.perf_counter()
                for i, prompt in enumerate(prompts):
                    gen = torch.Generator().manual_seed(1000 * repeat + i)
                    if key == "plain":
                        generate(target, [prompt], args.new, temperature=temperature,
                                 generator=gen)  # fmt: skip
                        continue
                    tokens, s = speculative_generate(target, draft, prompt, args.new, k=key,
                                                     temperature=temperature, generator=gen)  # fmt: skip
                    stats[key].append(s)
                    if temperature == 0 and repeat == 0:
                        plain = generate(target, [prompt], args.new, temperature=0)[0]
                        assert tokens == plain, "greedy speculation left the target's tokens"
                if repeat:
                    times[key].append(time.perf_counter() - start)
        made = args.new * len(prompts)
        plain_speed = made / statistics.median(times["plain"])
        for k in args.ks:
            drafted = sum(s.drafted for s in stats[k])
            accepted = sum(s.accepted for s in stats[k])
            rounds = sum(s.rounds for s in stats[k])
            speed = made / statistics.median(times[k])
            print(f"| {temperature:g} | {k} | {accepted / drafted:.0%} | "
                  f"{made * len(stats[k]) / len(prompts) / rounds:.2f} | {speed:.0f} | "
                  f"{plain_speed:.0f} | {speed / plain_speed:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
