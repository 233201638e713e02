"""The diffusion maths against closed forms and against diffusers' DDPMScheduler / DDIMScheduler."""

import math

import numpy as np
import pytest
import torch

from dali.diffusion import DiffusionConfig, GaussianDiffusion, cosine_betas, linear_betas


def test_linear_schedule_constants_match_the_paper():
    d = GaussianDiffusion()
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    assert d.betas.dtype == torch.float32 and d.betas.shape == (1000,)
    np.testing.assert_allclose(d.betas.numpy(), betas, rtol=1e-6)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-5)
    # Rounded once from float64: no float32 drift along the 1000-term product.
    assert torch.equal(d.alphas_cumprod, torch.from_numpy(abar).float())
    assert d.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)  # ᾱ_T ≈ 4e-5 (§4)
    assert linear_betas(10).dtype == torch.float64


def test_cosine_schedule_follows_alpha_bar_formula():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    abar = np.cumprod(1 - cosine_betas(T).numpy())
    for t in [0, 1, 10, 500, 900, 990]:
        assert abar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9, abs=1e-12)
    assert cosine_betas(T).max() <= 0.999


def test_posterior_is_bayes_rule_of_the_two_gaussians():
    """μ̃, β̃ from Eq. (7) equal the product of q(x_{t-1}|x_0) and q(x_t|x_{t-1}), computed here
    from precisions in float64."""
    d = GaussianDiffusion()
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    x0, xt = torch.tensor([[0.3, -0.7]]), torch.tensor([[1.1, 0.2]])
    for t in [1, 2, 50, 999]:
        precision = 1 / (1 - abar[t - 1]) + (1 - betas[t]) / betas[t]
        var = 1 / precision
        mean = var * (
            math.sqrt(abar[t - 1]) * x0.double().numpy() / (1 - abar[t - 1])
            + math.sqrt(1 - betas[t]) * xt.double().numpy() / betas[t]
        )
        got_mean, got_var = d.q_posterior(x0, xt, torch.tensor([t]))
        np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_var.numpy(), np.full_like(mean, var), rtol=1e-5)
    # t = 0 (the paper's t = 1): ᾱ_0 = 1, so the posterior is a point mass at x_0.
    mean, var = d.q_posterior(x0, xt, torch.tensor([0]))
    torch.testing.assert_close(mean, x0)
    assert var.abs().max() == 0


def test_q_sample_closed_form():
    d = GaussianDiffusion()
    x0, noise, t = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3), torch.tensor([0, 10, 500, 999])
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))).float()[t]
    expected = (
        abar.sqrt()[:, None, None, None] * x0 + (1 - abar).sqrt()[:, None, None, None] * noise
    )
    torch.testing.assert_close(d.q_sample(x0, t, noise), expected)


# -- diffusers parity ----------------------------------------------------------------------------
diffusers = pytest.importorskip("diffusers")

PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def _ddpm_scheduler(schedule="linear", variance="small", prediction="eps"):
    return diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear" if schedule == "linear" else "squaredcos_cap_v2",
        variance_type="fixed_small" if variance == "small" else "fixed_large",
        clip_sample=True,
        prediction_type=PREDICTION[prediction],
    )


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_constants_and_add_noise_match_diffusers(schedule):
    ours = GaussianDiffusion(DiffusionConfig(schedule=schedule))
    ref = _ddpm_scheduler(schedule)
    torch.testing.assert_close(ours.betas, ref.betas.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=2e-5, atol=1e-7)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(
        ours.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ancestral_step_matches_diffusers_ddpm_step(variance, prediction):
    ours = GaussianDiffusion(DiffusionConfig(variance=variance, prediction=prediction))
    ref = _ddpm_scheduler(variance=variance, prediction=prediction)
    for t in [999, 600, 100, 1, 0]:
        g = torch.Generator().manual_seed(t)
        x = torch.randn(3, 1, 5, 5, generator=g)
        output = torch.randn(3, 1, 5, 5, generator=g)
        expected = ref.step(output, t, x, generator=torch.Generator().manual_seed(123)).prev_sample
        noise = torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(123))
        got, _ = ours.p_sample(output, x, t, noise if t > 0 else None)
        # diffusers forms 1 - ᾱ_{t-1} in float32: at t = 1 that is 1 - 0.9999, good to ~1e-3
        # relative; our constants come from float64, hence the looser tolerance at small t.
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 if t > 10 else 2e-4)


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_step_matches_diffusers_ddim_step(eta, prediction, clip):
    steps = 50
    ours = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=clip,
        set_alpha_to_one=True,
        prediction_type=PREDICTION[prediction],
    )
    ref.set_timesteps(steps)
    taus = ours.ddim_timesteps(steps)
    assert taus == ref.timesteps.tolist()
    for i, t in enumerate(taus):
        g = torch.Generator().manual_seed(i)
        x, output = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
        noise = torch.randn(2, 1, 4, 4, generator=g)
        expected = ref.step(
            output, t, x, eta=eta, use_clipped_model_output=True, variance_noise=noise
        ).prev_sample
        t_prev = taus[i + 1] if i + 1 < len(taus) else -1
        got, _ = ours.ddim_step(output, x, t, t_prev, eta, noise, clip_x0=clip)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# -- the samplers as wholes ----------------------------------------------------------------------
def _toy_model(x, t):
    """A fixed function of (x_t, t) standing in for ε_θ: enough to make every step non-trivial."""
    return 0.5 * torch.tanh(x) + 0.1 * torch.sin(t.float() / 37.0)[:, None, None, None]


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_eta_one_over_all_steps_is_ancestral_with_small_variance(schedule, clip):
    config = DiffusionConfig(timesteps=200, schedule=schedule, variance="small", clip_x0=clip)
    d = GaussianDiffusion(config)
    shape = (3, 1, 4, 4)
    ancestral = d.sample_ancestral(_toy_model, shape, torch.Generator().manual_seed(7))
    ddim = d.sample_ddim(
        _toy_model, shape, 200, 1.0, torch.Generator().manual_seed(7), clip_x0=clip
    )
    torch.testing.assert_close(ddim, ancestral, rtol=1e-4, atol=1e-4)
    # ... and η = 0 is something else (deterministic DDIM).
    assert not torch.allclose(
        d.sample_ddim(_toy_model, shape, 200, 0.0, torch.Generator().manual_seed(7)),
        ancestral,
        atol=1e-2,
    )


def test_samplers_are_reproducible_for_a_seed_and_ddim_eta0_is_deterministic_given_xT():
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    shape = (2, 1, 4, 4)
    a = d.sample_ancestral(_toy_model, shape, torch.Generator().manual_seed(1))
    b = d.sample_ancestral(_toy_model, shape, torch.Generator().manual_seed(1))
    c = d.sample_ancestral(_toy_model, shape, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    e = d.sample_ddim(_toy_model, shape, 10, 0.0, torch.Generator().manual_seed(1))
    f = d.sample_ddim(_toy_model, shape, 10, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(e, f)


def test_ddim_steps_outside_one_to_T_are_refused():
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    with pytest.raises(ValueError, match="between 1 and T = 100"):
        d.ddim_timesteps(101)
    assert d.ddim_timesteps(100) == list(range(99, -1, -1))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_loss_targets(prediction):
    d = GaussianDiffusion(DiffusionConfig(prediction=prediction))
    x0, noise, t = torch.rand(2, 1, 3, 3) * 2 - 1, torch.randn(2, 1, 3, 3), torch.tensor([3, 700])
    abar = d.alphas_cumprod[t][:, None, None, None]
    target = {"eps": noise, "x0": x0, "v": abar.sqrt() * noise - (1 - abar).sqrt() * x0}[prediction]
    perfect = lambda xt, tt: target
    assert d.training_loss(perfect, x0, t, noise).item() == pytest.approx(0.0, abs=1e-10)
    zero = lambda xt, tt: torch.zeros_like(xt)
    assert d.training_loss(zero, x0, t, noise).item() == pytest.approx(
        target.pow(2).mean().item(), rel=1e-6
    )
    # From the perfect prediction every parameterisation implies the true x₀ (no clipping needed).
    x0_hat, eps_hat = d.predict_x0_eps(target, d.q_sample(x0, t, noise), t)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-3, atol=1e-3)
