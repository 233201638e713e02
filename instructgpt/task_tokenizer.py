"""The tokenizer that travels with every instructgpt model: our byte-level BPE with an
end-of-sequence token, saved as `tokenizer.bpe` beside the run."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .data import InstructGPTError

EOS = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.bpe"


class TaskTokenizer:
    """A byte-level BPE tokenizer (the `tokenizer` package) with an end-of-sequence token.

    User text is always encoded as ordinary text: an "<|endoftext|>" written in a prompt stays text.
    """

    def __init__(self, bpe, path: Path | None = None):
        if EOS not in bpe.special_tokens:
            raise InstructGPTError(f"the tokenizer has no {EOS} token to end responses with")
        self.bpe, self.path = bpe, path
        self.eos_id = bpe.special_tokens[EOS]
        self.vocab_size = bpe.vocab_size

    @classmethod
    def train(cls, text: str, vocab_size: int) -> TaskTokenizer:
        from tokenizer import BPETokenizer

        return cls(BPETokenizer.train(text, vocab_size, special_tokens=[EOS], progress=False))

    @classmethod
    def load(cls, path: Path) -> TaskTokenizer:
        from tokenizer import BPETokenizer

        path = Path(path)
        return cls(BPETokenizer.load(path), path if path.is_file() else path / TOKENIZER_FILE)

    def save(self, directory: Path) -> Path:
        self.path = self.bpe.save(Path(directory) / TOKENIZER_FILE)
        return self.path

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


def find_tokenizer(path: Path) -> Path:
    """`tokenizer.bpe` in a checkpoint directory, its run directory, or `path` itself."""
    path = Path(path)
    for candidate in (path, path / TOKENIZER_FILE, path.parent.parent / TOKENIZER_FILE):
        if candidate.is_file() and candidate.name.endswith(".bpe"):
            return candidate
    raise InstructGPTError(
        f"no {TOKENIZER_FILE} found with {path} (looked in the checkpoint and its run directory)"
    )


def check_same_tokenizer(a: TaskTokenizer, b: TaskTokenizer, what_a: str, what_b: str) -> None:
    if a.fingerprint() != b.fingerprint():
        raise InstructGPTError(
            f"the {what_a} and the {what_b} use different tokenizers "
            f"({a.path} vs {b.path}); they must share one vocabulary"
        )
