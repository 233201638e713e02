"""Supervised fine-tuning (InstructGPT §3.5 "SFT"): train the policy on prompt → demonstration pairs.

    python -m instructgpt.sft --model BASE_RUN --out runs/sft [--data demos.jsonl]

The loss is next-token cross-entropy on the response tokens only; prompt tokens are conditioning.
Without --data, the demonstrations are the embedded task's: openings of sentences from the Python
documentation and their real continuations (see instructgpt/data.py).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
    Demonstration,
    collate,
    encode_pair,
    encode_prompt,
    read_demonstrations,
    task_demonstrations,
    task_prompts,
)
from .model import sample_responses, sft_loss
from .stage import add_training_arguments, ddp, optimizer_step, start_run, start_stage


@dataclass
class SFTConfig:
    steps: int = param(300, "optimizer steps")
    batch_size: int = param(32, "demonstrations per step (the global batch, split over processes)")
    lr: float = param(3e-4, "peak learning rate (cosine decay to a tenth)")
    warmup: int = param(20, "linear warm-up steps")
    weight_decay: float = param(0.0, "AdamW weight decay")
    max_len: int = param(64, "longest prompt + response in tokens (longer responses are cut)")
    padding_side: Literal["right", "left"] = param(
        "right", "pad batches on the right or left (results are the same; a flag for the tests)"
    )

    def __post_init__(self):
        check_config(
            self,
            positive=("steps", "batch_size", "lr", "max_len"),
            non_negative=("warmup", "weight_decay"),
        )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        help="base model: a run or checkpoint directory of xllama or instructgpt, or a Hugging Face "
        "or Meta Llama directory",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help='JSONL of {"prompt", "response"} demonstrations (default: the embedded task)',
    )


def train_sft(
    args, config: SFTConfig, demonstrations: list[Demonstration] | None = None
) -> TrainingRun:
    dist, device, dtype = start_stage(args)
    policy, tokenizer, base = load_policy(args.model, device)
    if demonstrations is None:
        demonstrations = read_demonstrations(args.data) if args.data else task_demonstrations()
    max_len = min(config.max_len, policy.config.max_seq_len)
    examples = [encode_pair(tokenizer, d.prompt, d.response, max_len) for d in demonstrations]
    run, optimizer = start_run(
        args, stage="sft", config=config, model=policy, kind="policy", llama=policy.config, tokenizer=tokenizer,
        dist=dist, device=device,
        lr=config.lr, weight_decay=config.weight_decay,
        extra_config={"base_model": str(base), "data": str(args.data or "embedded task")},
    )  # fmt: skip
    model = ddp(policy, dist)
    sampler = EpochSampler(len(examples), args.seed, run.data_state)
    policy.train()
    for step in run.steps(config.steps, desc="sft"):
        indices = rank_slice(sampler.next_batch(config.batch_size), dist.rank, dist.world_size)
        batch = collate([examples[i] for i in indices], tokenizer.eos_id, config.padding_side)
        batch = batch.to(device)
        set_lr(
            optimizer, warmup_cosine(step, config.steps, config.lr, 0.1 * config.lr, config.warmup)
        )
        with autocast(device, dtype):
            logits = model(batch.tokens, attention_mask=batch.attention_mask)
        loss = sft_loss(logits, batch.tokens, batch.response_mask)
        run.check_finite(step, loss=loss.detach())
        optimizer_step(optimizer, loss, policy)
        run.log(step, loss=dist.all_reduce_mean(loss.detach()).item(), epoch=sampler.epoch)
        run.end_of_step(step, sampler.state())
    run.save_final(config.steps, sampler.state())
    if dist.is_main:
        print_samples(run, policy, tokenizer, task_prompts("heldout")[:3], max_len)
    dist.close()
    return run


def print_samples(run, policy, tokenizer, prompts, max_len: int, max_new_tokens: int = 32) -> None:
    """Greedy continuations of a few held-out prompts, so a person can see what training did."""
    max_new_tokens = min(max_new_tokens, policy.config.max_seq_len - max_len // 2)
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    outs = sample_responses(policy, ids, max_new_tokens, stop_ids(tokenizer), temperature=0.0)
    for prompt, out in zip(prompts, outs):
        run.write(f"  {prompt!r} -> {tokenizer.decode(out)!r}")


def main(argv=None) -> int:
    parser = CommandParser(
        prog="instructgpt.sft", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    add_data_arguments(parser)
    add_training_arguments(parser, SFTConfig, "SFT")
    args = parser.parse_args(argv)
    config = dataclass_from_args(SFTConfig, args)
    train_sft(args, config)
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="instructgpt-sft"))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="instructgpt.sft"))
