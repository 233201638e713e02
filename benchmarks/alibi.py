"""ALiBi's result in miniature (Press et al. 2022, Figure 1): train short, read long.

Train a RoPE and an ALiBi model of the same size on Tiny Shakespeare with context 64:

    T=../shared/data/tinyshakespeare/input.txt
    C="--config shakespeare-char --text $T --tokenizer char --steps 3000 --time-limit 0"
    python -m xllama.train $C --position rope --out runs/pos-rope
    python -m xllama.train $C --position alibi --out runs/pos-alibi

then evaluate both, without fine-tuning, at longer inputs:

    python benchmarks/alibi.py --runs rope=runs/pos-rope alibi=runs/pos-alibi --text $T \\
        --plot runs/alibi.png

Each model reads the same validation tokens (the held-out tail its run trained without) cut into
non-overlapping windows of L tokens, L = 64 ... 1024, and the validation loss is the mean over every
predicted token of every window (the paper's non-overlapping evaluation). Positions past the
training context are simply given: RoPE rotates by angles it never saw, ALiBi adds distances it
never saw.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xllama.convert import load_checkpoint  # noqa: E402
from xllama.data import read_texts, split_train_val  # noqa: E402
from xllama.model import Llama, loss_fn  # noqa: E402

LENGTHS = (64, 128, 256, 512, 1024)


def longer_context(model: Llama, max_len: int) -> Llama:
    """The same weights with tables (RoPE) built for `max_len` positions."""
    longer = Llama(replace(model.config, max_seq_len=max_len))
    longer.load_state_dict(model.state_dict())
    return longer.eval()


@torch.no_grad()
def window_loss(model: Llama, ids: torch.Tensor, length: int, batch: int = 8) -> float:
    """Mean next-token loss over `ids` cut into non-overlapping windows of `length` tokens."""
    windows = ids[: len(ids) // (length + 1) * (length + 1)].view(-1, length + 1)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i : i + batch]
        loss = loss_fn(model(chunk[:, :-1]), chunk[:, 1:])
        total += float(loss) * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    return total / count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_DIR, one per model")
    parser.add_argument("--text", type=Path, required=True, help="the text the runs trained on")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as the runs used")
    parser.add_argument("--tokens", type=int, default=65536, help="validation tokens read")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, help="write the figure here (needs matplotlib)")
    parser.add_argument("--json", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = read_texts([args.text])
    table = {}
    for spec in args.runs:
        name, _, directory = spec.partition("=")
        model, tokenizer, config = load_checkpoint(Path(directory))
        val = split_train_val(tokenizer.encode(text), args.val_fraction)[1]
        val = val[: args.tokens + max(args.lengths) + 1]
        trained = model.config.max_seq_len
        model = longer_context(model, max(args.lengths))
        table[name] = {"trained_context": trained, "position": model.config.position}
        for length in args.lengths:
            table[name][length] = window_loss(model, val, length)
            print(f"{name:>8}  L={length:5d}  val loss {table[name][length]:.4f}", flush=True)
    print()
    print("| model | " + " | ".join(f"L = {n}" for n in args.lengths) + " |")
    print("|---|" + "---:|" * len(args.lengths))
    for name, row in table.items():
        cells = " | ".join(f"{row[n]:.3f}" for n in args.lengths)
        print(f"| {name} (trained at {row['trained_context']}) | {cells} |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4))
        for name, row in table.items():
            ax.plot(args.lengths, [row[n] for n in args.lengths], marker="o", label=name)
        ax.axvline(next(iter(table.values()))["trained_context"], color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.lengths, [str(n) for n in args.lengths])
        ax.set_xlabel("evaluation length (tokens); dotted: training length")
        ax.set_ylabel("validation loss (nats / char)")
        top = min(max(max(row[n] for n in args.lengths) for row in table.values()), 6.0)
        ax.set_ylim(top=top * 1.05 if math.isfinite(top) else None)
        ax.set_title("Train short, test long (Tiny Shakespeare)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"figure: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
