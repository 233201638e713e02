"""Compare two policies under a judge: the win rate of A over B with a 95% confidence interval.

    python -m instructgpt.evaluate --a runs/ppo --b runs/sft [--judge gold | --judge RM_RUN]

Each held-out prompt gets `--samples` responses from each policy; a pair counts 1 when the judge
scores A's response higher, ½ on a tie. The interval treats prompts as the independent units
(mean ± 1.96 standard errors of the per-prompt win rates). Also reported: each policy's mean judge
score, and KL(π_A‖π_B) estimated on A's samples (with B = the SFT model, the KL to SFT).
The judge is the embedded task's gold labeler (default) or a reward model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from transformer.training import (
    CommandParser,
    add_common_arguments,
    positive_int,
    run_command,
    seed_everything,
    select_device,
)
from xllama.chat import stop_ids

from .checkpoints import load_policy, load_reward_model
from .data import GoldLabeler, collate, encode_pair, encode_prompt, read_prompts, task_prompts
from .model import sample_responses, sequence_logprobs
from .task_tokenizer import check_same_tokenizer


class Judge:
    """Scores (prompt, response text) pairs: the gold labeler or a reward model."""

    def __init__(self, reward_model=None, tokenizer=None, max_len: int = 64):
        self.gold = GoldLabeler() if reward_model is None else None
        self.reward_model, self.tokenizer, self.max_len = reward_model, tokenizer, max_len

    @torch.no_grad()
    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        if self.gold is not None:
            return [self.gold.score(p, r) for p, r in zip(prompts, responses)]
        seqs = [encode_pair(self.tokenizer, p, r, self.max_len) for p, r in zip(prompts, responses)]
        batch = collate(seqs, self.tokenizer.eos_id).to(self.reward_model.head.weight.device)
        return self.reward_model.score(batch.tokens, batch.attention_mask).tolist()


@torch.no_grad()
def sample_and_score(policy, reference, tokenizer, prompts, judge, samples, max_new_tokens, seed):
    """Responses of `policy` (`samples` per prompt), their judge scores, and the per-response
    log π(y) − log π_ref(y) (whose mean is KL(π‖π_ref))."""
    device = policy.tok_embeddings.weight.device
    repeated = [p for p in prompts for _ in range(samples)]
    ids = [encode_prompt(tokenizer, p) for p in repeated]
    g = torch.Generator(device=device).manual_seed(seed)
    outs = sample_responses(policy, ids, max_new_tokens, stop_ids(tokenizer), generator=g)
    texts = [tokenizer.decode(o) for o in outs]
    scores = judge.scores(repeated, texts)
    kls = []
    for i in range(0, len(ids), 64):
        seqs = [(p + o, len(p)) for p, o in zip(ids[i : i + 64], outs[i : i + 64])]
        batch = collate(seqs, tokenizer.eos_id).to(device)
        lp, _ = sequence_logprobs(policy, batch.tokens, batch.attention_mask, batch.response_mask)
        ref, _ = sequence_logprobs(
            reference, batch.tokens, batch.attention_mask, batch.response_mask
        )
        kls += (lp - ref).sum(1).tolist()
    return texts, scores, kls


def win_rate(scores_a: list[float], scores_b: list[float], samples: int) -> dict:
    """Win rate of A over B (ties ½) with a 95% interval over prompts as independent units."""
    outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores_a, scores_b)]
    per_prompt = [
        sum(outcomes[i : i + samples]) / samples for i in range(0, len(outcomes), samples)
    ]
    n = len(per_prompt)
    mean = sum(per_prompt) / n
    var = sum((x - mean) ** 2 for x in per_prompt) / max(n - 1, 1)
    half = 1.96 * math.sqrt(var / n)
    return {
        "win_rate": mean,
        "ci_low": max(0.0, mean - half),
        "ci_high": min(1.0, mean + half),
        "prompts": n,
        "comparisons": len(outcomes),
        "ties": sum(o == 0.5 for o in outcomes) / len(outcomes),
    }


def compare(policy_a, policy_b, tokenizer, prompts, judge, samples=4, max_new_tokens=32, seed=0):
    """Everything `evaluate` prints, as a dict (the pipeline calls this directly)."""
    texts_a, scores_a, kl_a = sample_and_score(
        policy_a, policy_b, tokenizer, prompts, judge, samples, max_new_tokens, seed
    )
    texts_b, scores_b, _ = sample_and_score(
        policy_b, policy_b, tokenizer, prompts, judge, samples, max_new_tokens, seed + 1
    )
    result = win_rate(scores_a, scores_b, samples)
    result.update(
        {
            "score_a": sum(scores_a) / len(scores_a),
            "score_b": sum(scores_b) / len(scores_b),
            "kl_a_to_b": sum(kl_a) / len(kl_a),
            "example": {"prompt": prompts[0], "a": texts_a[0], "b": texts_b[0]},
        }
    )
    return result


def main(argv=None) -> int:
    parser = CommandParser(
        prog="instructgpt.evaluate",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--a", type=Path, required=True, help="policy A (run or checkpoint)")
    parser.add_argument(
        "--b", type=Path, required=True, help="policy B, also the reference for the KL (e.g. SFT)"
    )
    parser.add_argument(
        "--judge",
        default="gold",
        help='"gold" (the embedded task\'s labeler) or a reward model run directory (default: gold)',
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help='JSONL with a "prompt" per line (default: the embedded task\'s held-out prompts)',
    )
    parser.add_argument(
        "--samples", type=positive_int, default=4, help="responses per prompt (default: 4)"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=32, help="longest response (default: 32)"
    )
    add_common_arguments(parser, training=False)
    args = parser.parse_args(argv)
    seed_everything(args.seed)
    device = select_device(args.device)
    policy_a, tok_a, _ = load_policy(args.a, device)
    policy_b, tok_b, _ = load_policy(args.b, device)
    check_same_tokenizer(tok_a, tok_b, "policy A", "policy B")
    if args.judge == "gold":
        judge = Judge()
    else:
        rm, tok_rm, _ = load_reward_model(Path(args.judge), device)
        check_same_tokenizer(tok_a, tok_rm, "policies", "reward model judge")
        judge = Judge(rm.eval(), tok_rm)
    prompts = read_prompts(args.prompts) if args.prompts else task_prompts("heldout")
    result = compare(
        policy_a.eval(), policy_b.eval(), tok_a, prompts, judge, args.samples,
        args.max_new_tokens, args.seed,
    )  # fmt: skip
    print(
        f"win rate of A over B: {result['win_rate']:.1%} "
        f"(95% CI {result['ci_low']:.1%}-{result['ci_high']:.1%}; {result['prompts']} prompts x "
        f"{args.samples} samples, {result['ties']:.0%} ties); judge score A {result['score_a']:.3f}"
        f" vs B {result['score_b']:.3f}; KL(A||B) {result['kl_a_to_b']:.2f} nats"
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="instructgpt-evaluate"))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="instructgpt.evaluate"))
