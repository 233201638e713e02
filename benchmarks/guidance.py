"""Classifier-free guidance sweep (Ho & Salimans 2022, Fig. 2 / Table 1): fidelity against diversity.

    python benchmarks/guidance.py --checkpoint runs/mnist-cfg --n 1000 --steps 50 \
        --weights 0 0.3 1 2 4 --out dali/assets

For each guidance weight w, the same noise and the same balanced labels (n / 10 of each class) go
through `dali.pipeline.generate` (DDIM, EMA weights, ε̃ = (1 + w) ε(x, c) − w ε(x, ∅)); the samples
are scored with `dali.evaluate.measure_quality`: Fréchet distance to real images in the project's
classifier's feature space (against the real-vs-real floor), the fraction the classifier assigns
to the requested class, and the fraction it reads with confidence ≥ 0.9. Writes a Markdown table
on stdout, `guidance_sweep.json`, `guidance_sweep.png` (both curves against w) and
`guidance_grid.png` (one row per class at the w with the highest requested-class accuracy, or at
`--grid-weight`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from dali.data import load_images, save_grid  # noqa: E402
from dali.evaluate import measure_quality  # noqa: E402
from dali.pipeline import generate, load_ddpm, requested_labels  # noqa: E402
from dali.quality import train_classifier  # noqa: E402


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = [r["guidance"] for r in rows]
    fig, left = plt.subplots(figsize=(5.5, 3.4), dpi=110)
    left.plot(
        w, [r["frechet_distance"] for r in rows], "o-", color="tab:blue", label="Fréchet distance"
    )
    left.axhline(rows[0]["floor"], color="tab:blue", ls=":", lw=1, label="real-vs-real floor")
    left.set_xlabel("guidance weight w")
    left.set_ylabel("Fréchet distance (classifier features)", color="tab:blue")
    right = left.twinx()
    right.plot(w, [100 * r["requested_accuracy"] for r in rows], "s--", color="tab:red",
               label="requested class")  # fmt: skip
    right.set_ylabel("samples classified as requested (%)", color="tab:red")
    left.set_title("Classifier-free guidance: fidelity vs diversity")
    fig.legend(loc="center right", bbox_to_anchor=(0.86, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--n", type=int, default=1000, help="samples per weight (a multiple of 10)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.3, 1, 2, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-weight", type=float, default=None,
                        help="w of the grid (default: the swept w with the best requested-class "
                        "accuracy)")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON and images")
    args = parser.parse_args(argv)
    ddpm, config = load_ddpm(args.checkpoint, "cpu")
    c = ddpm.unet_config
    data = load_images(config.get("data", "digits"), c.image_size, c.in_channels)
    labels = requested_labels("all", args.n, c.num_classes)
    classifier = train_classifier(data.images, data.labels, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for w in args.weights:
        started = time.perf_counter()
        report = measure_quality(ddpm, data, args.n, "ddim", args.steps, seed=args.seed,
                                 labels=labels, guidance=w, classifier=classifier,
                                 progress=False)  # fmt: skip
        rows.append({"guidance": w, **report.to_dict(), "seconds": time.perf_counter() - started})
        print(f"w={w:g}: " + "; ".join(report.lines()[:3] + report.lines()[4:6]), file=sys.stderr)
    (args.out / "guidance_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.out / "guidance_sweep.png")
    best = max(rows, key=lambda r: (r["requested_accuracy"], -r["frechet_distance"]))
    grid_w = best["guidance"] if args.grid_weight is None else args.grid_weight
    grid_labels = torch.arange(100) // 10
    grid = generate(ddpm, 100, "ddim", args.steps, seed=args.seed + 1, labels=grid_labels,
                    guidance=grid_w)  # fmt: skip
    save_grid(grid, args.out / "guidance_grid.png", nrow=10, scale=2)
    print(f"{args.n} samples per weight, DDIM-{args.steps}, seed {args.seed}; classifier "
          f"held-out accuracy on real images {rows[0]['classifier_accuracy']:.1%}\n")  # fmt: skip
    print("| w | Fréchet distance | ratio to floor | requested class | confidence ≥ 0.9 "
          "| classes present | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['guidance']:g} | {r['frechet_distance']:.2f} | {r['ratio']:.2f} | "
              f"{r['requested_accuracy']:.1%} | {r['confident']:.1%} | {r['classes_present']}/10 | "
              f"{r['seconds']:.0f} |")  # fmt: skip
    print(f"\nfloor {rows[0]['floor']:.2f}; grid at w = {grid_w:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
