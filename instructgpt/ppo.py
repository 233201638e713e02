"""Reinforcement learning from the reward model with PPO (InstructGPT §3.5 "RL", Eq. 2).

    python -m instructgpt.ppo --policy SFT_RUN --reward-model RM_RUN --out runs/ppo

Each iteration:
1. rollouts: responses to a batch of prompts sampled from the policy with the KV cache;
2. per-token rewards: −β·log(π/π_SFT) at every token against the frozen SFT model, plus the reward
   model's score at the last token (β fixed, or the adaptive controller of Ziegler et al. 2019);
3. advantages by GAE(γ, λ) from a value model initialised from the reward model, whitened;
4. several epochs over minibatches of the clipped surrogate (ε = 0.2) and the clipped value loss,
   plus, for PPO-ptx, γ_ptx times the negative log-likelihood of pretraining text.
Logged per iteration: RM score, KL(π‖π_SFT), β, clip fraction, value loss, entropy, approximate KL
(and, on the embedded task, the gold labeler's score, as a measurement only).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from transformer.lora import lora_layers, remove_lora
from transformer.training import (
    CommandParser,
    Distributed,
    TrainingRun,
    check_config,
    dataclass_from_args,
    param,
    run_command,
    save_checkpoint,
)
from xllama.chat import stop_ids
from xllama.sampling import token_logprobs
from xllama.tokenization import keep_tokenizer

from .batches import EpochSampler, rank_slice
from .checkpoints import load_policy, load_reward_model, model_config
from .data import (
    GoldLabeler,
    InstructGPTError,
    corpus_text,
    encode_prompt,
    read_prompts,
    task_prompts,
)
from .losses import (
    AdaptiveKLController,
    FixedKLController,
    clipped_surrogate_loss,
    clipped_value_loss,
    entropy_from_logits,
    gae,
    kl_penalised_rewards,
    masked_mean,
    ptx_loss,
    whiten,
)
from .model import RewardModel, sample_responses, sequence_logprobs
from .stage import (
    add_training_arguments,
    ddp,
    frozen_copy,
    reference_model,
    start_run,
    start_stage,
)
from .task_tokenizer import check_same_tokenizer


@dataclass
class PPOConfig:
    iterations: int = param(40, "rollout batches (each followed by ppo-epochs passes over it)")
    rollout_batch: int = param(64, "prompts per rollout batch (global, split over processes)")
    minibatch: int = param(16, "sequences per gradient step")
    ppo_epochs: int = param(4, "passes over each rollout batch")
    lr: float = param(1e-5, "AdamW learning rate of the policy and the value model")
    beta: float = param(
        0.02, "KL coefficient β of the per-token penalty β·log(π/π_SFT) (InstructGPT: 0.02)"
    )
    adaptive_kl: bool = param(
        False, "adapt β to hold KL(π‖π_SFT) near kl-target (Ziegler et al. 2019)"
    )
    kl_target: float = param(6.0, "target KL in nats for the adaptive controller")
    kl_horizon: int = param(10000, "horizon of the adaptive controller, in sequences")
    gamma: float = param(1.0, "discount γ of GAE")
    lam: float = param(0.95, "λ of GAE")
    clip: float = param(0.2, "ε of the clipped surrogate objective")
    value_clip: float = param(0.2, "clip range of the value loss")
    value_coef: float = param(
        1.0, "weight of the value loss (the value model is a separate network)"
    )
    whiten_advantages: bool = param(
        True, "normalise advantages to zero mean and unit variance per rollout batch"
    )
    ptx_coef: float = param(
        0.0, "PPO-ptx: coefficient γ of the pretraining log-likelihood term (0 = plain PPO)"
    )
    ptx_batch: int = param(
        8, "pretraining sequences per gradient step (and process) when ptx-coef > 0"
    )
    ptx_len: int = param(48, "tokens per pretraining sequence")
    max_new_tokens: int = param(32, "longest response sampled")
    missing_eos_penalty: float = param(
        0.0,
        "subtracted from the reward-model score of a response cut at max-new-tokens before its EOS "
        "(TRL's missing_eos_penalty); 0 scores such a response as it is",
        added=True,
    )
    value_init: Literal["reward", "policy"] = param(
        "reward",
        'initialise the value model from the reward model ("reward", as InstructGPT) or from the policy with a zero head ("policy")',
    )

    def __post_init__(self):
        check_config(
            self,
            positive=("iterations", "rollout_batch", "minibatch", "ppo_epochs", "lr", "beta",
                      "kl_target", "kl_horizon", "clip", "value_clip", "ptx_batch", "ptx_len",
                      "max_new_tokens"),
            non_negative=("value_coef", "ptx_coef", "missing_eos_penalty"),
            probability=("gamma", "lam"),
        )  # fmt: skip


@dataclass
class Rollout:
    tokens: Tensor
    attention_mask: Tensor
    mask: Tensor
    """(batch, T − 1) response tokens in the prediction frame"""
    old_logprobs: Tensor
    old_values: Tensor
    advantages: Tensor
    returns: Tensor
    score: Tensor
    kl: Tensor
    """(batch,) summed per-token log(π/π_SFT) of each response"""
    responses: list[list[int]]
    truncated: Tensor
    """(batch,) 1 where the response was cut at max_new_tokens before its EOS"""

    def rows(self, index: Tensor) -> dict:
        return {
            k: getattr(self, k)[index]
            for k in (
                "tokens",
                "attention_mask",
                "mask",
                "old_logprobs",
                "old_values",
                "advantages",
                "returns",
            )
        }


@torch.no_grad()
def make_rollout(
    policy,
    reference,
    reward_model,
    value_model,
    prompt_ids,
    stops,
    config: PPOConfig,
    beta,
    generator=None,
) -> Rollout:
    """Sample responses and compute everything the PPO update needs (steps 1-3 above)."""
    responses = sample_responses(
        policy,
        prompt_ids,
        config.max_new_tokens,
        stops,
        batch_size=len(prompt_ids),
        generator=generator,
    )
    device = policy.tok_embeddings.weight.device
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, responses))
    n = len(prompt_ids)
    tokens = torch.full((n, width), min(stops), dtype=torch.long)  # padding: masked, any id
    attention = torch.zeros(n, width, dtype=torch.long)
    response_mask = torch.zeros(n, width, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention[i, : len(p) + len(r)] = 1
        response_mask[i, len(p) : len(p) + len(r)] = 1
    tokens, attention, response_mask = (
        tokens.to(device),
        attention.to(device),
        response_mask.to(device),
    )
    policy.eval()
    old_logprobs, mask = sequence_logprobs(policy, tokens, attention, response_mask)
    ref_logprobs, _ = sequence_logprobs(reference, tokens, attention, response_mask)
    old_values = value_model(tokens, attention)[:, :-1] * mask
    score = reward_model.score(tokens, attention)
    # The reward model only ever saw responses that end with EOS (or the end of a turn); one cut
    # short is scored as it is, less `missing_eos_penalty` (TRL's rule).
    truncated = torch.tensor([not r or r[-1] not in stops for r in responses], device=device)
    score = score - config.missing_eos_penalty * truncated.float()
    rewards, kl = kl_penalised_rewards(score, old_logprobs, ref_logprobs, mask, beta)
    advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)
    policy.train()
    return Rollout(
        tokens, attention, mask, old_logprobs, old_values, advantages, returns, score,
        kl.sum(1), responses, truncated.float(),
    )  # fmt: skip


def ppo_update(
    policy: nn.Module,
    value_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    config: PPOConfig,
    ptx_batches: Iterator[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> dict:
    """Step 4: `ppo_epochs` passes of minibatch gradient steps; returns averaged statistics.

    `policy` and `value_model` may be DistributedDataParallel wrappers. `ptx_batches` yields the
    pretraining text of PPO-ptx, one (ptx_batch, ptx_len) batch per gradient step.
    """
    n = rollout.tokens.size(0)
    stats: dict[str, list[float]] = {
        k: []
        for k in ("policy_loss", "value_loss", "clip_fraction", "approx_kl", "entropy", "ptx_loss")
    }
    for _ in range(config.ppo_epochs):
        order = torch.randperm(n, generator=generator).to(rollout.tokens.device)
        for start in range(0, n, config.minibatch):
            mb = rollout.rows(order[start : start + config.minibatch])
            logits = policy(mb["tokens"], attention_mask=mb["attention_mask"])[:, :-1]
            logprobs = token_logprobs(logits, mb["tokens"][:, 1:])
            pg = clipped_surrogate_loss(
                logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"], config.clip
            )
            loss = pg.loss
            if ptx_batches is not None and config.ptx_coef > 0:
                text = next(ptx_batches)
                # Through the unwrapped module: one DDP forward per backward; the gradients of
                # both terms meet in the same parameters and are all-reduced together.
                lm = getattr(policy, "module", policy)
                ptx_lp = token_logprobs(lm(text)[:, :-1], text[:, 1:])
                ptx = ptx_loss(ptx_lp, torch.ones_like(ptx_lp), config.ptx_coef)
                loss = loss + ptx
                stats["ptx_loss"].append(ptx.item())
            values = value_model(mb["tokens"], mb["attention_mask"])[:, :-1]
            v_loss, _ = clipped_value_loss(
                values, mb["old_values"], mb["returns"], mb["mask"], config.value_clip
            )
            optimizer.zero_grad(set_to_none=True)
            (loss + config.value_coef * v_loss).backward()
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            with torch.no_grad():
                entropy = masked_mean(entropy_from_logits(logits), mb["mask"])
            stats["policy_loss"].append(pg.loss.item())
            stats["value_loss"].append(v_loss.item())
            stats["clip_fraction"].append(pg.clip_fraction.item())
            stats["approx_kl"].append(pg.approx_kl.item())
            stats["entropy"].append(entropy.item())
    return {k: sum(v) / len(v) for k, v in stats.items() if v}


class ActorCritic(nn.Module):
    """The policy and the value model as one module, so one checkpoint holds both."""

    def __init__(self, policy: nn.Module, value: RewardModel):
        super().__init__()
        self.policy, self.value = policy, value


def pretraining_windows(tokenizer, length: int) -> Tensor:
    """The pretraining corpus (the embedded one) cut into windows of `length` tokens, for PPO-ptx."""
    ids = torch.tensor(tokenizer.encode(corpus_text()))
    n = len(ids) // length
    return ids[: n * length].view(n, length)


def pretraining_batches(
    windows: Tensor, sampler: EpochSampler, batch: int, dist: Distributed
) -> Iterator[Tensor]:
    """Batches of `batch` pretraining windows for PPO-ptx in a shuffled order, each continuing where
    the last gradient step stopped (`sampler` holds the position that a checkpoint saves); each
    process gets its own windows."""
    while True:
        rows = sampler.next_batch(batch * dist.world_size)
        yield windows[rank_slice(rows, dist.rank, dist.world_size)]


def train_ppo(
    args, config: PPOConfig, prompts: list[str] | None = None
) -> tuple[TrainingRun, dict]:
    dist, device, _ = start_stage(args)  # rollouts and updates run in float32 (--dtype unused)
    policy, tokenizer, policy_path = load_policy(args.policy, device)
    reward_model, rm_tokenizer, rm_path = load_reward_model(args.reward_model, device)
    check_same_tokenizer(tokenizer, rm_tokenizer, "policy", "reward model")
    reference = reference_model(policy, args)
    reward_model = frozen_copy(reward_model)
    if config.value_init == "reward":
        value_model = RewardModel(reward_model.config)
        value_model.load_state_dict(reward_model.state_dict())
    else:
        value_model = RewardModel.from_language_model(policy)
    value_model.to(device).train()
    embedded = prompts is None and args.prompts is None
    if prompts is None:
        prompts = read_prompts(args.prompts) if args.prompts else task_prompts("train")
    gold = GoldLabeler() if embedded else None
    actor_critic = ActorCritic(policy, value_model)
    kl_controller = (
        AdaptiveKLController(config.beta, config.kl_target, config.kl_horizon)
        if config.adaptive_kl
        else FixedKLController(config.beta)
    )
    run, optimizer = start_run(
        args, stage="ppo", config=config, model=actor_critic, kind="actor_critic", llama=policy.config, tokenizer=tokenizer,
        dist=dist, device=device,
        lr=config.lr, weight_decay=0.01,  # torch's AdamW default, which PPO has always used
        extra_config={"sft_model": str(policy_path), "reward_model": str(rm_path)},
    )  # fmt: skip
    state = run.data_state or {}
    if "beta" in state:
        kl_controller.value = float(state["beta"])
    sampler = EpochSampler(len(prompts), args.seed, state.get("prompts"))
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    stops = stop_ids(tokenizer)
    max_prompt = policy.config.max_seq_len - config.max_new_tokens
    if max(len(p) for p in prompt_ids) > max_prompt:
        raise InstructGPTError(
            f"a prompt is longer than {max_prompt} tokens (the context minus --max-new-tokens)"
        )
    ptx_batches, ptx_sampler = None, None
    if config.ptx_coef > 0:
        windows = pretraining_windows(tokenizer, config.ptx_len).to(device)
        ptx_sampler = EpochSampler(len(windows), args.seed, state.get("ptx"))
        ptx_batches = pretraining_batches(windows, ptx_sampler, config.ptx_batch, dist)
    policy_ddp, value_ddp = ddp(policy, dist), ddp(value_model, dist)
    generator = torch.Generator(device=device)
    cpu_generator = torch.Generator()

    def data_state() -> dict:
        """What the loop carries from one iteration to the next besides weights, optimizer, RNG."""
        state = {"prompts": sampler.state(), "beta": kl_controller.value}
        if ptx_sampler is not None:
            state["ptx"] = ptx_sampler.state()
        return state

    history = []
    for it in run.steps(config.iterations, desc="ppo"):
        indices = rank_slice(sampler.next_batch(config.rollout_batch), dist.rank, dist.world_size)
        beta = kl_controller.value
        # Seeded per iteration (and rank), so a resumed run samples what the straight one did.
        generator.manual_seed(args.seed * 1_000_003 + it * 7919 + dist.rank)
        cpu_generator.manual_seed(args.seed * 1_000_003 + it)
        rollout = make_rollout(
            policy, reference, reward_model, value_model, [prompt_ids[i] for i in indices],
            stops, config, beta, generator,
        )  # fmt: skip
        stats = ppo_update(
            policy_ddp, value_ddp, optimizer, rollout, config, ptx_batches, cpu_generator
        )
        kl = dist.all_reduce_mean(rollout.kl.mean()).item()
        metrics = {
            "score": dist.all_reduce_mean(rollout.score.mean()).item(),
            "kl": kl,
            "beta": beta,
            "reward": dist.all_reduce_mean((rollout.score - beta * rollout.kl).mean()).item(),
            "response_length": dist.all_reduce_mean(rollout.mask.sum(1).float().mean()).item(),
            "truncated": dist.all_reduce_mean(rollout.truncated.mean()).item(),
            # the update's statistics, averaged over processes like the rest (float64: exact)
            **{k: dist.all_reduce_mean(torch.tensor(v, dtype=torch.float64)).item()
               for k, v in stats.items()},
        }  # fmt: skip
        if gold is not None:
            texts = [tokenizer.decode(r) for r in rollout.responses]
            gold_scores = torch.tensor(
                [gold.score(prompts[i], t) for i, t in zip(indices, texts)], device=device
            )
            metrics["gold"] = dist.all_reduce_mean(gold_scores.mean()).item()
        if kl < 0:
            warnings.warn(
                f"iteration {it + 1}: the KL estimate is negative ({kl:.3f}); the policy puts less "
                "mass on its own samples than the SFT model does, which usually means sampling and "
                "scoring disagree (temperature, truncation) or the learning rate is too high",
                stacklevel=1,
            )
        run.check_finite(it, **metrics)  # losses, score, KL, ...: stop at the first NaN or inf
        kl_controller.update(kl, config.rollout_batch)
        run.log(it, **metrics)
        history.append(metrics)
        run.end_of_step(it, data_state())
    run.save_final(config.iterations, data_state())
    if dist.is_main:
        save_policy(run.out, policy, tokenizer, {"stage": "ppo", "sft_model": str(policy_path)})
        from .sft import print_samples

        print_samples(run, policy, tokenizer, task_prompts("heldout")[:3], 2 * max_prompt)
    dist.close()
    return run, history[-1] if history else {}


def save_policy(out: Path, policy: nn.Module, tokenizer, extra: dict) -> Path:
    """Write the policy alone as `OUT/policy` (a checkpoint `load_policy` reads), with LoRA
    adapters merged into its weights."""
    if any(True for _ in lora_layers(policy)):
        policy = copy.deepcopy(policy)
        remove_lora(policy)
    path = Path(out) / "policy"
    save_checkpoint(path, policy, {"package": "instructgpt", "tokenizer": tokenizer.spec(),
                                   "model": model_config("policy", policy.config), **extra})  # fmt: skip
    keep_tokenizer(tokenizer, path)
    return path


def main(argv=None) -> int:
    parser = CommandParser(
        prog="instructgpt.ppo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--policy", type=Path, required=True, help="SFT model run or checkpoint")
    parser.add_argument(
        "--reward-model", type=Path, required=True, help="reward model run or checkpoint"
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help='JSONL with a "prompt" per line (default: the embedded task\'s training prompts)',
    )
    add_training_arguments(parser, PPOConfig, "PPO", checkpoint_unit="iterations")
    args = parser.parse_args(argv)
    _, last = train_ppo(args, dataclass_from_args(PPOConfig, args))
    if last:
        print(json.dumps({k: round(v, 4) for k, v in last.items()}))
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="instructgpt-ppo"))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="instructgpt.ppo"))
