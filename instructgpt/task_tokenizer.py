"""The tokenizer that travels with every instructgpt model: xllama's `BPE` (our byte-level BPE
with `<|endoftext|>`), saved as `tokenizer.bpe` beside the run. Responses end with its
end-of-sequence token, so a tokenizer without one is refused."""

from __future__ import annotations

from pathlib import Path

from tokenizer.fileformat import FILE_NAME
from transformer.vocabulary import BPE, EOS

from .data import InstructGPTError


def load_task_tokenizer(path: Path) -> BPE:
    """The BPE tokenizer in `path` (a file or a directory), which must have `<|endoftext|>`."""
    tokenizer = BPE.load(path)
    if tokenizer.eos_id is None:
        raise InstructGPTError(
            f"the tokenizer {tokenizer.path} has no {EOS} token to end responses with"
        )
    return tokenizer


def find_tokenizer(path: Path) -> Path:
    """`tokenizer.bpe` in a checkpoint directory, its run directory, or `path` itself."""
    path = Path(path)
    for candidate in (path, path / FILE_NAME, path.parent.parent / FILE_NAME):
        if candidate.is_file() and candidate.name.endswith(".bpe"):
            return candidate
    raise InstructGPTError(
        f"no {FILE_NAME} found with {path} (looked in the checkpoint and its run directory)"
    )


def check_same_tokenizer(a: BPE, b: BPE, what_a: str, what_b: str) -> None:
    if a.fingerprint() != b.fingerprint():
        raise InstructGPTError(
            f"the {what_a} and the {what_b} use different tokenizers "
            f"({a.path} vs {b.path}); they must share one vocabulary"
        )
