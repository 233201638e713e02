"""ALiBi (Press et al. 2022) in the shared attention core: the slopes against the paper's numbers
and BLOOM's implementation in `transformers`, the bias against one built by hand, and attention
with the bias against the paper's own formulation (fairseq adds m·j, not -m·(i - j): the two differ
by a constant per query row, which the softmax cancels)."""

import pytest
import torch

from transformer.attention import (
    MultiHeadAttention,
    alibi_bias,
    alibi_slopes,
    causal_mask,
    scaled_dot_product_attention,
)


def test_slopes_for_eight_heads_are_the_papers():
    # §3: "for a model with 8 heads, the slopes we use are the geometric sequence 1/2, 1/4, ..., 1/256"
    assert alibi_slopes(8).tolist() == [1 / 2**i for i in range(1, 9)]


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 40])
def test_slopes_match_bloom_for_every_head_count(n_heads):
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    alibi = bloom.build_alibi_tensor(torch.ones(1, 3), n_heads, torch.float32)  # slope · position
    torch.testing.assert_close(alibi_slopes(n_heads), alibi[:, 0, 1], rtol=1e-6, atol=0)


def test_bias_is_minus_slope_times_distance():
    bias = alibi_bias(torch.tensor([0.5, 0.25]), torch.arange(3), torch.arange(3))
    by_hand = torch.tensor(
        [
            [[0.0, 0.5, 1.0], [-0.5, 0.0, 0.5], [-1.0, -0.5, 0.0]],
            [[0.0, 0.25, 0.5], [-0.25, 0.0, 0.25], [-0.5, -0.25, 0.0]],
        ]
    )
    assert torch.equal(bias, by_hand)
    # Decoding: one query at position 4 against keys 0..4.
    assert alibi_bias(torch.tensor([0.5]), torch.tensor([4]), torch.arange(5)).tolist() == [
        [[-2.0, -1.5, -1.0, -0.5, 0.0]]
    ]


def _fairseq_attention(q, k, v, slopes, mask):
    """Press et al.'s code: scores + m·j (key position only), per head, by a loop."""
    n_rep = q.size(1) // k.size(1)
    out = torch.empty_like(q)
    key_pos = torch.arange(k.size(2), dtype=torch.float32)
    for h in range(q.size(1)):
        s = q[:, h] @ k[:, h // n_rep].transpose(-2, -1) / q.size(-1) ** 0.5
        s = s + slopes[h] * key_pos
        s = s.masked_fill(~mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))[:, h], -1e30)
        out[:, h] = torch.softmax(s, -1) @ v[:, h // n_rep]
    return out


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1), (6, 2)])
@pytest.mark.parametrize("kernel", ["fused", "reference"])
@pytest.mark.parametrize("kind", ["causal", "causal+padding", "decode", "window"])
def test_attention_with_alibi_equals_the_papers_formulation(n_heads, n_kv_heads, kernel, kind):
    g = torch.Generator().manual_seed(0)
    q_len, k_len = (2, 7) if kind == "decode" else (7, 7)
    q = torch.randn(2, n_heads, q_len, 8, generator=g)
    k = torch.randn(2, n_kv_heads, k_len, 8, generator=g)
    v = torch.randn(2, n_kv_heads, k_len, 8, generator=g)
    slopes = alibi_slopes(n_heads)
    bias = alibi_bias(slopes, torch.arange(k_len - q_len, k_len), torch.arange(k_len))
    mask = causal_mask(q_len, k_len)[None, None]
    if kind == "causal+padding":
        mask = mask & torch.tensor([[True] * 7, [False, False] + [True] * 5])[:, None, None, :]
        mask = mask | torch.eye(7, dtype=torch.bool)  # padding queries see themselves
    if kind == "window":  # Mistral's sliding window of 3
        distance = torch.arange(q_len)[:, None] - torch.arange(k_len)[None, :]
        mask = mask & (distance < 3)
    ours = scaled_dot_product_attention(q, k, v, mask, kernel=kernel, bias=bias)
    torch.testing.assert_close(
        ours, _fairseq_attention(q, k, v, slopes, mask), atol=1e-5, rtol=1e-5
    )
    if kind == "causal":  # is_causal=True instead of the mask: the same
        same = scaled_dot_product_attention(q, k, v, is_causal=True, kernel=kernel, bias=bias)
        torch.testing.assert_close(same, ours, atol=1e-6, rtol=1e-6)


def test_without_the_bias_the_answer_differs():
    # The check above can fail: with the bias dropped, the outputs are far apart.
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 6, 8, generator=g) for _ in range(3))
    slopes, mask = alibi_slopes(4), causal_mask(6, 6)[None, None]
    plain = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (plain - _fairseq_attention(q, k, v, slopes, mask)).abs().max() > 1e-2


def test_multi_head_attention_passes_the_bias_and_flash_refuses_it():
    attn = MultiHeadAttention(16, 4, 2, bias=False)
    x = torch.randn(1, 5, 16)
    bias = alibi_bias(alibi_slopes(4), torch.arange(5), torch.arange(5))
    with_bias = attn(x, is_causal=True, bias=bias)
    assert not torch.allclose(with_bias, attn(x, is_causal=True))
    attn.kernel = "flash"
    with pytest.raises(ValueError, match="no additive bias"):
        attn(x, is_causal=True, bias=bias)
