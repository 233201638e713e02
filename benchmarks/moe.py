"""Dense against sparse mixture of experts on Tiny Shakespeare, same active parameters, same steps.

    T=../shared/data/tinyshakespeare/input.txt
    C="--config shakespeare-char --text $T --tokenizer char --steps 3000 --time-limit 0"
    python -m xllama.train $C --out runs/moe-dense
    M="--n-experts 8 --experts-per-token 2 --ffn-hidden-dim 176"
    python -m xllama.train $C $M --out runs/moe-balanced
    python -m xllama.train $C $M --router-aux-loss-coef 0 --out runs/moe-free
    python benchmarks/moe.py --runs dense=runs/moe-dense balanced=runs/moe-balanced \\
        free=runs/moe-free --text $T --plot runs/moe.png

The dense model's SwiGLU has hidden size 352 (Llama's rule for dim 128); each of the 8 experts has
176, so a token's two experts hold as many parameters as the dense FFN. "balanced" trains with the
Switch load-balancing loss (coefficient 0.01), "free" without it.

Reports per run: validation loss at the end (on the held-out tail, as `xllama.train` estimates it)
and the best one logged, training wall time (the run's own clock), total and active parameters; for
the MoE runs the share of the (token, expert) assignments each expert gets, per layer, on the
validation text, and a figure of those histograms.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xllama.convert import load_checkpoint  # noqa: E402
from xllama.data import read_texts, split_train_val  # noqa: E402
from xllama.model import Llama, MoEFeedForward  # noqa: E402


def active_parameters(model: Llama) -> int:
    """Parameters one token goes through: all, less the experts it is not routed to."""
    n = model.num_params()
    for layer in model.modules():
        if isinstance(layer, MoEFeedForward):
            per_expert = sum(p.numel() for p in layer.experts[0].parameters())
            n -= (len(layer.experts) - layer.top_k) * per_expert
    return n


@torch.no_grad()
def expert_usage(model: Llama, ids: torch.Tensor, windows: int = 64) -> torch.Tensor:
    """(layers, experts): each expert's share of the top-k assignments on `windows` windows."""
    length = model.config.max_seq_len
    batch = ids[: windows * length].view(windows, length)
    model.eval()(batch)
    rows = []
    for layer in model.modules():
        if isinstance(layer, MoEFeedForward):
            rows.append(layer.expert_load / layer.expert_load.sum())
    return torch.stack(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_DIR, one per model")
    parser.add_argument("--text", type=Path, required=True, help="the text the runs trained on")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as the runs used")
    parser.add_argument("--plot", type=Path, help="write the usage histograms here (matplotlib)")
    parser.add_argument("--json", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    text = read_texts([args.text])
    table = {}
    for spec in args.runs:
        name, _, directory = spec.partition("=")
        rows = [json.loads(line) for line in (Path(directory) / "metrics.jsonl").open()]
        steps = [r for r in rows if "loss" in r]
        model, tokenizer, _ = load_checkpoint(Path(directory))
        entry = {
            "final_val_loss": next(r["final_val_loss"] for r in rows if "final_val_loss" in r),
            "best_val_loss": min(r["val_loss"] for r in rows if "val_loss" in r),
            "steps": len(steps),
            "wall_s": steps[-1]["time"] - steps[0]["time"],
            "params": model.num_params(),
            "active_params": active_parameters(model),
        }
        if model.config.n_experts is not None:
            val = split_train_val(tokenizer.encode(text), args.val_fraction)[1]
            entry["usage"] = expert_usage(model, val).tolist()
        table[name] = entry
    print("| model | params | active / token | steps | val loss (end) | best logged | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, e in table.items():
        print(f"| {name} | {e['params'] / 1e6:.2f}M | {e['active_params'] / 1e6:.2f}M | "
              f"{e['steps']} | {e['final_val_loss']:.4f} | {e['best_val_loss']:.4f} | "
              f"{e['wall_s']:.0f} |")  # fmt: skip
    for name, e in table.items():
        if "usage" not in e:
            continue
        print(f"\n{name}: share of assignments per expert (uniform = {1 / len(e['usage'][0]):.3f})")
        print(
            "| layer | " + " | ".join(f"E{i}" for i in range(len(e["usage"][0]))) + " | max/min |"
        )
        print("|---|" + "---:|" * (len(e["usage"][0]) + 1))
        for i, row in enumerate(e["usage"]):
            spread = max(row) / max(min(row), 1e-9)
            print(f"| {i} | " + " | ".join(f"{f:.3f}" for f in row) + f" | {spread:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    moe = {name: e for name, e in table.items() if "usage" in e}
    if args.plot and moe:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(moe), figsize=(4.2 * len(moe), 3.2), sharey=True)
        axes = [axes] if len(moe) == 1 else axes
        for ax, (name, e) in zip(axes, moe.items()):
            usage = torch.tensor(e["usage"])
            layers, experts = usage.shape
            width = 0.8 / layers
            for i in range(layers):
                ax.bar(torch.arange(experts) + i * width, usage[i], width, label=f"layer {i}")
            ax.axhline(1 / experts, color="grey", ls=":", lw=1)
            ax.set_xticks(torch.arange(experts) + 0.4 - width / 2, [str(i) for i in range(experts)])
            ax.set_xlabel("expert")
            ax.set_title(f"{name} (val loss {e['final_val_loss']:.3f})")
        axes[0].set_ylabel("share of top-2 assignments")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nfigure: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
