"""Fine-tuning with LoRA and QLoRA against full fine-tuning, on real data, same steps and data.

    python benchmarks/lora.py --text ../shared/data/tinyshakespeare/input.txt --out runs/lora

1. Pretrain the `small` preset on the embedded corpus (`python -m xllama.train`'s default), or take
   `--base DIR`.
2. Fine-tune it on the text for `--steps` steps, once per method: full fine-tuning; LoRA on every
   linear layer at r = 1, 4, 8, 16, 64; QLoRA (NF4 base + LoRA r = 8); int8 base + LoRA r = 8.
   Each run is its own `xllama.train --init-from` process, one after another.
3. Report per method: validation loss at the end (the same held-out tail of the text), trainable
   parameters, weight memory (parameters and buffers as trained: the quantised base is smaller),
   the process's peak resident memory, and the median step time; and a plot of validation loss
   against trainable parameters (with matplotlib).

Also, without training: the 7B shape (`llama2-7b` on the meta device), the trainable parameters
and the bytes a QLoRA fine-tune holds (weights, adapters, gradients, AdamW state) against full
fine-tuning in fp32 with AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from transformer.lora import add_lora, trainable_parameters  # noqa: E402
from transformer.quantize import ABSMAX_BLOCK, NF4_BLOCK, quantize_model, weight_bytes  # noqa: E402
from xllama.convert import QUANTIZE_SKIP, load_checkpoint  # noqa: E402
from xllama.model import LLAMA2, Llama  # noqa: E402

# name: (lora rank, quantize, peak learning rate). Each kind has the better of the peak rates tried
# on this base (full: 1e-3 and 2e-3; LoRA r = 8: 5e-3, 1e-2 and 2e-2).
METHODS = {
    "full fine-tuning": (0, "none", 2e-3),
    "LoRA r=1": (1, "none", 1e-2),
    "LoRA r=4": (4, "none", 1e-2),
    "LoRA r=8": (8, "none", 1e-2),
    "LoRA r=16": (16, "none", 1e-2),
    "LoRA r=64": (64, "none", 1e-2),
    "QLoRA (NF4 + LoRA r=8)": (8, "nf4", 1e-2),
    "int8 + LoRA r=8": (8, "int8", 1e-2),
}
# Every linear layer gets adapters, the output head included: on this small base, fine-tuning to a
# new domain moves the head most (attention alone: validation loss +32% over full fine-tuning).
TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]


def run(args: list[str], threads: int) -> tuple[int, int]:
    """Run `python -m xllama.train ARGS`; (exit status, peak resident KB of that process)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "xllama.train", *args], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss


def weight_memory(base: Path, rank: int, quantize: str) -> tuple[int, int, int]:
    """(weight bytes, trainable parameters, parameters of the float model with its adapters) of
    the model as a method trains it."""
    model, _, _ = load_checkpoint(base)
    n_base = model.num_params()
    if quantize != "none":
        quantize_model(model, quantize, skip=QUANTIZE_SKIP)
    if rank:
        add_lora(model, TARGETS, rank, 2.0 * rank)
    trainable, _ = trainable_parameters(model)
    return weight_bytes(model), trainable, n_base + (trainable if rank else 0)


def metrics(run_dir: Path) -> tuple[float, float]:
    """(final validation loss, median step time in s)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = next(r["final_val_loss"] for r in rows if "final_val_loss" in r)
    config = json.loads((run_dir / "config.json").read_text())
    tokens = config["train"]["batch_size"] * config["model"]["max_seq_len"]
    steps = [tokens / r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    return final, statistics.median(steps[5:] or steps)


def seven_b() -> str:
    """QLoRA against full fine-tuning at Llama 2 7B's shape, counted on the meta device."""
    with torch.device("meta"):
        model = Llama(LLAMA2["llama2-7b"])
    n = model.num_params()
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and not name.endswith("output"))  # fmt: skip
    add_lora(model, ["wq", "wk", "wv", "wo"], 8, 16.0)
    adapters, _ = trainable_parameters(model)
    bits = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * ABSMAX_BLOCK)
    qlora_base = linear * bits / 8 + (n - linear) * 2  # NF4 linears, bf16 embeddings, norms, head
    qlora = qlora_base + adapters * 4 * 4  # adapters fp32: weights, gradients, AdamW m and v
    full = n * 4 * 4  # fp32 weights, gradients, AdamW m and v
    return "\n".join([
        "| llama2-7b | parameters | trainable | weights + gradients + AdamW state |",
        "|---|---|---|---|",
        f"| full fine-tuning (fp32) | {n / 1e9:.2f}B | {n / 1e9:.2f}B | {full / 2**30:.1f} GiB |",
        f"| QLoRA (NF4 base, LoRA r=8 on attention, fp32 adapters) | {n / 1e9:.2f}B | "
        f"{adapters / 1e6:.1f}M ({adapters / n:.3%}) | {qlora / 2**30:.1f} GiB "
        f"(base {qlora_base / 2**30:.1f} GiB) |",
    ])  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", type=Path, help="text to fine-tune on (Tiny Shakespeare)")
    parser.add_argument("--out", type=Path, default=Path("runs/lora"))
    parser.add_argument("--base", type=Path, help="pretrained run (default: train one first)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (tests)")
    args = parser.parse_args(argv)
    print(seven_b())
    if args.text is None:
        return 0
    if not args.text.is_file():
        print(f"error: {args.text} not found", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    common = ["--device", "cpu", "--sample-tokens", "0", "--checkpoint-every", "0", "--overwrite"]
    size = ["--config", "tiny", "--vocab-size", "300"] if args.smoke else []
    base = args.base
    if base is None:
        base = args.out / "base"
        code, _ = run([*size, *common, "--out", str(base)], args.threads)
        if code:
            return code
    rows = []
    for name in args.methods:
        rank, quantize, lr = METHODS[name]
        out = args.out / name.split(" (")[0].replace(" ", "-").replace("=", "").lower()
        flags = [*common, "--init-from", str(base), "--text", str(args.text), "--out", str(out)]
        flags += ["--steps", str(args.steps), "--lr", str(lr), "--min-lr", str(lr / 10)]
        flags += ["--time-limit", "0", "--eval-every", "0", "--warmup-steps", "20"]
        if rank:
            flags += ["--lora-rank", str(rank), "--lora-alpha", str(2 * rank), "--lora-targets"]
            flags += TARGETS
        if quantize != "none":
            flags += ["--quantize", quantize]
        code, peak_kb = run(flags, args.threads)
        if code:
            return code
        val, step_s = metrics(out)
        weights, trainable, total = weight_memory(base, rank, quantize)
        rows.append((name, val, trainable, total, weights, peak_kb, step_s))
    full = rows[0] if rows[0][0] == "full fine-tuning" else None
    print()
    print("| method | val loss | vs full | trainable params | weight MB | peak RSS MB | step ms |")
    print("|---|---|---|---|---|---|---|")
    for name, val, trainable, total, weights, peak_kb, step_s in rows:
        versus = f"{val / full[1] - 1:+.1%}" if full else "-"
        print(f"| {name} | {val:.4f} | {versus} | {trainable:,} ({trainable / total:.2%}) | "
              f"{weights / 1e6:.2f} | {peak_kb / 1024:.0f} | {step_s * 1e3:.0f} |")  # fmt: skip
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, val, trainable, *_ in rows:
        ax.scatter(trainable, val, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "lora.png", dpi=120)
    print(f"\nplot: {args.out / 'lora.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
