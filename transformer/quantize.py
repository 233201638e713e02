"""Quantised frozen linear layers: NF4 with double quantisation (QLoRA, Dettmers et al. 2023, §3),
and int8 absmax per output channel as the simpler baseline. Both dequantise on the fly in the
forward pass and take LoRA adapters on top (`transformer.lora`): that is QLoRA.

QLoRA §3, in order:

- **4-bit NormalFloat.** Pre-trained weights are roughly N(0, σ²). NF4's 16 values are quantiles of
  N(0, 1) normalised to [−1, 1], so that each code is used about equally often, with an exact zero
  (`nf4_code`: 8 quantiles for the positive half and 7 for the negative, Appendix E and
  bitsandbytes' `create_normal_map`).
- **Block-wise absmax quantisation** (Eq. 1): each block of 64 consecutive weights is divided by its
  absolute maximum c₂ (so it lies in [−1, 1]) and every weight stored as the index of the nearest
  code (4 bits, two per byte).
- **Double quantisation.** The fp32 constants c₂ (32/64 = 0.5 bits per weight) are themselves
  quantised: their mean is subtracted (they are positive), then blocks of 256 are stored in 8 bits
  with one fp32 constant c₁ per block: 8/64 + 32/(64·256) = 0.127 bits per weight instead of 0.5.
  Deviation: the second level stores int8 with an absmax scale (a linear code), where the paper
  and bitsandbytes use an 8-bit float code; the bits per weight are the same (4.127).
- The forward pass dequantises W = code[index] · c₂ to the compute dtype and runs a plain linear
  layer (§3, Eq. 5: "we dequantize the storage data type to the computation data type").
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .training import UserError

NF4_BLOCK = 64  # weights per first-level absmax constant (§3)
ABSMAX_BLOCK = 256  # first-level constants per second-level constant (double quantisation)


class QuantizeError(UserError, ValueError):
    """A model or layer that cannot be quantised (again) or used quantised."""


@functools.cache
def nf4_code() -> Tensor:
    """The 16 NF4 values, ascending, in [−1, 1] with an exact zero (QLoRA §3, Appendix E).

    Quantiles of N(0, 1) at evenly spaced probabilities from `offset` to 1/2: 8 for the positive
    half (9 points, the last is the median, dropped) and 7 for the negative one, plus zero; divided
    by the largest so that the extremes are ±1. `offset` = ½(1 − 1/30 + 1 − 1/32) keeps the
    outermost quantile finite (bitsandbytes' `create_normal_map(0.9677083)`). Computed once (every
    forward pass reads it); do not modify the returned tensor.
    """
    offset = 0.9677083
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    positive = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).float()


def _blocks(flat: Tensor, block: int) -> Tensor:
    """(n_blocks, block), zero-padded at the end."""
    pad = (-flat.numel()) % block
    return F.pad(flat, (0, pad)).view(-1, block)


def nf4_blocks(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 1 block by block: (index of the nearest NF4 code of every weight (n_blocks, 64), uint8;
    the absmax constant c₂ of every block of 64, fp32). The last block is zero-padded."""
    code = nf4_code().to(weight.device)
    blocks = _blocks(weight.detach().float().flatten(), NF4_BLOCK)
    absmax = blocks.abs().amax(1)
    normed = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    index = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8)  # nearest code
    return index, absmax


def quantize_nf4(weight: Tensor) -> dict[str, Tensor]:
    """NF4 indices (two per byte, the first in the high nibble) and the double-quantised block
    constants of `weight`."""
    index, absmax = nf4_blocks(weight)
    packed = (index[:, 0::2] << 4) | index[:, 1::2]
    # Double quantisation: c₂ - mean in int8 blocks of 256, one fp32 scale c₁ per block.
    mean = absmax.mean()
    centred = _blocks(absmax - mean, ABSMAX_BLOCK)
    scale = centred.abs().amax(1) / 127
    quantized = torch.round(centred / scale.clamp(min=torch.finfo(torch.float32).tiny)[:, None])
    return {
        "packed": packed.flatten(),
        "absmax_q": quantized.to(torch.int8).flatten(),
        "absmax_scale": scale,
        "absmax_mean": mean.reshape(1),
    }


def dequantize_nf4(q: dict[str, Tensor], shape: torch.Size, dtype=torch.float32) -> Tensor:
    """The weight `quantize_nf4` encoded, in `dtype`."""
    n = shape.numel()
    n_blocks = -(-n // NF4_BLOCK)
    scale = q["absmax_scale"].repeat_interleave(ABSMAX_BLOCK)[:n_blocks]
    absmax = q["absmax_q"][:n_blocks].float() * scale + q["absmax_mean"]
    packed = q["packed"]
    index = torch.stack((packed >> 4, packed & 0xF), dim=1).flatten().long()
    code = nf4_code().to(packed.device)
    values = code[index].view(-1, NF4_BLOCK) * absmax[:, None]
    return values.flatten()[:n].view(shape).to(dtype)


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored quantised and dequantised in the forward pass
    (to `compute_dtype`, the dtype of the layer it replaces); subclasses say how it is stored."""

    bits = ""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype or linear.weight.dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)

    def dequantized_weight(self) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantized_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.bits}"


class NF4Linear(QuantizedLinear):
    """NF4 with double quantisation (QLoRA §3)."""

    bits = "nf4"

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype | None = None):
        super().__init__(linear, compute_dtype)
        for name, tensor in quantize_nf4(linear.weight).items():
            self.register_buffer(name, tensor)

    def dequantized_weight(self) -> Tensor:
        q = {
            name: getattr(self, name)
            for name in ("packed", "absmax_q", "absmax_scale", "absmax_mean")
        }
        shape = torch.Size((self.out_features, self.in_features))
        return dequantize_nf4(q, shape, self.compute_dtype)


class Int8Linear(QuantizedLinear):
    """int8 with one absmax scale per output channel (row): W ≈ q · s, s = max|W_row| / 127. The
    baseline beside NF4."""

    bits = "int8"

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype | None = None):
        super().__init__(linear, compute_dtype)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1) / 127
        quantized = torch.round(weight / scale.clamp(min=1e-30)[:, None]).to(torch.int8)
        self.register_buffer("weight_q", quantized)
        self.register_buffer("scale", scale)

    def dequantized_weight(self) -> Tensor:
        return (self.weight_q.float() * self.scale[:, None]).to(self.compute_dtype)


QUANTIZED = {"nf4": NF4Linear, "int8": Int8Linear}


def quantize_model(model: nn.Module, kind: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Replace every `nn.Linear` (but those named in `skip`, e.g. the output head) by its
    quantised form, in place; returns the quantised names. The model is frozen afterwards."""
    if kind not in QUANTIZED:
        raise QuantizeError(f"unknown quantisation {kind!r}; choose one of: {', '.join(QUANTIZED)}")
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise QuantizeError("the model is already quantised; quantising it twice would lose more")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and n.rsplit(".", 1)[-1] not in skip and n not in skip]  # fmt: skip
    if not names:
        raise QuantizeError("the model has no linear layer to quantise")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QUANTIZED[kind](getattr(parent, child)))
    model.requires_grad_(False)
    return names


def dequantize_model(model: nn.Module) -> None:
    """Replace every quantised layer by an `nn.Linear` holding its dequantised weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None
            )
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            linear.to(module.compute_dtype)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, linear)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (tied tensors once): the model's weight memory."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # a tied one once
    return sum(t.numel() * t.element_size() for t in tensors.values())
