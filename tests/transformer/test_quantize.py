"""NF4 with double quantisation (QLoRA §3) and int8 absmax against the paper's numbers and the
error bounds their block constants imply; QLoRA = a quantised base with LoRA on top."""

import pytest
import torch
from torch import nn

from transformer.lora import LoRAError, add_lora, merge_lora
from transformer.quantize import (
    ABSMAX_BLOCK,
    NF4_BLOCK,
    Int8Linear,
    NF4Linear,
    QuantizeError,
    dequantize_model,
    dequantize_nf4,
    nf4_blocks,
    nf4_code,
    quantize_model,
    quantize_nf4,
    weight_bytes,
)

# QLoRA Appendix E (and bitsandbytes' NF4 table), to the digits printed there.
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip


def test_nf4_code_book_is_the_papers_table():
    torch.testing.assert_close(nf4_code(), torch.tensor(PAPER_NF4), rtol=0, atol=1e-6)


def test_nf4_first_level_equals_bitsandbytes():
    """Against bitsandbytes' CPU path (without its double quantisation, whose second level uses
    an 8-bit float code where ours uses int8): the same code book, the same packed 4-bit codes,
    the same dequantised weights."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(4)
    w = torch.randn(48, 256) * 0.05
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    torch.testing.assert_close(state.code.float(), nf4_code(), rtol=0, atol=2e-7)  # float32 ulps
    index, absmax = nf4_blocks(w)
    torch.testing.assert_close(absmax, state.absmax.float())
    assert torch.equal(quantize_nf4(w)["packed"], packed.flatten())
    ours = (nf4_code()[index.long()] * absmax[:, None]).view_as(w)
    torch.testing.assert_close(ours, bnb.dequantize_4bit(packed, state), rtol=0, atol=1e-7)


def test_nf4_round_trip_error_is_within_what_the_block_constants_imply():
    torch.manual_seed(0)
    w = torch.randn(96, 200) * 0.02  # 19,200 weights: 300 blocks, the last absmax block partial
    q = quantize_nf4(w)
    back = dequantize_nf4(q, w.shape)
    blocks = torch.nn.functional.pad(w.flatten(), (0, (-w.numel()) % NF4_BLOCK)).view(-1, 64)
    true_absmax = blocks.abs().amax(1)
    n_blocks = len(true_absmax)
    scale = q["absmax_scale"].repeat_interleave(ABSMAX_BLOCK)[:n_blocks]
    absmax = q["absmax_q"][:n_blocks].float() * scale + q["absmax_mean"]
    assert ((absmax - true_absmax).abs() <= scale / 2 + 1e-9).all()  # 8-bit second level
    half_gap = (nf4_code()[1:] - nf4_code()[:-1]).max() / 2
    bound = absmax * half_gap + (absmax - true_absmax).abs() + 1e-7
    error = (back.flatten() - w.flatten()).abs().view(-1, 64)
    assert (error <= bound[:, None]).all()
    # and the zero of the code is exact: zero weights come back as zeros
    w[0, :64] = 0
    assert (dequantize_nf4(quantize_nf4(w), w.shape)[0, :64] == 0).all()


def test_nf4_bits_per_parameter_is_the_papers_4_127():
    layer = NF4Linear(nn.Linear(4096, 4096, bias=False))
    bits = 8 * weight_bytes(layer) / (4096 * 4096)
    assert abs(bits - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4 and abs(bits - 4.127) < 1e-3


def test_int8_round_trip_error_is_half_a_step_per_row():
    torch.manual_seed(1)
    linear = nn.Linear(40, 30)
    q = Int8Linear(linear)
    error = (q.dequantized_weight() - linear.weight.detach()).abs()
    step = linear.weight.detach().abs().amax(1, keepdim=True) / 127
    assert (error <= step / 2 + 1e-7).all()
    x = torch.randn(5, 40)
    expected = x @ q.dequantized_weight().T + linear.bias.detach()
    torch.testing.assert_close(q(x), expected)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_trains_the_adapters_on_a_frozen_quantised_base(kind):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))
    x = torch.randn(8, 64)
    reference = model(x).detach()
    names = quantize_model(model, kind)
    assert names == ["0", "2"]
    assert weight_bytes(model) < 0.3 * (64 * 128 + 128 + 128 * 10 + 10) * 4
    quantized_out = model(x).detach()
    tolerance = {"nf4": 0.25, "int8": 0.02}[kind]  # 4 bits on nn.Linear's uniform init: coarse
    assert (quantized_out - reference).abs().max() < tolerance * reference.abs().max()
    add_lora(model, ["0", "2"], rank=4, alpha=8.0)
    torch.testing.assert_close(model(x), quantized_out)  # B = 0: exactly the quantised base
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, frozen[k]), k
    with pytest.raises(LoRAError, match="dequantise the model first"):
        merge_lora(model)


def test_quantising_twice_and_unknown_kinds_are_refused():
    model = nn.Sequential(nn.Linear(8, 8))
    quantize_model(model, "nf4")
    with pytest.raises(QuantizeError, match="already quantised"):
        quantize_model(model, "int8")
    with pytest.raises(QuantizeError, match="unknown quantisation 'int3'"):
        quantize_model(nn.Sequential(nn.Linear(8, 8)), "int3")


def test_dequantized_model_is_plain_and_equal():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(70, 33))
    quantize_model(model, "nf4")
    x = torch.randn(4, 70)
    quantized = model(x)
    dequantize_model(model)
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), quantized)
