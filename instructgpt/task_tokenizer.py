"""The tokenizer that travels with every instructgpt model: any tokenizer an xllama checkpoint can
have (our byte-level BPE with `<|endoftext|>`, Llama 2's sentencepiece model, Llama 3's
`tokenizer.json`, ...; `xllama.tokenization`). A stage keeps its file in the run directory and
names it in `config.json` ("tokenizer"), as xllama's runs do. Responses end with its
end-of-sequence token, so a tokenizer without one is refused; a prompt starts with its BOS token
when it has one (the Llama models were trained so)."""

from __future__ import annotations

from pathlib import Path

from tokenizer.fileformat import FILE_NAME
from transformer.training import read_config
from xllama.tokenization import load_tokenizer, same_tokens

from .data import InstructGPTError


def with_eos(tokenizer, where: Path):
    """`tokenizer`, which must have an end-of-sequence token to end responses with."""
    if tokenizer.eos_id is None:
        raise InstructGPTError(f"the tokenizer of {where} has no end-of-sequence token to end "
                               "responses with")  # fmt: skip
    return tokenizer


def load_task_tokenizer(checkpoint: Path):
    """The tokenizer a checkpoint's `config.json` names, else the `tokenizer.bpe` beside it or in
    its run directory (runs written before the config named it)."""
    checkpoint = Path(checkpoint)
    spec = read_config(checkpoint).get("tokenizer")
    if spec:
        return with_eos(load_tokenizer(spec, checkpoint), checkpoint)
    for candidate in (checkpoint / FILE_NAME, checkpoint.parent.parent / FILE_NAME):
        if candidate.is_file():
            return with_eos(load_tokenizer(str(candidate)), checkpoint)
    raise InstructGPTError(
        f"no tokenizer found with {checkpoint} (its config.json names none, and there is no "
        f"{FILE_NAME} in the checkpoint or its run directory)"
    )


def check_same_tokenizer(a, b, what_a: str, what_b: str) -> None:
    if not same_tokens(a, b):
        raise InstructGPTError(
            f"the {what_a} and the {what_b} use different tokenizers; they must share one "
            "vocabulary"
        )
