"""Hugging Face's byte-level BPE `tokenizer.json` (Llama 3's, GPT-2's) read into our tokenizer.

Such a file holds a vocabulary (each token spelled in GPT-2's printable byte alphabet,
`bytes_to_unicode`), merges, a split pattern and added tokens. Llama 3's was converted from its
tiktoken ranks (`transformers`' `TikTokenConverter`), so the token ids are the ranks and every merge
produces a token of higher id than the merges before it: applying merges in list order is then
the same as merging the lowest-ranked pair, which is what `BPETokenizer` does. `from_tokenizer_json`
checks that order and refuses a file without it, so a loaded tokenizer gives Hugging Face's ids.

The split pattern comes from the pre-tokenizer: a `Split` regex (Llama 3) followed by a
`ByteLevel` step without its own regex, or a `ByteLevel` step with `use_regex` (GPT-2's pattern).
Added tokens become special tokens (one the vocabulary also lists, as GPT-2's `<|endoftext|>`,
leaves the merge ranks): matched in text only where `encode` allows them.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizer.errors import TokenizerFileError
from tokenizer.fileformat import bytes_to_unicode


def _pre_tokenizer_pattern(pre: dict | None, where: str) -> str:
    """The split pattern of a byte-level pre-tokenizer (`gpt2` for ByteLevel's own regex)."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    pattern, byte_level = None, None
    for step in steps:
        kind = step.get("type")
        if kind == "Split" and pattern is None and "Regex" in step.get("pattern", {}):
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise TokenizerFileError(f"{where}: a Split step other than Isolated, not inverted")
            pattern = step["pattern"]["Regex"]
        elif kind == "ByteLevel" and byte_level is None:
            byte_level = step
        else:
            raise TokenizerFileError(f"{where}: pre-tokenizer step {kind!r} is not supported")
    if byte_level is None:
        raise TokenizerFileError(f"{where}: not a byte-level BPE (no ByteLevel pre-tokenizer)")
    if byte_level.get("add_prefix_space"):
        raise TokenizerFileError(f"{where}: ByteLevel add_prefix_space is not supported")
    if byte_level.get("use_regex", True):
        if pattern is not None:
            raise TokenizerFileError(f"{where}: both a Split regex and ByteLevel's own regex")
        return "gpt2"
    if pattern is None:
        raise TokenizerFileError(f"{where}: no split pattern (a Split regex or ByteLevel's)")
    return pattern


def from_tokenizer_json(cls, path: str | Path):
    """Our tokenizer from a Hugging Face byte-level BPE `tokenizer.json` (module docstring)."""
    path = Path(path)
    where = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerFileError(f"tokenizer file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerFileError(f"cannot read {path} as JSON: {err}") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerFileError(f"{where}: not a Hugging Face BPE tokenizer.json")
    if data.get("normalizer") is not None:
        raise TokenizerFileError(
            f"{where}: a normalizer is not supported (byte-level BPE has none)"
        )
    try:
        pattern = _pre_tokenizer_pattern(data.get("pre_tokenizer"), where)
        letter_byte = {c: b for b, c in bytes_to_unicode().items()}
        ranks = {
            bytes(letter_byte[c] for c in token): int(i) for token, i in model["vocab"].items()
        }
        merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
        merged = [ranks[bytes(letter_byte[c] for c in "".join(pair))] for pair in merges]
        specials = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
    except TokenizerFileError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise TokenizerFileError(
            f"{where}: vocabulary, merges or added tokens not byte-level BPE ({err!r})"
        ) from None
    out_of_order = next((i for i in range(1, len(merged)) if merged[i] < merged[i - 1]), None)
    if out_of_order is not None:
        raise TokenizerFileError(
            f"{where}: merge {out_of_order} makes a token of lower id than the merge before it; "
            "only vocabularies whose ids are merge ranks (GPT-2's, tiktoken conversions) are "
            "supported"
        )
    special_ids = set(specials.values())
    ranks = {token: i for token, i in ranks.items() if i not in special_ids}
    return cls._from_ranks(ranks, pattern, specials, merges=None)
