"""Direct preference optimisation (Rafailov et al. 2023): the policy learns from comparisons
directly, with the reference (SFT) model in place of a reward model.

    python -m instructgpt.dpo --model SFT_RUN --data comparisons.jsonl --out runs/dpo

Loss (Eq. 7): −log σ(β [log π/π_ref (y_w|x) − log π/π_ref (y_l|x)]), or conservative DPO with
--label-smoothing ε, or IPO with --loss-type ipo (summed log-ratios as in the IPO paper, or
per-token averages with --ipo-length-normalise). Reference log-probabilities are computed once
before training unless --no-precompute-reference. Rankings of K > 2 responses give all their
K-choose-2 pairs. Logged: implicit rewards β·log(π/π_ref) of chosen and rejected, their margin and
the preference accuracy. Without --data, comparisons are made for the embedded task as in
instructgpt.reward.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from transformer.training import (
    CommandParser,
    ConfigError,
    TrainingRun,
    autocast,
    check_config,
    dataclass_from_args,
    param,
    run_command,
    set_lr,
    warmup_cosine,
)

from .batches import EpochSampler, rank_slice
from .checkpoints import load_policy
from .data import Ranking, collate, encode_pair, task_prompts
from .losses import dpo_loss
from .model import sequence_logprobs
from .reward import training_rankings
from .stage import (
    add_training_arguments,
    check_k,
    ddp,
    optimizer_step,
    reference_model,
    start_run,
    start_stage,
)


@dataclass
class DPOConfig:
    steps: int = param(200, "optimizer steps")
    batch_size: int = param(32, "preference pairs per step (global batch)")
    lr: float = param(1e-4, "peak learning rate (cosine decay to a tenth)")
    warmup: int = param(10, "linear warm-up steps")
    beta: float = param(0.1, "β: strength of the implicit KL constraint to the reference")
    label_smoothing: float = param(
        0.0, "ε of conservative DPO: the assumed probability that a label is flipped"
    )
    loss_type: Literal["sigmoid", "ipo"] = param(
        "sigmoid", "sigmoid (DPO) or ipo (Azar et al. 2023)"
    )
    ipo_length_normalise: bool = param(
        False, "IPO only: per-token average log-ratios instead of the paper's sums"
    )
    precompute_reference: bool = param(
        True, "compute the reference log-probabilities once before training"
    )
    max_len: int = param(64, "longest prompt + response in tokens")
    eval_fraction: float = param(
        0.1, "share of prompts held out to measure preference accuracy, if no --eval-data"
    )
    k: int = param(4, "embedded task only: responses sampled per prompt for the labeler to rank")

    def __post_init__(self):
        check_config(
            self,
            positive=("steps", "batch_size", "lr", "beta", "max_len"),
            non_negative=("warmup",),
            below_one=("eval_fraction",),
        )
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}"
            )
        check_k(self)


def ranking_pairs(rankings: list[Ranking]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) for every ordered pair of every ranking."""
    return [
        (r.prompt, r.responses[i], r.responses[j])
        for r in rankings
        for i in range(len(r.responses))
        for j in range(i + 1, len(r.responses))
    ]


def pair_logprobs(model, tokenizer, pairs, max_len, device, average: bool = False):
    """log π(y|x) of chosen and rejected responses (summed over tokens, or averaged), in one
    forward over a batch holding both."""
    sequences = [encode_pair(tokenizer, p, c, max_len) for p, c, _ in pairs]
    sequences += [encode_pair(tokenizer, p, r, max_len) for p, _, r in pairs]
    batch = collate(sequences, tokenizer.eos_id).to(device)
    logprobs, mask = sequence_logprobs(
        model, batch.tokens, batch.attention_mask, batch.response_mask
    )
    total = logprobs.sum(1)
    if average:
        total = total / mask.sum(1).clamp(min=1)
    n = len(pairs)
    return total[:n], total[n:]


@torch.no_grad()
def reference_logprobs(reference, tokenizer, pairs, max_len, device, average, batch_size=64):
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logprobs(
            reference, tokenizer, pairs[i : i + batch_size], max_len, device, average
        )
        chosen.append(c)
        rejected.append(r)
    return torch.cat(chosen), torch.cat(rejected)


@torch.no_grad()
def preference_accuracy(policy, reference, tokenizer, pairs, config, max_len, device) -> dict:
    """Implicit-reward accuracy and margin on held-out pairs."""
    policy.eval()
    average = config.loss_type == "ipo" and config.ipo_length_normalise
    pc, pr = reference_logprobs(policy, tokenizer, pairs, max_len, device, average)
    rc, rr = reference_logprobs(reference, tokenizer, pairs, max_len, device, average)
    out = dpo_loss(pc, pr, rc, rr, config.beta, config.label_smoothing, config.loss_type)
    policy.train()
    return {"accuracy": out.accuracy.item(), "margin": out.margin.item(), "loss": out.loss.item()}


def train_dpo(args, config: DPOConfig, rankings=None, heldout=None) -> tuple[TrainingRun, dict]:
    dist, device, dtype = start_stage(args)
    policy, tokenizer, base = load_policy(args.model, device)
    max_len = min(config.max_len, policy.config.max_seq_len)
    rankings, heldout = training_rankings(
        args, config, policy, tokenizer, max_len, rankings, heldout
    )
    pairs, heldout_pairs = ranking_pairs(rankings), ranking_pairs(heldout or [])
    reference = reference_model(policy, args)
    average = config.loss_type == "ipo" and config.ipo_length_normalise
    run, optimizer = start_run(
        args, stage="dpo", config=config, model=policy, kind="policy", llama=policy.config, tokenizer=tokenizer,
        dist=dist, device=device,
        lr=config.lr, weight_decay=0.01,  # torch's AdamW default, which DPO has always used
        extra_config={"reference_model": str(base), "data": str(args.data or "embedded task")},
    )  # fmt: skip
    ref_chosen = ref_rejected = None
    if config.precompute_reference:
        ref_chosen, ref_rejected = reference_logprobs(
            reference, tokenizer, pairs, max_len, device, average
        )
    model = ddp(policy, dist)
    sampler = EpochSampler(len(pairs), args.seed, run.data_state)
    policy.train()
    for step in run.steps(config.steps, desc="dpo"):
        indices = rank_slice(sampler.next_batch(config.batch_size), dist.rank, dist.world_size)
        chunk = [pairs[i] for i in indices]
        set_lr(
            optimizer, warmup_cosine(step, config.steps, config.lr, 0.1 * config.lr, config.warmup)
        )
        with autocast(device, dtype):
            chosen, rejected = pair_logprobs(model, tokenizer, chunk, max_len, device, average)
        if ref_chosen is not None:
            index = torch.tensor(indices, device=device)
            rc, rr = ref_chosen[index], ref_rejected[index]
        else:
            with torch.no_grad():
                rc, rr = pair_logprobs(reference, tokenizer, chunk, max_len, device, average)
        out = dpo_loss(
            chosen, rejected, rc, rr, config.beta, config.label_smoothing, config.loss_type
        )
        metrics = {
            "loss": dist.all_reduce_mean(out.loss.detach()).item(),
            "chosen_reward": dist.all_reduce_mean(out.chosen_rewards.mean()).item(),
            "rejected_reward": dist.all_reduce_mean(out.rejected_rewards.mean()).item(),
            "margin": dist.all_reduce_mean(out.margin).item(),
            "accuracy": dist.all_reduce_mean(out.accuracy).item(),
        }
        run.check_finite(step, **metrics)
        optimizer_step(optimizer, out.loss, policy)
        run.log(step, **metrics)
        run.end_of_step(step, sampler.state())
    run.save_final(config.steps, sampler.state())
    summary = {"train_pairs": len(pairs), "heldout_pairs": len(heldout_pairs)}
    if heldout_pairs:
        summary.update(
            {
                f"heldout_{k}": v
                for k, v in preference_accuracy(
                    policy, reference, tokenizer, heldout_pairs, config, max_len, device
                ).items()
            }
        )
    if dist.is_main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        run.write("dpo: " + json.dumps({k: round(v, 4) for k, v in summary.items()}))
        from .sft import print_samples

        print_samples(run, policy, tokenizer, task_prompts("heldout")[:3], max_len)
    dist.close()
    return run, summary


def main(argv=None) -> int:
    parser = CommandParser(
        prog="instructgpt.dpo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="SFT model (the starting policy and reference)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help='JSONL of comparisons {"prompt","chosen","rejected"} and/or rankings '
        "(default: made for the embedded task)",
    )
    parser.add_argument("--eval-data", type=Path, default=None, help="held-out comparisons JSONL")
    add_training_arguments(parser, DPOConfig, "DPO")
    args = parser.parse_args(argv)
    train_dpo(args, dataclass_from_args(DPOConfig, args))
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="instructgpt-dpo"))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="instructgpt.dpo"))
