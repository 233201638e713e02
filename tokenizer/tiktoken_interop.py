"""Exact interop with tiktoken: load its encodings' ranks into our tokenizer (same ids, same
pattern, same special tokens), and export ours as a `tiktoken.Encoding`."""

from __future__ import annotations

from pathlib import Path

from tokenizer.errors import TokenizerError, TokenizerFileError
from tokenizer.pretokenize import LLAMA3_PATTERN

# Special tokens and split patterns of the tiktoken encodings `from_tiktoken` knows by name.
TIKTOKEN_ENCODINGS = {
    "r50k_base": ("gpt2", {"<|endoftext|>": 50256}),
    "cl100k_base": (
        "gpt4",
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    ),
    "o200k_base": ("o200k", {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
}

# Meta's Llama 3 `tokenizer.model` is a tiktoken rank file too (128,000 ranks), with its own split
# pattern (`pretokenize.LLAMA3_PATTERN`) and 256 special tokens numbered after the ranks, named as
# in Llama 3.1 (3.0 left some of them reserved: the beginning, end, header and end-of-turn tokens
# have the same ids in both).
_LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>",
                 "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]  # fmt: skip
LLAMA3_SPECIAL_TOKENS = _LLAMA3_NAMED + [
    f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(_LLAMA3_NAMED))
]
TIKTOKEN_ENCODINGS["llama3"] = (LLAMA3_PATTERN, LLAMA3_SPECIAL_TOKENS)  # ids follow the ranks


def from_tiktoken(cls, encoding_or_name, ranks_file: str | Path | None = None):
    """Our tokenizer with a tiktoken encoding's ranks, split pattern and special tokens.

    `encoding_or_name` is a `tiktoken.Encoding` or a name: "cl100k_base", "o200k_base",
    "r50k_base", or "llama3" (Meta's Llama 3 `tokenizer.model` as `ranks_file`). With
    `ranks_file`, the ranks are read from that local file and the pattern and special tokens are
    those of the name; without it, tiktoken loads the encoding itself (which may need its
    download cache).
    """
    import tiktoken
    import tiktoken.load

    if isinstance(encoding_or_name, str):
        name = encoding_or_name
        if ranks_file is not None:
            if name not in TIKTOKEN_ENCODINGS:
                known = ", ".join(TIKTOKEN_ENCODINGS)
                raise TokenizerError(f"unknown tiktoken encoding {name!r} (known: {known})")
            try:
                ranks = tiktoken.load.load_tiktoken_bpe(str(ranks_file))
            except FileNotFoundError:
                raise TokenizerFileError(f"rank file not found: {ranks_file}") from None
            except (OSError, ValueError) as err:
                raise TokenizerFileError(f"cannot read rank file {ranks_file}: {err}") from None
            pattern, specials = TIKTOKEN_ENCODINGS[name]
            if isinstance(specials, list):  # numbered after the ranks
                specials = {token: len(ranks) + i for i, token in enumerate(specials)}
            return cls._from_ranks(ranks, pattern, dict(specials), merges=None)
        if name == "llama3":
            raise TokenizerError("llama3 is not a tiktoken download: pass its ranks file (--ranks)")
        try:
            encoding = tiktoken.get_encoding(name)
        except Exception as err:
            reason = " ".join(str(err).split())  # tiktoken's message spans lines
            raise TokenizerError(
                f"tiktoken could not load {name!r} ({reason}); "
                "pass ranks_file= a local .tiktoken file"
            ) from None
    else:
        encoding = encoding_or_name
        if not isinstance(encoding, tiktoken.Encoding):
            raise TypeError(f"expected a tiktoken.Encoding or a name, got {encoding!r}")
    return cls._from_ranks(
        dict(encoding._mergeable_ranks),
        encoding._pat_str,
        dict(encoding._special_tokens),
        merges=None,
    )


def to_tiktoken(tokenizer, name: str | None = None):
    """A `tiktoken.Encoding` with our ranks, pattern and special tokens (identical ids)."""
    import tiktoken

    return tiktoken.Encoding(
        name=name or f"bpe-{tokenizer.vocab_size}",
        pat_str=tokenizer.pattern,
        mergeable_ranks=dict(tokenizer._ranks),
        special_tokens=dict(tokenizer.special_tokens),
    )
