"""Reward model training (InstructGPT §3.5 "Reward modeling (RM)", Eq. 1).

    python -m instructgpt.reward --model SFT_RUN --data rankings.jsonl --out runs/rm

The reward model is the SFT model with a scalar head read at the last response token. Each batch
element is one prompt with its K ranked responses, and the loss averages −log σ(r_w − r_l) over all
K-choose-2 pairs of that prompt (comparisons are the K = 2 case). After training, the head's bias is
shifted so that the reference demonstrations score 0 on average, and the pairwise accuracy on
held-out comparisons is reported.

Without --data, rankings are made for the embedded task: K responses per training prompt sampled
from --model and ranked by the gold labeler (the stand-in for human raters).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from transformer.training import (
    CommandParser,
    TrainingRun,
    autocast,
    check_config,
    dataclass_from_args,
    param,
    run_command,
    set_lr,
    warmup_cosine,
)
from xllama.chat import stop_ids

from .batches import EpochSampler, rank_slice
from .checkpoints import load_policy
from .data import (
    DataError,
    GoldLabeler,
    Ranking,
    collate,
    encode_pair,
    encode_prompt,
    read_demonstrations,
    read_rankings,
    task_demonstrations,
    task_prompts,
)
from .losses import ranking_accuracy, ranking_loss
from .model import RewardModel, last_token_index, sample_responses
from .stage import add_training_arguments, check_k, ddp, optimizer_step, start_run, start_stage


@dataclass
class RewardConfig:
    steps: int = param(200, "optimizer steps")
    batch_size: int = param(
        16, "prompts per step, each with all of its ranked responses (global batch)"
    )
    lr: float = param(1e-4, "peak learning rate (cosine decay to a tenth)")
    warmup: int = param(10, "linear warm-up steps")
    weight_decay: float = param(0.0, "AdamW weight decay")
    max_len: int = param(64, "longest prompt + response in tokens")
    eval_fraction: float = param(
        0.1,
        "share of the rankings held out (by prompt) to measure pairwise accuracy, if no --eval-data",
    )
    k: int = param(4, "embedded task only: responses sampled per prompt for the labeler to rank")

    def __post_init__(self):
        check_config(
            self,
            positive=("steps", "batch_size", "lr", "max_len"),
            non_negative=("warmup", "weight_decay"),
            below_one=("eval_fraction",),
        )
        check_k(self)


def score_rankings(
    model: RewardModel, tokenizer, rankings: list[Ranking], max_len: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward of every response, as (batch, K_max) scores and a validity mask.

    `model` may be wrapped in DistributedDataParallel: only its forward (per-position values) is
    called, and the value at each row's last token is read here.
    """
    sequences = [
        encode_pair(tokenizer, r.prompt, response, max_len)
        for r in rankings
        for response in r.responses
    ]
    batch = collate(sequences, tokenizer.eos_id).to(device)
    values = model(batch.tokens, batch.attention_mask)
    flat = values.gather(1, last_token_index(batch.attention_mask)[:, None]).squeeze(1)
    k_max = max(len(r.responses) for r in rankings)
    scores = torch.zeros(len(rankings), k_max, device=device, dtype=flat.dtype)
    valid = torch.zeros(len(rankings), k_max, device=device, dtype=torch.bool)
    row = 0
    for i, r in enumerate(rankings):
        k = len(r.responses)
        scores[i, :k] = flat[row : row + k]
        valid[i, :k] = True
        row += k
    return scores, valid


@torch.no_grad()
def evaluate_accuracy(model, tokenizer, rankings, max_len, device, batch_size=32) -> float:
    model.eval()
    right = total = 0.0
    for i in range(0, len(rankings), batch_size):
        chunk = rankings[i : i + batch_size]
        scores, valid = score_rankings(model, tokenizer, chunk, max_len, device)
        n_pairs = sum(len(r.responses) * (len(r.responses) - 1) // 2 for r in chunk)
        right += ranking_accuracy(scores, valid).item() * n_pairs
        total += n_pairs
    model.train()
    return right / max(total, 1)


@torch.no_grad()
def mean_score(model, tokenizer, prompts_responses, max_len, device, batch_size=64) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(prompts_responses), batch_size):
        chunk = prompts_responses[i : i + batch_size]
        batch = collate([encode_pair(tokenizer, p, r, max_len) for p, r in chunk], tokenizer.eos_id)
        batch = batch.to(device)
        total += model.score(batch.tokens, batch.attention_mask).sum().item()
    model.train()
    return total / len(prompts_responses)


def make_task_rankings(
    policy, tokenizer, prompts: list[str], k: int, max_len: int, seed: int, max_new_tokens: int = 32
):
    """The embedded task's preference data: K samples per prompt from `policy`, ranked best first
    by the gold labeler; prompts whose samples all tie are dropped."""
    gold = GoldLabeler()
    ids = [encode_prompt(tokenizer, p) for p in prompts for _ in range(k)]
    longest = max(len(i) for i in ids)
    max_new = min(max_new_tokens, policy.config.max_seq_len - longest, max_len - longest)
    g = torch.Generator(device=policy.tok_embeddings.weight.device).manual_seed(seed)
    outs = sample_responses(policy, ids, max_new, stop_ids(tokenizer), generator=g)
    rankings = []
    for j, prompt in enumerate(prompts):
        texts = [tokenizer.decode(o) for o in outs[j * k : (j + 1) * k]]
        texts = [t for t in texts if t.strip()]
        ranked = gold.rank(prompt, texts)
        if len(ranked) >= 2:
            rankings.append(Ranking(prompt, ranked))
    return rankings


def split_heldout(rankings: list[Ranking], fraction: float, seed: int):
    prompts = sorted({r.prompt for r in rankings}, key=lambda p: (isinstance(p, tuple), p))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(prompts), generator=g).tolist()
    held = {prompts[i] for i in order[: max(1, int(round(fraction * len(prompts))))]}
    return [r for r in rankings if r.prompt not in held], [r for r in rankings if r.prompt in held]


def training_rankings(args, config, policy, tokenizer, max_len: int, rankings=None, heldout=None):
    """(training, held-out) rankings for the reward model or DPO: those given, else --data (made
    for the embedded task by `policy` and the labeler without it), and --eval-data (else a share
    of the prompts, `config.eval_fraction`, held out)."""
    if rankings is None:
        if args.data is not None:
            rankings = read_rankings(args.data)
        else:
            rankings = make_task_rankings(
                policy, tokenizer, task_prompts("train"), config.k, max_len, args.seed
            )
    if heldout is None:
        if args.eval_data is not None:
            heldout = read_rankings(args.eval_data)
        else:
            rankings, heldout = split_heldout(rankings, config.eval_fraction, args.seed)
    return rankings, heldout


def train_reward(
    args, config: RewardConfig, rankings=None, heldout=None
) -> tuple[TrainingRun, dict]:
    dist, device, dtype = start_stage(args)
    sft, tokenizer, base = load_policy(args.model, device)
    max_len = min(config.max_len, sft.config.max_seq_len)
    rankings, heldout = training_rankings(args, config, sft, tokenizer, max_len, rankings, heldout)
    if not rankings:
        raise DataError("no training rankings left after holding out the evaluation share")
    model = RewardModel.from_language_model(sft)
    del sft
    run, optimizer = start_run(
        args, stage="reward", config=config, model=model, kind="reward", llama=model.config, tokenizer=tokenizer,
        dist=dist, device=device,
        lr=config.lr, weight_decay=config.weight_decay,
        extra_config={"base_model": str(base), "data": str(args.data or "embedded task")},
    )  # fmt: skip
    wrapped = ddp(model, dist)
    sampler = EpochSampler(len(rankings), args.seed, run.data_state)
    model.train()
    for step in run.steps(config.steps, desc="reward"):
        indices = rank_slice(sampler.next_batch(config.batch_size), dist.rank, dist.world_size)
        chunk = [rankings[i] for i in indices]
        set_lr(
            optimizer, warmup_cosine(step, config.steps, config.lr, 0.1 * config.lr, config.warmup)
        )
        with autocast(device, dtype):
            scores, valid = score_rankings(wrapped, tokenizer, chunk, max_len, device)
        loss = ranking_loss(scores, valid)
        run.check_finite(step, loss=loss.detach())
        optimizer_step(optimizer, loss, model)
        accuracy = ranking_accuracy(scores.detach(), valid)
        run.log(
            step,
            loss=dist.all_reduce_mean(loss.detach()).item(),
            accuracy=dist.all_reduce_mean(accuracy).item(),
        )
        run.end_of_step(step, sampler.state())
    # §3.5: shift the reward so that the reference demonstrations score 0 on average.
    demos = (
        read_demonstrations(args.demonstrations) if args.demonstrations else task_demonstrations()
    )
    offset = mean_score(model, tokenizer, [(d.prompt, d.response) for d in demos], max_len, device)
    model.normalise(offset)
    accuracy = evaluate_accuracy(model, tokenizer, heldout, max_len, device) if heldout else None
    run.save(config.steps, sampler.state())
    summary = {
        "heldout_accuracy": accuracy,
        "heldout_rankings": len(heldout or []),
        "train_rankings": len(rankings),
        "normalisation_offset": offset,
    }
    if dist.is_main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        acc = "n/a" if accuracy is None else f"{accuracy:.3f}"
        run.write(
            f"reward model: held-out pairwise accuracy {acc} on {len(heldout or [])} rankings; "
            f"demonstrations shifted by {-offset:+.3f} to score 0 on average"
        )
    dist.close()
    return run, summary


def main(argv=None) -> int:
    parser = CommandParser(
        prog="instructgpt.reward",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--model", type=Path, required=True, help="SFT model run or checkpoint directory"
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help='JSONL of comparisons {"prompt","chosen","rejected"} and/or rankings '
        '{"prompt","responses":[best,...,worst]} (default: made for the embedded task)',
    )
    parser.add_argument(
        "--eval-data", type=Path, default=None, help="held-out rankings JSONL for accuracy"
    )
    parser.add_argument(
        "--demonstrations",
        type=Path,
        default=None,
        help="SFT JSONL whose responses should score 0 on average (default: the embedded task)",
    )
    add_training_arguments(parser, RewardConfig, "reward model")
    args = parser.parse_args(argv)
    train_reward(args, dataclass_from_args(RewardConfig, args))
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="instructgpt-reward"))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="instructgpt.reward"))
