"""Figures of the pipeline (matplotlib, from the `plots` extra; imported only here)."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_frontier(results: dict, path: Path) -> Path:
    """Gold reward against KL(π‖π_SFT) for every PPO and DPO policy (DPO paper, Figure 2)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=110)
    evaluation = results["evaluation"]
    sft_scores = [r["score_b"] for r in evaluation.values()]
    ax.scatter([0.0], [sum(sft_scores) / len(sft_scores)], marker="*", s=120, c="k", label="SFT")
    series = (
        ("PPO", "o", "tab:blue", lambda name: name.startswith("ppo")),
        ("DPO", "s", "tab:orange", lambda name: name.startswith("dpo") and "-round" not in name),
        ("iterative DPO", "D", "tab:red", lambda name: "-round" in name),
    )
    for label, marker, colour, member in series:
        runs = sorted(
            ((name, r) for name, r in evaluation.items() if member(name)),
            key=lambda item: item[1]["kl_a_to_b"],
        )
        if not runs:
            continue
        xs = [r["kl_a_to_b"] for _, r in runs]
        ys = [r["score_a"] for _, r in runs]
        ax.plot(xs, ys, marker=marker, c=colour, linestyle=":", label=label)
        for (name, _), x, y in zip(runs, xs, ys):
            beta = name.split("beta")[1].split("-round")[0]
            ax.annotate("β=" + beta, (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    ax.set_xlabel("KL(π ‖ π_SFT), nats per response")
    ax.set_ylabel("gold reward (held-out prompts)")
    ax.set_title("Reward-KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_overoptimisation(pipeline_dir: Path, path: Path) -> Path:
    """Reward-model score and gold score of the PPO rollouts across training, per β."""
    plt = _pyplot()
    fig, (ax_rm, ax_gold) = plt.subplots(1, 2, figsize=(8.0, 3.4), dpi=110)
    for run in sorted(Path(pipeline_dir).glob("ppo-beta*")):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
        steps = [r["step"] for r in rows]
        label = "β=" + run.name.split("beta")[1]
        ax_rm.plot(steps, [r["score"] for r in rows], label=label)
        if "gold" in rows[0]:
            ax_gold.plot(steps, [r["gold"] for r in rows], label=label)
    ax_rm.set_title("reward model score (optimised)")
    ax_gold.set_title("gold labeler score (measured)")
    for ax in (ax_rm, ax_gold):
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
