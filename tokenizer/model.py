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

The package, one job per file: `learn.py` learns merges (Algorithm 1 as written, then the fast
incremental trainer), `merge.py` applies them to a chunk, this file is the tokenizer itself
(training, encoding, decoding), `fileformat.py` saves and loads it, `tiktoken_interop.py` converts
to and from tiktoken.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Collection, Iterable
from pathlib import Path

from tokenizer import fileformat, hf_interop, tiktoken_interop
from tokenizer.errors import (
    DisallowedSpecialTokenError,
    EmptyCorpusError,
    InvalidTokenIdError,
    SpecialTokenError,
    TokenizerError,
    VocabSizeError,
)
from tokenizer.learn import learn_merges
from tokenizer.merge import BYTE, NO_MERGE, byte_pair_merge
from tokenizer.pretokenize import make_splitter, pattern_name, resolve_pattern

_CACHE_LIMIT = 1 << 20  # the chunk -> ids cache is emptied when it grows past this


class BPETokenizer:
    """A byte-level BPE tokenizer: a split pattern, a bytes -> id table, and special tokens.

    Make one with `BPETokenizer.train`, `BPETokenizer.load` or `BPETokenizer.from_tiktoken`.
    `BPETokenizer()` itself is the untrained tokenizer: 256 byte tokens and no merges.
    """

    def __init__(self, pattern: str = "gpt4", special_tokens: dict[str, int] | None = None):
        self._setup({BYTE[b]: b for b in range(256)}, resolve_pattern(pattern), special_tokens)
        self._merges: dict[tuple[int, int], int] | None = {}

    # ----------------------------------------------------------------------------------------
    # Construction

    def _setup(
        self, ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int] | None
    ) -> None:
        """Build every derived table from the ranks, the pattern and the special tokens."""
        missing = [b for b in range(256) if BYTE[b] not in ranks]
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
        self._byte_pair_ranks = [NO_MERGE] * 65536
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
        self._cache: dict[str, list[int]] = {}  # chunk -> ids

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

        ranks = {BYTE[b]: b for b in range(256)}
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
        """Our tokenizer with a tiktoken encoding's ranks, split pattern and special tokens
        (`tokenizer.tiktoken_interop.from_tiktoken`)."""
        return tiktoken_interop.from_tiktoken(cls, encoding_or_name, ranks_file)

    @classmethod
    def from_tokenizer_json(cls, path: str | Path) -> BPETokenizer:
        """Our tokenizer from a Hugging Face byte-level BPE `tokenizer.json`, Llama 3's or
        GPT-2's (`tokenizer.hf_interop.from_tokenizer_json`): the same ids as Hugging Face's."""
        return hf_interop.from_tokenizer_json(cls, path)

    def to_tiktoken(self, name: str | None = None):
        """A `tiktoken.Encoding` with our ranks, pattern and special tokens (identical ids)."""
        return tiktoken_interop.to_tiktoken(self, name)

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
                if get(token[:k], NO_MERGE) < rank and get(token[k:], NO_MERGE) < rank
            ]
            if len(splits) == 1:
                parts = [token[: splits[0]], token[splits[0] :]]
            else:
                parts = byte_pair_merge(token, get, rank)
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

    def encode_ordinary(self, text: str, dropout: float = 0.0, rng=None) -> list[int]:
        """Token ids of `text`, reading special-token strings as ordinary text.

        Split into chunks and encode each distinct chunk once (cached: most chunks repeat).
        With `dropout` > 0 the segmentation is BPE-dropout's random one (`byte_pair_merge`, drawn
        from `rng`, a `random.Random`; never cached): a regulariser for training text.
        """
        if dropout > 0:
            rng = rng or random.Random()
            chunks = self._split(_valid_unicode(text))
            return [i for chunk in chunks for i in self._encode_chunk(chunk, dropout, rng)]
        try:
            return self._encode_chunks(self._split(text))
        except UnicodeEncodeError:
            return self._encode_chunks(self._split(_valid_unicode(text)))

    def _encode_chunks(self, chunks: Iterable[str]) -> list[int]:
        cache, ids = self._cache, []
        for chunk in chunks:
            chunk_ids = cache.get(chunk)
            if chunk_ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                chunk_ids = cache[chunk] = self._encode_chunk(chunk)
            ids += chunk_ids
        return ids

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

    def _encode_chunk(self, chunk: str, dropout: float = 0.0, rng=None) -> list[int]:
        """The ids of one chunk: one lookup when it is a single token, else the merge loop
        (always the loop under BPE-dropout, which may split even a whole-token chunk)."""
        piece = chunk.encode("utf-8")
        ranks = self._ranks
        rank = ranks.get(piece)
        if rank is not None and not dropout:
            return [rank]
        parts = byte_pair_merge(piece, ranks.get, NO_MERGE, self._byte_pair_ranks, dropout, rng)
        return [ranks[part] for part in parts]

    # ----------------------------------------------------------------------------------------
    # Saving and loading

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer file and, beside it, a readable vocabulary listing (`.vocab`).

        `path` is a file path, or a directory to hold `tokenizer.bpe` (an existing directory,
        or a path without a suffix, which is created). Returns the file's path. The format
        (versioned, line based, UTF-8) is described in tokenizer/README.md.
        """
        return fileformat.write(self, path)

    def vocab_listing(self) -> str:
        """One line per token: id, its bytes shown as text, and the pair it was merged from."""
        return fileformat.vocab_listing(self)

    @classmethod
    def load(cls, path: str | Path) -> BPETokenizer:
        """Read a file written by `save` (or a directory holding `tokenizer.bpe`).

        The stored pattern is recompiled and every table rebuilt from the merges; a damaged or
        foreign file raises `TokenizerFileError` naming the line.
        """
        return fileformat.read(cls, path)


def _special_regex(tokens: Iterable[str]) -> re.Pattern:
    """A regex matching any of the strings, longest first where one is a prefix of another."""
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _valid_unicode(text: str) -> str:
    """Lone surrogates are not UTF-8; tiktoken replaces them with U+FFFD, and so do we."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return _valid_unicode(text).encode("utf-8")


def _hashable_in(value, table: dict) -> bool:
    try:
        return value in table
    except TypeError:
        return False
