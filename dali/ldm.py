"""The conditional U-Net of latent diffusion (Rombach et al. 2022, §3.3 and Appendix E), Stable
Diffusion's `UNet2DConditionModel`.

ε_θ(z_t, t, τ_θ(y)) works on the autoencoder's latents z (`dali.vae`) and is the DDPM U-Net
(`dali.model`: the same residual blocks, down- and upsampling and skip connections) with two
changes:

- after each residual block of the levels that have them, a **SpatialTransformer** (§3.3: "the
  cross-attention layers"): GroupNorm, a 1×1 projection in, then a Transformer block over the H·W
  positions, each a pre-norm residual of self-attention, *cross-attention* to the conditioning
  sequence τ_θ(y) (Eq. 3: Q = W_Q φ(z), K = W_K τ_θ(y), V = W_V τ_θ(y); Stable Diffusion: CLIP's 77
  hidden states, `dali.clip`), and a GEGLU feed-forward (Shazeer 2020), then a 1×1 projection out
  and a residual connection around it all. Attention is the shared
  `transformer.attention.MultiHeadAttention`.
- the timestep embedding divides the frequencies by dim/2 and puts the cosines first (the
  `shift=0, cos_first=True` of `dali.model.timestep_embedding`).

The defaults are Stable Diffusion v1's (859.5M parameters): 320/640/1280/1280 channels, two
residual blocks per level, cross-attention at the first three levels and in the middle, 8 heads,
768-wide context.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformer.attention import MultiHeadAttention

from .model import Downsample, Level, ResBlock, Upsample, timestep_embedding


@dataclass(frozen=True)
class LatentUNetConfig:
    """Field names follow diffusers' `UNet2DConditionModel` config; `cross_attention` says which
    levels (down order) have SpatialTransformers (CrossAttnDownBlock2D / CrossAttnUpBlock2D)."""

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    cross_attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    attention_heads: int = 8
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    freq_shift: int = 0
    flip_sin_to_cos: bool = True

    def __post_init__(self):  # read back from JSON, the tuples are lists
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "cross_attention", tuple(self.cross_attention))

    @classmethod
    def from_hf(cls, config: dict) -> LatentUNetConfig:
        """A diffusers `UNet2DConditionModel` config.json of Stable Diffusion v1's kind."""
        down = list(config.get("down_block_types", []))
        up = list(config.get("up_block_types", []))
        known = {"CrossAttnDownBlock2D", "DownBlock2D"}
        if set(down) - known or [k.replace("Up", "Down") for k in reversed(up)] != down:
            raise ValueError(f"block types {down} / {up} are not Stable Diffusion v1's U-Net")
        if (
            config.get("use_linear_projection")
            or config.get("transformer_layers_per_block", 1) != 1
        ):
            raise ValueError(
                "linear projections / several transformer layers (SD 2, SDXL) are not supported"
            )
        values = {f.name: config[f.name] for f in fields(cls) if f.name in config}
        values["block_out_channels"] = tuple(config["block_out_channels"])
        values["cross_attention"] = tuple(kind == "CrossAttnDownBlock2D" for kind in down)
        # diffusers' quirk: SD v1's `attention_head_dim` (8) is the number of heads.
        values["attention_heads"] = config.get("num_attention_heads") or config.get(
            "attention_head_dim", 8
        )
        return cls(**values)


class TransformerBlock(nn.Module):
    """Self-attention, cross-attention to the context, GEGLU feed-forward; each pre-norm and
    residual (Stable Diffusion's `BasicTransformerBlock`)."""

    def __init__(self, width: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn1 = MultiHeadAttention(width, heads, bias=False, out_bias=True)
        self.norm2 = nn.LayerNorm(width)
        self.attn2 = MultiHeadAttention(width, heads, bias=False, out_bias=True,
                                        context_dim=context_dim)  # fmt: skip
        self.norm3 = nn.LayerNorm(width)
        self.ff_in = nn.Linear(width, 2 * 4 * width)  # GEGLU: the value half and the gate half
        self.ff_out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context=context)
        value, gate = self.ff_in(self.norm3(x)).chunk(2, dim=-1)
        return x + self.ff_out(value * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1×1 conv in, a Transformer block over the H·W positions, 1×1 conv out, plus the
    input (§3.3)."""

    def __init__(self, width: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, width, eps=1e-6)
        self.proj_in = nn.Conv2d(width, width, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(width, heads, context_dim)])
        self.proj_out = nn.Conv2d(width, width, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x)).reshape(b, c, h * w).transpose(1, 2)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens.transpose(1, 2).reshape(b, c, h, w))


class Middle(nn.Module):
    def __init__(self, width: int, time_dim: int, c: LatentUNetConfig):
        super().__init__()
        g, eps = c.norm_num_groups, c.norm_eps
        self.block1 = ResBlock(width, width, time_dim, 0.0, g, eps)
        self.attention = SpatialTransformer(width, c.attention_heads, c.cross_attention_dim, g)
        self.block2 = ResBlock(width, width, time_dim, 0.0, g, eps)

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        return self.block2(self.attention(self.block1(x, temb), context), temb)


class LatentUNet(nn.Module):
    """ε_θ(z_t, t, context): latents (B, C, h, w), timesteps (B,), context (B, L, context_dim)."""

    def __init__(self, config: LatentUNetConfig = LatentUNetConfig()):
        super().__init__()
        self.config = c = config
        widths, g, eps = c.block_out_channels, c.norm_num_groups, c.norm_eps
        time_dim = 4 * widths[0]
        self.time_mlp = nn.Sequential(nn.Linear(widths[0], time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))  # fmt: skip
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)

        def attention(level: int, width: int) -> list[nn.Module]:
            if not c.cross_attention[level]:
                return []
            return [SpatialTransformer(width, c.attention_heads, c.cross_attention_dim, g)]

        skip_widths, width = [widths[0]], widths[0]
        self.down = nn.ModuleList()
        for level, out in enumerate(widths):
            blocks, attentions = [], []
            for _ in range(c.layers_per_block):
                blocks.append(ResBlock(width, out, time_dim, 0.0, g, eps))
                width = out
                attentions += attention(level, width)
                skip_widths.append(width)
            resample = None
            if level < len(widths) - 1:
                resample = Downsample(width)
                skip_widths.append(width)
            self.down.append(Level(blocks, attentions, resample))
        self.middle = Middle(width, time_dim, c)
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks, attentions = [], []
            for _ in range(c.layers_per_block + 1):
                blocks.append(
                    ResBlock(width + skip_widths.pop(), widths[level], time_dim, 0.0, g, eps)
                )
                width = widths[level]
                attentions += attention(level, width)
            self.up.append(Level(blocks, attentions, Upsample(width) if level > 0 else None))
        self.norm_out = nn.GroupNorm(g, width, eps=eps)
        self.conv_out = nn.Conv2d(width, c.out_channels, 3, padding=1)

    def forward(self, z: Tensor, t: Tensor, context: Tensor) -> Tensor:
        c = self.config
        t = torch.as_tensor(t, device=z.device).expand(z.shape[0])
        emb = timestep_embedding(t, c.block_out_channels[0], shift=c.freq_shift,
                                 cos_first=c.flip_sin_to_cos)  # fmt: skip
        temb = self.time_mlp(emb.to(z.dtype))
        h = self.conv_in(z)
        skips = [h]
        for level in self.down:
            for i, block in enumerate(level.blocks):
                h = block(h, temb)
                if level.attentions:
                    h = level.attentions[i](h, context)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)
        h = self.middle(h, temb, context)
        for level in self.up:
            for i, block in enumerate(level.blocks):
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
                if level.attentions:
                    h = level.attentions[i](h, context)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))
