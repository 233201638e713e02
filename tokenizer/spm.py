"""SentencePiece BPE models (the Llama-2 ``tokenizer.model`` kind) behind our tokenizer interface.

SentencePiece (Kudo and Richardson 2018) treats text as a raw character stream: spaces become
the visible symbol ``▁`` (U+2581), a dummy ``▁`` is put in front of the text, and BPE then works
on characters, not bytes. Merges are chosen by *score* (a merge learned earlier scores higher),
highest first, leftmost on ties. Characters the vocabulary lacks fall back to byte tokens
``<0x00>`` .. ``<0xFF>`` when the model was trained with ``byte_fallback`` (as Llama-2 was);
otherwise they become the unknown token.

`SentencePieceTokenizer` reads the ``.model`` protobuf itself (a few dozen lines, no protobuf
library) and encodes with its own BPE loop; the ``sentencepiece`` library is used to *train*
models (`train_sentencepiece`) and, in the tests, as the reference the ids must equal. Models
whose normalizer is not the identity (e.g. the default ``nmt_nfkc``) have their text normalized
by the library's normalizer, as its precompiled character map is beyond this module.
"""

from __future__ import annotations

import codecs
import heapq
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizer.errors import InvalidTokenIdError, TokenizerError, TokenizerFileError, VocabSizeError

FILE_NAME = "tokenizer.model"  # what the train command writes inside its output directory
SPACE = "\u2581"  # ▁, how SentencePiece writes a space inside pieces

# SentencePiece.Type in sentencepiece_model.proto
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2  # TrainerSpec.ModelType


@dataclass
class SentencePieceModel:
    """The parts of a ``.model`` file (a serialized ``ModelProto``) that encoding needs."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    model_type: int = 1  # proto default: UNIGRAM
    has_trainer_spec: bool = False
    """False for a file cut short before its TrainerSpec (every model sentencepiece writes has one)"""
    byte_fallback: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    pad_id: int = -1
    unk_surface: str = " \u2047 "
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True

    @classmethod
    def parse(cls, data: bytes) -> SentencePieceModel:
        """Decode the protobuf wire format; field numbers are those of sentencepiece_model.proto."""
        model = cls(pieces=[], scores=[], types=[])
        for number, value in _protobuf_fields(data):
            if number == 1:  # repeated SentencePiece pieces
                piece, score, kind = "", 0.0, NORMAL
                for inner, inner_value in _protobuf_fields(value):
                    if inner == 1:
                        piece = inner_value.decode("utf-8")
                    elif inner == 2:
                        score = struct.unpack("<f", inner_value)[0]
                    elif inner == 3:
                        kind = inner_value
                model.pieces.append(piece)
                model.scores.append(score)
                model.types.append(kind)
            elif number == 2:  # TrainerSpec
                model.has_trainer_spec = True
                for inner, inner_value in _protobuf_fields(value):
                    if inner == 3:
                        model.model_type = inner_value
                    elif inner == 24:
                        model.treat_whitespace_as_suffix = bool(inner_value)
                    elif inner == 35:
                        model.byte_fallback = bool(inner_value)
                    elif inner in (40, 41, 42, 43):
                        signed = inner_value - (1 << 64) if inner_value >= 1 << 63 else inner_value
                        name = {40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id"}[inner]
                        setattr(model, name, signed)
                    elif inner == 44:
                        model.unk_surface = inner_value.decode("utf-8")
            elif number == 3:  # NormalizerSpec
                for inner, inner_value in _protobuf_fields(value):
                    if inner == 1:
                        model.normalizer_name = inner_value.decode("utf-8")
                    elif inner == 2:
                        model.precompiled_charsmap = bytes(inner_value)
                    elif inner == 3:
                        model.add_dummy_prefix = bool(inner_value)
                    elif inner == 4:
                        model.remove_extra_whitespaces = bool(inner_value)
                    elif inner == 5:
                        model.escape_whitespaces = bool(inner_value)
        return model


def _protobuf_fields(data: bytes):
    """(field number, value) for each field of a protobuf message: ints, or bytes."""
    view = memoryview(data)
    position, end = 0, len(data)

    def varint() -> int:
        nonlocal position
        result = shift = 0
        while True:
            if position >= end or shift > 63:
                raise ValueError("truncated or overlong varint")
            byte = view[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while position < end:
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            yield number, varint()
        elif wire_type == 2:
            length = varint()
            if position + length > end:
                raise ValueError("field runs past the end of the data")
            yield number, view[position : position + length].tobytes()
            position += length
        elif wire_type == 5:
            if position + 4 > end:
                raise ValueError("truncated 32-bit field")
            yield number, view[position : position + 4].tobytes()
            position += 4
        elif wire_type == 1:
            if position + 8 > end:
                raise ValueError("truncated 64-bit field")
            yield number, view[position : position + 8].tobytes()
            position += 8
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")


class SentencePieceTokenizer:
    """Encode and decode with a SentencePiece BPE ``.model`` file (Llama-2 style).

    `bos_id`, `eos_id`, `pad_id` and `unk_id` are the model's (None when the model has none,
    as Llama-2 has no pad). `encode(text, bos=True)` puts the begin-of-sequence id first.
    """

    _SPACE_RUN = re.compile(f"{SPACE}+")

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TokenizerFileError(f"sentencepiece model not found: {path}") from None
        except OSError as err:
            raise TokenizerFileError(f"cannot read sentencepiece model {path}: {err}") from None
        try:
            model = SentencePieceModel.parse(data)
        except (ValueError, UnicodeDecodeError, struct.error) as err:
            raise TokenizerFileError(
                f"{path} is not a sentencepiece model (damaged protobuf: {err})"
            ) from None
        if not model.pieces:
            raise TokenizerFileError(f"{path} is not a sentencepiece model (it has no pieces)")
        if not model.has_trainer_spec:
            raise TokenizerFileError(
                f"{path} is truncated or damaged: it ends after {len(model.pieces)} pieces, "
                "before the model's trainer settings"
            )
        if model.model_type != BPE_MODEL:
            raise TokenizerFileError(
                f"{path} is a sentencepiece model of type {model.model_type}; "
                f"SentencePieceTokenizer implements the BPE type (2), the one Llama-2 uses"
            )
        self.path = path
        self.model = model
        self._piece_ids: dict[str, int] = {}  # pieces BPE may form: normal, user-defined, unused
        self._reserved_ids: dict[str, int] = {}  # control, unknown and byte pieces
        for token_id, (piece, kind) in enumerate(zip(model.pieces, model.types)):
            table = (
                self._piece_ids if kind in (NORMAL, USER_DEFINED, UNUSED) else self._reserved_ids
            )
            if piece in table:
                raise TokenizerFileError(f"{path}: piece {piece!r} is defined twice")
            table[piece] = token_id
        self._byte_ids = [self._reserved_ids.get(f"<0x{b:02X}>") for b in range(256)]
        if model.byte_fallback and None in self._byte_ids:
            raise TokenizerFileError(f"{path}: byte_fallback is on but byte pieces are missing")
        user_defined = [p for p, k in zip(model.pieces, model.types) if k == USER_DEFINED]
        self._user_defined = (
            re.compile("|".join(map(re.escape, sorted(user_defined, key=len, reverse=True))))
            if user_defined
            else None
        )
        self._library_normalizer = None
        if model.precompiled_charsmap:
            import sentencepiece

            self._library_normalizer = sentencepiece.SentencePieceNormalizer(model_proto=data)
        self._bigrams = {
            piece[i : i + 2] for piece in self._piece_ids for i in range(len(piece) - 1)
        }
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------------------
    # The vocabulary

    @property
    def vocab_size(self) -> int:
        return len(self.model.pieces)

    def _optional_id(self, token_id: int) -> int | None:
        return token_id if 0 <= token_id < self.vocab_size else None

    @property
    def bos_id(self) -> int | None:
        return self._optional_id(self.model.bos_id)

    @property
    def eos_id(self) -> int | None:
        return self._optional_id(self.model.eos_id)

    @property
    def pad_id(self) -> int | None:
        return self._optional_id(self.model.pad_id)

    @property
    def unk_id(self) -> int | None:
        return self._optional_id(self.model.unk_id)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Control and user-defined pieces (``<s>``, ``</s>``, ``<|endoftext|>`` ...) by id."""
        return {
            piece: token_id
            for token_id, (piece, kind) in enumerate(zip(self.model.pieces, self.model.types))
            if kind in (CONTROL, USER_DEFINED)
        }

    def piece(self, token_id: int) -> str:
        self._check_id(token_id)
        return self.model.pieces[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for: a byte piece's byte, a piece's text with ▁ as space."""
        self._check_id(token_id)
        kind = self.model.types[token_id]
        if kind == BYTE:
            return bytes([int(self.model.pieces[token_id][3:5], 16)])
        if kind == CONTROL:
            return b""
        if kind == UNKNOWN:
            return self.model.unk_surface.encode("utf-8")
        return self.model.pieces[token_id].replace(SPACE, " ").encode("utf-8")

    def _check_id(self, token_id) -> None:
        if not isinstance(token_id, int) and not hasattr(token_id, "__index__"):
            raise InvalidTokenIdError(f"token id {token_id!r} is not an integer")
        if not 0 <= token_id < self.vocab_size:
            raise InvalidTokenIdError(
                f"token id {token_id!r} is not in the vocabulary (ids run from 0 to "
                f"{self.vocab_size - 1})"
            )

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    # ----------------------------------------------------------------------------------------
    # Encoding

    def normalize(self, text: str) -> str:
        """The text BPE runs on: spaces as ▁ and a dummy ▁ in front (identity normalization)."""
        if self._library_normalizer is not None:
            return self._library_normalizer.normalize(text)
        model = self.model
        if model.remove_extra_whitespaces:
            text = re.sub(" +", " ", text.strip(" "))
        if not text:
            return ""
        if model.escape_whitespaces:
            text = text.replace(" ", SPACE)
        space = SPACE if model.escape_whitespaces else " "
        if model.add_dummy_prefix:
            text = text + space if model.treat_whitespace_as_suffix else space + text
        return text

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally with the begin/end-of-sequence ids around them."""
        ids = self.encode_ordinary(text)
        if bos:
            if self.bos_id is None:
                raise TokenizerError("this sentencepiece model has no begin-of-sequence token")
            ids.insert(0, self.bos_id)
        if eos:
            if self.eos_id is None:
                raise TokenizerError("this sentencepiece model has no end-of-sequence token")
            ids.append(self.eos_id)
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`: normalize, then BPE over the whole normalized string."""
        normalized = self.normalize(text)
        if not normalized:
            return []
        if self._user_defined is None:
            ids = self._encode_words(normalized)
        else:
            # User-defined symbols are matched first (longest first) and never merged.
            ids = []
            start = 0
            for found in self._user_defined.finditer(normalized):
                ids += self._encode_words(normalized[start : found.start()])
                ids.append(self._piece_ids[found.group()])
                start = found.end()
            ids += self._encode_words(normalized[start:])
        unk = self.model.unk_id
        if not self.model.byte_fallback and unk in ids:
            # Without byte fallback, a run of unknown pieces is reported as one unknown token.
            ids = [t for i, t in enumerate(ids) if t != unk or i == 0 or ids[i - 1] != unk]
        return ids

    def _encode_words(self, text: str) -> list[int]:
        """BPE over `text`, cut first where no piece can span the cut (before most ▁).

        A merge across position p would make a piece containing the two characters around p;
        where no piece contains that pair, the two sides merge independently, in the same
        order, so each side can be encoded (and cached) on its own.
        """
        ids: list[int] = []
        start = 0
        bigrams = self._bigrams
        for found in self._SPACE_RUN.finditer(text, 1):
            cut = found.start()
            if text[cut - 1 : cut + 1] not in bigrams:
                ids += self._encode_span(text[start:cut])
                start = cut
        ids += self._encode_span(text[start:])
        return ids

    def encode_batch(self, texts: Iterable[str], **options) -> list[list[int]]:
        return [self.encode(text, **options) for text in texts]

    def _encode_span(self, text: str) -> list[int]:
        """BPE over characters, highest-scoring merge first (leftmost on ties)."""
        if not text:
            return []
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        piece_ids, scores, types = self._piece_ids, self.model.scores, self.model.types
        symbols = list(text)
        n = len(symbols)
        next_of = list(range(1, n + 1))
        prev_of = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []  # (-score, left, merged length, right)
        made_from: dict[str, tuple[str, str]] = {}  # for unused pieces: what they merged from

        def push(left: int, right: int) -> None:
            if left < 0 or right >= n:
                return
            merged = symbols[left] + symbols[right]
            token_id = piece_ids.get(merged)
            if token_id is None:
                return
            if types[token_id] == UNUSED:
                made_from[merged] = (symbols[left], symbols[right])
            heapq.heappush(heap, (-scores[token_id], left, len(merged), right))

        for i in range(n - 1):
            push(i, i + 1)
        while heap:
            _, left, length, right = heapq.heappop(heap)
            if (
                not symbols[left]
                or not symbols[right]
                or next_of[left] != right
                or len(symbols[left]) + len(symbols[right]) != length
            ):
                continue  # stale: one side has merged with something else since
            symbols[left] += symbols[right]
            symbols[right] = ""
            next_of[left] = next_of[right]
            if next_of[right] < n:
                prev_of[next_of[right]] = left
            push(prev_of[left], left)
            push(left, next_of[left])

        ids: list[int] = []
        i = 0
        while i < n:
            self._emit(symbols[i], made_from, ids)
            i = next_of[i]
        if len(text) <= 64:
            if len(self._cache) > 1 << 16:
                self._cache.clear()
            self._cache[text] = ids
        return ids

    def _emit(self, piece: str, made_from: dict[str, tuple[str, str]], ids: list[int]) -> None:
        """Append a final piece's id: unused pieces split back, unknown ones as bytes or unk."""
        token_id = self._piece_ids.get(piece)
        if token_id is not None and self.model.types[token_id] == UNUSED and piece in made_from:
            left, right = made_from[piece]
            self._emit(left, made_from, ids)
            self._emit(right, made_from, ids)
            return
        if token_id is None:
            token_id = self._reserved_ids.get(piece)
        if token_id is not None and token_id != self.model.unk_id:
            ids.append(token_id)
        elif self.model.byte_fallback:
            ids += [self._byte_ids[b] for b in piece.encode("utf-8")]
        else:
            ids.append(self.model.unk_id)

    # ----------------------------------------------------------------------------------------
    # Decoding

    def _segments(self, ids: Iterable[int]) -> list[bytearray]:
        """The bytes of the ids, cut wherever a control token stands.

        Control tokens (bos, eos) have no text, but they do end a run of byte-fallback pieces:
        SentencePiece decodes the bytes on either side separately, so two halves of one UTF-8
        character separated by a control token are two invalid bytes, not one character.
        The first text piece loses the dummy prefix's space.
        """
        segments = [bytearray()]
        at_start = True
        for token_id in ids:
            token = self.token_bytes(token_id)
            kind = self.model.types[token_id]
            if kind == CONTROL:
                if segments[-1]:
                    segments.append(bytearray())
                continue
            if at_start and kind not in (BYTE, UNKNOWN) and self.model.add_dummy_prefix:
                if token.startswith(b" ") and not self.model.treat_whitespace_as_suffix:
                    token = token[1:]
            at_start = False
            segments[-1] += token
        if self.model.add_dummy_prefix and self.model.treat_whitespace_as_suffix:
            last = next((seg for seg in reversed(segments) if seg), None)
            if last is not None and last.endswith(b" "):
                del last[-1]
        return segments

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the ids, with the dummy-prefix space of the first piece removed."""
        return b"".join(self._segments(ids))

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """The text of the ids; each byte that is not part of valid UTF-8 becomes one U+FFFD.

        (SentencePiece replaces invalid bytes one by one; Python's own "replace" would give one
        U+FFFD per broken sequence, so "replace" here uses a handler that does as SentencePiece.)
        """
        if errors == "replace":
            errors = _replace_each_byte()
        return "".join(bytes(seg).decode("utf-8", errors=errors) for seg in self._segments(ids))


def _replace_each_byte() -> str:
    """The name of a codec error handler that turns each undecodable byte into U+FFFD."""
    name = "tokenizer.spm.replace_each_byte"
    try:
        codecs.lookup_error(name)
    except LookupError:
        codecs.register_error(name, lambda error: ("\ufffd", error.start + 1))
    return name


def train_sentencepiece(
    documents: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    special_tokens: Iterable[str] | None = None,
    seed: int = 0,
    threads: int = 2,
) -> Path:
    """Train a Llama-2-style SentencePiece BPE model; returns the path of ``tokenizer.model``.

    Settings as Llama-2's tokenizer: BPE, byte fallback, identity normalization, a dummy
    prefix, whitespace kept as it is, digits split, ids unk 0 / bos 1 / eos 2 and no pad.
    `special_tokens` become user-defined pieces (always one token). Training reads the text
    line by line (SentencePiece trains on sentences); lines over 4192 bytes are skipped by it.
    """
    import sentencepiece

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [line for document in documents for line in document.split("\n") if line.strip()]
    if not lines:
        from tokenizer.errors import EmptyCorpusError

        raise EmptyCorpusError("the training text is empty")
    sentencepiece.set_random_generator_seed(seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(out_dir / Path(FILE_NAME).stem),
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.99995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            user_defined_symbols=list(special_tokens or []),
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "ocab" in message:  # "Vocabulary size is smaller than required_chars", "too high"
            raise VocabSizeError(f"sentencepiece: {message}") from None
        raise TokenizerError(f"sentencepiece training failed: {message}") from None
    return out_dir / FILE_NAME
