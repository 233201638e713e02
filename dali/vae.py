"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, §3 and Appendix G;
Esser et al. 2021's convolutional encoder/decoder), Stable Diffusion's `AutoencoderKL`.

The encoder maps an image x (B, 3, H, W) in [-1, 1] to the mean and log-variance of a diagonal
Gaussian over latents z (B, 4, H/f, W/f), f = 2^(levels - 1) (Stable Diffusion: f = 8); the decoder
maps z back to an image. Both are built from the DDPM U-Net's parts (`dali.model`): residual
blocks without a time embedding, single-head self-attention in the middle, stride-2 convolutions
(padded after the image only) going down and nearest-neighbour upsampling going up; GroupNorm's ε
is 1e-6. A 1×1 convolution follows the encoder (`quant_conv`) and precedes the decoder
(`post_quant_conv`), the names kept from VQGAN, where the quantiser sat between them.

The diffusion model works on z · `scaling_factor` (§4.3.2: "rescale the latent space to unit
variance"; Stable Diffusion v1: 0.18215), so `encode` and `decode` take and give unscaled latents
and the pipeline scales.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .model import AttentionBlock, Downsample, ResBlock, Upsample

EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """Stable Diffusion v1's autoencoder by default (83.7M parameters, f = 8, 4 latent channels)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215

    @classmethod
    def from_hf(cls, config: dict) -> VAEConfig:
        """The fields of a diffusers `AutoencoderKL` config.json."""
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        if "block_out_channels" in values:
            values["block_out_channels"] = tuple(values["block_out_channels"])
        return cls(**values)


class Level(nn.Module):
    def __init__(self, blocks: list[ResBlock], resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


class Middle(nn.Module):
    """Residual block, self-attention, residual block."""

    def __init__(self, width: int, groups: int):
        super().__init__()
        self.block1 = ResBlock(width, width, None, 0.0, groups, EPS)
        self.attention = AttentionBlock(width, 1, groups, EPS)
        self.block2 = ResBlock(width, width, None, 0.0, groups, EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.attention(self.block1(x)))


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        width = widths[0]
        for level, out in enumerate(widths):
            blocks = []
            for _ in range(c.layers_per_block):
                blocks.append(ResBlock(width, out, None, 0.0, groups, EPS))
                width = out
            last = level == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(width, asymmetric=True)))
        self.middle = Middle(width, groups)
        self.norm_out = nn.GroupNorm(groups, width, eps=EPS)
        self.conv_out = nn.Conv2d(width, 2 * c.latent_channels, 3, padding=1)  # mean, log σ²

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.blocks:
                h = block(h)
            if level.resample is not None:
                h = level.resample(h)
        h = self.middle(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        widths, groups = c.block_out_channels, c.norm_num_groups
        width = widths[-1]
        self.conv_in = nn.Conv2d(c.latent_channels, width, 3, padding=1)
        self.middle = Middle(width, groups)
        self.up = nn.ModuleList()
        for level, out in enumerate(reversed(widths)):
            blocks = []
            for _ in range(c.layers_per_block + 1):
                blocks.append(ResBlock(width, out, None, 0.0, groups, EPS))
                width = out
            last = level == len(widths) - 1
            self.up.append(Level(blocks, None if last else Upsample(width)))
        self.norm_out = nn.GroupNorm(groups, width, eps=EPS)
        self.conv_out = nn.Conv2d(width, c.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.middle(self.conv_in(z))
        for level in self.up:
            for block in level.blocks:
                h = block(h)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z|x) = N(mean, exp(log_var)): the mean and log-variance (clamped to [-30, 20])."""
        mean, log_var = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, log_var.clamp(-30.0, 20.0)

    @staticmethod
    def sample(mean: Tensor, log_var: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + σ·ε, the reparameterisation (Kingma & Welling 2014)."""
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * log_var) * noise

    @staticmethod
    def kl(mean: Tensor, log_var: Tensor) -> Tensor:
        """KL(q(z|x) ‖ N(0, I)) per image, summed over the latent's elements."""
        return 0.5 * (mean.pow(2) + log_var.exp() - 1.0 - log_var).flatten(1).sum(1)

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction through the posterior's mean."""
        return self.decode(self.encode(x)[0])
