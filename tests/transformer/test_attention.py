"""The attention core against the paper's formula written out, and against torch.nn.MultiheadAttention."""

import pytest
import torch

from transformer.attention import (
    KVCache,
    MultiHeadAttention,
    attention_reference,
    causal_mask,
    combine_masks,
    flash_attention,
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


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_mha_matches_torch_multihead_attention(kernel):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ours = MultiHeadAttention(32, 4, kernel=kernel).eval()
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


# FlashAttention's tiling (Dao et al. 2022/2023): outputs and gradients against the explicit loop.

FLASH_CASES = ["none", "causal", "padding", "causal+padding", "decode", "per-head"]


def _case(kind, n_heads, n_kv_heads, q_len, k_len, batch=2):
    """(mask, is_causal) for one of FLASH_CASES; no query row is fully masked."""
    mask, is_causal = None, kind in ("causal", "decode", "causal+padding")
    if kind in ("padding", "causal+padding"):
        pad = torch.zeros(batch, k_len, dtype=torch.bool)
        pad[1, : k_len // 3] = True  # row 1 left-padded; its first queries still see themselves
        pad[0, -2:] = kind == "padding"  # row 0 right-padded (not with causal: rows would be empty)
        mask = padding_mask(pad)
        if kind == "causal+padding":
            mask = mask.clone()
            mask[1, ..., : k_len // 3] = True  # keep left-padded rows alive under the causal mask
            mask[1, ..., k_len // 3 - 1] = False
    if kind == "per-head":
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(batch, n_heads, q_len, k_len, generator=g) > 0.3
        mask[..., 0] = True
    return mask, is_causal


# (T, S, tile): not a multiple of the tile, an exact multiple, a tile bigger than the sequence.
FLASH_SHAPES = [(37, 37, 8), (16, 16, 16), (13, 13, 64)]


@pytest.mark.parametrize("n_heads,n_kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize(
    "kind,q_len,k_len,block",
    [(kind, *shape) for kind in FLASH_CASES if kind != "decode" for shape in FLASH_SHAPES]
    + [("decode", 5, 29, 4), ("decode", 1, 29, 8)],
)
def test_flash_attention_equals_explicit_with_gradients(
    n_heads, n_kv_heads, kind, q_len, k_len, block
):
    """Every mask kind and head layout, decoding shapes (T < S); gradients of q, k and v by
    autograd through the explicit per-head loop."""
    q, k, v = _qkv(n_heads, n_kv_heads, q_len, k_len)
    mask, is_causal = _case(kind, n_heads, n_kv_heads, q_len, k_len)
    full_mask = combine_masks(mask, causal_mask(q_len, k_len) if is_causal else None)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad)
        return out.detach(), [t.grad for t in leaves]

    expected, expected_grads = run(lambda q, k, v: _explicit(q, k, v, full_mask))
    out, grads = run(
        lambda q, k, v: flash_attention(q, k, v, mask, is_causal, block_q=block, block_k=block)
    )
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_flash_attention_passes_gradcheck_with_uneven_tiles():
    """Finite differences in float64, GQA, causal, tiles of 3 queries by 5 keys."""
    q, k, v = (t.double().requires_grad_() for t in _qkv(4, 2, 7, 7, batch=1, head_dim=4))
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention(q, k, v, is_causal=True, block_q=3, block_k=5), (q, k, v)
    )


def test_flash_kernel_through_multi_head_attention_and_the_dispatcher():
    torch.manual_seed(0)
    fused = MultiHeadAttention(32, 4, 2).eval()
    flash = MultiHeadAttention(32, 4, 2, kernel="flash").eval()
    flash.load_state_dict(fused.state_dict())
    x = torch.randn(2, 70, 32)
    torch.testing.assert_close(
        flash(x, is_causal=True), fused(x, is_causal=True), atol=1e-5, rtol=1e-5
    )
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="no attention dropout"):
        scaled_dot_product_attention(q, k, v, dropout_p=0.1, kernel="flash")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        MultiHeadAttention(32, 4, kernel="tiled")
    with pytest.raises(ValueError, match="tile sizes must be positive"):
        flash_attention(q, k, v, block_q=0)


def test_a_query_with_no_key_gets_zeros_as_in_torch():
    """Left padding under a causal mask leaves the first query with no key it may attend to:
    PyTorch's kernel returns zeros there and clean gradients; the written-out path (which attention
    dropout takes on a CPU) must not return NaN, which would reach every gradient."""
    q, k, v = (t.requires_grad_() for t in _qkv(4, 2, q_len=4, k_len=4))
    mask = torch.tensor([[False, True, True, True], [True, True, True, True]])[:, None, None, :]
    mask = combine_masks(mask, causal_mask(4, 4, q.device))
    upstream = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for kernel in ("fused", "reference"):
        out = scaled_dot_product_attention(q, k, v, mask, kernel=kernel)
        out.backward(upstream)
        grads.append([out.detach()] + [t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    assert (grads[1][0][0, :, 0] == 0).all()
    for ours, torchs in zip(grads[1], grads[0]):
        assert not ours.isnan().any()
        torch.testing.assert_close(ours, torchs, atol=1e-5, rtol=1e-4)
    out = scaled_dot_product_attention(q, k, v, mask, dropout_p=0.1)  # the CPU dropout path
    assert not out.isnan().any() and (out[0, :, 0] == 0).all()


@pytest.mark.parametrize("n_heads, n_kv_heads", HEAD_LAYOUTS)
def test_attention_dropout_on_cpu_drops_weights_at_rate_p(n_heads, n_kv_heads):
    """With q = 0 every unmasked key gets weight 1 / S', and v = the identity makes the output the
    weights themselves: after dropout each is 0 or 1 / (S' (1 − p)), a fraction p of them 0 (within
    5σ of a binomial), masked keys always 0, and the gradient flows only through kept weights."""
    torch.manual_seed(0)
    p, batch, length = 0.25, 64, 16
    q = torch.zeros(batch, n_heads, length, length)
    k = torch.randn(batch, n_kv_heads, length, length)
    v = torch.eye(length).expand(batch, n_kv_heads, length, length).clone().requires_grad_()
    mask = torch.ones(1, 1, 1, length, dtype=torch.bool)
    mask[..., 12:] = False  # S' = 12 keys may be attended to
    out = scaled_dot_product_attention(q, k, v, mask, dropout_p=p)
    kept = 1 / (12 * (1 - p))
    assert (out[..., 12:] == 0).all()
    seen = out[..., :12]
    assert (
        torch.isclose(seen, torch.tensor(0.0))
        .logical_or(torch.isclose(seen, torch.tensor(kept)))
        .all()
    )
    dropped = (seen == 0).float().mean().item()
    sigma = (p * (1 - p) / seen.numel()) ** 0.5
    assert abs(dropped - p) < 5 * sigma
    out.sum().backward()  # d out / d v: the kept weights summed over query heads and queries
    assert v.grad[..., 12:, :].abs().max() == 0


@pytest.mark.parametrize("kernel", ["reference", "flash"])
def test_flash_attention_saves_no_quadratic_tensor_for_backward(kernel):
    """What autograd keeps for the backward pass: the reference keeps T×T probabilities, the tiled
    kernel only q, k, v, O and the log-sum-exp (linear in T)."""
    n, d = 256, 16
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, n, n, batch=1, head_dim=d))
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        scaled_dot_product_attention(q, k, v, is_causal=True, kernel=kernel).sum().backward()
    if kernel == "flash":
        assert max(saved) <= 2 * n * d and sum(saved) <= 10 * 2 * n * d
    else:
        assert max(saved) >= 2 * n * n
