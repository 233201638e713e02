"""The split patterns: the fast standard-library splitter against the `regex` module and
tiktoken's own Unicode tables."""

import itertools

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import UnknownPatternError, embedded_corpus
from tokenizer.pretokenize import (
    PATTERNS,
    category,
    make_splitter,
    measure_tiktoken_classes,
    resolve_pattern,
)
from tokenizer.unicode_tables import RANGES


def test_gpt2_pattern_is_tiktokens():
    """(gpt4 and o200k are compared with tiktoken's constructors in test_tiktoken_parity.)"""
    from tiktoken_ext import openai_public

    assert PATTERNS["gpt2"] == openai_public.r50k_pat_str


def test_unicode_tables_are_what_tiktoken_uses():
    """The stored tables equal what tiktoken's regex engine reports for each class, today."""
    measured = measure_tiktoken_classes()
    for name, ranges in measured.items():
        stored = [
            tuple(int(x, 16) for x in (item.split("-") * 2)[:2]) for item in RANGES[name].split()
        ]
        assert stored == ranges, name


def agrees_with_regex_module(ch: str) -> bool:
    """Whether the `regex` module's (newer) Unicode puts `ch` in the category our tables do."""
    ours = category(ord(ch))
    for name in ("Lu", "Ll", "Lt", "Lm", "Lo", "M", "N"):
        if regex.fullmatch(rf"\p{{{name}}}", ch):
            return ours == name
    return ours == "other"


stable_text = st.text(st.characters().filter(agrees_with_regex_module), max_size=50)


@pytest.mark.parametrize("name", PATTERNS)
def test_fast_splitter_equals_regex_module_on_the_corpus(name):
    text = embedded_corpus()[:100_000] + " naïve 日本語 🎉🎉 x\U0001d518\U0001d52b  \n\n"
    assert make_splitter(PATTERNS[name])(text) == regex.findall(PATTERNS[name], text)


# Characters of each category the patterns distinguish, astral ones included (Lu Ll Lm Lo Mn Nd
# and an emoji above U+FFFF), with the contraction pieces: every triple of them, line by line.
EDGE_ALPHABET = [
    "\U0001d400",
    "\U0001d41a",
    "\U00016f93",
    "\U00020000",
    "\U0001d167",
    "\U0001d7ce",
    "\U0001f389",
    "A",
    "a",
    "\u02b0",
    "\u00aa",
    "\u01c5",
    "\u0300",
    "1",
    "'",
    "s",
    "\u017f",
    "T",
    " ",
    "\n",
    "/",
    "!",
]
EDGE_TEXT = "\n".join("".join(triple) for triple in itertools.product(EDGE_ALPHABET, repeat=3))


@pytest.mark.parametrize("name", PATTERNS)
def test_fast_splitter_equals_regex_module_on_every_category_triple(name):
    assert make_splitter(PATTERNS[name])(EDGE_TEXT) == regex.findall(PATTERNS[name], EDGE_TEXT)


@settings(max_examples=300, deadline=None)
@given(text=stable_text)
def test_fast_splitter_equals_regex_module_on_random_text(text):
    """Where both agree on what a character is, the two engines cut text identically."""
    for pattern in PATTERNS.values():
        assert make_splitter(pattern)(text) == regex.findall(pattern, text)


def test_custom_patterns_use_the_regex_module():
    split = make_splitter(resolve_pattern(r"\p{L}+|(\d)|\s+"))  # a group: still whole matches
    assert split("ab 12 é") == ["ab", " ", "1", "2", " ", "é"]
    assert make_splitter(r"\w*")("a b") == ["a", "b"]  # empty matches are dropped


def test_pattern_names_and_errors():
    assert resolve_pattern("gpt4") == PATTERNS["gpt4"]
    assert resolve_pattern(PATTERNS["o200k"]) == PATTERNS["o200k"]
    with pytest.raises(UnknownPatternError, match="gpt2, gpt4, o200k"):
        resolve_pattern("cl100k")
    with pytest.raises(UnknownPatternError, match="not a valid regex"):
        resolve_pattern("[a-")
    with pytest.raises(UnknownPatternError):
        resolve_pattern("")
