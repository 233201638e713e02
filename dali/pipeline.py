"""What a checkpoint holds and how the commands use it: the U-Net, its EMA copy and the diffusion.

A dali checkpoint's `model.safetensors` stores both the trained weights (`model.*`) and their
exponential moving average (`ema.*`); sampling uses the EMA weights, as the paper does (§4, "we
used EMA on model parameters with a decay factor of 0.9999"). The diffusion constants follow from
the config and are not stored.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from transformer.training import (
    autocast,
    check_checkpoint,
    config_from_dict,
    find_checkpoint,
    float_in,
    load_weights,
    positive_int,
)

from .data import DaliError
from .diffusion import DiffusionConfig, GaussianDiffusion
from .model import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig


class DDPM(nn.Module):
    """The network being trained, its EMA, and the fixed diffusion process."""

    def __init__(self, unet: UNetConfig, diffusion: DiffusionConfig):
        super().__init__()
        self.model = UNet(unet)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.diffusion = GaussianDiffusion(diffusion)

    @property
    def unet_config(self) -> UNetConfig:
        return self.model.config

    def model_config(self) -> dict:
        """The `model` entry of the checkpoint config: everything that fixes the weights' meaning."""
        return {
            "unet": self.model.config.to_dict(),
            "diffusion": vars(self.diffusion.config).copy(),
        }


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """θ_ema ← decay · θ_ema + (1 - decay) · θ for every parameter; buffers are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The decay used after `step` updates: fixed, or with warm-up min(decay, (1 + n) / (10 + n))
    (as in TensorFlow's ExponentialMovingAverage with num_updates), which lets short runs average
    over their own length instead of remembering the random initialisation."""
    if not warmup:
        return decay
    return min(decay, (1 + step) / (10 + step))


def load_ddpm(path: Path, device: torch.device | str = "cpu") -> tuple[DDPM, dict]:
    """A checkpoint directory (or a run directory: its latest checkpoint) -> (DDPM, config)."""
    checkpoint = find_checkpoint(Path(path))
    config = check_checkpoint(checkpoint, "dali")
    model = config.get("model")
    where = f"{checkpoint}/config.json: model"
    if not isinstance(model, dict):
        raise DaliError(f"{where} is not a JSON object")
    if model.get("kind") == "latent":
        raise DaliError(f"{checkpoint} is a latent diffusion checkpoint: sample it with --prompt")
    if model.get("kind") == "autoencoder":
        raise DaliError(f"{checkpoint} is an autoencoder, not a diffusion model")
    unet_config = config_from_dict(UNetConfig, model.get("unet"), f"{where}.unet")
    diffusion_config = config_from_dict(
        DiffusionConfig, model.get("diffusion"), f"{where}.diffusion"
    )
    ddpm = DDPM(unet_config, diffusion_config)
    load_weights(checkpoint, ddpm)
    return ddpm.to(device).eval(), config


def check_ddim_steps(diffusion: GaussianDiffusion, sampler: str, steps: int | None) -> None:
    """DDIM takes 1..T steps; say so in the commands' terms (--steps) before any work starts."""
    if sampler == "ddim" and steps is not None and not 1 <= steps <= diffusion.timesteps:
        raise DaliError(f"--steps must be between 1 and T = {diffusion.timesteps}, got {steps}")


def generate(
    ddpm: DDPM,
    n: int,
    sampler: str = "ancestral",
    steps: int | None = None,
    *,
    eta: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    on_step: Callable[[int, Tensor, Tensor], None] | None = None,
    progress: bool = False,
    use_ema: bool = True,
    ddim_clip_x0: bool = True,
    labels: Tensor | None = None,
    guidance: float = 0.0,
) -> Tensor:
    """n images in [-1, 1] from the EMA network, reproducible for `seed` (batches draw from one
    generator in order). `on_step` sees only the first batch. `ddim_clip_x0=False` lets DDIM
    use the raw x̂₀ (Song et al.) instead of clipping it; either way the final images are clamped to the data
    range [-1, 1], as any image writer would.

    A class-conditional network samples image i of class `labels[i]` (n labels), with
    classifier-free guidance of weight w = `guidance` (Ho & Salimans 2022, Eq. 6):
    ε̃ = (1 + w) ε(x, c) − w ε(x, ∅), both terms from one batched forward pass; w = 0 is the
    conditional model alone. The same combination is applied to x̂₀- or v-predictions, which are
    affine in ε̂ at a given x_t. Without labels a conditional network samples from ε(x, ∅)."""
    device = torch.device(device)
    net = ddpm.ema if use_ema else ddpm.model
    net.eval()
    c = ddpm.unet_config
    diffusion = ddpm.diffusion.to(device)
    check_ddim_steps(diffusion, sampler, steps)
    check_labels(c, n, labels, guidance)
    generator = torch.Generator(device=device).manual_seed(seed)

    def guided(batch_labels: Tensor | None):
        def model(x, t):
            with autocast(device, dtype):
                if batch_labels is None or guidance == 0.0:
                    return net(x, t, batch_labels)
                null = torch.full_like(batch_labels, net.null_label)
                both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([batch_labels, null]))
                conditional, unconditional = both.chunk(2)
                return (1 + guidance) * conditional - guidance * unconditional

        return model

    out = []
    for start in range(0, n, batch_size):
        shape = (min(batch_size, n - start), c.in_channels, c.image_size, c.image_size)
        batch_labels = None
        if labels is not None:
            batch_labels = labels[start : start + shape[0]].to(device)
        out.append(
            diffusion.sample(
                guided(batch_labels),
                shape,
                sampler,
                steps,
                eta,
                generator,
                device,
                on_step if start == 0 else None,
                progress,
                ddim_clip_x0,
            ).cpu()
        )
    return torch.cat(out).clamp(-1.0, 1.0)


def check_labels(config: UNetConfig, n: int, labels: Tensor | None, guidance: float) -> None:
    """Labels and guidance that the network can use, said in the commands' terms."""
    if labels is not None:
        if not config.num_classes:
            raise DaliError("--class needs a class-conditional model (trained with --num-classes)")
        if labels.shape != (n,):
            raise DaliError(f"{n} samples need {n} labels, got shape {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= config.num_classes:
            raise DaliError(f"class labels must be in 0..{config.num_classes - 1}")
    if guidance != 0.0 and labels is None:
        raise DaliError("--guidance needs --class: guidance steers towards a class")
    if not math.isfinite(guidance) or guidance < 0:
        raise DaliError(f"--guidance must be a finite number >= 0, got {guidance}")


def add_sampler_arguments(parser: argparse.ArgumentParser, sampler: str, steps: int) -> None:
    """The sampler flags of `dali.sample` and `dali.evaluate`: --sampler --steps --eta
    --ddim-clip-x0, with the given defaults."""
    parser.add_argument(
        "--sampler",
        choices=["ancestral", "ddim"],
        default=sampler,
        help="ancestral: Algorithm 2 over all T steps; ddim: Song et al. over --steps steps "
        f"(default: {sampler})",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=steps, help=f"DDIM steps, 1..T (default: {steps})"
    )
    parser.add_argument(
        "--eta",
        type=float_in(0.0, 1.0),
        default=0.0,
        help="DDIM η: 0 deterministic, 1 ≈ DDPM (default: 0)",
    )
    parser.add_argument(
        "--ddim-clip-x0",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clip x̂₀ to [-1, 1] at every DDIM step, as the ancestral sampler (Ho et al.) and "
        "diffusers' DDIMScheduler with use_clipped_model_output=True do (ε̂ is recomputed from the "
        "clipped x̂₀); --no-ddim-clip-x0 uses the raw prediction of Song et al.'s "
        "Eq. 12, slightly better on a well-trained network, far worse on an undertrained one",
    )


def requested_labels(label: str | None, n: int, num_classes: int) -> torch.Tensor | None:
    """--class as one label per sample: None, every sample of one class, or ('all') the classes in
    turn, n // num_classes consecutive samples each (one row of the grid per class)."""
    if label is None:
        return None
    if not num_classes:
        raise DaliError("--class needs a class-conditional model (trained with --num-classes)")
    if label == "all":
        return torch.arange(n) // max(1, n // num_classes) % num_classes
    try:
        value = int(label)
    except ValueError:
        raise DaliError(f"--class must be a class number or 'all', got {label!r}") from None
    return torch.full((n,), value)


def load_autoencoder(path: Path, device="cpu") -> tuple[AutoencoderKL, dict]:
    """An autoencoder run directory (its `autoencoder/` checkpoint) or that checkpoint itself."""
    path = Path(path)
    checkpoint = path / "autoencoder" if (path / "autoencoder").is_dir() else path
    config = check_checkpoint(checkpoint, "dali")
    model = config.get("model") or {}
    if model.get("kind") != "autoencoder" or "scaling_factor" not in model.get("vae", {}):
        raise DaliError(f"{checkpoint} is not a finished dali.autoencoder checkpoint")
    vae = AutoencoderKL(VAEConfig.from_hf(model["vae"]))
    load_weights(checkpoint, vae)
    return vae.to(device).eval(), config


def load_latent(path: Path, device="cpu"):
    """A `dali.train_latent` run or checkpoint -> (LatentDiffusion, its tokenizer, its
    autoencoder, config). The run directory holds the tokenizer and the autoencoder it used."""
    from tokenizer import BPETokenizer

    from .clip import CLIPTextConfig
    from .latent import LatentDiffusion
    from .ldm import LatentUNetConfig

    checkpoint = find_checkpoint(Path(path))
    config = check_checkpoint(checkpoint, "dali")
    model = config.get("model") or {}
    if model.get("kind") != "latent":
        raise DaliError(f"{checkpoint} is not a latent diffusion checkpoint (dali.train_latent)")
    run_dir = checkpoint.parent.parent
    tokenizer_file = run_dir / "tokenizer.bpe"
    if not tokenizer_file.is_file():
        raise DaliError(f"{tokenizer_file} not found beside the checkpoint's run")
    vae, _ = load_autoencoder(run_dir / "autoencoder", device)
    text = config_from_dict(CLIPTextConfig, model.get("text"), f"{checkpoint}: text")
    unet = config_from_dict(LatentUNetConfig, model.get("unet"), f"{checkpoint}: unet")
    diffusion = config_from_dict(
        DiffusionConfig, model.get("diffusion"), f"{checkpoint}: diffusion"
    )
    ldm = LatentDiffusion(text, unet, diffusion)
    load_weights(checkpoint, ldm)
    return ldm.to(device).eval(), BPETokenizer.load(tokenizer_file), vae, config
