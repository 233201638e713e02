"""transformer.dropout against the closed form of inverted dropout: each element dropped
independently with probability p, the rest scaled by the inverse of the keep probability."""

import math

import pytest
import torch

from transformer.dropout import LEVELS, Dropout, dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_drop_rate_and_mean_match_the_closed_form(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of 4: the last random word is cut
    y = dropout(torch.ones(n), p)
    dropped = (y == 0).double()
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(dropped.mean().item() - p) < 5 * sd
    # Each of the four 16-bit pieces of a random word (the top one has a 0 for its 16th bit) drops
    # at p.
    for offset in range(4):
        piece = dropped[offset::4]
        assert abs(piece.mean().item() - p) < 5 * math.sqrt(p * (1 - p) / piece.numel())
    assert abs(y.double().mean().item() - 1.0) < 5 * sd / (1 - p)


def test_kept_elements_are_scaled_by_the_inverse_keep_probability():
    torch.manual_seed(1)
    x = torch.randn(4, 257, dtype=torch.float64)
    y = dropout(x, 0.2)
    kept = y != 0
    threshold = round(0.2 * LEVELS)
    torch.testing.assert_close(y[kept], x[kept] * LEVELS / (LEVELS - threshold), rtol=0, atol=0)
    assert 0 < kept.sum() < x.numel()


def test_neighbouring_masks_are_independent():
    torch.manual_seed(2)
    kept = (dropout(torch.ones(400_000), 0.5) != 0).double()
    # P(both kept) for neighbours, within one random word and across words, is 1/4.
    for lag in (1, 2, 3, 4):
        both = (kept[:-lag] * kept[lag:]).mean().item()
        assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / kept.numel())


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(3)
    x = torch.randn(3, 5, 7, requires_grad=True)
    y = dropout(x, 0.3)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    scale = LEVELS / (LEVELS - round(0.3 * LEVELS))
    torch.testing.assert_close(x.grad, upstream * (y != 0) * scale)


def test_masks_follow_the_seed():
    x = torch.ones(1000)
    torch.manual_seed(4)
    a = dropout(x, 0.1)
    torch.manual_seed(4)
    b = dropout(x, 0.1)
    c = dropout(x, 0.1)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_evaluation_and_zero_rate_pass_the_input_through():
    x = torch.randn(8, 8)
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    module = Dropout(0.5).eval()
    assert module(x) is x
    assert "p=0.5" in repr(module)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_rates_outside_zero_to_one_are_refused(p):
    with pytest.raises(ValueError, match="dropout probability"):
        dropout(torch.ones(3), p)
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(p)


def test_bfloat16_keeps_its_dtype_and_rate():
    torch.manual_seed(5)
    y = dropout(torch.ones(200_000, dtype=torch.bfloat16), 0.1)
    assert y.dtype == torch.bfloat16
    assert abs((y == 0).float().mean().item() - 0.1) < 5 * math.sqrt(0.09 / y.numel())
