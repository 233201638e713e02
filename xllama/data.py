"""Training data for the language model: one long stream of token ids, split 90/10 into training
and validation, from which random windows of `seq_len + 1` tokens are drawn (inputs and the same
tokens shifted by one as targets).

Sources: a token file written by `tokenizer.data.write_tokens` (`FILE.bin` + `FILE.bin.json`), text
files, or the embedded offline corpus (`pydoc_data.topics`, ~465 KB of English, ships with CPython).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .model import XLlamaError


def embedded_corpus() -> str:
    """The offline default corpus (the same text as `tokenizer.data.embedded_corpus`)."""
    try:
        from tokenizer.data import embedded_corpus as corpus

        return corpus()
    except ImportError:
        from pydoc_data.topics import topics

        return "".join(topics.values())


def read_texts(paths) -> str:
    """The concatenated UTF-8 text of the files; a missing, binary, empty file or a directory is
    refused in one line naming it (the tokenizer package's `read_text_file`)."""
    from tokenizer.data import read_text_file

    return "".join(read_text_file(path) for path in paths)


def read_token_file(path: Path) -> tuple[np.ndarray, dict]:
    """(ids, sidecar) of a token file; a file that disagrees with its sidecar is refused."""
    try:
        from tokenizer.data import read_token_meta, read_tokens
    except ImportError:
        raise XLlamaError("token files need the `tokenizer` package's data module") from None
    from tokenizer import TokenizerError

    try:
        meta = read_token_meta(path)
        ids = read_tokens(path)
    except TokenizerError as exc:
        raise XLlamaError(str(exc)) from None
    return ids, meta


def split_train_val(ids, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """The first (1 - val_fraction) of the stream trains, the rest validates (nanoGPT's split)."""
    ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def random_windows(
    ids: Tensor, batch: int, seq_len: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """`batch` random windows: inputs (batch, seq_len) and targets shifted by one token."""
    if len(ids) <= seq_len + 1:
        raise XLlamaError(
            f"{len(ids)} tokens are too few for windows of {seq_len} (lower --max-seq-len)"
        )
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = ids[starts[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]
