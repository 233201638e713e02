"""The attention core against the paper's formula written out, and against torch.nn.MultiheadAttention."""

import pytest
import torch

from transformer.attention import (
    KVCache,
    MultiHeadAttention,
    attention_reference,
    causal_mask,
    combine_masks,
    padding_mask,
    scaled_dot_product_attention,
)

HEAD_LAYOUTS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA


def _qkv(n_heads, n_kv_heads, q_len=5, k_len=5, batch=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_heads, q_len, head_dim, generator=g)
    k = torch.randn(batch, n_kv_heads, k_len, head_dim, generator=g)
    v = torch.randn(batch, n_kv_heads, k_len, head_dim, generator=g)
    return q, k, v


def _explicit(q, k, v, mask):
    """softmax(QKᵀ/√d)V with a loop over heads, independent of attention_reference's broadcasting."""
    n_rep = q.size(1) // k.size(1)
    out = torch.empty_like(q)
    for h in range(q.size(1)):
        s = q[:, h] @ k[:, h // n_rep].transpose(-2, -1) / q.size(-1) ** 0.5
        if mask is not None:
            m = mask.expand(q.size(0), q.size(1), q.size(2), k.size(2))[:, h]
            s = s.masked_fill(~m, float("-inf"))
        out[:, h] = torch.softmax(s, -1) @ v[:, h // n_rep]
    return out


def test_causal_mask_is_aligned_to_the_end():
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(3, 3).tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]


@pytest.mark.parametrize("n_heads,n_kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize(
    "kind", ["none", "causal", "padding", "causal+padding", "decode", "per-head"]
)
def test_fast_path_equals_reference(n_heads, n_kv_heads, kind):
    q_len, k_len = (2, 6) if kind == "decode" else (5, 5)
    q, k, v = _qkv(n_heads, n_kv_heads, q_len, k_len)
    pad = torch.zeros(2, k_len, dtype=torch.bool)
    pad[1, :2] = True  # row 1 is left-padded by two keys
    mask, is_causal = None, False
    if kind in ("causal", "decode"):
        is_causal = True
    if kind == "padding":
        mask = padding_mask(pad)
    if kind == "causal+padding":
        mask, is_causal = padding_mask(pad), True
        pad[1, :2] = False  # a fully masked query row has no defined output
        mask = padding_mask(pad)
    if kind == "per-head":
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(2, n_heads, q_len, k_len, generator=g) > 0.3
        mask[..., 0] = True
    full_mask = combine_masks(mask, causal_mask(q_len, k_len) if is_causal else None)
    expected = _explicit(q, k, v, full_mask)
    torch.testing.assert_close(attention_reference(q, k, v, mask, is_causal), expected)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, mask, is_causal), expected)


@pytest.mark.parametrize("n_heads,n_kv_heads", HEAD_LAYOUTS)
def test_cached_decoding_equals_full_causal_pass(n_heads, n_kv_heads):
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, n_heads, n_kv_heads).eval()
    x = torch.randn(2, 7, 32)
    full = attn(x, is_causal=True)
    cache = KVCache(2, n_kv_heads, 16, 32 // n_heads)
    prefix = attn(x[:, :4], is_causal=True, cache=cache)  # prompt in one go
    steps = [attn(x[:, t : t + 1], is_causal=True, cache=cache) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat([prefix, *steps], 1), full, atol=1e-5, rtol=1e-5)
    assert cache.position == 7


def test_kv_cache_refuses_overflow():
    cache = KVCache(1, 1, 2, 4)
    cache.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match="full"):
        cache.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


def _load_from_torch(ours: MultiHeadAttention, theirs: torch.nn.MultiheadAttention) -> None:
    wq, wk, wv = theirs.in_proj_weight.chunk(3)
    bq, bk, bv = theirs.in_proj_bias.chunk(3)
    with torch.no_grad():
        for lin, w, b in ((ours.wq, wq, bq), (ours.wk, wk, bk), (ours.wv, wv, bv)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        ours.wo.weight.copy_(theirs.out_proj.weight)
        ours.wo.bias.copy_(theirs.out_proj.bias)


@pytest.mark.parametrize("fast", [True, False])
def test_mha_matches_torch_multihead_attention(fast):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ours = MultiHeadAttention(32, 4, fast=fast).eval()
    _load_from_torch(ours, theirs)
    x, memory = torch.randn(3, 6, 32), torch.randn(3, 9, 32)
    key_is_pad = torch.zeros(3, 9, dtype=torch.bool)
    key_is_pad[0, -3:] = True
    # self-attention with a causal mask (torch: True = masked out)
    expected, _ = theirs(x, x, x, attn_mask=~causal_mask(6, 6), need_weights=False)
    torch.testing.assert_close(ours(x, is_causal=True), expected, atol=1e-5, rtol=1e-5)
    # cross-attention with key padding
    expected, _ = theirs(x, memory, memory, key_padding_mask=key_is_pad, need_weights=False)
    got = ours(x, context=memory, mask=padding_mask(key_is_pad))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_gqa_head_grouping_follows_llama_repeat_kv():
    """Query head h reads key/value head h // n_rep (Llama's repeat_kv); MQA = one shared head."""
    q, k, v = _qkv(4, 2)
    out = scaled_dot_product_attention(q, k, v)
    for h in range(4):
        single = scaled_dot_product_attention(
            q[:, h : h + 1], k[:, h // 2 : h // 2 + 1], v[:, h // 2 : h // 2 + 1]
        )
        torch.testing.assert_close(out[:, h : h + 1], single)


def test_rejects_bad_head_counts():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        MultiHeadAttention(32, 4, 3)
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)
