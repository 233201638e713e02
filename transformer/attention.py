"""Attention, written once for every package (Vaswani et al. 2017, §3.2).

Scaled dot-product attention (§3.2.1, Eq. 1) appears twice: `attention_reference` spells out
softmax(QKᵀ/√d_k)V as in the paper, and `scaled_dot_product_attention` hands the same maths to
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU). The
two agree to float32 tolerance on every mask kind; the fast path is the default.

`MultiHeadAttention` (§3.2.2) covers three head layouts through the number of key/value heads:
multi-head (MHA, `n_kv_heads == n_heads`), grouped-query (GQA, Ainslie et al. 2023,
`n_heads % n_kv_heads == 0`) and multi-query (MQA, Shazeer 2019, `n_kv_heads == 1`). Query head
`h` reads key/value head `h // (n_heads // n_kv_heads)`, the grouping Llama uses.

Shapes: queries (batch, n_heads, T, head_dim); keys and values (batch, n_kv_heads, S, head_dim).
Masks are boolean and broadcastable to (batch, n_heads, T, S); True means "may attend". A causal
mask is aligned to the end of the keys: query i sits at absolute position S - T + i, which is what
decoding with a KV cache needs (T new queries after S - T cached keys).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def causal_mask(q_len: int, k_len: int, device: torch.device | str | None = None) -> Tensor:
    """(q_len, k_len) boolean mask, True where query i may see key j (j <= k_len - q_len + i)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


def padding_mask(key_is_pad: Tensor) -> Tensor:
    """(batch, S) with True at padding keys -> (batch, 1, 1, S) mask, True where keys may be seen."""
    return ~key_is_pad.bool()[:, None, None, :]


def combine_masks(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of the masks that are given (broadcasting), or None when none is."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    combined = present[0]
    for m in present[1:]:
        combined = combined & m
    return combined


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
) -> Tensor:
    """Eq. (1), written out: softmax(QKᵀ / √d_k) V, with masked scores set to -inf.

    Grouped key/value heads are repeated to the query heads here: this path is for reading and for
    checking the fast one, not for speed.
    """
    n_rep = q.size(1) // k.size(1)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if is_causal:
        mask = combine_masks(mask, causal_mask(q.size(-2), k.size(-2), q.device))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    fast: bool = True,
) -> Tensor:
    """Scaled dot-product attention (Eq. 1) through PyTorch's fused kernel, or the reference.

    Grouped key/value heads are never repeated in memory here. With a mask that is the same for
    every head (the usual causal / padding masks) the query heads of a group are folded into the
    sequence axis, so each key/value head is read once for all its query heads; otherwise the
    kernel's own `enable_gqa` broadcasting is used.
    """
    if not fast:
        return attention_reference(q, k, v, mask, is_causal, dropout_p)
    q_len, k_len = q.size(-2), k.size(-2)
    if is_causal and (mask is not None or q_len != k_len):
        # The kernel's is_causal is aligned to the start; ours is aligned to the end.
        mask = combine_masks(mask, causal_mask(q_len, k_len, q.device))
        is_causal = False
    n_heads, n_kv_heads = q.size(1), k.size(1)
    n_rep = n_heads // n_kv_heads
    if n_rep > 1 and not is_causal and (mask is None or mask.dim() < 4 or mask.size(1) == 1):
        # Fold the n_rep query heads of a group into the sequence axis: row r*T + t is head r, query t.
        batch, _, _, head_dim = q.shape
        q_folded = q.reshape(batch, n_kv_heads, n_rep * q_len, head_dim)
        if mask is not None:
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            mask = mask.expand(mask.size(0), 1, q_len, k_len).repeat(1, 1, n_rep, 1)
        out = F.scaled_dot_product_attention(q_folded, k, v, attn_mask=mask, dropout_p=dropout_p)
        return out.reshape(batch, n_heads, q_len, head_dim)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=n_rep > 1
    )


class KVCache:
    """Keys and values of one attention layer, preallocated for (batch, max_len).

    `update` writes the new keys/values at the current position and returns everything cached so
    far; `position` is where the next token goes (the start position for rotary embeddings).
    Decoder-only models keep one per layer; the encoder-decoder keeps one per decoder self-attention
    layer and reorders it along the batch during beam search.
    """

    def __init__(
        self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device=None, dtype=None
    ):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.position = 0

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        start, end = self.position, self.position + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, {self.max_len} allocated")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.position = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep the batch rows `index` (beam search: follow the surviving hypotheses)."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class StaticKVCache:
    """Keys and values of a context that does not change while decoding (the encoder output in
    cross-attention, §3.2.3): projected on the first call, reused on every later one.

    Pass one per cross-attention layer as `cache=`; the context is then only read on the first
    call. `reorder` keeps batch rows, like `KVCache.reorder`.
    """

    def __init__(self):
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def filled(self) -> bool:
        return self.k is not None

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k, self.v = k, v
        return k, v

    def reorder(self, index: Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, index)
            self.v = self.v.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Multi-head attention (§3.2.2): h projected heads attend in parallel and are concatenated.

    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O,  head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    Self-attention when `context` is None, cross-attention (encoder-decoder, §3.2.3) when it is the
    encoder output. `rotary`, if given, maps (q, k) -> (q, k) after projection and before caching
    (rotary position embeddings, Su et al.); `cache`, if given, is a `KVCache`-like object whose
    `update(k, v)` returns all keys and values to attend to. A filled `StaticKVCache` skips the
    key/value projections altogether (cross-attention during incremental decoding).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        fast: bool = True,
    ):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if d_model % n_heads != 0:
                raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
            head_dim = d_model // n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.dropout, self.fast = dropout, fast
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=bias)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        cache=None,
        rotary=None,
    ) -> Tensor:
        batch, q_len, _ = x.shape
        source = x if context is None else context
        q = self.wq(x).view(batch, q_len, self.n_heads, self.head_dim).transpose(1, 2)
        if isinstance(cache, StaticKVCache) and cache.filled:
            k, v = cache.k, cache.v  # the context's keys/values, projected on the first call
        else:
            k = self.wk(source).view(batch, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)
            v = self.wv(source).view(batch, -1, self.n_kv_heads, self.head_dim).transpose(1, 2)
            if rotary is not None:
                q, k = rotary(q, k)
            if cache is not None:
                k, v = cache.update(k, v)
        dropout_p = self.dropout if self.training else 0.0
        y = scaled_dot_product_attention(q, k, v, mask, is_causal, dropout_p, self.fast)
        return self.wo(y.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.head_dim))
