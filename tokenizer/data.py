"""Text in and tokens out: the embedded corpus, input files, and the token file format.

Token files are how the language-model packages read training data: a flat little-endian array
of ids (``uint16`` when every id fits, else ``uint32``) in ``NAME.bin``, and a JSON sidecar
``NAME.bin.json`` saying what is in it. `read_tokens` maps the array into memory without
reading it, so a training loop can slice windows out of a file larger than RAM.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from tokenizer.errors import EmptyCorpusError, InputFileError, TokenFileError, TokenizerError

TOKEN_FILE_FORMAT = "tokens v1"


def embedded_corpus() -> str:
    """The offline default corpus: every topic text of Python's help system, ~465 KB of English.

    `pydoc_data.topics` ships with CPython, so training works on a machine with no data and no
    network; the texts are joined in their stored order.
    """
    from pydoc_data.topics import topics

    return "".join(topics.values())


def read_text_file(path: str | Path) -> str:
    """The UTF-8 text of a file, or `InputFileError` naming the file and what is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputFileError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise InputFileError(f"input is a directory, not a file: {path}") from None
    except OSError as err:
        raise InputFileError(f"cannot read input file {path}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputFileError(
            f"input file {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset "
            f"{err.start})"
        ) from None
    if not text:
        raise InputFileError(f"input file {path} is empty")
    return text


def read_corpus(paths: Sequence[str | Path] | None) -> list[str]:
    """The documents to train on: the files' texts, or the embedded corpus when none are given."""
    if not paths:
        return [embedded_corpus()]
    return [read_text_file(path) for path in paths]


def split_held_out(documents: list[str], fraction: float = 0.1) -> tuple[list[str], str]:
    """Cut the last `fraction` of the text off (at a line break when there is one nearby).

    The held-out slice measures compression on text the tokenizer was not trained on.
    Returns (training documents, held-out text).
    """
    if not 0 < fraction < 1:
        raise TokenizerError(f"held-out fraction must be between 0 and 1, got {fraction}")
    total = sum(map(len, documents))
    if total == 0:
        raise EmptyCorpusError("the training text is empty")
    cut = int(total * (1 - fraction))
    # Find the document the cut falls in, and move the cut back to a line start if close.
    before = 0
    for index, document in enumerate(documents):
        if before + len(document) > cut:
            at = cut - before
            line_start = document.rfind("\n", 0, at) + 1
            if line_start > 0 and at - line_start < 10_000:
                at = line_start
            train = documents[:index] + [document[:at]]
            held_out = document[at:] + "".join(documents[index + 1 :])
            return [d for d in train if d], held_out
        before += len(document)
    return documents, ""


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id (0 .. vocab_size - 1) fits in 16 bits, else ``uint32``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of a token file: ``NAME.bin`` -> ``NAME.bin.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_tokens(
    path: str | Path,
    ids: Iterable[int] | np.ndarray,
    vocab_size: int,
    meta: dict | None = None,
) -> Path:
    """Write ids as a flat little-endian array plus the JSON sidecar; returns the array's path.

    Both files are written to temporary names and renamed into place, so a crash never leaves
    a token file that disagrees with its sidecar.
    """
    path = Path(path)
    dtype = token_dtype(vocab_size)
    array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
    if array.ndim != 1:
        raise TokenFileError(f"token ids must be a flat sequence, got shape {array.shape}")
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        bad = array[(array < 0) | (array >= vocab_size)][0]
        raise TokenFileError(f"token id {bad} is outside the vocabulary (0 .. {vocab_size - 1})")
    sidecar = {
        "format": TOKEN_FILE_FORMAT,
        "dtype": dtype.name,
        "byte_order": "little",
        "count": int(array.size),
        "vocab_size": int(vocab_size),
        **(meta or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    array.astype(dtype).tofile(temporary)
    temporary_sidecar = path.with_name(path.name + ".json.tmp")
    temporary_sidecar.write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)
    os.replace(temporary_sidecar, sidecar_path(path))
    return path


def read_token_meta(path: str | Path) -> dict:
    """The sidecar of a token file, checked to be one of ours."""
    if Path(path).is_dir():
        raise TokenFileError(f"{path} is a directory; expected a token file FILE.bin")
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenFileError(f"token file sidecar not found: {side}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TokenFileError(f"token file sidecar {side} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != TOKEN_FILE_FORMAT:
        raise TokenFileError(f"{side} is not a token file sidecar (no 'format': 'tokens v1')")
    for key in ("dtype", "count", "vocab_size"):
        if key not in meta:
            raise TokenFileError(f"token file sidecar {side} lacks {key!r}")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise TokenFileError(f"token file sidecar {side}: unknown dtype {meta['dtype']!r}")
    return meta


def read_tokens(path: str | Path) -> np.ndarray:
    """The ids of a token file as a read-only memory map (checked against its sidecar)."""
    path = Path(path)
    meta = read_token_meta(path)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    count = meta["count"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TokenFileError(f"token file not found: {path}") from None
    if size != count * dtype.itemsize:
        raise TokenFileError(
            f"token file {path} has {size} bytes, but its sidecar promises {count} "
            f"{meta['dtype']} ids ({count * dtype.itemsize} bytes)"
        )
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))
