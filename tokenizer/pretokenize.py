"""Pre-tokenization: cutting text into chunks before byte-pair encoding.

GPT-2 (Radford et al. 2019, section 2.2 "Input Representation") observed that plain byte-level BPE
wastes merges on variants such as ``dog.``, ``dog!`` and ``dog?``, and prevents BPE "from merging
across character categories for any byte sequence". The text is therefore first split with a
regex into chunks (letters, digits, punctuation, whitespace runs); merges never cross a chunk
boundary. Sennrich et al. (2016, section 3.2) do the same with whitespace-separated words.

The three built-in split patterns are tiktoken's strings, character for character:

* ``gpt2``  -- GPT-2's pattern (tiktoken's ``r50k_base``),
* ``gpt4``  -- GPT-4's ``cl100k_base`` pattern (case-insensitive contractions, digits in runs of at
  most three, newlines kept apart from other whitespace),
* ``o200k`` -- GPT-4o's ``o200k_base`` pattern (camel-case words split, contractions attached).

Any other regex (``regex`` module syntax) is accepted too.

Speed and exactness. The ``regex`` module runs these patterns at roughly 6-10 MB/s, slower than
the whole of tiktoken's encoder. For the built-in patterns we therefore run an equivalent pattern
on the standard library's ``re`` engine, with ``\\p{L}``, ``\\p{N}``, ``\\s`` ... spelled out as
explicit character classes. Those classes come from `tokenizer.unicode_tables`, the Unicode 15.1
tables tiktoken's regex engine is built with, so we split exactly as tiktoken does even for
characters that newer Unicode versions (and the ``regex`` module) classify differently. ``re``
looks up a class of Basic Multilingual Plane characters in constant time but scans a list for
characters above U+FFFF, so those (emoji, historic scripts, rare CJK) are first replaced one for
one by a BMP character of the same category, and the chunks are cut from the original text at
the same positions.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Callable
from itertools import accumulate, pairwise

import regex

from tokenizer.errors import UnknownPatternError

# The split patterns, exactly as tiktoken defines them (tiktoken_ext/openai_public.py).
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
GPT4_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN, "o200k": O200K_PATTERN}
# Llama 3's pattern (Meta's tokenizer.py; its Hugging Face tokenizer.json's Split regex). Not a
# built-in name: it runs on `regex`, whose Unicode tables agree with Hugging Face's tokenizers.
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The same patterns for the standard library's `re`, with the Unicode classes as placeholders.
# Possessive quantifiers became greedy ones: in these patterns nothing after them can fail in a
# way that backtracking into them would fix, so the matches are the same (and `re` before Python
# 3.11 has no possessive quantifiers). `$` became `\Z`: after a possessive `\s++` Python's "or
# before a final newline" reading of `$` can never apply. `(?i:s)` is spelled out as `[sSſ]`
# (U+017F LATIN SMALL LETTER LONG S folds to s), as tiktoken's engine folds it.
_S, _D, _M, _T = "sSſ", "dD", "mM", "tT"
_CONTRACTION = f"(?:'[{_S}]|'[{_T}]|'[rR][eE]|'[vV][eE]|'[{_M}]|'[lL][lL]|'[{_D}])"
_STDLIB_TEMPLATES = {
    GPT2_PATTERN: "|".join(
        [
            r"'(?:[sdmt]|ll|ve|re)",
            r" ?[{L}]+",
            r" ?[{N}]+",
            r" ?[^{S}{L}{N}]+",
            r"[{S}]+\Z",
            r"[{S}]+(?![^{S}])",
            r"[{S}]",
        ]
    ),
    GPT4_PATTERN: "|".join(
        [
            f"'(?:[{_S}{_D}{_M}{_T}]|[lL][lL]|[vV][eE]|[rR][eE])",
            r"[^\r\n{L}{N}]?[{L}]+",
            r"[{N}]{{1,3}}",
            r" ?[^{S}{L}{N}]+[\r\n]*",
            r"[{S}]+\Z",
            r"[{S}]*[\r\n]",
            r"[{S}]+(?![^{S}])",
            r"[{S}]",
        ]
    ),
    O200K_PATTERN: "|".join(
        [
            r"[^\r\n{L}{N}]?[{UPPER}]*[{LOWER}]+" + _CONTRACTION + "?",
            r"[^\r\n{L}{N}]?[{UPPER}]+[{LOWER}]*" + _CONTRACTION + "?",
            r"[{N}]{{1,3}}",
            r" ?[^{S}{L}{N}]+[\r\n/]*",
            r"[{S}]*[\r\n]+",
            r"[{S}]+(?![^{S}])",
            r"[{S}]+",
        ]
    ),
}

# A character above U+FFFF is replaced by this BMP character of the same general category before
# matching: every class the built-in patterns use treats the two alike (no astral character is
# whitespace, and none of these is an apostrophe, a slash or a contraction letter).
_BMP_STAND_IN = {
    "Lu": "A",
    "Ll": "a",
    "Lt": "\u01c5",  # Dž
    "Lm": "\u02b0",  # modifier letter small h
    "Lo": "\u00aa",  # feminine ordinal indicator
    "M": "\u0300",  # combining grave accent
    "N": "0",
    "other": "#",
}
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def resolve_pattern(pattern: str) -> str:
    """The regex string for a built-in pattern name, or `pattern` itself once it compiles.

    A bare word (letters, digits, ``_.-``) is always read as a name, so a typo such as ``gtp4``
    fails loudly instead of becoming a regex that matches the literal text "gtp4".
    """
    if pattern in PATTERNS:
        return PATTERNS[pattern]
    if not isinstance(pattern, str) or not pattern:
        raise UnknownPatternError(f"split pattern must be a name or a regex, got {pattern!r}")
    if re.fullmatch(r"[\w.-]+", pattern):
        names = ", ".join(PATTERNS)
        raise UnknownPatternError(f"unknown split pattern name {pattern!r} (built in: {names})")
    try:
        regex.compile(pattern)
    except regex.error as err:
        raise UnknownPatternError(
            f"split pattern {pattern!r} is not a valid regex: {err}"
        ) from None
    return pattern


def pattern_name(pattern: str) -> str | None:
    """The built-in name of a pattern string, or None for a custom regex."""
    for name, known in PATTERNS.items():
        if known == pattern:
            return name
    return None


@functools.cache
def make_splitter(pattern: str) -> Callable[[str], list[str]]:
    """A function text -> list of chunks, for a pattern string (see `resolve_pattern`).

    Built-in patterns get the fast standard-library splitter; anything else runs on ``regex``.
    Chunks are the pattern's matches in order; text between matches (possible only with custom
    patterns) is dropped, as tiktoken drops it, and so are empty matches.
    """
    if pattern in _STDLIB_TEMPLATES:
        return _StdlibSplitter(pattern)
    compiled = regex.compile(pattern)
    if compiled.groups == 0:
        findall = compiled.findall
        return lambda text: [chunk for chunk in findall(text) if chunk]
    return lambda text: [m.group() for m in compiled.finditer(text) if m.end() > m.start()]


class _StdlibSplitter:
    """A built-in pattern on the standard library's `re`, with explicit Unicode 15.1 classes."""

    def __init__(self, pattern: str):
        classes = _unicode_classes()
        template = _STDLIB_TEMPLATES[pattern]
        self._findall = re.compile(template.format(**classes)).findall
        self._stand_ins = _StandIns()

    def __call__(self, text: str) -> list[str]:
        # Pure ASCII and BMP text (the common case) is matched as it is.
        if text.isascii() or _ASTRAL.search(text) is None:
            return self._findall(text)
        # Otherwise match a copy where each astral character has a BMP stand-in, then cut the
        # original at the same positions (the built-in patterns match every character).
        stand_in_chunks = self._findall(text.translate(self._stand_ins))
        ends = accumulate(map(len, stand_in_chunks), initial=0)
        return [text[start:end] for start, end in pairwise(ends)]


class _StandIns(dict):
    """A `str.translate` table filled on demand: astral character -> BMP stand-in."""

    def __missing__(self, codepoint: int) -> int:
        stand_in = codepoint if codepoint < 0x10000 else ord(_BMP_STAND_IN[category(codepoint)])
        self[codepoint] = stand_in
        return stand_in


@functools.cache
def _category_ranges() -> dict[str, tuple[list[int], list[int]]]:
    """Per category: sorted range starts and ends, parsed from `tokenizer.unicode_tables`."""
    from tokenizer import unicode_tables

    parsed = {}
    for name, text in unicode_tables.RANGES.items():
        starts, ends = [], []
        for item in text.split():
            first, _, last = item.partition("-")
            starts.append(int(first, 16))
            ends.append(int(last or first, 16))
        parsed[name] = (starts, ends)
    return parsed


def category(codepoint: int) -> str:
    """The coarse Unicode 15.1 category the split patterns care about: Lu Ll Lt Lm Lo M N or other."""
    for name, (starts, ends) in _category_ranges().items():
        if name == "White_Space":
            continue
        i = bisect.bisect_right(starts, codepoint) - 1
        if i >= 0 and codepoint <= ends[i]:
            return name
    return "other"


@functools.cache
def _unicode_classes() -> dict[str, str]:
    """The `re` character-class bodies L, N, S, UPPER, LOWER over BMP characters."""

    def body(*names: str) -> str:
        pieces = []
        for name in names:
            for first, last in zip(*_category_ranges()[name]):
                if first > 0xFFFF:
                    break
                last = min(last, 0xFFFF)
                pieces.append(_escape(first) + ("" if first == last else "-" + _escape(last)))
        return "".join(pieces)

    return {
        "L": body("Lu", "Ll", "Lt", "Lm", "Lo"),
        "N": body("N"),
        "S": body("White_Space"),
        "UPPER": body("Lu", "Lt", "Lm", "Lo", "M"),
        "LOWER": body("Ll", "Lm", "Lo", "M"),
    }


def _escape(codepoint: int) -> str:
    return f"\\U{codepoint:08x}"


def measure_tiktoken_classes() -> dict[str, list[tuple[int, int]]]:
    """Ask tiktoken's regex engine which code points are in each class (for the tables module).

    A tiktoken encoding whose pattern is a single class and whose vocabulary is the 256 bytes
    keeps exactly the characters of that class when it encodes the string of all code points.
    """
    import tiktoken

    everything = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)
    byte_ranks = {bytes([b]): b for b in range(256)}
    classes = {}
    for name, cls in [
        ("Lu", r"\p{Lu}"),
        ("Ll", r"\p{Ll}"),
        ("Lt", r"\p{Lt}"),
        ("Lm", r"\p{Lm}"),
        ("Lo", r"\p{Lo}"),
        ("M", r"\p{M}"),
        ("N", r"\p{N}"),
        ("White_Space", r"\s"),
    ]:
        probe = tiktoken.Encoding(
            f"probe-{name}", pat_str=cls, mergeable_ranks=byte_ranks, special_tokens={}
        )
        kept = sorted({ord(c) for c in probe.decode(probe.encode_ordinary(everything))})
        ranges: list[tuple[int, int]] = []
        for c in kept:
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1] = (ranges[-1][0], c)
            else:
                ranges.append((c, c))
        classes[name] = ranges
    return classes


def format_tables(classes: dict[str, list[tuple[int, int]]]) -> str:
    """The source text of `tokenizer/unicode_tables.py` for measured classes."""
    lines = [
        '"""Unicode 15.1 character classes, as compiled into tiktoken\'s regex engine.',
        "",
        "Generated by `python -m tokenizer.pretokenize --write-tables` (then `ruff format`).",
        "Each value lists code point ranges in hex, `first-last` or a single code point. The",
        "categories are the general categories the split patterns name (M is Mn+Mc+Me, N is",
        "Nd+Nl+No); White_Space is what the whitespace class matches.",
        '"""',
        "",
        "RANGES = {",
    ]
    for name, ranges in classes.items():
        items = [f"{a:x}" if a == b else f"{a:x}-{b:x}" for a, b in ranges]
        lines.append(f'    "{name}": (')
        line = ""
        for item in items:
            if len(line) + len(item) + 1 > 86:
                lines.append(f'        "{line}"')
                line = ""
            line += item + " "
        lines.append(f'        "{line}"')
        lines.append("    ),")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(
        prog="python -m tokenizer.pretokenize",
        description="Regenerate tokenizer/unicode_tables.py from tiktoken's regex engine.",
    )
    parser.add_argument("--write-tables", action="store_true", help="write the tables file")
    args = parser.parse_args(argv)
    source = format_tables(measure_tiktoken_classes())
    if args.write_tables:
        path = Path(__file__).with_name("unicode_tables.py")
        path.write_text(source, encoding="utf-8")
        print(f"wrote {path}")
    else:
        print(source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
