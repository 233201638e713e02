"""The objectives against hand-computed values and brute-force sums."""

import math

import pytest
import torch

from instructgpt.losses import (
    AdaptiveKLController,
    clipped_surrogate_loss,
    clipped_value_loss,
    dpo_loss,
    gae,
    kl_penalised_rewards,
    ptx_loss,
    ranking_accuracy,
    ranking_loss,
    whiten,
)

# softplus(-1) = log(1 + e^-1), softplus(1) = log(1 + e), softplus(-2) = log(1 + e^-2), by hand.
SP_M1, SP_P1, SP_M2 = 0.31326168751822286, 1.3132616875182228, 0.12692801104297263


def test_dpo_is_log2_with_zero_rewards_when_policy_equals_reference():
    logps = torch.tensor([-3.0, -10.0, -0.5])
    other = torch.tensor([-4.0, -2.0, -7.0])
    out = dpo_loss(logps, other, logps.clone(), other.clone(), beta=0.3)
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2)))
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0


def test_sigmoid_dpo_hand_computed():
    # h = (−1 − −2) − (−3 − −2) = 2; β h = 1; loss = −log σ(1) = softplus(−1)
    out = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5
    )
    assert out.loss.item() == pytest.approx(SP_M1, rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)
    assert out.margin.item() == pytest.approx(1.0) and out.accuracy.item() == 1.0


def test_conservative_dpo_hand_computed():
    out = dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.0]),
        0.5,
        label_smoothing=0.1,
    )
    assert out.loss.item() == pytest.approx(0.9 * SP_M1 + 0.1 * SP_P1, rel=1e-6)


def test_ipo_hand_computed():
    args = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0])
    # h = 2: (2 − 1/(2·0.5))² = 1;  (2 − 1/(2·0.25))² = 0;  (2 − 1/(2·1))² = 2.25
    assert dpo_loss(*args, beta=0.5, loss_type="ipo").loss.item() == pytest.approx(1.0)
    assert dpo_loss(*args, beta=0.25, loss_type="ipo").loss.item() == pytest.approx(0.0)
    assert dpo_loss(*args, beta=1.0, loss_type="ipo").loss.item() == pytest.approx(2.25)


def test_dpo_refuses_nonpositive_beta():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(x, x, x, x, beta=0.0)


def test_ranking_loss_hand_made_scores():
    rewards = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 99.0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    # prompt 1: pairs (2,1) (2,0) (1,0) -> softplus(−1), softplus(−2), softplus(−1), averaged
    # prompt 2: one pair, best scored below worst -> softplus(1); the padded third is ignored
    expected = ((2 * SP_M1 + SP_M2) / 3 + SP_P1) / 2
    assert ranking_loss(rewards, valid).item() == pytest.approx(expected, rel=1e-6)
    assert ranking_accuracy(rewards, valid).item() == pytest.approx(3 / 4)


def test_ranking_loss_k2_is_plain_pairwise():
    chosen, rejected = torch.randn(5), torch.randn(5)
    pairwise = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
    torch.testing.assert_close(ranking_loss(torch.stack([chosen, rejected], 1)), pairwise)


def test_gae_matches_brute_force_discounted_sum():
    torch.manual_seed(0)
    batch, T, gamma, lam = 4, 7, 0.9, 0.8
    rewards, values = torch.randn(batch, T), torch.randn(batch, T)
    lengths = [7, 3, 1, 5]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        v = list(values[b, :n].tolist()) + [0.0]
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            brute = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t))
            assert advantages[b, t].item() == pytest.approx(brute, abs=1e-5)
            assert returns[b, t].item() == pytest.approx(brute + v[t], abs=1e-5)
        assert advantages[b, n:].abs().sum() == 0
    # λ = 1, γ = 1: the return is the plain sum of future rewards
    _, returns = gae(rewards, values, mask, 1.0, 1.0)
    for b, n in enumerate(lengths):
        for t in range(n):
            assert returns[b, t].item() == pytest.approx(rewards[b, t:n].sum().item(), abs=1e-5)


def test_whiten_gives_zero_mean_unit_variance_on_mask():
    x = torch.randn(3, 6) * 5 + 2
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]).bool()
    w = whiten(x, mask)
    assert w[mask].mean().abs() < 1e-5 and w[mask].var().item() == pytest.approx(1.0, abs=1e-4)
    assert w[~mask].abs().sum() == 0


def _surrogate_grad(log_ratio: float, advantage: float) -> float:
    logprob = torch.tensor([[log_ratio]], requires_grad=True)
    stats = clipped_surrogate_loss(
        logprob, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1), clip=0.2
    )
    stats.loss.backward()
    return logprob.grad.item()


def test_clipped_objective_has_zero_gradient_where_clipped():
    up, down = math.log(1.5), math.log(0.5)
    assert _surrogate_grad(up, +1.0) == 0.0  # ratio above 1+ε with A > 0: clipped
    assert _surrogate_grad(down, -1.0) == 0.0  # ratio below 1−ε with A < 0: clipped
    # the pessimistic side keeps its gradient: −A·ρ
    assert _surrogate_grad(down, +1.0) == pytest.approx(-0.5)
    assert _surrogate_grad(up, -1.0) == pytest.approx(1.5)
    assert _surrogate_grad(0.0, 2.0) == pytest.approx(-2.0)  # inside the trust region


def test_clip_fraction_and_approx_kl_hand_computed():
    """Four tokens (the last masked out): ratios 1.5 (A > 0: clipped), 0.5 (A < 0: clipped), 0.5
    (A > 0: pessimistic side, not clipped) and 1.0; approx KL = mean of (ρ − 1) − log ρ."""
    ratios = [1.5, 0.5, 0.5, 1.0]
    logprobs = torch.tensor([[math.log(r) for r in ratios]])
    advantages = torch.tensor([[1.0, -1.0, 1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    stats = clipped_surrogate_loss(logprobs, torch.zeros(1, 4), advantages, mask, clip=0.2)
    assert stats.clip_fraction.item() == pytest.approx(2 / 3)
    kl = [(r - 1) - math.log(r) for r in ratios[:3]]
    assert stats.approx_kl.item() == pytest.approx(sum(kl) / 3)
    # the loss is −mean over tokens of min(ρA, clip(ρ, 0.8, 1.2)·A)
    terms = [min(r * a, max(0.8, min(1.2, r)) * a) for r, a in zip(ratios[:3], [1.0, -1.0, 1.0])]
    assert stats.loss.item() == pytest.approx(-sum(terms) / 3)


def test_clipped_value_loss_hand_computed():
    values, old, returns = torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[3.0]])
    loss, frac = clipped_value_loss(values, old, returns, torch.ones(1, 1), clip=0.2)
    # unclipped (1−3)² = 4; clipped (0.2−3)² = 7.84 -> ½ · 7.84
    assert loss.item() == pytest.approx(3.92) and frac.item() == 1.0


def test_kl_penalty_is_zero_for_identical_models_and_score_lands_on_last_token():
    logps = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0, -1.0]), logps, logps, mask, beta=0.1)
    assert kl.abs().sum() == 0
    assert rewards.tolist() == [[0.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -1.0]]
    rewards, kl = kl_penalised_rewards(torch.zeros(2), logps, logps - 1.0, mask, beta=0.1)
    torch.testing.assert_close(rewards, -0.1 * mask.float())


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2 -> ×(1 + 0.2·0.1)
    assert ctl.value == pytest.approx(0.102)
    ctl.update(current_kl=5.4, n_steps=1000)  # error −0.1 -> ×0.9
    assert ctl.value == pytest.approx(0.102 * 0.9)


def test_ptx_loss_is_negative_mean_loglikelihood():
    logps = torch.tensor([[-1.0, -3.0, -100.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert ptx_loss(logps, mask, coef=0.5).item() == pytest.approx(1.0)
