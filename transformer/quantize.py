"""Quantised frozen linear layers: NF4 with double quantisation (QLoRA, Dettmers et al. 2023, §3);
int8 absmax per output channel; int4 group-wise (as gpt-fast quantises Llama for decoding). All
take LoRA adapters on top (`transformer.lora`): with NF4 that is QLoRA.

Weight-only int8 and int4 are also the deployment formats: batch-1 decoding reads every weight once
per token, so fewer bytes per weight is more tokens per second. Their forward runs PyTorch's
weight-only kernels on a CPU (`torch._weight_int8pack_mm`; `aten._weight_int4pack_mm_for_cpu`,
which unpacks and scales inside the matmul), never a dequantised copy of the weight. Those kernels
are fast for bfloat16 activations only (with float32 ones they take a generic path 5-13× slower
than a float32 `F.linear`), so the input is cast to bfloat16 for the kernel and the output back, as
gpt-fast runs them. On other devices the layers dequantise and call `F.linear`. Their backward
(LoRA training on an int8/int4 base) multiplies by the dequantised weight. NF4 has no PyTorch
kernel and always dequantises.

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


class _WeightOnlyMatmul(torch.autograd.Function):
    """x Wᵀ through a layer's weight-only kernel; the backward pass multiplies by the dequantised
    weight (the weight itself is frozen: no gradient)."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: KernelLinear) -> Tensor:
        ctx.layer = layer
        return layer.kernel(x.to(KERNEL_DTYPE)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad @ ctx.layer.dequantized_weight().to(grad.dtype), None


class KernelLinear(QuantizedLinear):
    """A quantised layer with a CPU matmul kernel that reads the packed weight directly, in
    bfloat16 (`KERNEL_DTYPE`: the kernels' fast path)."""

    def kernel(self, x: Tensor) -> Tensor:  # (tokens, in) in KERNEL_DTYPE -> (tokens, out)
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        flat = x.reshape(-1, self.in_features).contiguous()
        if torch.is_grad_enabled() and x.requires_grad:  # training through the layer (LoRA)
            y = _WeightOnlyMatmul.apply(flat, self)
        else:  # the same kernel without autograd's bookkeeping (decoding: every call counts)
            y = self.kernel(flat.to(KERNEL_DTYPE)).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


KERNEL_DTYPE = torch.bfloat16


class Int8Linear(KernelLinear):
    """int8 with one absmax scale per output channel (row), symmetric: W ≈ q · s,
    s = max|W_row| / 127, stored in bfloat16 (rounded up, so that |w| / s ≤ 127 still). The
    forward is `torch._weight_int8pack_mm` (int8 weights converted inside the kernel, the row scale
    applied to its output). Its bfloat16 path needs rows of a multiple of 16 weights (it crashes on
    others), so rows are stored padded with zeros and the input padded to match."""

    bits = "int8"

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype | None = None):
        super().__init__(linear, compute_dtype)
        weight = F.pad(linear.weight.detach().float(), (0, (-self.in_features) % 16))
        # bfloat16 rounds to nearest within 2^-9: scaling by 1 + 2^-8 first rounds up.
        scale = (weight.abs().amax(1) / 127 * (1 + 2**-8)).to(KERNEL_DTYPE)
        quantized = torch.round(weight / scale.float().clamp(min=1e-30)[:, None])
        self.register_buffer("weight_q", quantized.clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)

    def dequantized_weight(self) -> Tensor:
        weight = self.weight_q[:, : self.in_features].float() * self.scale.float()[:, None]
        return weight.to(self.compute_dtype)

    def kernel(self, x: Tensor) -> Tensor:
        if self.weight_q.size(1) != self.in_features:
            x = F.pad(x, (0, self.weight_q.size(1) - self.in_features))
        return torch._weight_int8pack_mm(x, self.weight_q, self.scale.to(KERNEL_DTYPE))


INT4_GROUP_SIZES = (32, 64, 128)
INT4_ROW_BLOCK = 64  # rows per block of the packed layout


def pack_int4(codes: Tensor) -> Tensor:
    """(rows, k) codes 0..15, rows a multiple of 64 -> (rows, k / 2) bytes in the stored layout, the
    one PyTorch's CPU int4 kernel reads on an AVX-512 machine: in each block of 64 rows, row j's and
    row j + 32's codes for input k share byte k·32 + j of the block, row j in the low nibble.
    Other CPUs read other layouts (AVX2: blocks of 32 rows); `kernel_int4_layout` converts."""
    rows, k = codes.shape
    blocks = codes.to(torch.uint8).view(-1, INT4_ROW_BLOCK, k)
    half = INT4_ROW_BLOCK // 2
    packed = (blocks[:, :half] | (blocks[:, half:] << 4)).transpose(1, 2)
    return packed.reshape(rows, k // 2).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: (rows, k / 2) bytes -> (rows, k) codes, uint8."""
    rows, k = packed.size(0), packed.size(1) * 2
    blocks = packed.view(-1, k, INT4_ROW_BLOCK // 2).transpose(1, 2)
    return torch.cat([blocks & 0xF, blocks >> 4], 1).reshape(rows, k)


def kernel_int4_layout(packed: Tensor) -> Tensor:
    """`packed` (the stored layout) as this machine's int4 kernel reads it. PyTorch packs for the
    CPU's vector width (`aten._convert_weight_to_int4pack_for_cpu`: blocks of 64 rows with AVX-512,
    32 with AVX2, other pairings without either), so checkpoints keep one layout and the kernel gets
    a copy made by PyTorch's own packer; where the two agree (AVX-512) it is `packed` itself."""
    if packed.device.type != "cpu":  # off the CPU the layers dequantise instead
        return packed
    theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).int(), 1)
    return packed if torch.equal(theirs, packed) else theirs


class Int4Linear(KernelLinear):
    """int4 group-wise, round to nearest (gpt-fast's `WeightOnlyInt4Linear`): each group of
    `group_size` consecutive input weights of a row gets its own scale and offset from its range,
    s = (max - min) / 15 and z = min + 8 s; a weight is stored as q = round((w - z) / s) + 8 in
    0..15 and read as (q - 8) · s + z. 4 bits per weight plus two bfloat16 constants per group (with
    groups of 64: 4.5 bits per weight); bfloat16 is what the kernel reads, as in gpt-fast.

    Stored as the kernel reads it on an AVX-512 CPU (`pack_int4`): the codes, two per byte, and the
    (groups, rows, 2) scales and offsets; on other CPUs the kernel reads a repacked copy of the codes
    (`kernel_int4_layout`, made at its first call after building or loading). Rows are padded to a multiple of
    64 and inputs to a multiple of the group size with zeros (the forward pads its input and drops
    the padded outputs)."""

    bits = "int4"

    def __init__(
        self, linear: nn.Linear, compute_dtype: torch.dtype | None = None, group_size: int = 64
    ):
        super().__init__(linear, compute_dtype)
        if group_size not in INT4_GROUP_SIZES:
            raise QuantizeError(
                f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                f"not {group_size}"
            )
        self.group_size = group_size
        weight = linear.weight.detach().float()
        rows = (-self.out_features) % INT4_ROW_BLOCK
        weight = F.pad(weight, (0, (-self.in_features) % group_size, 0, rows))
        groups = weight.view(weight.size(0), -1, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        # s and z as stored (bfloat16), and the codes nearest to each weight on that grid.
        scale = ((high - low) / 15).clamp(min=1e-6).to(KERNEL_DTYPE).float()  # (rows, groups)
        zero = (low + 8 * scale).to(KERNEL_DTYPE).float()
        codes = torch.round((groups - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
        self.register_buffer("weight_q", pack_int4(codes.view(weight.shape)))
        scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).to(KERNEL_DTYPE)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())  # (groups, rows, 2)
        self.kernel_weight = None  # the codes as this CPU's kernel reads them, made at first use

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.kernel_weight = None  # repacked from the loaded codes at the next call

    def dequantized_weight(self) -> Tensor:
        scale, zero = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (rows, groups)
        codes = unpack_int4(self.weight_q).float()
        groups = codes.view(codes.size(0), -1, self.group_size)
        weight = ((groups - 8) * scale[..., None] + zero[..., None]).view(codes.shape)
        return weight[: self.out_features, : self.in_features].to(self.compute_dtype)

    def kernel(self, x: Tensor) -> Tensor:
        if self.weight_q.size(1) * 2 != self.in_features:
            x = F.pad(x, (0, self.weight_q.size(1) * 2 - self.in_features))
        if self.kernel_weight is None:
            self.kernel_weight = kernel_int4_layout(self.weight_q)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.kernel_weight, self.group_size, self.scales_and_zeros.to(KERNEL_DTYPE)
        )  # .to: a no-op unless model.to(dtype) converted the constants
        return y if y.size(1) == self.out_features else y[:, : self.out_features]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


QUANTIZED = {"nf4": NF4Linear, "int8": Int8Linear, "int4": Int4Linear}


def quantize_model(
    model: nn.Module, kind: str, skip: tuple[str, ...] = (), group_size: int = 64
) -> list[str]:
    """Replace every `nn.Linear` (but those named in `skip`, e.g. the output head) by its
    quantised form, in place; returns the quantised names. The model is frozen afterwards.
    `group_size` is int4's (32, 64 or 128)."""
    if kind not in QUANTIZED:
        raise QuantizeError(f"unknown quantisation {kind!r}; choose one of: {', '.join(QUANTIZED)}")
    if kind == "int4" and group_size not in INT4_GROUP_SIZES:
        raise QuantizeError(
            f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
            f"not {group_size}"
        )
    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise QuantizeError("the model is already quantised; quantising it twice would lose more")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and n.rsplit(".", 1)[-1] not in skip and n not in skip]  # fmt: skip
    if not names:
        raise QuantizeError("the model has no linear layer to quantise")
    options = {"group_size": group_size} if kind == "int4" else {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QUANTIZED[kind](getattr(parent, child), **options))
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
