"""What decoding carries between steps, and the attention masks and positions of a forward pass.

- `Cache`: one KV cache per layer (the shared `transformer.attention.KVCache`, or Mistral's
  rolling buffer `RollingKVCache` for a sliding window), the slots used so far, and the left
  padding of each row;
- `attention_inputs`: from the padding mask, the cache and the sliding window, the rotary
  positions of the new tokens and the boolean mask they attend with (or the fused causal kernel
  when no mask is needed), and ALiBi's bias from the slots of the queries and the keys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from transformer.attention import KVCache, alibi_bias

from .errors import XLlamaError

if TYPE_CHECKING:
    from .model import LlamaConfig


class RollingKVCache:
    """Mistral's rolling-buffer cache for sliding-window attention: W slots, token i in slot i % W.

    Same `update(k, v)` interface as `transformer.attention.KVCache`. One new token: it is written
    to its slot and the whole buffer is returned (attention does not care about key order; the mask
    from `key_slots` says which entries are visible). Several new tokens (a prompt chunk): the
    buffered keys in time order followed by all the new ones are returned, and the last W new ones
    are written to the buffer.
    """

    def __init__(self, batch, n_kv_heads, window, head_dim, device=None, dtype=None):
        shape = (batch, n_kv_heads, window, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.window = window
        self.position = 0

    def key_slots(self, n_new: int, device=None) -> Tensor:
        """Absolute slot (token index) of each key `update` will return for n_new new tokens;
        -1 marks a buffer entry never written."""
        start, w = self.position, self.window
        if n_new == 1:
            end = start + 1
            entries = torch.arange(w, device=device)
            # Entry j holds the latest slot s < end with s % w == j.
            slots = entries + ((end - 1 - entries).div(w, rounding_mode="floor")) * w
            return torch.where(slots >= 0, slots, -1)
        old = torch.arange(max(0, start - w), start, device=device)
        return torch.cat([old, torch.arange(start, start + n_new, device=device)])

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n_new, start, w = k.size(2), self.position, self.window
        if n_new == 1:
            slot = start % w
            self.k[:, :, slot : slot + 1] = k
            self.v[:, :, slot : slot + 1] = v
            self.position += 1
            return self.k, self.v
        held = min(start, w)
        order = torch.arange(start - held, start, device=k.device) % w
        k_all = torch.cat([self.k.index_select(2, order), k], dim=2)
        v_all = torch.cat([self.v.index_select(2, order), v], dim=2)
        keep = min(n_new, w)
        slots = torch.arange(start + n_new - keep, start + n_new, device=k.device) % w
        self.k.index_copy_(2, slots, k[:, :, -keep:])
        self.v.index_copy_(2, slots, v[:, :, -keep:])
        self.position += n_new
        return k_all, v_all


class Cache:
    """Everything a batch carries between decoding steps.

    - one KV cache per layer (preallocated `KVCache`, or `RollingKVCache` with a sliding window);
    - `length`: slots used so far (slot = step index, shared by the batch);
    - `pad` (batch,) or None: how many padding slots each row starts with (left padding);
    - `key_valid` (batch, max_len): which slots hold real tokens (False = left padding).

    Row b's rotary position at slot s is s - pad[b], so a row padded on the left has the same
    positions, and (masking its padding) the same results, as when it runs alone.
    """

    def __init__(self, config: LlamaConfig, batch: int, max_len: int, device=None, dtype=None):
        self.config, self.batch, self.max_len = config, batch, max_len
        hd, nkv = config.head_dim, config.kv_heads
        window = config.sliding_window
        if window is not None and window < max_len:
            self.layers = [
                RollingKVCache(batch, nkv, window, hd, device, dtype)
                for _ in range(config.n_layers)
            ]
        else:
            window = None
            self.layers = [
                KVCache(batch, nkv, max_len, hd, device, dtype) for _ in range(config.n_layers)
            ]
        self.rolling = window is not None
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.pad: Tensor | None = None
        self.length = 0

    def rollback(self, length: int) -> None:
        """Forget every slot from `length` on (speculative decoding: drafted tokens the target
        rejected); the next tokens are written from there."""
        if self.rolling:
            raise XLlamaError(
                "a sliding-window (rolling) cache has overwritten the slots it would roll back to"
            )
        if not 0 <= length <= self.length:
            raise XLlamaError(f"cannot roll a cache of {self.length} slots back to {length}")
        for layer in self.layers:
            layer.position = length
        self.length = length

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (e.g. drop finished rows)."""
        for layer in self.layers:
            layer.k = layer.k.index_select(0, index)
            layer.v = layer.v.index_select(0, index)
        self.key_valid = self.key_valid.index_select(0, index)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, index)
        self.batch = len(index)


def attention_inputs(
    config: LlamaConfig, tokens, attention_mask, positions, cache: Cache | None, alibi=None
):
    """What one forward pass attends with, for `config`'s model: (positions or None, first slot,
    boolean attention mask or None, is_causal, ALiBi bias or None).

    positions None means every row sits at slots first..first+T-1 (no padding): the rotary
    tables are then sliced rather than gathered. Masks are True where a query may attend.
    `alibi`: the heads' slopes, for a bias -m·(i - j) between query slot i and key slot j.
    """
    T = tokens.size(1)
    device = tokens.device
    window = config.sliding_window
    valid = None
    if attention_mask is not None:
        valid = attention_mask.to(torch.bool)
        if bool(valid.all()):
            valid = None

    def bias(query_slots, key_slots):
        return None if alibi is None else alibi_bias(alibi, query_slots, key_slots)

    if cache is None:
        if valid is not None and positions is None:
            positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        if valid is None and window is None:  # the fused causal kernel
            slots = None if alibi is None else torch.arange(T, device=device)
            return positions, 0, None, True, bias(slots, slots)
        slots = torch.arange(T, device=device)
        mask = slot_mask(slots, slots, window)[None, None]  # (1, 1, T, T)
        if valid is not None:
            diagonal = torch.eye(T, dtype=torch.bool, device=device)
            mask = (mask & valid[:, None, None, :]) | diagonal
        return positions, 0, mask, False, bias(slots, slots)

    start = cache.length
    if start + T > cache.max_len:
        raise XLlamaError(
            f"sequence of {start + T} tokens does not fit the cache of {cache.max_len}"
        )
    if valid is not None:
        if start > 0 or bool((valid[:, 1:].long() < valid[:, :-1].long()).any()):
            raise XLlamaError(
                "with a KV cache, padding must be on the left of the first chunk only"
            )
        cache.pad = (~valid).sum(1)
        cache.key_valid[:, :T] = valid
    cache.length = start + T
    query_slots = torch.arange(start, start + T, device=device)
    if positions is None and cache.pad is not None:
        positions = (query_slots[None] - cache.pad[:, None]).clamp(min=0)
    padded = cache.pad is not None
    sees_every_key = T == 1 and not padded and (not cache.rolling or start + 1 >= window)
    if sees_every_key and alibi is None:  # one decoding step: no mask, no key slots needed
        return positions, start, None, False, None
    if cache.rolling:
        key_slots = cache.layers[0].key_slots(T, device)
    else:
        key_slots = torch.arange(start + T, device=device)
    if sees_every_key:
        return positions, start, None, False, bias(query_slots, key_slots)
    mask = slot_mask(query_slots, key_slots, window)[None, None]
    if padded:
        key_valid = cache.key_valid[:, key_slots.clamp(min=0)]
        mask = mask & key_valid[:, None, None, :]
        # Padding queries see themselves only, so their (unused) rows never softmax over nothing.
        mask = mask | (query_slots[:, None] == key_slots[None, :])
    return positions, start, mask, False, bias(query_slots, key_slots)


def slot_mask(query_slots: Tensor, key_slots: Tensor, window: int | None) -> Tensor:
    """(T, S) True where query slot i may see key slot j: 0 <= i - j (< window)."""
    distance = query_slots[:, None] - key_slots[None, :]
    mask = (distance >= 0) & (key_slots[None, :] >= 0)
    if window is not None:
        mask = mask & (distance < window)
    return mask
