"""The U-Net of Denoising Diffusion Probabilistic Models (Ho et al. 2020, §4 and Appendix B).

A PixelCNN++-style U-Net (Salimans et al. 2017) built from wide-ResNet blocks (Zagoruyko &
Komodakis 2016) with group normalisation (Wu & He 2018) in place of weight normalisation:

- the timestep t enters as the Transformer's sinusoidal position embedding (`timestep_embedding`),
  passed through a two-layer MLP and added inside every residual block;
- going down, each resolution has `num_res_blocks` residual blocks and then a strided convolution
  halves the resolution; channel counts are `channels × channel_mult[level]`;
- in the middle, residual block, self-attention, residual block;
- going up, each resolution has `num_res_blocks + 1` residual blocks, each taking the matching
  activation from the way down as a skip connection (concatenated), then nearest-neighbour
  upsampling and a convolution;
- single-head self-attention at the resolutions in `attention_resolutions` (the paper: 16×16),
  computed by the shared `transformer.attention.MultiHeadAttention` over the H·W positions;
- dropout 0.1 inside each residual block;
- the initialisation of the authors' code (`init="ddpm"`, the default): fan-average uniform
  variance scaling and zero biases everywhere, and zero for the last convolution of every
  residual block, the attention output projection and the final convolution, so that each
  residual branch starts as the identity and ε̂ = 0 at the start (`init="torch"` keeps PyTorch's
  defaults instead).

The paper's CIFAR-10 model (`dali.train.PRESETS["cifar10"].unet`) has 35.7M parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.attention import MultiHeadAttention
from transformer.dropout import Dropout
from transformer.training import ConfigError, check_config, param


@dataclass
class UNetConfig:
    image_size: int = param(32, "Height and width of the (square) images.")
    in_channels: int = param(3, "Image channels: 1 for grayscale, 3 for RGB.")
    channels: int = param(128, "Base channel count (paper: 128 for CIFAR-10).")
    channel_mult: tuple[int, ...] = param(
        (1, 2, 2, 2), "Channel multiplier per resolution level; the image is halved between levels."
    )
    num_res_blocks: int = param(2, "Residual blocks per resolution on the way down (paper: 2).")
    attention_resolutions: tuple[int, ...] = param(
        (16,), "Resolutions (in pixels) with self-attention after each residual block (paper: 16)."
    )
    attention_heads: int = param(1, "Heads of each self-attention layer (paper: 1).")
    dropout: float = param(0.1, "Dropout inside the residual blocks (paper: 0.1 on CIFAR-10).")
    norm_groups: int = param(32, "Groups of every GroupNorm (paper: 32).")
    num_classes: int = param(
        0,
        "Class-conditional U-Net with this many classes (Ho & Salimans 2022): a label embedding "
        "added to the time embedding, plus one null label for the unconditional model; 0 = "
        "unconditional.",
        added=True,
    )
    init: str = param(
        "ddpm",
        "Initialisation: ddpm = Ho et al.'s code (fan-average uniform variance scaling, zero biases, "
        "and zero for each residual block's last convolution, the attention output and the final "
        "convolution, so that the network starts at ε̂ = 0); torch = PyTorch's layer defaults.",
        added=True,
    )

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        check_config(
            self,
            positive=("image_size", "in_channels", "channels", "channel_mult", "num_res_blocks",
                      "attention_resolutions", "attention_heads", "norm_groups"),
            non_negative=("num_classes",),
            below_one=("dropout",),
        )  # fmt: skip
        levels = len(self.channel_mult)
        if levels == 0:
            raise ConfigError("UNetConfig.channel_mult needs at least one level")
        if self.image_size % 2 ** (levels - 1):
            raise ConfigError(
                f"UNetConfig.image_size {self.image_size} cannot be halved {levels - 1} times "
                f"(channel_mult has {levels} levels)"
            )
        if self.init not in ("ddpm", "torch"):
            raise ConfigError(f"UNetConfig.init must be ddpm or torch, got {self.init!r}")
        for width in sorted({self.channels * m for m in self.channel_mult}):
            if width % self.norm_groups:
                raise ConfigError(
                    f"UNetConfig: {width} channels do not split into norm_groups {self.norm_groups}"
                )
            if width % self.attention_heads:
                raise ConfigError(
                    f"UNetConfig: {width} channels do not split into attention_heads "
                    f"{self.attention_heads}"
                )

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10000.0, shift: int = 1, cos_first: bool = False
) -> Tensor:
    """The sinusoidal embedding of the Transformer (Vaswani et al. 2017, §3.5) applied to the
    timestep: [sin(t·ω_i), cos(t·ω_i)] with ω_i = max_period^(-i/(dim/2 - shift)), i < dim/2.

    Ho et al.'s code divides by dim/2 - 1 (`shift=1`); Stable Diffusion's U-Net by dim/2
    (`shift=0`) and puts the cosines first (`cos_first`)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=t.device)
        / (half - shift)
    )
    angles = t.float()[:, None] * freqs[None, :]
    parts = (
        [torch.cos(angles), torch.sin(angles)]
        if cos_first
        else [torch.sin(angles), torch.cos(angles)]
    )
    return torch.cat(parts, dim=1)


def ddpm_init(module: nn.Module) -> None:
    """Ho et al.'s `default_init`: variance scaling with scale 1, mode fan_avg, uniform
    distribution (= Glorot/Xavier uniform; for a convolution the fans count the kernel's
    positions), and zero biases. `UNet` then zeroes the layers that end each residual branch."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ResBlock(nn.Module):
    """Wide-ResNet block: GN, swish, conv3×3, + projected time embedding, GN, swish, dropout,
    conv3×3, plus the input (through a 1×1 convolution when the channel count changes).

    Latent diffusion's autoencoder uses the same block without a time embedding
    (`time_dim=None`) and with GroupNorm's ε at 1e-6 (`eps`)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        time_dim: int | None,
        dropout: float,
        groups: int,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.dropout = Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_proj is not None:
            h = h + self.time_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H·W positions of a feature map (the paper's 16×16 attention),
    with a GroupNorm before it and a residual connection around it."""

    def __init__(self, channels: int, heads: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=eps)
        self.attention = MultiHeadAttention(channels, heads)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        out = self.attention(tokens).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class Downsample(nn.Module):
    """Halve the resolution with a 3×3 convolution of stride 2. `asymmetric`: pad one row and
    column after the image and none before (TensorFlow's "SAME" for this kernel and stride), as
    latent diffusion's autoencoder does, instead of one on every side."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks (each optionally followed by attention) of one resolution, and the
    resampling layer that follows them (None at the bottom of the way down / top of the way up)."""

    def __init__(self, blocks: list[ResBlock], attentions: list[nn.Module], resample):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


class UNet(nn.Module):
    """ε_θ(x_t, t): maps a batch of noisy images (B, C, H, W) and integer timesteps (B,) to a
    tensor of the same shape as the images; with `num_classes`, ε_θ(x_t, t, c) for labels c."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch, groups, time_dim = c.channels, c.norm_groups, 4 * c.channels
        self.time_mlp = nn.Sequential(
            nn.Linear(ch, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim)
        )
        # Classifier-free guidance: label c (or the null label, index num_classes) joins t.
        self.label_embedding = nn.Embedding(c.num_classes + 1, time_dim) if c.num_classes else None
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        def attention(width: int, resolution: int) -> nn.Module:
            if resolution in c.attention_resolutions:
                return AttentionBlock(width, c.attention_heads, groups)
            return nn.Identity()

        # Way down: remember the width of every activation that becomes a skip connection.
        skip_widths, width, resolution = [ch], ch, c.image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(c.channel_mult):
            blocks, attentions = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(width, ch * mult, time_dim, c.dropout, groups))
                width = ch * mult
                attentions.append(attention(width, resolution))
                skip_widths.append(width)
            resample = None
            if level < len(c.channel_mult) - 1:
                resample = Downsample(width)
                resolution //= 2
                skip_widths.append(width)
            self.down.append(Level(blocks, attentions, resample))

        self.mid_block1 = ResBlock(width, width, time_dim, c.dropout, groups)
        self.mid_attention = AttentionBlock(width, c.attention_heads, groups)
        self.mid_block2 = ResBlock(width, width, time_dim, c.dropout, groups)

        # Way up: num_res_blocks + 1 blocks per level, each consuming one skip connection.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            blocks, attentions = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(
                    ResBlock(width + skip_widths.pop(), ch * mult, time_dim, c.dropout, groups)
                )
                width = ch * mult
                attentions.append(attention(width, resolution))
            resample = None
            if level > 0:
                resample = Upsample(width)
                resolution *= 2
            self.up.append(Level(blocks, attentions, resample))

        self.norm_out = nn.GroupNorm(groups, width)
        self.conv_out = nn.Conv2d(width, c.in_channels, 3, padding=1)
        if c.init == "ddpm":
            self.apply(ddpm_init)
            last_layers = [self.conv_out.weight]
            for module in self.modules():
                if isinstance(module, ResBlock):
                    last_layers.append(module.conv2.weight)
                elif isinstance(module, AttentionBlock):
                    last_layers.append(module.attention.wo.weight)
            for weight in last_layers:
                nn.init.zeros_(weight)

    @property
    def null_label(self) -> int:
        """The label of the unconditional model ∅ (Ho & Salimans 2022, §3.2)."""
        return self.config.num_classes

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """ε̂(x_t, t) or, class-conditional, ε̂(x_t, t, c); labels None means ∅ for every row."""
        temb = self.time_mlp(timestep_embedding(t, self.config.channels))
        if self.label_embedding is not None:
            if labels is None:
                labels = torch.full_like(t, self.null_label, dtype=torch.long)
            temb = temb + self.label_embedding(labels)
        elif labels is not None:
            raise ValueError("labels given to an unconditional U-Net (num_classes = 0)")
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(h, temb))
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, temb)), temb)
        for level in self.up:
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), temb))
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
