"""Byte-level byte-pair encoding: the tokenizer of GPT-2, GPT-4 and their descendants.

Byte-pair encoding (Sennrich, Haddow and Birch 2016, "Neural Machine Translation of Rare Words
with Subword Units", section 3.1 and its Algorithm 1) starts from single symbols and repeatedly
replaces the most frequent adjacent pair with a new symbol, recording each replacement as a
*merge*. GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners",
section 2.2 "Input Representation") runs it on UTF-8 *bytes* instead of characters, so the 256
byte values form the base vocabulary and any string is encodable without an unknown token, and
stops merges from crossing character categories by first splitting text with a regex
(`tokenizer.pretokenize`).

Token ids: 0-255 are the bytes, merge k creates id 256 + k, and special tokens come after the
merges. Encoding applies merges by *rank* (a token's id, the order it was learned in): inside each
chunk, repeatedly join the adjacent pair whose concatenated bytes form the lowest-ranked token.
That rule needs nothing but a bytes -> rank table, which is exactly what tiktoken ships, so the
same encoder serves our trained merges and OpenAI's cl100k_base / o200k_base ranks.
"""

from __future__ import annotations

import heapq
import json
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable
from itertools import chain
from pathlib import Path

from tokenizer.errors import (
    DisallowedSpecialTokenError,
    EmptyCorpusError,
    InvalidTokenIdError,
    SpecialTokenError,
    TokenizerError,
    TokenizerFileError,
    VocabSizeError,
)
from tokenizer.pretokenize import make_splitter, pattern_name, resolve_pattern

FILE_MAGIC = "bpe-tokenizer"
FILE_VERSION = 1
FILE_NAME = "tokenizer.bpe"  # what `save_dir`/`load` use inside a directory

# Special tokens and split patterns of the tiktoken encodings `from_tiktoken` knows by name.
TIKTOKEN_ENCODINGS = {
    "r50k_base": ("gpt2", {"<|endoftext|>": 50256}),
    "cl100k_base": (
        "gpt4",
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": ("o200k", {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}

_NO_MERGE = 1 << 62  # rank of a pair that is not in the vocabulary
_LONG_CHUNK = 256  # chunks longer than this (in bytes) use the heap-based merge loop
_CACHE_LIMIT = 1 << 20  # the chunk -> ids cache is emptied when it grows past this
_BYTE = [bytes([b]) for b in range(256)]


class BPETokenizer:
    """A byte-level BPE tokenizer: a split pattern, a bytes -> id table, and special tokens.

    Make one with `BPETokenizer.train`, `BPETokenizer.load` or `BPETokenizer.from_tiktoken`.
    `BPETokenizer()` itself is the untrained tokenizer: 256 byte tokens and no merges.
    """

    def __init__(self, pattern: str = "gpt4", special_tokens: dict[str, int] | None = None):
        self._setup({_BYTE[b]: b for b in range(256)}, resolve_pattern(pattern), special_tokens)
        self._merges: dict[tuple[int, int], int] | None = {}

    # ----------------------------------------------------------------------------------------
    # Construction

    def _setup(
        self, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int] | None
    ) -> None:
        """Build every derived table from the ranks, the pattern and the special tokens."""
        missing = [b for b in range(256) if _BYTE[b] not in ranks]
        if missing:
            raise TokenizerError(
                f"a byte-level vocabulary must contain all 256 single bytes; "
                f"{len(missing)} are missing (first: 0x{missing[0]:02x})"
            )
        self.pattern = pattern
        self._split = make_splitter(pattern)
        self._ranks = ranks
        # The rank of every two-byte token, indexed by first byte * 256 + second byte: the
        # first step of every merge loop looks up all adjacent byte pairs of a chunk.
        self._byte_pair_ranks = [_NO_MERGE] * 65536
        for token, rank in ranks.items():
            if len(token) == 2:
                self._byte_pair_ranks[token[0] << 8 | token[1]] = rank
        self._decoder = {rank: token for token, rank in ranks.items()}
        if len(self._decoder) != len(ranks):
            raise TokenizerError("two tokens share one id")
        special_tokens = dict(special_tokens or {})
        for token, token_id in special_tokens.items():
            if not isinstance(token, str) or not token:
                raise SpecialTokenError(f"special token {token!r} must be a non-empty string")
            if token_id in self._decoder:
                raise SpecialTokenError(f"special token {token!r} reuses id {token_id}")
            self._decoder[token_id] = token.encode("utf-8")
        self.special_tokens = special_tokens
        self._vocab_size = max(self._decoder) + 1
        self._special_regex: dict[frozenset[str], re.Pattern] = {}
        self._cache = _ChunkCache(self._encode_chunk)

    @classmethod
    def _from_ranks(
        cls,
        ranks: dict[bytes, int],
        pattern: str,
        special_tokens: dict[str, int] | None = None,
        merges: dict[tuple[int, int], int] | None = None,
    ) -> BPETokenizer:
        tokenizer = cls.__new__(cls)
        tokenizer._setup(ranks, resolve_pattern(pattern), special_tokens)
        tokenizer._merges = merges
        return tokenizer

    @classmethod
    def train(
        cls,
        text_or_iterable: str | Iterable[str],
        vocab_size: int,
        pattern: str = "gpt4",
        special_tokens: Iterable[str] | None = None,
        progress: bool = True,
    ) -> BPETokenizer:
        """Learn `vocab_size - 256 - len(special_tokens)` merges from text (Sennrich et al. 3.1).

        `text_or_iterable` is one string or an iterable of documents. Special-token strings are
        cut out of the training text (they never take part in merges) and get the ids after the
        merges, in the order given. Training stops early, with a smaller vocabulary, when no
        chunk has two tokens left to merge. See `learn_merges` for the algorithm and its
        tie-breaking rule.
        """
        special_list = list(special_tokens or [])
        if len(set(special_list)) != len(special_list):
            raise SpecialTokenError(f"special tokens repeat: {special_list}")
        for token in special_list:
            if not isinstance(token, str) or not token:
                raise SpecialTokenError(f"special token {token!r} must be a non-empty string")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(special_list):
            raise VocabSizeError(
                f"vocab size {vocab_size} is too small: it must hold the 256 byte tokens "
                f"plus {len(special_list)} special token(s), at least {256 + len(special_list)}"
            )
        pattern = resolve_pattern(pattern)
        split = make_splitter(pattern)
        documents = [text_or_iterable] if isinstance(text_or_iterable, str) else text_or_iterable
        remove_specials = _special_regex(special_list) if special_list else None

        # Count each distinct chunk once: real text repeats its words over and over.
        chunk_counts: Counter[str] = Counter()
        for document in documents:
            if not isinstance(document, str):
                raise TypeError(f"training text must be str, got {type(document).__name__}")
            pieces = remove_specials.split(document) if remove_specials else [document]
            for piece in pieces:
                chunk_counts.update(split(piece))
        if not chunk_counts:
            raise EmptyCorpusError("the training text is empty")

        words, freqs = [], []
        for chunk, count in chunk_counts.items():
            encoded = _utf8(chunk)
            if len(encoded) > 1:  # a single byte has no pair to merge
                words.append(list(encoded))
                freqs.append(count)
        num_merges = vocab_size - 256 - len(special_list)
        merge_list = learn_merges(words, freqs, num_merges, progress=progress)

        ranks = {_BYTE[b]: b for b in range(256)}
        token_bytes = list(ranks)
        merges = {}
        for new_id, (left, right) in enumerate(merge_list, start=256):
            token = token_bytes[left] + token_bytes[right]
            token_bytes.append(token)
            ranks[token] = new_id
            merges[(left, right)] = new_id
        first_special = 256 + len(merge_list)
        specials = {token: first_special + i for i, token in enumerate(special_list)}
        return cls._from_ranks(ranks, pattern, specials, merges)

    @classmethod
    def from_tiktoken(cls, encoding_or_name, ranks_file: str | Path | None = None) -> BPETokenizer:
        """Our tokenizer with a tiktoken encoding's ranks, split pattern and special tokens.

        `encoding_or_name` is a `tiktoken.Encoding` or a name: "cl100k_base", "o200k_base" or
        "r50k_base". With `ranks_file`, the ranks are read from that local `.tiktoken` file and
        the pattern and special tokens are tiktoken's for that name; without it, tiktoken loads
        the encoding itself (which may need its download cache).
        """
        import tiktoken
        import tiktoken.load

        if isinstance(encoding_or_name, str):
            name = encoding_or_name
            if ranks_file is not None:
                if name not in TIKTOKEN_ENCODINGS:
                    known = ", ".join(TIKTOKEN_ENCODINGS)
                    raise TokenizerError(f"unknown tiktoken encoding {name!r} (known: {known})")
                try:
                    ranks = tiktoken.load.load_tiktoken_bpe(str(ranks_file))
                except FileNotFoundError:
                    raise TokenizerFileError(f"rank file not found: {ranks_file}") from None
                except (OSError, ValueError) as err:
                    raise TokenizerFileError(f"cannot read rank file {ranks_file}: {err}") from None
                pattern, specials = TIKTOKEN_ENCODINGS[name]
                return cls._from_ranks(ranks, pattern, dict(specials), merges=None)
            try:
                encoding = tiktoken.get_encoding(name)
            except Exception as err:
                raise TokenizerError(
                    f"tiktoken could not load {name!r} ({err}); pass ranks_file= a local "
                    f".tiktoken file"
                ) from None
        else:
            encoding = encoding_or_name
            if not isinstance(encoding, tiktoken.Encoding):
                raise TypeError(f"expected a tiktoken.Encoding or a name, got {encoding!r}")
        return cls._from_ranks(
            dict(encoding._mergeable_ranks),
            encoding._pat_str,
            dict(encoding._special_tokens),
            merges=None,
        )

    def to_tiktoken(self, name: str | None = None):
        """A `tiktoken.Encoding` with our ranks, pattern and special tokens (identical ids)."""
        import tiktoken

        return tiktoken.Encoding(
            name=name or f"bpe-{self.vocab_size}",
            pat_str=self.pattern,
            mergeable_ranks=dict(self._ranks),
            special_tokens=dict(self.special_tokens),
        )

    # ----------------------------------------------------------------------------------------
    # The vocabulary

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the size of an embedding table for these ids."""
        return self._vocab_size

    @property
    def merges(self) -> dict[tuple[int, int], int]:
        """(left id, right id) -> new id, in the order learned (recovered for tiktoken ranks)."""
        if self._merges is None:
            self._merges = self._recover_merges()
        return self._merges

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token (a special token's UTF-8 string)."""
        try:
            return self._decoder[token_id]
        except (KeyError, TypeError):
            raise self._invalid_id(token_id) from None

    def _recover_merges(self) -> dict[tuple[int, int], int]:
        """Which pair each multi-byte token was merged from, for ranks that come without merges.

        Encoding a token's bytes with only the lower-ranked tokens available stops at exactly
        the two parts the token was made of; a vocabulary where it does not is not a BPE
        vocabulary.
        """
        merges = {}
        get = self._ranks.get
        for token, rank in sorted(self._ranks.items(), key=lambda item: item[1]):
            if len(token) == 1:
                continue
            # Usually only one split point leaves two lower-ranked tokens: then it is the one.
            splits = [
                k
                for k in range(1, len(token))
                if get(token[:k], _NO_MERGE) < rank and get(token[k:], _NO_MERGE) < rank
            ]
            if len(splits) == 1:
                parts = [token[: splits[0]], token[splits[0] :]]
            else:
                parts = _byte_pair_merge(token, get, rank)
            if len(parts) != 2:
                raise TokenizerError(
                    f"token {rank} ({token!r}) is not the merge of two lower-ranked tokens"
                )
            merges[(self._ranks[parts[0]], self._ranks[parts[1]])] = rank
        return merges

    def _invalid_id(self, token_id) -> InvalidTokenIdError:
        return InvalidTokenIdError(
            f"token id {token_id!r} is not in the vocabulary (ids run from 0 to "
            f"{self.vocab_size - 1})"
        )

    def __repr__(self) -> str:
        name = pattern_name(self.pattern) or "custom"
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, pattern={name!r}, "
            f"special_tokens={len(self.special_tokens)})"
        )

    # ----------------------------------------------------------------------------------------
    # Encoding and decoding

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, reading special-token strings as ordinary text.

        Split into chunks, encode each distinct chunk once (cached: most chunks repeat), and
        chain the results; the whole loop runs in C except for cache misses.
        """
        try:
            return list(chain.from_iterable(map(self._cache.__getitem__, self._split(text))))
        except UnicodeEncodeError:
            # Lone surrogates are not UTF-8; tiktoken replaces them with U+FFFD, and so do we.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return list(chain.from_iterable(map(self._cache.__getitem__, self._split(text))))

    def encode(
        self,
        text: str,
        allowed_special: str | Collection[str] = "none_raise",
        disallowed_special: str | Collection[str] = "all",
    ) -> list[int]:
        """Token ids of `text`, with tiktoken's rules for special tokens.

        `allowed_special` ("all", or a collection of special-token strings) are encoded as
        their single control token. A `disallowed_special` string ("all" means every special
        token not allowed) found in the text raises `DisallowedSpecialTokenError` instead of
        silently turning user text into a control token; pass `disallowed_special=()` to encode
        such strings as plain text. The default "none_raise" allows none and raises on all.
        """
        if allowed_special == "all":
            allowed = frozenset(self.special_tokens)
        elif allowed_special == "none_raise":
            allowed = frozenset()
        elif isinstance(allowed_special, str):
            raise SpecialTokenError(
                f"allowed_special must be 'all', 'none_raise' or a collection of special tokens, "
                f"got {allowed_special!r}"
            )
        else:
            allowed = frozenset(allowed_special)
            unknown = allowed - self.special_tokens.keys()
            if unknown:
                raise SpecialTokenError(
                    f"allowed_special names {sorted(unknown)}, which are not special tokens of "
                    f"this tokenizer (it has {sorted(self.special_tokens)})"
                )
        if disallowed_special == "all":
            disallowed = frozenset(self.special_tokens) - allowed
        elif isinstance(disallowed_special, str):
            raise SpecialTokenError(
                f"disallowed_special must be 'all' or a collection, got {disallowed_special!r}"
            )
        else:
            disallowed = frozenset(disallowed_special)
        if disallowed:
            found = self._special_pattern(disallowed).search(text)
            if found:
                token = found.group()
                raise DisallowedSpecialTokenError(
                    f"the text contains the special token {token!r} at character "
                    f"{found.start()}; pass allowed_special={{{token!r}}} (or 'all') to encode it "
                    f"as a control token, or disallowed_special=() to encode it as plain text"
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for found in self._special_pattern(allowed).finditer(text):
            ids += self.encode_ordinary(text[start : found.start()])
            ids.append(self.special_tokens[found.group()])
            start = found.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def encode_batch(self, texts: Iterable[str], **special) -> list[list[int]]:
        """`encode` of each text (one thread: pure Python gains nothing from more)."""
        return [self.encode(text, **special) for text in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes the ids stand for (special tokens as their UTF-8 strings)."""
        if not isinstance(ids, (list, tuple)):
            ids = list(ids)
        try:
            return b"".join(map(self._decoder.__getitem__, ids))
        except (KeyError, TypeError):
            bad = next(i for i in ids if not _hashable_in(i, self._decoder))
            raise self._invalid_id(bad) from None

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """The text the ids stand for; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def clear_cache(self) -> None:
        """Forget the cached chunk encodings (for honest cold-cache benchmarks)."""
        self._cache.clear()

    def _special_pattern(self, tokens: frozenset[str]) -> re.Pattern:
        if tokens not in self._special_regex:
            self._special_regex[tokens] = _special_regex(tokens)
        return self._special_regex[tokens]

    def _encode_chunk(self, chunk: str) -> list[int]:
        """The ids of one chunk: one lookup when it is a single token, else the merge loop."""
        piece = chunk.encode("utf-8")
        rank = self._ranks.get(piece)
        if rank is not None:
            return [rank]
        ranks = self._ranks
        if len(piece) > _LONG_CHUNK:
            parts = _byte_pair_merge_long(piece, ranks.get, _NO_MERGE)
        else:
            parts = _byte_pair_merge_short(piece, ranks.get, _NO_MERGE, self._byte_pair_ranks)
        return [ranks[part] for part in parts]

    # ----------------------------------------------------------------------------------------
    # Saving and loading

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer file and, beside it, a readable vocabulary listing (`.vocab`).

        `path` is a file path, or a directory to hold `tokenizer.bpe` (an existing directory,
        or a path without a suffix, which is created). Returns the file's path. The format
        (versioned, line based, UTF-8) is described in tokenizer/README.md.
        """
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / FILE_NAME
        merges = self.merges
        lines = [
            f"{FILE_MAGIC} v{FILE_VERSION}",
            "# byte-level BPE tokenizer: split pattern, byte tokens, merges, special tokens.",
            "# merges: new id, left id, right id; the new token's bytes are left's then right's.",
            f"pattern {json.dumps(self.pattern)}",
            "bytes 256",
        ]
        byte_ids = sorted((self._ranks[_BYTE[b]], b) for b in range(256))
        lines += [f"{token_id} {b:02x}" for token_id, b in byte_ids]
        lines.append(f"merges {len(merges)}")
        for (left, right), new_id in sorted(merges.items(), key=lambda item: item[1]):
            lines.append(f"{new_id} {left} {right}")
        lines.append(f"specials {len(self.special_tokens)}")
        for token, token_id in sorted(self.special_tokens.items(), key=lambda item: item[1]):
            lines.append(f"{token_id} {json.dumps(token)}")
        lines.append("end")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        path.with_suffix(".vocab").write_text(self.vocab_listing(), encoding="utf-8")
        return path

    def vocab_listing(self) -> str:
        """One line per token: id, its bytes shown as text, and the pair it was merged from."""
        made_from = {new_id: pair for pair, new_id in self.merges.items()}
        lines = ["# id [token] <- [left] [right]   (bytes that are not UTF-8 shown as \\xNN)"]
        for token_id in sorted(self._decoder):
            token = self._decoder[token_id]
            if token_id in self.special_tokens.values():
                lines.append(f"{token_id} [{render_bytes(token)}] special")
            elif token_id in made_from:
                left, right = made_from[token_id]
                lines.append(
                    f"{token_id} [{render_bytes(token)}] <- [{render_bytes(self._decoder[left])}]"
                    f" [{render_bytes(self._decoder[right])}]"
                )
            else:
                lines.append(f"{token_id} [{render_bytes(token)}]")
        return "\n".join(lines) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a file written by `save` (or a directory holding `tokenizer.bpe`).

        The stored pattern is recompiled and every table rebuilt from the merges; a damaged or
        foreign file raises `TokenizerFileError` naming the line.
        """
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise TokenizerFileError(f"tokenizer file not found: {path}") from None
        except OSError as err:
            raise TokenizerFileError(f"cannot read tokenizer file {path}: {err.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenizerFileError(
                f"{path} is not a tokenizer file (not UTF-8 text; expected a "
                f"'{FILE_MAGIC} v{FILE_VERSION}' file written by BPETokenizer.save)"
            ) from None
        return _TokenizerFileReader(path, text).read(cls)


class _ChunkCache(dict):
    """chunk string -> ids; a miss encodes the chunk (keeps the hot loop inside C)."""

    def __init__(self, encode_chunk):
        super().__init__()
        self._encode_chunk = encode_chunk

    def __missing__(self, chunk: str) -> list[int]:
        ids = self._encode_chunk(chunk)
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        self[chunk] = ids
        return ids


def _byte_pair_merge(piece: bytes, rank_of, limit: int) -> list[bytes]:
    """Split `piece` into tokens by merging, lowest rank first, pairs ranked below `limit`.

    Among pairs of equal rank the leftmost merges first (this is tiktoken's rule too). Short
    pieces keep a list of pair ranks and find the best with C-level `min` and `index`;
    long ones use a heap so that a 100 kB run of one character does not take quadratic time.
    """
    if len(piece) > _LONG_CHUNK:
        return _byte_pair_merge_long(piece, rank_of, limit)
    return _byte_pair_merge_short(piece, rank_of, limit)


def _byte_pair_merge_short(
    piece: bytes, rank_of, limit: int, byte_pair_ranks: list[int] | None = None
) -> list[bytes]:
    """`_byte_pair_merge` in O(n^2) with C-level steps: fastest for the usual short chunk.

    `byte_pair_ranks` (first byte * 256 + second byte -> rank) is an optional faster table
    for the ranks of the initial byte pairs.
    """
    parts = list(map(_BYTE.__getitem__, piece))
    if byte_pair_ranks is None:
        pair_ranks = [rank_of(piece[i : i + 2], _NO_MERGE) for i in range(len(piece) - 1)]
    else:
        pair_ranks = [byte_pair_ranks[a << 8 | b] for a, b in zip(piece, piece[1:])]
    while pair_ranks:
        best = min(pair_ranks)
        if best >= limit:
            break
        i = pair_ranks.index(best)
        merged = parts[i] + parts.pop(i + 1)
        parts[i] = merged
        del pair_ranks[i]
        if i:
            pair_ranks[i - 1] = rank_of(parts[i - 1] + merged, _NO_MERGE)
        if i < len(pair_ranks):
            pair_ranks[i] = rank_of(merged + parts[i + 1], _NO_MERGE)
    return parts


def _byte_pair_merge_long(piece: bytes, rank_of, limit: int) -> list[bytes]:
    """`_byte_pair_merge` in O(n log n): a heap of (rank, start) over a linked list of parts."""
    n = len(piece)
    end = list(range(1, n + 1))  # end[start] = where the part beginning at `start` ends
    before = list(range(-1, n - 1))  # before[start] = start of the previous part
    alive = [True] * n
    heap = []
    for i in range(n - 1):
        rank = rank_of(piece[i : i + 2], _NO_MERGE)
        if rank < limit:
            heap.append((rank, i))
    heapq.heapify(heap)
    while heap:
        rank, start = heapq.heappop(heap)
        if not alive[start] or end[start] >= n:
            continue
        stop = end[end[start]]
        if rank_of(piece[start:stop], _NO_MERGE) != rank:
            continue  # stale: one of the two parts has grown since this pair was pushed
        alive[end[start]] = False
        end[start] = stop
        if stop < n:
            before[stop] = start
            right = rank_of(piece[start : end[stop]], _NO_MERGE)
            if right < limit:
                heapq.heappush(heap, (right, start))
        left_start = before[start]
        if left_start >= 0:
            left = rank_of(piece[left_start:stop], _NO_MERGE)
            if left < limit:
                heapq.heappush(heap, (left, left_start))
    parts = []
    start = 0
    while start < n:
        parts.append(piece[start : end[start]])
        start = end[start]
    return parts


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


class _TokenizerFileReader:
    """Parses a `save`d file line by line, naming the line in every error."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()
        self.number = 0  # 1-based number of the line last returned
        self.seen: set[bytes] = set()  # bytes of every token defined so far

    def fail(self, message: str) -> TokenizerFileError:
        return TokenizerFileError(f"{self.path} line {self.number}: {message}")

    def next_line(self, what: str) -> str:
        while self.number < len(self.lines):
            line = self.lines[self.number]
            self.number += 1
            if not line.startswith("#"):
                return line
        self.number = len(self.lines) + 1
        raise self.fail(f"file ends early: expected {what} (truncated file?)")

    def fields(self, what: str, count: int) -> list[str]:
        line = self.next_line(what)
        parts = line.split(" ", count - 1)
        if len(parts) != count:
            raise self.fail(f"expected {what}, got {line[:80]!r}")
        return parts

    def integer(self, text: str, what: str) -> int:
        if not re.fullmatch(r"\d+", text):
            raise self.fail(f"expected {what} (a non-negative integer), got {text[:80]!r}")
        return int(text)

    def section(self, name: str) -> int:
        keyword, count = self.fields(f"'{name} <count>'", 2)
        if keyword != name:
            raise self.fail(f"expected the '{name} <count>' section, got {keyword[:80]!r}")
        return self.integer(count, f"the number of {name}")

    def read(self, cls):
        first = self.next_line("the header") if self.lines else ""
        header = f"{FILE_MAGIC} v{FILE_VERSION}"
        if first != header:
            if first.startswith(FILE_MAGIC + " v"):
                raise self.fail(
                    f"unsupported format version {first[len(FILE_MAGIC) + 1 :]!r}; this code "
                    f"reads v{FILE_VERSION}"
                )
            raise self.fail(
                f"not a tokenizer file: expected the header {header!r}, got {first[:80]!r}"
            )
        keyword, pattern_json = self.fields("'pattern \"<regex>\"'", 2)
        if keyword != "pattern":
            raise self.fail(f"expected 'pattern \"<regex>\"', got {keyword[:80]!r}")
        try:
            pattern = json.loads(pattern_json)
            if not isinstance(pattern, str):
                raise ValueError
            pattern = resolve_pattern(pattern)
        except ValueError as err:
            detail = f": {err}" if isinstance(err, TokenizerError) else ""
            raise self.fail(f"the pattern is not a valid JSON string regex{detail}") from None

        token_bytes: dict[int, bytes] = {}
        if self.section("bytes") != 256:
            raise self.fail("a byte-level tokenizer has exactly 256 byte tokens")
        for _ in range(256):
            token_id, value = self.fields("'<id> <byte in hex>'", 2)
            token_id = self.integer(token_id, "a token id")
            if not re.fullmatch(r"[0-9a-f]{2}", value):
                raise self.fail(f"expected a byte as two hex digits, got {value[:80]!r}")
            self.add(token_bytes, token_id, bytes([int(value, 16)]))
        merges = {}
        for _ in range(self.section("merges")):
            new_id, left, right = self.fields("'<new id> <left id> <right id>'", 3)
            new_id = self.integer(new_id, "the new id")
            left = self.integer(left, "the left id")
            right = self.integer(right, "the right id")
            for part in (left, right):
                if part not in token_bytes:
                    raise self.fail(f"merge uses id {part}, which is not defined above this line")
            self.add(token_bytes, new_id, token_bytes[left] + token_bytes[right])
            merges[(left, right)] = new_id
        specials = {}
        for _ in range(self.section("specials")):
            token_id, token_json = self.fields("'<id> \"<special token>\"'", 2)
            token_id = self.integer(token_id, "a special token id")
            try:
                token = json.loads(token_json)
            except ValueError:
                token = None
            if not isinstance(token, str) or not token:
                raise self.fail(f"expected a special token as a JSON string, got {token_json!r}")
            if token_id in token_bytes or token_id in specials.values() or token in specials:
                raise self.fail(f"special token {token!r} (id {token_id}) repeats")
            specials[token] = token_id
        if self.next_line("'end'") != "end":
            raise self.fail("expected 'end' after the special tokens")
        ranks = {token: token_id for token_id, token in token_bytes.items()}
        return cls._from_ranks(ranks, pattern, specials, merges)

    def add(self, token_bytes: dict[int, bytes], token_id: int, token: bytes) -> None:
        if token_id in token_bytes:
            raise self.fail(f"id {token_id} is defined twice")
        if token in self.seen:
            raise self.fail(f"token {token!r} (id {token_id}) repeats an earlier token's bytes")
        self.seen.add(token)
        token_bytes[token_id] = token


def _special_regex(tokens: Iterable[str]) -> re.Pattern:
    """A regex matching any of the strings, longest first where one is a prefix of another."""
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _hashable_in(value, table: dict) -> bool:
    try:
        return value in table
    except TypeError:
        return False


def render_bytes(token: bytes) -> str:
    """Token bytes as readable text: UTF-8 where valid, `\\xNN` otherwise, controls escaped."""
    text = token.decode("utf-8", errors="backslashreplace")
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch)[0] == "C" and ch != "\\"
        else ch
        for ch in text
    )
