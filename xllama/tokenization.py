"""The tokenizers a Llama model may come with, behind one small interface.

- our byte-level BPE (`tokenizer.BPETokenizer`, trained by `xllama.train` or `tokenizer.train`);
- characters (`CharTokenizer`: the Tiny Shakespeare character-level baseline);
- a sentencepiece `tokenizer.model` (Llama 2's own tokenizer);
- a tiktoken encoding (`tiktoken:cl100k_base`, or a `*.tiktoken` ranks file).

Each wrapper has `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `bos_id`,
`eos_id` (None when the tokenizer has none) and `spec()`, a JSON-able description that a checkpoint's
config stores so `xllama.generate` can rebuild the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tokenizer.fileformat import FILE_NAME

from .model import XLlamaError


class CharTokenizer:
    """One token per character of a fixed alphabet (sorted characters of the training text)."""

    kind = "char"
    bos_id = None
    eos_id = None

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as exc:
            raise XLlamaError(
                f"character {exc.args[0]!r} is not in the character vocabulary"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def spec(self) -> dict:
        return {"kind": "char", "chars": self.chars}


EOS = "<|endoftext|>"


class BPE:
    """Our byte-level BPE (`tokenizer.BPETokenizer`) with `<|endoftext|>` as end of sequence,
    stored as `tokenizer.bpe` next to a run: the tokenizer of xllama's runs and of every
    instructgpt model. Text is always encoded as ordinary text (an "<|endoftext|>" written in a
    prompt stays text), and decoding leaves the end-of-sequence token out."""

    kind = "bpe"
    bos_id = None

    def __init__(self, bpe, path: Path | None = None):
        self.bpe = bpe
        self.path = None if path is None else Path(path)
        self.eos_id = bpe.special_tokens.get(EOS) if _has_specials(bpe) else None

    @property
    def file(self) -> str | None:
        """The file's name, which a checkpoint's config records (found beside the run)."""
        return None if self.path is None else self.path.name

    @staticmethod
    def tokenizer_class():
        try:
            from tokenizer import BPETokenizer
        except ImportError:
            raise XLlamaError(
                "the BPE tokenizer (package `tokenizer`) is not available in this checkout"
            ) from None
        return BPETokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int, progress: bool = True) -> BPE:
        bpe = cls.tokenizer_class().train(text, vocab_size, special_tokens=[EOS], progress=progress)
        return cls(bpe)

    @classmethod
    def load(cls, path: Path) -> BPE:
        """From a `tokenizer.bpe` file, or a directory holding one."""
        path = Path(path)
        return cls(cls.tokenizer_class().load(path), path if path.is_file() else path / FILE_NAME)

    def save(self, path: Path) -> Path:
        """To a file, or to `tokenizer.bpe` in a directory; returns the file's path."""
        self.path = self.bpe.save(path)
        return self.path

    @property
    def vocab_size(self) -> int:
        return self.bpe.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.bpe.decode([i for i in ids if i != self.eos_id])

    def fingerprint(self) -> str:
        """A hash of the vocabulary: two models can share data only if these agree."""
        h = hashlib.sha256()
        for i in range(self.vocab_size):
            try:
                h.update(self.bpe.token_bytes(i) + b"\0")
            except Exception:  # ids the vocabulary skips
                h.update(b"\1")
        return h.hexdigest()[:16]

    def spec(self) -> dict:
        return {"kind": "bpe", "file": self.file}


def _has_specials(bpe) -> bool:
    return isinstance(getattr(bpe, "special_tokens", None), dict)


class SentencePiece:
    """A sentencepiece model file (Llama 2's `tokenizer.model`)."""

    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece

        self.file = Path(path).name
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise XLlamaError(f"cannot read sentencepiece model {path}: {exc}") from None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))

    def spec(self) -> dict:
        return {"kind": "sentencepiece", "file": self.file}


class Tiktoken(BPE):
    """A tiktoken encoding (`cl100k_base`, `o200k_base`, `r50k_base`), by name (tiktoken's cache)
    or from its ranks file (`cl100k_base.tiktoken`), through our `BPETokenizer.from_tiktoken`."""

    kind = "tiktoken"

    def __init__(self, name_or_path: str):
        path = Path(name_or_path)
        cls = self.tokenizer_class()
        try:
            if path.suffix == ".tiktoken":
                bpe = cls.from_tiktoken(path.stem, ranks_file=path)
            else:
                bpe = cls.from_tiktoken(str(name_or_path))
        except Exception as exc:
            raise XLlamaError(f"cannot load tiktoken encoding {name_or_path}: {exc}") from None
        super().__init__(bpe)
        self.name = str(name_or_path)

    def spec(self) -> dict:
        return {"kind": "tiktoken", "name": self.name}


def load_tokenizer(spec: dict | str, base_dir: Path | None = None):
    """A tokenizer from a checkpoint's spec dict, or from a path / `tiktoken:NAME` string."""
    if isinstance(spec, str):
        if spec.startswith("tiktoken:"):
            return Tiktoken(spec.split(":", 1)[1])
        path = Path(spec)
        if not path.is_file():
            raise XLlamaError(f"tokenizer file not found: {path}")
        if path.suffix == ".model":
            return SentencePiece(path)
        if path.suffix == ".tiktoken":
            return Tiktoken(str(path))
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            if data.get("kind") == "char":
                return CharTokenizer(data["chars"])
        return BPE.load(path)
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "tiktoken":
        return Tiktoken(spec["name"])
    if kind in ("bpe", "sentencepiece"):
        path = find_beside(spec["file"], base_dir)
        return BPE.load(path) if kind == "bpe" else SentencePiece(path)
    raise XLlamaError(f"unknown tokenizer kind {kind!r}")


def find_beside(name: str, base_dir: Path | None) -> Path:
    """`name` in a checkpoint directory or in the run directory two levels up."""
    base = Path(base_dir or ".")
    for folder in (base, base.parent, base.parent.parent):
        if (folder / name).is_file():
            return folder / name
    raise XLlamaError(f"tokenizer file {name} not found in {base} or its run directory")


def tokenizer_for_checkpoint(directory: Path, config: dict | None):
    """The tokenizer a checkpoint names in its config, or a `tokenizer.model` beside it."""
    directory = Path(directory)
    if config and config.get("tokenizer"):
        return load_tokenizer(config["tokenizer"], directory)
    if (directory / "tokenizer.model").is_file():
        return SentencePiece(directory / "tokenizer.model")
    return None
