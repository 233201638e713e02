"""Learning merges (Sennrich et al. 2016, Algorithm 1), twice: first as the paper writes it, then
the incremental trainer the tokenizer uses, tested to give exactly the same merges.

Both start from the text's chunks (the split pattern's pieces) as byte ids and repeat: count every
adjacent pair, merge the most frequent into a new token. Ties go to the smallest (left, right) pair.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict

from tokenizer.pretokenize import make_splitter


def naive_merges(text: str, num_merges: int, pattern: str) -> list[tuple[int, int]]:
    """Algorithm 1 as written (minbpe's style): after each merge, recount every pair of every
    chunk. Quadratic in the number of merges: the reference the fast trainer is tested against."""
    chunks = [list(chunk.encode("utf-8")) for chunk in make_splitter(pattern)(text)]
    return naive_merge_steps(chunks, 256, num_merges)


def naive_merge_steps(
    chunks: list[list[int]], first_id: int, num_merges: int
) -> list[tuple[int, int]]:
    """`num_merges` steps of Algorithm 1 from the state `chunks` (rewritten in place), the first
    new token being `first_id`."""
    merges = []
    for new_id in range(first_id, first_id + num_merges):
        counts = Counter()
        for ids in chunks:
            counts.update(zip(ids, ids[1:]))
        if not counts:
            break
        best = max(counts, key=lambda pair: (counts[pair], -pair[0], -pair[1]))
        merges.append(best)
        for index, ids in enumerate(chunks):
            merged, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    merged.append(new_id)
                    i += 2
                else:
                    merged.append(ids[i])
                    i += 1
            chunks[index] = merged
    return merges


def learn_merges(
    words: list[list[int]], freqs: list[int], num_merges: int, progress: bool = True
) -> list[tuple[int, int]]:
    """Learn up to `num_merges` merges from distinct chunks (`words`, as byte lists) and counts.

    Sennrich et al.'s Algorithm 1 recounts every pair of the corpus after each merge. Here each
    distinct chunk is stored once with its frequency, pair counts are kept in a dict and updated
    only in the chunks that contain the merged pair (an index pair -> chunks finds them), and a
    heap finds the most frequent pair. Heap entries are never updated in place: an entry whose
    count is out of date is pushed back with the current count when it reaches the top (counts
    of existing pairs only ever fall; pairs with the new token are pushed when they appear).

    Tie-breaking: the pair with the highest count wins; among equal counts, the pair with the
    smallest (left id, right id) wins, comparing left ids first. The result is deterministic
    and independent of the order of the corpus. Words are modified in place.
    """
    first_id = 256
    shift = (first_id + num_merges).bit_length()  # a pair is one int: left << shift | right
    mask = (1 << shift) - 1
    counts: defaultdict[int, int] = defaultdict(int)
    where: defaultdict[int, set[int]] = defaultdict(set)
    for w, (ids, freq) in enumerate(zip(words, freqs)):
        for left, right in zip(ids, ids[1:]):
            key = left << shift | right
            counts[key] += freq
            where[key].add(w)
    heap = [(-count, key) for key, count in counts.items()]
    heapq.heapify(heap)

    from tqdm import tqdm

    merges: list[tuple[int, int]] = []
    with tqdm(total=num_merges, desc="merges", unit="merge", disable=not progress) as bar:
        for new in range(first_id, first_id + num_merges):
            # The most frequent pair: pop entries until one is up to date.
            while heap:
                negative_count, key = heap[0]
                count = counts.get(key, 0)
                if count == -negative_count:
                    heapq.heappop(heap)
                    break
                if count:
                    heapq.heapreplace(heap, (-count, key))
                else:
                    heapq.heappop(heap)
            else:
                break  # no pair left anywhere: every chunk is a single token
            a, b = key >> shift, key & mask
            merges.append((a, b))
            del counts[key]

            # Replace a b by `new` in every chunk that has it, noting how pair counts change:
            # x a b y loses (x, a) and (b, y) and gains (x, new) and (new, y).
            delta: defaultdict[int, int] = defaultdict(int)
            new_left = new << shift
            for w in where.pop(key):
                ids = words[w]
                freq = freqs[w]
                last = len(ids) - 1
                i = 0
                while i < last:
                    if ids[i] == a and ids[i + 1] == b:
                        if i:
                            x = ids[i - 1] << shift
                            delta[x | a] -= freq
                            delta[x | new] += freq
                            where[x | new].add(w)
                        if i + 1 < last:
                            y = ids[i + 2]
                            delta[b << shift | y] -= freq
                            delta[new_left | y] += freq
                            where[new_left | y].add(w)
                        ids[i : i + 2] = (new,)
                        last -= 1
                    i += 1
            for changed, change in delta.items():
                if not change or changed == key:
                    continue
                count = counts[changed] + change
                if count:
                    counts[changed] = count
                    if changed >> shift == new or changed & mask == new:
                        heapq.heappush(heap, (-count, changed))  # a pair seen for the first time
                else:
                    del counts[changed]
            bar.update()
    return merges
