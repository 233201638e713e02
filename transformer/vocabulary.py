"""Vocabularies: text to token ids and back, with the special tokens a model needs.

One interface for every package: `encode(text) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, and the ids of the special tokens, `pad_id`, `bos_id`, `eos_id` (None when the
vocabulary has no such token).

- `BPE`: our byte-level BPE (`tokenizer.BPETokenizer`) with special tokens registered after the
  merges. It is the tokenizer of the translation model trained on real data (§5.1: "a shared
  source-target vocabulary"; specials `<pad>`, `<s>`, `</s>`), of xllama's runs and of every
  instructgpt model (special `<|endoftext|>`). Text is always encoded as ordinary text (a special
  token's string typed in the text stays text), and decoding leaves the special tokens out.
- `WordVocabulary`: a closed set of whitespace-separated words (the translation model's embedded
  task), with padding, BOS and EOS at ids 0, 1 and 2.

A run directory of the translation model records its vocabulary in `vocabulary.json`
(`save_vocabulary` / `load_vocabulary`); xllama and instructgpt record the BPE file's name in their
configs.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizer import BPETokenizer
from tokenizer.fileformat import FILE_NAME

from .training import UserError

EOS = "<|endoftext|>"  # end of text, GPT-2's spelling: xllama and instructgpt
PAD, BOS, END = "<pad>", "<s>", "</s>"  # the translation model's specials
LLAMA3_BOS, LLAMA3_EOS = "<|begin_of_text|>", "<|end_of_text|>"  # Llama 3's (xllama)
TRANSLATION_SPECIALS = (PAD, BOS, END)


class VocabularyError(UserError, ValueError):
    """A vocabulary that cannot be read, built or used for this text."""


class BPE:
    """Our byte-level BPE with its special tokens, as a model's vocabulary.

    The roles of the special tokens come from their strings: `<pad>` pads, `<s>` (Llama 3:
    `<|begin_of_text|>`) begins a sequence, `</s>`, `<|endoftext|>` or `<|end_of_text|>` ends one.
    """

    kind = "bpe"

    def __init__(self, bpe, path: Path | None = None):
        self.bpe = bpe
        self.path = None if path is None else Path(path)
        specials = getattr(bpe, "special_tokens", None) or {}
        self.special_ids = frozenset(specials.values())
        self.pad_id = specials.get(PAD)
        self.bos_id = specials.get(BOS, specials.get(LLAMA3_BOS))
        self.eos_id = specials.get(END, specials.get(EOS, specials.get(LLAMA3_EOS)))

    @property
    def file(self) -> str | None:
        """The file's name, which a checkpoint's config records (found beside the run)."""
        return None if self.path is None else self.path.name

    @classmethod
    def train(
        cls,
        text: str | Iterable[str],
        vocab_size: int,
        special_tokens: Iterable[str] = (EOS,),
        progress: bool = True,
    ) -> BPE:
        """Learn merges from one text or an iterable of texts; `vocab_size` counts the 256 bytes,
        the merges and the special tokens."""
        bpe = BPETokenizer.train(
            text, vocab_size, special_tokens=list(special_tokens), progress=progress
        )
        return cls(bpe)

    @classmethod
    def load(cls, path: Path) -> BPE:
        """From a `tokenizer.bpe` file, or a directory holding one."""
        path = Path(path)
        return cls(BPETokenizer.load(path), path if path.is_file() else path / FILE_NAME)

    def save(self, path: Path) -> Path:
        """To a file, or to `tokenizer.bpe` in a directory; returns the file's path."""
        self.path = self.bpe.save(path)
        return self.path

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    def encode(self, text: str, dropout: float = 0.0, rng=None) -> list[int]:
        """Ids of `text`; `dropout` > 0 draws a BPE-dropout segmentation from `rng` (training)."""
        return self.bpe.encode_ordinary(text, dropout, rng)

    def decode(self, ids) -> str:
        return self.bpe.decode([i for i in ids if i not in self.special_ids])

    def spec(self) -> dict:
        return {"kind": "bpe", "file": self.file}


class WordVocabulary:
    """A closed vocabulary of whitespace-separated words, after padding, BOS and EOS (0, 1, 2)."""

    kind = "words"
    pad_id, bos_id, eos_id = 0, 1, 2
    reserved = 3

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.index = {w: i + self.reserved for i, w in enumerate(self.words)}

    @classmethod
    def train(cls, texts: list[str]) -> WordVocabulary:
        return cls(sorted({w for text in texts for w in text.split()}))

    @property
    def vocab_size(self) -> int:
        return self.reserved + len(self.words)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[w] for w in text.split()]
        except KeyError as exc:
            raise VocabularyError(f"word {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i - self.reserved] for i in ids if i >= self.reserved)


def save_vocabulary(vocab: BPE | WordVocabulary, directory: Path) -> None:
    """`vocabulary.json` (and the BPE file) in a run directory."""
    directory = Path(directory)
    if isinstance(vocab, WordVocabulary):
        meta = {"kind": vocab.kind, "words": vocab.words}
    else:
        meta = {"kind": vocab.kind, "file": vocab.save(directory).name}
    (directory / "vocabulary.json").write_text(json.dumps(meta, indent=1) + "\n")


def load_vocabulary(directory: Path) -> BPE | WordVocabulary:
    """The vocabulary saved in a run or checkpoint directory."""
    path = Path(directory) / "vocabulary.json"
    if not path.is_file():
        raise VocabularyError(f"no vocabulary.json in {directory}")
    meta = json.loads(path.read_text())
    if meta.get("kind") == "words":
        return WordVocabulary(meta["words"])
    if meta.get("kind") == "bpe":
        return BPE.load(Path(directory) / meta["file"])
    raise VocabularyError(f"unknown vocabulary kind {meta.get('kind')!r} in {path}")
