"""Encoding one chunk: apply the learned merges to its bytes, lowest rank first (GPT-2's `bpe`,
tiktoken's `byte_pair_merge`). Two loops give the same result: a short one for the usual chunk and a
heap-based one for long chunks; `byte_pair_merge` chooses. With `dropout` > 0 the short loop
draws BPE-dropout's random segmentation (Provilkov et al. 2020), for training text only."""

from __future__ import annotations

import heapq

NO_MERGE = 1 << 62  # rank of a pair that is not in the vocabulary
LONG_CHUNK = 256  # chunks longer than this (in bytes) use the heap-based merge loop
BYTE = [bytes([b]) for b in range(256)]


def byte_pair_merge(
    piece: bytes,
    rank_of,
    limit: int = NO_MERGE,
    byte_pair_ranks: list[int] | None = None,
    dropout: float = 0.0,
    rng=None,
) -> list[bytes]:
    """Split `piece` into tokens by merging, lowest rank first, pairs ranked below `limit`.

    Among pairs of equal rank the leftmost merges first (this is tiktoken's rule too). Short
    pieces keep a list of pair ranks and find the best with C-level `min` and `index`;
    long ones use a heap so that a 100 kB run of one character does not take quadratic time.
    `byte_pair_ranks` (first byte * 256 + second byte -> rank) speeds up the short loop's start.

    BPE-dropout (Provilkov, Emelianenko and Voita 2020, "BPE-Dropout: Simple and Effective
    Subword Regularization", Algorithm 1): with `dropout` > 0, at every step each applicable merge
    is dropped with that probability (their p, drawn from `rng`, a `random.Random`), the best of
    the rest is applied, and the segmentation ends when none is left; 1 leaves single bytes. It
    runs the short loop at every length: it only segments training text.
    """
    if dropout > 0:
        return _byte_pair_merge_short(piece, rank_of, limit, byte_pair_ranks, dropout, rng)
    if len(piece) > LONG_CHUNK:
        return _byte_pair_merge_long(piece, rank_of, limit)
    return _byte_pair_merge_short(piece, rank_of, limit, byte_pair_ranks)


def _byte_pair_merge_short(
    piece: bytes,
    rank_of,
    limit: int,
    byte_pair_ranks: list[int] | None = None,
    dropout: float = 0.0,
    rng=None,
) -> list[bytes]:
    """`_byte_pair_merge` in O(n^2) with C-level steps: fastest for the usual short chunk.

    `byte_pair_ranks` (first byte * 256 + second byte -> rank) is an optional faster table
    for the ranks of the initial byte pairs. With `dropout` > 0 each step considers only the
    merges that survive a fresh draw (BPE-dropout).
    """
    parts = list(map(BYTE.__getitem__, piece))
    if byte_pair_ranks is None:
        pair_ranks = [rank_of(piece[i : i + 2], NO_MERGE) for i in range(len(piece) - 1)]
    else:
        pair_ranks = [byte_pair_ranks[a << 8 | b] for a, b in zip(piece, piece[1:])]
    while pair_ranks:
        kept = pair_ranks
        if dropout:
            kept = [r if r < limit and rng.random() >= dropout else NO_MERGE for r in pair_ranks]
        best = min(kept)
        if best >= limit:
            break
        i = kept.index(best)
        merged = parts[i] + parts.pop(i + 1)
        parts[i] = merged
        del pair_ranks[i]
        if i:
            pair_ranks[i - 1] = rank_of(parts[i - 1] + merged, NO_MERGE)
        if i < len(pair_ranks):
            pair_ranks[i] = rank_of(merged + parts[i + 1], NO_MERGE)
    return parts


def _byte_pair_merge_long(piece: bytes, rank_of, limit: int) -> list[bytes]:
    """`_byte_pair_merge` in O(n log n): a heap of (rank, start) over a linked list of parts."""
    n = len(piece)
    end = list(range(1, n + 1))  # end[start] = where the part beginning at `start` ends
    before = list(range(-1, n - 1))  # before[start] = start of the previous part
    alive = [True] * n
    heap = []
    for i in range(n - 1):
        rank = rank_of(piece[i : i + 2], NO_MERGE)
        if rank < limit:
            heap.append((rank, i))
    heapq.heapify(heap)
    while heap:
        rank, start = heapq.heappop(heap)
        if not alive[start] or end[start] >= n:
            continue
        stop = end[end[start]]
        if rank_of(piece[start:stop], NO_MERGE) != rank:
            continue  # stale: one of the two parts has grown since this pair was pushed
        alive[end[start]] = False
        end[start] = stop
        if stop < n:
            before[stop] = start
            right = rank_of(piece[start : end[stop]], NO_MERGE)
            if right < limit:
                heapq.heappush(heap, (right, start))
        left_start = before[start]
        if left_start >= 0:
            left = rank_of(piece[left_start:stop], NO_MERGE)
            if left < limit:
                heapq.heappush(heap, (left, left_start))
    parts = []
    start = 0
    while start < n:
        parts.append(piece[start : end[start]])
        start = end[start]
    return parts
