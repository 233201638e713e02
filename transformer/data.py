"""Parallel text, the joint vocabulary, token-count batches, and the embedded offline task.

- Real data: two files of the same number of lines, one sentence per line (`.gz` accepted), e.g.
  Multi30k's `train.de.gz` / `train.en.gz`. A joint BPE vocabulary (§5.1: "a shared source-target
  vocabulary") is trained with our `tokenizer` package on the training split's two sides and
  saved with the run.
- Embedded task (no files, no downloads): `digit_reversal_pairs`, a small sequence transduction —
  a string of digits is "translated" into the English words for its digits in reverse order,
  "3 1 4 1 5" -> "five one four one three". The model has to learn a vocabulary mapping and a
  reordering through attention, and exact match is well defined. Its vocabulary is the closed set
  of words (`transformer.vocabulary.WordVocabulary`).
- Batches are built by token count (§5.1: "approximately 25000 source tokens and 25000 target
  tokens"): sentence pairs of similar length are grouped so padding stays small.

Special tokens (their ids come from the vocabulary, `transformer.vocabulary`): padding, the
beginning of sentence (BOS, starts the decoder input) and the end of sentence (EOS, ends both the
source and the target).
"""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .training import UserError, one_line


class DataError(UserError):
    """Unreadable, empty or mismatched data files."""


# -- files ----------------------------------------------------------------------------------------


def read_lines(path: str | Path) -> list[str]:
    """The lines of a text file (gzip when the name ends in .gz), without line breaks."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory; expected a text file (one sentence per line)")
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (offset {exc.start})") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {one_line(exc)}") from None
    if not any(line.strip() for line in lines):
        raise DataError(f"{path} is empty")
    return lines


def read_parallel(source_path: str | Path, target_path: str | Path) -> tuple[list[str], list[str]]:
    """Sentence pairs from two line-aligned files; their line counts must match."""
    source, target = read_lines(source_path), read_lines(target_path)
    if len(source) != len(target):
        raise DataError(
            f"{source_path} has {len(source)} lines but {target_path} has {len(target)}; "
            "parallel files must be line-aligned"
        )
    return source, target


# -- the embedded task ----------------------------------------------------------------------------

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def reverse_and_spell(source: str) -> str:
    """The embedded task's "translation": "3 1 4" -> "four one three"."""
    return " ".join(DIGIT_WORDS[int(d)] for d in reversed(source.split()))


# Only 1,110 strings have fewer than 4 digits: they repeat (lengths stay uniform) and appear in both
# splits; from 4 digits on, strings are distinct and validation ones never occur in training.
HELD_OUT_MIN_LEN = 4


def digit_reversal_pairs(
    n: int, seed: int, min_len: int = 1, max_len: int = 12, exclude: set[str] | None = None
) -> tuple[list[str], list[str]]:
    """`n` random digit strings (lengths uniform in min_len..max_len) and their translations."""
    rng = random.Random(seed)
    exclude = exclude or set()
    seen: set[str] = set()
    sources = []
    while len(sources) < n:
        length = rng.randint(min_len, max_len)
        sentence = " ".join(str(rng.randrange(10)) for _ in range(length))
        if length >= HELD_OUT_MIN_LEN and (sentence in seen or sentence in exclude):
            continue
        seen.add(sentence)
        sources.append(sentence)
    return sources, [reverse_and_spell(s) for s in sources]


def embedded_task(train_size: int = 20000, valid_size: int = 500, seed: int = 1234):
    """(train_src, train_tgt, valid_src, valid_tgt) of the digit task; validation strings of 4
    or more digits never occur in training (shorter ones are too few to hold out)."""
    valid_src, valid_tgt = digit_reversal_pairs(valid_size, seed + 1)
    train_src, train_tgt = digit_reversal_pairs(train_size, seed, exclude=set(valid_src))
    return train_src, train_tgt, valid_src, valid_tgt


# -- token ids and batches ------------------------------------------------------------------------


@dataclass
class ParallelData:
    """Token ids of sentence pairs (EOS not yet appended), the text they came from, and the
    vocabulary's padding, BOS and EOS ids."""

    source: list[list[int]]
    target: list[list[int]]
    source_text: list[str]
    target_text: list[str]
    pad_id: int
    bos_id: int
    eos_id: int

    def __len__(self) -> int:
        return len(self.source)


def encode_pairs(vocab, source: list[str], target: list[str], max_tokens: int = 0) -> ParallelData:
    """Encode pairs; with `max_tokens` > 0 drop pairs with a side longer than that (training)."""
    pairs = [
        (vocab.encode(s), vocab.encode(t), s, t)
        for s, t in zip(source, target)
        if s.strip() and t.strip()
    ]
    if max_tokens > 0:
        pairs = [p for p in pairs if len(p[0]) <= max_tokens and len(p[1]) <= max_tokens]
    if not pairs:
        raise DataError("no usable sentence pairs (all empty or too long)")
    src, tgt, src_text, tgt_text = map(list, zip(*pairs))
    return ParallelData(src, tgt, src_text, tgt_text, vocab.pad_id, vocab.bos_id, vocab.eos_id)


def resegment(data: ParallelData, vocab, dropout: float, seed: str) -> ParallelData:
    """The same pairs, both sides segmented anew with BPE-dropout at rate `dropout` (Provilkov et
    al. 2020: random segmentations in training, the deterministic one for validation and
    translation; training draws one per epoch). `seed` fixes the draw, so a resumed run and every
    process see the same segmentation."""
    rng = random.Random(seed)
    return replace(
        data,
        source=[vocab.encode(text, dropout, rng) for text in data.source_text],
        target=[vocab.encode(text, dropout, rng) for text in data.target_text],
    )


def token_batches(
    data: ParallelData, max_tokens: int, shuffle_seed: int | None = None
) -> list[list[int]]:
    """Indices of pairs grouped by length, each batch at most `max_tokens` padded tokens per side.

    Pairs are sorted by (target length, source length), ties broken at random when shuffling, cut
    into batches greedily, and the batch order is shuffled: every epoch sees every pair once,
    in batches of similar-length sentences (+1 for the EOS each side gets).
    """
    rng = random.Random(shuffle_seed)
    noise = [rng.random() for _ in range(len(data))] if shuffle_seed is not None else None
    order = sorted(
        range(len(data)),
        key=lambda i: (len(data.target[i]), len(data.source[i]), noise[i] if noise else i),
    )
    batches, current, longest = [], [], 0
    for i in order:
        length = max(len(data.source[i]), len(data.target[i])) + 1
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    if shuffle_seed is not None:
        rng.shuffle(batches)
    return batches


def _pad(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def collate(data: ParallelData, indices: list[int]) -> tuple[torch.Tensor, ...]:
    """(source, target_in, target_out): source + EOS; decoder input BOS + y; prediction y + EOS."""
    pad, bos, eos = data.pad_id, data.bos_id, data.eos_id
    source = _pad([data.source[i] + [eos] for i in indices], pad)
    target_in = _pad([[bos] + data.target[i] for i in indices], pad)
    target_out = _pad([data.target[i] + [eos] for i in indices], pad)
    return source, target_in, target_out


def source_batches(ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Indices of sources to translate together (sorted by length), at most `max_tokens` each."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches, current, longest = [], [], 0
    for i in order:
        length = len(ids[i]) + 1
        if current and max(longest, length) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches


def source_tensor(ids: list[list[int]], indices: list[int], vocab) -> torch.Tensor:
    """The sources `indices`, each followed by EOS, padded: the encoder's input."""
    return _pad([ids[i] + [vocab.eos_id] for i in indices], vocab.pad_id)
