"""The objectives of the alignment pipeline, one function per term of the papers.

- Reward model (Ouyang et al. 2022, §3.5, Eq. 1): `ranking_loss`, all K-choose-2 pairs of a
  prompt's ranked responses in one batch element.
- PPO (Schulman et al. 2017): `gae` (Schulman et al. 2016, Eq. 16), `whiten`,
  `clipped_surrogate_loss` (PPO Eq. 7), `clipped_value_loss`; InstructGPT's objective (§3.5, Eq. 2)
  through `kl_penalised_rewards` (per-token β·log(π/π_SFT)), the KL controllers of Ziegler et al.
  (2019, §2.2), and `ptx_loss` for the PPO-ptx term γ·E_pretrain[log π].
- DPO (Rafailov et al. 2023, Eq. 7): `dpo_loss` with its sigmoid form, label smoothing
  ("conservative DPO", Mitchell 2023) and IPO (Azar et al. 2023, Eq. 17), plus the implicit rewards
  β·log(π/π_ref) of §5.

Shapes: per-token tensors are (batch, T) with a boolean or 0/1 `mask` marking real response tokens;
sequence tensors are (batch,). Every loss returns a scalar averaged as the paper does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# ------------------------------------------------------------------------------------------------
# Helpers on masked per-token tensors


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over positions where `mask` is set (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Unbiased variance of `x` over the masked positions."""
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    return ((x - mean) ** 2 * mask.to(x.dtype)).sum() / (n - 1).clamp(min=1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Per-position entropy −Σ p log p of the categorical distributions in `logits`."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------------------------------------
# Reward model: InstructGPT §3.5, Eq. (1)


def ranking_loss(rewards: Tensor, valid: Tensor | None = None) -> Tensor:
    """−1/C(K,2) · Σ_{i<j} log σ(r_i − r_j) per prompt, averaged over the batch.

    `rewards` (batch, K) holds the reward model's scores of K responses to one prompt ordered from
    best to worst, so every pair (i, j) with i < j has response i preferred. `valid` (batch, K)
    marks real responses when prompts have different K (padding at the end); each prompt's pairs
    are averaged within its batch element, as InstructGPT does to avoid over-fitting from the
    correlated pairs of one prompt. K = 2 is the plain pairwise loss −log σ(r_chosen − r_rejected).
    """
    batch, k = rewards.shape
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    valid = valid.bool()
    diff = rewards[:, :, None] - rewards[:, None, :]  # (batch, i, j): r_i − r_j
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)
    pairs = upper & valid[:, :, None] & valid[:, None, :]
    per_pair = -F.logsigmoid(diff)
    n_pairs = pairs.sum((1, 2))
    per_prompt = (per_pair * pairs).sum((1, 2)) / n_pairs.clamp(min=1)
    return per_prompt.mean()


def ranking_accuracy(rewards: Tensor, valid: Tensor | None = None) -> Tensor:
    """Fraction of ordered pairs (i better than j) with r_i > r_j, over all pairs in the batch."""
    k = rewards.shape[1]
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    valid = valid.bool()
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)
    pairs = upper & valid[:, :, None] & valid[:, None, :]
    right = (rewards[:, :, None] > rewards[:, None, :]) & pairs
    return right.sum().float() / pairs.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------
# PPO: KL-penalised rewards, GAE, whitening, clipped objectives


def kl_penalised_rewards(
    score: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards of InstructGPT Eq. (2): −β·log(π/π_SFT) at every response token, plus
    the reward model's score r_θ(x, y) added at the last response token.

    Returns (rewards, kl) both (batch, T), where kl = log π(y_t) − log π_SFT(y_t) is the sampled
    per-token estimate whose sum over the response is an unbiased estimate of KL(π‖π_SFT).
    """
    mask = mask.bool()
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = mask.long().cumsum(1).argmax(1)  # index of the last response token of each row
    rewards = rewards.clone()
    rewards[torch.arange(len(score), device=score.device), last] += score
    return rewards * mask, kl


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16).

    A_t = Σ_l (γλ)^l δ_{t+l} with δ_t = r_t + γ V(s_{t+1}) − V(s_t), computed backwards; the
    value after the last response token is 0 (the episode ends there). Rows are right-padded
    response tokens marked by `mask`. Returns (advantages, returns = advantages + values).
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # Padding after the end: keep zeros and let the end see "value 0, advantage 0".
        advantages[:, t] = advantage * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t]
    return advantages, (advantages + values) * mask


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to unit variance (and zero mean if `shift_mean`) over the masked positions."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


@dataclass
class PolicyLossStats:
    loss: Tensor
    clip_fraction: Tensor
    approx_kl: Tensor


def clipped_surrogate_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> PolicyLossStats:
    """PPO's clipped surrogate objective (Schulman et al. 2017, Eq. 7), negated as a loss.

    L = −E_t[min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)], ρ_t = π(a_t|s_t)/π_old(a_t|s_t). Where the
    clipped term is the smaller one (ρ beyond 1±ε in the direction A favours), the gradient is 0.
    Also returns the fraction of tokens clipped and the approximate KL(π_old‖π) estimate
    E[(ρ − 1) − log ρ] (always ≥ 0, low variance; Schulman 2020).
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return PolicyLossStats(loss, clip_fraction, approx_kl)


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Tensor]:
    """½·E[max((V − R)², (V_clip − R)²)] with V_clip = V_old + clip(V − V_old, −ε, ε).

    The value-function clipping of the PPO reference implementation (Dhariwal et al. 2017) used
    by Ziegler et al. 2019. Returns (loss, fraction of tokens where the clipped term was used).
    """
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask)
    with torch.no_grad():
        fraction = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, fraction


def ptx_loss(pretrain_logprobs: Tensor, mask: Tensor, coef: float) -> Tensor:
    """The PPO-ptx term of InstructGPT Eq. (2), γ·E_{x~D_pretrain}[log π(x)], negated as a loss.

    `pretrain_logprobs` are per-token log-probabilities of pretraining text under the policy;
    averaged per token.
    """
    return -coef * masked_mean(pretrain_logprobs, mask)


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019, §2.2: β_{t+1} = β_t (1 + K_β e_t), e_t = clip(KL_t/KL_target − 1, ±0.2),
    with K_β = n_steps / horizon (the number of samples seen since the last update over the
    horizon), steering the measured KL(π‖π_SFT) toward `target`."""

    def __init__(self, beta: float, target: float, horizon: int = 10000):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# ------------------------------------------------------------------------------------------------
# DPO and its variants


@dataclass
class DPOOutput:
    losses: Tensor
    """per-pair loss (batch,)"""
    chosen_rewards: Tensor
    """implicit reward β·(log π(y_w|x) − log π_ref(y_w|x)), detached"""
    rejected_rewards: Tensor
    """implicit reward β·(log π(y_l|x) − log π_ref(y_l|x)), detached"""

    @property
    def loss(self) -> Tensor:
        return self.losses.mean()

    @property
    def margin(self) -> Tensor:
        return (self.chosen_rewards - self.rejected_rewards).mean()

    @property
    def accuracy(self) -> Tensor:
        return (self.chosen_rewards > self.rejected_rewards).float().mean()


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> DPOOutput:
    """DPO (Rafailov et al. 2023, Eq. 7) and two variants, from sequence log-probabilities.

    With h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]:
    - "sigmoid": −(1−ε)·log σ(βh) − ε·log σ(−βh). ε = `label_smoothing` = 0 is DPO; ε > 0 is
      conservative DPO, which assumes each preference label is flipped with probability ε.
    - "ipo": (h − 1/(2β))² (Azar et al. 2023, Eq. 17, with τ = β). The paper writes h with summed
      log-probabilities; some implementations (TRL) pass per-token averages instead. This function
      uses whatever the caller passes; `instructgpt.dpo --ipo-length-normalise` picks averages.
    When policy == reference, h = 0: the sigmoid loss is log 2 and both implicit rewards are 0.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
            -beta * h
        )
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r} (sigmoid or ipo)")
    return DPOOutput(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def binomial_confidence_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a win rate of `wins` successes out of `n` (ties count ½)."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
