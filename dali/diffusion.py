"""The diffusion process of Denoising Diffusion Probabilistic Models (Ho et al. 2020), and DDIM.

Read beside the paper. Notation: β_t is the noise schedule, α_t = 1 - β_t, ᾱ_t = ∏_{s≤t} α_s.
Timesteps are 0-based in code: index t = 0 is the paper's t = 1, the least noisy step.

- Forward process, Eq. (4): q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I)                  -> `q_sample`
- Posterior, Eqs. (6)-(7): q(x_{t-1} | x_t, x_0) = N(μ̃_t(x_t, x_0), β̃_t I)         -> `q_posterior`
- Training, Algorithm 1 and L_simple (Eq. 14, §3.4)                                 -> `training_loss`
- Sampling, Algorithm 2, σ²_t = β_t or β̃_t (§3.2)                                    -> `p_sample`,
                                                                                       `sample_ancestral`
- DDIM (Song et al. 2021, Eq. 12), any subsequence of timesteps and any η            -> `ddim_step`,
                                                                                       `sample_ddim`

The network may predict ε (the paper's choice), x₀, or v = √ᾱ_t ε - √(1-ᾱ_t) x₀ (Salimans & Ho
2022); whichever it predicts, sampling goes through the implied x̂₀ and ε̂. The ancestral sampler
clips x̂₀ to [-1, 1] as the paper's released sampler does. DDIM clips too by default, and then
recomputes ε̂ from the clipped x̂₀, so that each step uses one consistent (x̂₀, ε̂) pair: that is
diffusers' `DDIMScheduler` with `clip_sample=True` and `use_clipped_model_output=True` (not its
default, which clips x̂₀ but keeps the network's ε̂). We take that variant because with it DDIM at
η = 1 over all T steps is exactly the clipped ancestral sampler. `clip_x0=False` gives Song et al.'s
Eq. (12) with the raw prediction, which matters only for an undertrained network (dali/README.md). Schedule constants are computed in float64 and stored as
float32 buffers (not saved in checkpoints: they follow from the config).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from transformer.training import ConfigError, check_config, param, steps_bar


@dataclass
class DiffusionConfig:
    timesteps: int = param(1000, "T, the number of diffusion steps (paper: 1000).")
    schedule: Literal["linear", "cosine", "scaled_linear"] = param(
        "linear",
        "β schedule: the paper's linear one, the cosine schedule of Nichol & Dhariwal (2021), or "
        "latent diffusion's scaled-linear one (√β linear from √beta_start to √beta_end).",
    )
    beta_start: float = param(1e-4, "β_1 of the linear schedule (paper: 1e-4).")
    beta_end: float = param(0.02, "β_T of the linear schedule (paper: 0.02).")
    prediction: Literal["eps", "x0", "v"] = param(
        "eps", "What the network predicts: ε (paper, with L_simple), x₀, or v (Salimans & Ho 2022)."
    )
    variance: Literal["small", "large"] = param(
        "small",
        "Ancestral sampler variance: σ²_t = β̃_t (small) or β_t (large); the paper found both similar.",
    )
    clip_x0: bool = param(
        True,
        "Clip the predicted x̂₀ to [-1, 1] in the ancestral sampler (as the paper's sampler does).",
    )

    def __post_init__(self):
        check_config(self, positive=("timesteps", "beta_start", "beta_end"))
        if not self.beta_start <= self.beta_end < 1:
            raise ConfigError(
                f"DiffusionConfig needs 0 < beta_start <= beta_end < 1, got beta_start "
                f"{self.beta_start} and beta_end {self.beta_end}"
            )


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The paper's schedule (§4): β_t rising linearly from β_1 = 1e-4 to β_T = 0.02, in float64."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def scaled_linear_betas(timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """Latent diffusion's schedule (Stable Diffusion: 0.00085 to 0.012): √β_t rises linearly."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021), Eq. (17): ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2),
    β_t = 1 - ᾱ(t)/ᾱ(t-1), clipped to `max_beta` to avoid a singularity at t = T."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def _at(values: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """values[t], shaped to broadcast against the batch x (B, C, H, W)."""
    return values[t].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


class GaussianDiffusion(nn.Module):
    """The fixed forward process and the sampler that inverts it with a trained network.

    `model(x_t, t)` takes a batch of noisy images and their 0-based integer timesteps and returns a
    tensor shaped like x_t (ε̂, x̂₀ or v̂ according to `config.prediction`).
    """

    def __init__(self, config: DiffusionConfig | None = None):
        super().__init__()
        self.config = config = config or DiffusionConfig()
        if config.schedule == "linear":
            betas = linear_betas(config.timesteps, config.beta_start, config.beta_end)
        elif config.schedule == "cosine":
            betas = cosine_betas(config.timesteps)
        elif config.schedule == "scaled_linear":
            betas = scaled_linear_betas(config.timesteps, config.beta_start, config.beta_end)
        else:
            raise ValueError(f"unknown schedule {config.schedule!r}")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Eq. (7): β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t, and the two coefficients of μ̃_t.
        posterior_variance = (1 - alphas_cumprod_prev) / (1 - alphas_cumprod) * betas
        constants = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_mean_coef_x0": alphas_cumprod_prev.sqrt() * betas / (1 - alphas_cumprod),
            "posterior_mean_coef_xt": alphas.sqrt()
            * (1 - alphas_cumprod_prev)
            / (1 - alphas_cumprod),
        }
        for name, value in constants.items():
            self.register_buffer(name, value.float(), persistent=False)

    @property
    def timesteps(self) -> int:
        return self.config.timesteps

    # -- the forward process -------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Eq. (4), reparameterised: x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε."""
        return (
            _at(self.sqrt_alphas_cumprod, t, x0) * x0
            + _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Eqs. (6)-(7): the mean μ̃_t(x_t, x_0) and variance β̃_t of q(x_{t-1} | x_t, x_0)."""
        mean = (
            _at(self.posterior_mean_coef_x0, t, xt) * x0
            + _at(self.posterior_mean_coef_xt, t, xt) * xt
        )
        return mean, _at(self.posterior_variance, t, xt).expand_as(xt)

    # -- conversions between what the network predicts and x̂₀, ε̂ --------------------------------
    def x0_from_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Eq. (4) solved for x₀ (the x̂₀ of Eq. 15): x̂₀ = (x_t - √(1-ᾱ_t) ε̂) / √ᾱ_t."""
        return (xt - _at(self.sqrt_one_minus_alphas_cumprod, t, xt) * eps) / _at(
            self.sqrt_alphas_cumprod, t, xt
        )

    def eps_from_x0(self, xt: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """Eq. (4) solved for ε: ε = (x_t - √ᾱ_t x₀) / √(1-ᾱ_t)."""
        return (xt - _at(self.sqrt_alphas_cumprod, t, xt) * x0) / _at(
            self.sqrt_one_minus_alphas_cumprod, t, xt
        )

    def v_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """v = √ᾱ_t ε - √(1-ᾱ_t) x₀ (Salimans & Ho 2022, §4)."""
        return (
            _at(self.sqrt_alphas_cumprod, t, x0) * noise
            - _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def predict_x0_eps(
        self, output: Tensor, xt: Tensor, t: Tensor, clip: bool = False
    ) -> tuple[Tensor, Tensor]:
        """(x̂₀, ε̂) implied by the network output; with `clip`, x̂₀ is clipped to [-1, 1] and ε̂
        recomputed from the clipped x̂₀, so that the update uses one consistent pair."""
        kind = self.config.prediction
        if kind == "eps":
            x0 = self.x0_from_eps(xt, t, output)
        elif kind == "x0":
            x0 = output
        else:  # v: x₀ = √ᾱ_t x_t - √(1-ᾱ_t) v
            x0 = (
                _at(self.sqrt_alphas_cumprod, t, xt) * xt
                - _at(self.sqrt_one_minus_alphas_cumprod, t, xt) * output
            )
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        return x0, self.eps_from_x0(xt, t, x0)

    # -- training: Algorithm 1 -------------------------------------------------------------------
    def training_loss(
        self, model: Callable, x0: Tensor, t: Tensor | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """Algorithm 1: t ~ Uniform({1..T}), ε ~ N(0, I), and a gradient step on
        L_simple = ‖ε - ε_θ(√ᾱ_t x₀ + √(1-ᾱ_t) ε, t)‖² (Eq. 14), averaged over pixels and the batch.
        With x₀- or v-prediction the target is x₀ or v instead of ε."""
        if t is None:
            t = torch.randint(0, self.timesteps, (x0.size(0),), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        output = model(self.q_sample(x0, t, noise), t)
        kind = self.config.prediction
        target = noise if kind == "eps" else x0 if kind == "x0" else self.v_target(x0, t, noise)
        return (output.float() - target).pow(2).mean()

    # -- sampling: Algorithm 2 -------------------------------------------------------------------
    def p_sample(
        self, output: Tensor, xt: Tensor, t: int, noise: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """One step of Algorithm 2 given the network output at (x_t, t): returns (x_{t-1}, x̂₀).

        The mean is the posterior mean μ̃_t(x_t, x̂₀) (Eq. 7 with x̂₀ in place of x₀, identical to
        Eq. 11 when x̂₀ is not clipped); σ²_t is β̃_t or β_t; no noise is added at the last step.
        """
        tt = torch.full((xt.size(0),), t, device=xt.device, dtype=torch.long)
        x0, _ = self.predict_x0_eps(output, xt, tt, clip=self.config.clip_x0)
        mean, _ = self.q_posterior(x0, xt, tt)
        if t == 0:
            return mean, x0
        variance = self.posterior_variance if self.config.variance == "small" else self.betas
        return mean + variance[t].sqrt() * noise, x0

    @torch.no_grad()
    def sample_ancestral(
        self,
        model: Callable,
        shape: tuple[int, ...],
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        on_step: Callable[[int, Tensor, Tensor], None] | None = None,
        progress: bool = False,
    ) -> Tensor:
        """Algorithm 2: x_T ~ N(0, I), then x_{t-1} = μ̃_t + σ_t z for t = T..1, return x_0.

        Noise comes from `generator` only, so a seed fixes the samples. `on_step(t, x_t, x̂₀)` is called
        after every step (for the x̂₀ chain of the paper's Figure 6).
        """
        x = torch.randn(shape, generator=generator, device=device)
        for t in steps_bar(range(self.timesteps - 1, -1, -1), progress, "ancestral"):
            tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
            noise = torch.randn(shape, generator=generator, device=device) if t > 0 else None
            x, x0 = self.p_sample(model(x, tt).float(), x, t, noise)
            if on_step is not None:
                on_step(t, x, x0)
        return x

    # -- DDIM (Song et al. 2021) -----------------------------------------------------------------
    def ddim_timesteps(self, steps: int) -> list[int]:
        """The subsequence τ of Song et al. §4.2, evenly strided from 0 ("leading" spacing: 0, k,
        2k, ... with k = T // steps), in sampling order (largest first)."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"DDIM steps must be between 1 and T = {self.timesteps}, got {steps}")
        stride = self.timesteps // steps
        return list(range(0, steps * stride, stride))[::-1]

    def ddim_step(
        self,
        output: Tensor,
        xt: Tensor,
        t: int,
        t_prev: int,
        eta: float,
        noise: Tensor | None,
        clip_x0: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Song et al. Eq. (12): x_{t'} = √ᾱ_{t'} x̂₀ + √(1 - ᾱ_{t'} - σ²) ε̂ + σ z, with
        σ = η √((1-ᾱ_{t'})/(1-ᾱ_t)) √(1 - ᾱ_t/ᾱ_{t'}) (Eq. 16); t' = t_prev, and ᾱ at t' = -1 is 1.

        η = 0 is the deterministic DDIM; η = 1 over all T steps is Algorithm 2 with σ²_t = β̃_t
        (with `clip_x0` set as the ancestral sampler's). x̂₀ is clipped to [-1, 1] unless
        `clip_x0` is False. Returns (x_{t'}, x̂₀)."""
        tt = torch.full((xt.size(0),), t, device=xt.device, dtype=torch.long)
        x0, eps = self.predict_x0_eps(output, xt, tt, clip=clip_x0)
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else a_t.new_tensor(1.0)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and noise is not None:
            x_prev = x_prev + sigma * noise
        return x_prev, x0

    @torch.no_grad()
    def sample_ddim(
        self,
        model: Callable,
        shape: tuple[int, ...],
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        on_step: Callable[[int, Tensor, Tensor], None] | None = None,
        progress: bool = False,
        clip_x0: bool = True,
    ) -> Tensor:
        """DDIM sampling over `steps` evenly strided timesteps (Song et al. §4.2); deterministic
        given x_T when η = 0, and reproducible for a generator's seed for any η. `clip_x0` clips
        x̂₀ to [-1, 1] at every step (diffusers' default; False: Song et al.'s raw prediction)."""
        taus = self.ddim_timesteps(steps)
        x = torch.randn(shape, generator=generator, device=device)
        for i in steps_bar(range(len(taus)), progress, f"ddim-{steps}"):
            t = taus[i]
            t_prev = taus[i + 1] if i + 1 < len(taus) else -1
            tt = torch.full((shape[0],), t, device=device, dtype=torch.long)
            noise = None
            if eta > 0 and t_prev >= 0:
                noise = torch.randn(shape, generator=generator, device=device)
            x, x0 = self.ddim_step(model(x, tt).float(), x, t, t_prev, eta, noise, clip_x0)
            if on_step is not None:
                on_step(t, x, x0)
        return x

    def sample(
        self,
        model: Callable,
        shape: tuple[int, ...],
        sampler: Literal["ancestral", "ddim"] = "ancestral",
        steps: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        on_step: Callable[[int, Tensor, Tensor], None] | None = None,
        progress: bool = False,
        ddim_clip_x0: bool = True,
    ) -> Tensor:
        """Either sampler by name; `steps`, `eta` and `ddim_clip_x0` are for DDIM (ancestral always
        takes all T steps and clips as the config says)."""
        if sampler == "ancestral":
            return self.sample_ancestral(model, shape, generator, device, on_step, progress)
        if sampler == "ddim":
            steps = steps or 50
            return self.sample_ddim(
                model, shape, steps, eta, generator, device, on_step, progress, ddim_clip_x0
            )
        raise ValueError(f"unknown sampler {sampler!r} (ancestral or ddim)")
