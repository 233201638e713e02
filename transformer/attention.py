"""Attention, written once for every package (Vaswani et al. 2017, §3.2).

Scaled dot-product attention (§3.2.1, Eq. 1) has three kernels, chosen by name (`KERNELS`):
- `"reference"`: `attention_reference` spells out softmax(QKᵀ/√d_k)V as in the paper;
- `"fused"` (the default): `torch.nn.functional.scaled_dot_product_attention` (flash /
  memory-efficient kernels on GPU, a fused one on CPU; with attention dropout on a CPU, where
  PyTorch itself falls back to unfused math, the reference path with the package's dropout);
- `"flash"`: `flash_attention`, FlashAttention's tiling written out in PyTorch (Dao et al. 2022,
  in the loop order of FlashAttention-2, Dao 2023, Algorithms 1 and 2): the online softmax over key
  tiles, never forming the T×S score matrix, and a backward pass that recomputes each tile's
  probabilities from the saved log-sum-exp. Memory grows linearly with the sequence; on a CPU it is
  slower than the fused kernel (Python loops over tiles, see `benchmarks/attention.py`).
The three agree to float32 tolerance on every mask kind, gradients included.

`MultiHeadAttention` (§3.2.2) covers three head layouts through the number of key/value heads:
multi-head (MHA, `n_kv_heads == n_heads`), grouped-query (GQA, Ainslie et al. 2023,
`n_heads % n_kv_heads == 0`) and multi-query (MQA, Shazeer 2019, `n_kv_heads == 1`). Query head
`h` reads key/value head `h // (n_heads // n_kv_heads)`, the grouping Llama uses.

ALiBi (Press et al. 2022) is a property of attention, so it lives here too: `alibi_slopes` gives
each head its slope m, `alibi_bias` the bias -m·(i - j) that the kernels add to the scores
(`bias=`) instead of giving the tokens position embeddings.

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

from .dropout import dropout


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


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's head-specific slopes (Press et al. 2022, §3), float32 (n_heads,).

    For n heads, n a power of two, the geometric sequence that starts at 2^(-8/n) with that same
    ratio: 2^(-8/n), 2^(-16/n), ..., 2^(-8) (n = 8: 1/2, 1/4, ..., 1/256). Otherwise the slopes of
    the largest power of two p below n, followed by every other slope of 2p, up to n in all (the
    rule of the paper's code)."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be positive, got {n_heads}")

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(p) + geometric(2 * p)[0::2][: n_heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """The ALiBi bias (Press et al. 2022, Figure 3): -m_h · (i - j) for query position i and key
    position j, shape (n_heads, T, S), float32; added to QKᵀ/√d_k before the softmax. Keys after
    the query (j > i) are for the causal mask to hide."""
    distance = query_positions[:, None].float() - key_positions[None, :].float()  # i - j
    return -slopes.float()[:, None, None] * distance


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    bias: Tensor | None = None,
) -> Tensor:
    """Eq. (1), written out: softmax(QKᵀ / √d_k + bias) V, with masked scores set to -inf (and a
    query whose keys are all masked, such as a left-padding position, attending to nothing).

    Grouped key/value heads are repeated to the query heads here: this path is for reading, for
    checking the fast one, and for attention dropout on a CPU (see `scaled_dot_product_attention`).
    """
    n_rep = q.size(1) // k.size(1)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)
        v = v.repeat_interleave(n_rep, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if bias is not None:  # ALiBi
        scores = scores + bias.to(scores.dtype)
    if is_causal:
        mask = combine_masks(mask, causal_mask(q.size(-2), k.size(-2), q.device))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1)
    if mask is not None:  # a query with no key to attend to gets zeros, as in PyTorch's kernel
        weights = weights.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)
    weights = dropout(weights.to(q.dtype), dropout_p)  # the input itself when dropout_p is 0
    return weights @ v


KERNELS = ("fused", "reference", "flash")


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    kernel: str = "fused",
    bias: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention (Eq. 1) through one of `KERNELS` (module docstring).

    `bias`, broadcastable to (batch, n_heads, T, S), is added to the scaled scores (ALiBi's
    `alibi_bias`); the fused and reference kernels take it.

    In the fused kernel, grouped key/value heads are never repeated in memory: the query heads of a
    group are folded into the sequence axis (row r·T + t is the group's head r, query t), so each
    key/value head is read once for all its query heads, and a mask or bias is laid out the same way.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown attention kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    if kernel == "reference" or (kernel == "fused" and dropout_p > 0.0 and q.device.type == "cpu"):
        # With attention dropout, PyTorch's CPU kernel is not fused either: it falls back to this
        # same math with a `bernoulli_` mask. Written out here it takes the package's cheaper mask
        # (`transformer.dropout`), which makes a Multi30k training step faster (benchmarks/dropout.py).
        return attention_reference(q, k, v, mask, is_causal, dropout_p, bias)
    if kernel == "flash":
        if dropout_p > 0.0:
            raise ValueError("the flash kernel has no attention dropout; use kernel='fused'")
        if bias is not None:
            raise ValueError("the flash kernel takes no additive bias (ALiBi); use kernel='fused'")
        return flash_attention(q, k, v, mask, is_causal)
    q_len, k_len = q.size(-2), k.size(-2)
    if is_causal and (mask is not None or bias is not None or q_len != k_len):
        # The kernel's is_causal is aligned to the start; ours is aligned to the end.
        mask = combine_masks(mask, causal_mask(q_len, k_len, q.device))
        is_causal = False
    if bias is not None:  # one float mask: the bias where attending, -inf elsewhere
        bias = bias.to(q.dtype)
        mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    n_heads, n_kv_heads = q.size(1), k.size(1)
    n_rep = n_heads // n_kv_heads
    if n_rep > 1 and not is_causal:
        batch, _, _, head_dim = q.shape
        q_folded = q.reshape(batch, n_kv_heads, n_rep * q_len, head_dim)
        if mask is not None:
            mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
            mask = mask.expand(mask.size(0), n_heads, q_len, k_len)
            mask = mask.reshape(mask.size(0), n_kv_heads, n_rep * q_len, k_len)
        out = F.scaled_dot_product_attention(q_folded, k, v, attn_mask=mask, dropout_p=dropout_p)
        return out.reshape(batch, n_heads, q_len, head_dim)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, enable_gqa=n_rep > 1
    )


def _tiles(length: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive tiles of `size` covering `length` (the last may be shorter)."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def _grouped(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None):
    """Queries as (batch, n_kv_heads, n_rep, T, d) and keys/values as (batch, n_kv_heads, 1, S, d),
    so that each key/value head serves its group by broadcasting (GQA/MQA without copies); the mask
    as a boolean view that broadcasts to (batch, n_kv_heads, n_rep, T, S)."""
    batch, n_heads, q_len, head_dim = q.shape
    n_kv_heads, k_len = k.size(1), k.size(2)
    n_rep = n_heads // n_kv_heads
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        mask = mask.expand(*mask.shape[:2], q_len, k_len)  # a view: slicing tiles works on it
        if mask.size(1) == n_heads:
            mask = mask.reshape(mask.size(0), n_kv_heads, n_rep, q_len, k_len)
        else:
            mask = mask.unsqueeze(2)
    q = q.reshape(batch, n_kv_heads, n_rep, q_len, head_dim)
    return q, k.unsqueeze(2), v.unsqueeze(2), mask


class FlashAttention(torch.autograd.Function):
    """Exact attention by tiles (FlashAttention, Dao et al. 2022; loop order of FlashAttention-2,
    Dao 2023). Inputs are laid out by `_grouped`; `block_q` × `block_k` is the tile (B_r × B_c).

    On a GPU the tiles would live in SRAM and this loop would be one kernel; here each tile is a few
    batched matmuls, so what carries over is the memory: no T×S matrix is ever formed or saved.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, block_q: int, block_k: int, causal_offset: int | None):
        """Algorithm 1. For each query tile Q_i, walk the key tiles K_j, V_j keeping the running row
        max m_i, the running sum ℓ_i of exp(S - m_i) and the unnormalised output Õ_i; rescale them by
        exp(m_old - m_new) whenever the max grows (the online softmax). Save O and L = m + log ℓ."""
        scale, acc = q.size(-1) ** -0.5, _accumulator(q.dtype)
        q_len, k_len = q.size(-2), k.size(-2)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
        for i0, i1 in _tiles(q_len, block_q):
            q_i = q[..., i0:i1, :]
            m_i = torch.full(q_i.shape[:-1], float("-inf"), dtype=acc, device=q.device)  # m = -inf
            l_i = torch.zeros(q_i.shape[:-1], dtype=acc, device=q.device)  # ℓ = 0
            o_i = torch.zeros(q_i.shape[:-1] + v.shape[-1:], dtype=acc, device=q.device)  # Õ = 0
            for j0, j1 in _tiles(_keys_seen(i1, k_len, causal_offset), block_k):
                s_ij = (q_i @ k[..., j0:j1, :].transpose(-2, -1)).to(acc) * scale  # S_ij = Q_i K_jᵀ
                tile_mask = _tile_mask(mask, i0, i1, j0, j1, causal_offset, q.device)
                if tile_mask is not None:
                    s_ij = s_ij.masked_fill(~tile_mask, float("-inf"))
                m_new = torch.maximum(m_i, s_ij.amax(-1))  # m_i^(j)
                m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with no key yet
                p_ij = torch.exp(s_ij - m_safe[..., None])  # P̃_i^(j) = exp(S - m_i^(j))
                rescale = torch.exp(m_i - m_safe)  # exp(m_i^(j-1) - m_i^(j))
                l_i = rescale * l_i + p_ij.sum(-1)  # ℓ_i^(j)
                o_i = rescale[..., None] * o_i + p_ij @ v[..., j0:j1, :].to(acc)  # Õ_i^(j)
                m_i = m_new
            out[..., i0:i1, :] = o_i / l_i.clamp_min(1e-30)[..., None]  # O_i = diag(ℓ)⁻¹Õ
            lse[..., i0:i1] = m_i + torch.log(l_i)  # L_i = m_i + log ℓ_i
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.block_q, ctx.block_k, ctx.causal_offset = (
            mask,
            block_q,
            block_k,
            causal_offset,
        )
        return out

    @staticmethod
    def backward(ctx, d_out):
        """Algorithm 2. D = rowsum(dO ∘ O); for each key tile K_j, V_j and each query tile Q_i,
        recompute P_ij = exp(S_ij - L_i) from the saved log-sum-exp, then dV_j += P_ijᵀ dO_i,
        dP_ij = dO_i V_jᵀ, dS_ij = P_ij ∘ (dP_ij - D_i), dQ_i += dS_ij K_j, dK_j += dS_ijᵀ Q_i."""
        q, k, v, out, lse = ctx.saved_tensors
        mask, scale, acc = ctx.mask, q.size(-1) ** -0.5, _accumulator(q.dtype)
        q_len, k_len = q.size(-2), k.size(-2)
        d_out = d_out.to(acc)
        delta = (d_out * out.to(acc)).sum(-1)  # D = rowsum(dO ∘ O)
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # fully masked rows: P = 0
        d_q = torch.zeros(q.shape, dtype=acc, device=q.device)
        d_k = torch.zeros(k.shape, dtype=acc, device=q.device)
        d_v = torch.zeros(v.shape, dtype=acc, device=q.device)
        for j0, j1 in _tiles(k_len, ctx.block_k):
            k_j, v_j = k[..., j0:j1, :].to(acc), v[..., j0:j1, :].to(acc)
            for i0, i1 in _tiles(q_len, ctx.block_q):
                if _keys_seen(i1, k_len, ctx.causal_offset) <= j0:
                    continue  # the whole tile is above the causal diagonal
                q_i, do_i = q[..., i0:i1, :].to(acc), d_out[..., i0:i1, :]
                s_ij = (q_i @ k_j.transpose(-2, -1)) * scale  # S_ij = Q_i K_jᵀ
                tile_mask = _tile_mask(mask, i0, i1, j0, j1, ctx.causal_offset, q.device)
                if tile_mask is not None:
                    s_ij = s_ij.masked_fill(~tile_mask, float("-inf"))
                p_ij = torch.exp(s_ij - lse[..., i0:i1, None])  # P_ij = exp(S_ij - L_i)
                # dV_j += P_ijᵀ dO_i (summed over the query heads that share the key/value head)
                d_v[..., j0:j1, :] += (p_ij.transpose(-2, -1) @ do_i).sum(2, keepdim=True)
                d_p = do_i @ v_j.transpose(-2, -1)  # dP_ij = dO_i V_jᵀ
                d_s = p_ij * (d_p - delta[..., i0:i1, None])  # dS_ij = P ∘ (dP - D_i)
                d_q[..., i0:i1, :] += (d_s @ k_j) * scale  # dQ_i += dS_ij K_j
                d_k[..., j0:j1, :] += (d_s.transpose(-2, -1) @ q_i).sum(
                    2, keepdim=True
                ) * scale  # dK_j += dS_ijᵀ Q_i
        return d_q.to(q.dtype), d_k.to(k.dtype), d_v.to(v.dtype), None, None, None, None


def _tile_mask(mask, i0: int, i1: int, j0: int, j1: int, causal_offset: int | None, device):
    """The mask of tile (i, j): the given mask's slice, and the causal mask built for this tile
    alone where the tile crosses the diagonal (a T×S causal mask is never formed)."""
    tile = None if mask is None else mask[..., i0:i1, j0:j1]
    if causal_offset is not None and j1 - 1 > causal_offset + i0:  # a key after the first query
        query_position = torch.arange(i0, i1, device=device) + causal_offset
        causal = torch.arange(j0, j1, device=device) <= query_position[:, None]
        tile = causal if tile is None else tile & causal
    return tile


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """Tiles accumulate in float32 at least (float64 stays float64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _keys_seen(q_end: int, k_len: int, causal_offset: int | None) -> int:
    """How many keys the queries before `q_end` can see: all of them, or (causal) up to the last
    query's position; key tiles past it are skipped altogether, about half the work."""
    return k_len if causal_offset is None else min(k_len, causal_offset + q_end)


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    is_causal: bool = False,
    block_q: int = 64,
    block_k: int = 64,
) -> Tensor:
    """Eq. (1) by FlashAttention's tiling: same arguments and result as `attention_reference`
    (dropout aside), with O(T + S) extra memory instead of O(T·S), gradients included.

    `block_q` and `block_k` are the tile sizes (B_r and B_c in the papers). A fully masked query
    row gives zeros (the reference gives NaN there).
    """
    if block_q <= 0 or block_k <= 0:
        raise ValueError(f"tile sizes must be positive, got block_q={block_q}, block_k={block_k}")
    batch, n_heads, q_len, head_dim = q.shape
    causal_offset = k.size(2) - q_len if is_causal else None
    q5, k5, v5, mask5 = _grouped(q, k, v, mask)
    out = FlashAttention.apply(q5, k5, v5, mask5, block_q, block_k, causal_offset)
    return out.reshape(batch, n_heads, q_len, head_dim)


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
    encoder output (of width `context_dim`, when that differs from `d_model`: latent diffusion's
    image features attending to a text encoding). `bias` is the projections' (`out_bias`, if given,
    the output projection's alone). `rotary`, if given, maps (q, k) -> (q, k) after projection and before caching
    (rotary position embeddings, Su et al.); `bias`, if given, is added to the scores (ALiBi); `cache`, if given, is a `KVCache`-like object whose
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
        kernel: str = "fused",
        context_dim: int | None = None,
        out_bias: bool | None = None,
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
        if kernel not in KERNELS:
            raise ValueError(
                f"unknown attention kernel {kernel!r}; choose from {', '.join(KERNELS)}"
            )
        self.dropout, self.kernel = dropout, kernel
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.wk = nn.Linear(context_dim or d_model, n_kv_heads * head_dim, bias=bias)
        self.wv = nn.Linear(context_dim or d_model, n_kv_heads * head_dim, bias=bias)
        self.wo = nn.Linear(
            n_heads * head_dim, d_model, bias=bias if out_bias is None else out_bias
        )

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        is_causal: bool = False,
        cache=None,
        rotary=None,
        bias: Tensor | None = None,
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
        y = scaled_dot_product_attention(q, k, v, mask, is_causal, dropout_p, self.kernel, bias)
        return self.wo(y.transpose(1, 2).reshape(batch, q_len, self.n_heads * self.head_dim))
