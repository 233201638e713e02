"""A chat's later turns: keeping the KV cache of the dialog so far (`xllama.generate --chat`,
`TurnCache`) against reading the whole dialog again each turn (what `generate` does without it),
same model, same prompts, one process.

    python benchmarks/chat.py [--threads 2] [--dim 1024] [--layers 8] [--turns 4] [--chars 800]

A random Llama 3-shaped model (GQA 16/4 heads, context 2,048) and a Llama 3-style tokenizer made
here (a BPE of the embedded corpus as Meta-style tiktoken ranks, Llama 3's special tokens after
them; nothing is downloaded). Each turn adds a user message of `--chars` characters of the
embedded corpus and asks for 16 greedy tokens; reported per turn: the prompt's length, the tokens
the cache kept, and both times (best of `--repeats`).
"""

from __future__ import annotations

import argparse
import base64
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, not benchmarks/

from tokenizer import BPETokenizer, embedded_corpus  # noqa: E402
from xllama import Llama, LlamaConfig  # noqa: E402
from xllama.chat import TurnCache, dialog_prompt  # noqa: E402
from xllama.sampling import generate  # noqa: E402
from xllama.tokenization import Tiktoken  # noqa: E402


def llama3_style_tokenizer(directory: Path) -> Tiktoken:
    bpe = BPETokenizer.train(embedded_corpus(), 1000, progress=False)
    path = directory / "tokenizer.model"
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(bpe.token_bytes(i)).decode()} {i}\n" for i in range(1000))
    return Tiktoken(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--chars", type=int, default=800, help="characters per user message")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = llama3_style_tokenizer(Path(tempfile.mkdtemp()))
    torch.manual_seed(0)
    config = LlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=16, n_kv_heads=4,
                         vocab_size=tokenizer.vocab_size, max_seq_len=2048)  # fmt: skip
    model = Llama(config).eval()
    print(f"{model.num_params() / 1e6:.1f}M parameters, {args.threads} threads, float32")
    text = embedded_corpus()
    dialog = [{"role": "system", "content": "Be brief."}]
    turns = TurnCache(model)
    print(
        f"{'turn':>4} {'prompt':>7} {'kept':>6} {'read again (s)':>15} {'kept cache (s)':>15} ratio"
    )
    for t in range(args.turns):
        dialog.append({"role": "user", "content": text[t * 2000 : t * 2000 + args.chars]})
        ids = dialog_prompt(tokenizer, dialog, "llama3")
        fresh = kept_time = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            generate(model, [ids], 16, temperature=0)
            fresh = min(fresh, time.perf_counter() - start)
        held = list(turns.held)
        for _ in range(args.repeats):
            turns.held = held
            start = time.perf_counter()
            cache = turns.cache_for(ids)
            kept = cache.length
            new = generate(model, [ids], 16, temperature=0, cache=cache)[0]
            kept_time = min(kept_time, time.perf_counter() - start)
            turns.remember(ids + new)
        dialog.append({"role": "assistant", "content": tokenizer.decode(new)})
        print(f"{t + 1:>4} {len(ids):>7} {kept:>6} {fresh:>15.2f} {kept_time:>15.2f} "
              f"{fresh / kept_time:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
