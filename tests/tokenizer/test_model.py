"""The byte-level BPE: training (against a naive reference), encoding, special tokens, files."""

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenizer import (
    BPETokenizer,
    DisallowedSpecialTokenError,
    EmptyCorpusError,
    InvalidTokenIdError,
    SpecialTokenError,
    TokenizerFileError,
    UnknownPatternError,
    VocabSizeError,
    bytes_to_unicode,
    embedded_corpus,
)
from tokenizer.learn import learn_merges, naive_merges
from tokenizer.merge import _byte_pair_merge_long, _byte_pair_merge_short
from tokenizer.merge import byte_pair_merge as _byte_pair_merge
from tokenizer.pretokenize import PATTERNS, make_splitter

CORPUS = embedded_corpus()


@pytest.fixture(scope="module")
def small():
    """A tokenizer trained on 30 KB of the embedded corpus, with two special tokens."""
    return BPETokenizer.train(
        CORPUS[:30_000], 600, special_tokens=["<|endoftext|>", "<|pad|>"], progress=False
    )


def test_known_answer_aaabdaaabac():
    """Wikipedia's example, on bytes: aa -> Z, then ab -> Y (it ties with Za at two; the
    smaller pair wins), then ZY -> X, leaving XdXac."""
    tokenizer = BPETokenizer.train("aaabdaaabac", 256 + 3, pattern=r".+", progress=False)
    a, b = ord("a"), ord("b")
    assert list(tokenizer.merges) == [(a, a), (a, b), (256, 257)]
    assert tokenizer.encode("aaabdaaabac") == [258, ord("d"), 258, a, ord("c")]
    assert tokenizer.decode([258, ord("d"), 258, a, ord("c")]) == "aaabdaaabac"
    assert tokenizer.token_bytes(258) == b"aaab"


@pytest.mark.parametrize(
    "text, num_merges, pattern",
    [
        (CORPUS[:6000], 150, "gpt4"),
        (CORPUS[50_000:54_000], 120, "gpt2"),
        (CORPUS[100_000:104_000], 120, "o200k"),
        ("aaaa aaa aaaaa bab abab ababab " * 20 + "xyzzy " * 3, 40, "gpt4"),  # overlaps, ties
        ("Thé café naïve 日本語 日本 🎉🎉 " * 10, 60, r"\S+|\s+"),  # a custom pattern
    ],
)
def test_fast_trainer_equals_naive_reference(text, num_merges, pattern):
    tokenizer = BPETokenizer.train(text, 256 + num_merges, pattern=pattern, progress=False)
    assert list(tokenizer.merges) == naive_merges(text, num_merges, PATTERNS.get(pattern, pattern))


def test_ties_are_broken_by_the_smallest_pair():
    # Every pair occurs once: the first merge must be the smallest pair, (b'a', b'b').
    tokenizer = BPETokenizer.train("dc ba ab", 257, pattern=r"\S+", progress=False)
    assert list(tokenizer.merges) == [(ord("a"), ord("b"))]
    # The corpus order does not matter.
    again = BPETokenizer.train(["ab", "ba", "dc"], 257, pattern=r"\S+", progress=False)
    assert again.merges == tokenizer.merges


def test_learn_merges_stops_when_no_pairs_are_left():
    assert learn_merges([[1, 2]], [5], 10, progress=False) == [(1, 2)]
    tokenizer = BPETokenizer.train("ab ab", 300, progress=False)
    assert tokenizer.vocab_size < 300
    assert tokenizer.encode("ab ab") == [256, 257]


def test_encoding_the_training_chunks_reproduces_the_training_merges(small):
    """Rank-based encoding (tiktoken's rule) of each training chunk ends where training did."""
    chunks = Counter(make_splitter(small.pattern)(CORPUS[:30_000]))
    words = [list(chunk.encode("utf-8")) for chunk in chunks]
    learn_merges(words, list(chunks.values()), len(small.merges), progress=False)
    for chunk, final in zip(chunks, words):
        assert small.encode_ordinary(chunk) == final


def test_to_tiktoken_gives_identical_ids(small):
    reference = small.to_tiktoken()
    text = CORPUS[30_000:60_000] + " Thé 日本語 🎉 <|endoftext|>"
    assert small.encode(text, allowed_special="all") == reference.encode(
        text, allowed_special="all"
    )
    assert small.encode_ordinary(text) == reference.encode_ordinary(text)


@settings(max_examples=1500, deadline=None)
@given(text=st.text())
def test_round_trip_random_strings(small, text):
    assert small.decode(small.encode_ordinary(text)) == text


@settings(max_examples=1500, deadline=None)
@given(data=st.binary())
def test_round_trip_random_bytes(small, data):
    """Arbitrary bytes, mostly invalid UTF-8: merging keeps every byte; decode replaces."""
    ids = [small._ranks[part] for part in _byte_pair_merge(data, small._ranks.get, 1 << 62)]
    assert small.decode_bytes(ids) == data
    assert small.decode(ids) == data.decode("utf-8", errors="replace")
    text = data.decode("utf-8", errors="replace")
    assert small.decode(small.encode_ordinary(text)) == text


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=700),
        st.builds(
            lambda start, size: CORPUS[start : start + size].encode(),
            st.integers(0, 400_000),
            st.integers(0, 700),
        ),
        st.builds(
            lambda unit, n: unit * n,
            st.sampled_from([b"a", b"ab", b" ", b"aab"]),
            st.integers(0, 400),
        ),
    ),
    limit=st.sampled_from([1 << 62, 300, 450]),
)
def test_long_chunk_merge_loop_equals_the_short_one(small, data, limit):
    """The heap-based loop for long chunks merges exactly as the simple one (ties leftmost)."""
    get = small._ranks.get
    expected = _byte_pair_merge_short(data, get, limit)
    assert _byte_pair_merge_long(data, get, limit) == expected
    assert _byte_pair_merge_short(data, get, limit, small._byte_pair_ranks) == expected


def test_long_runs_encode_correctly(small):
    text = "ab" * 20_000 + " " * 5000 + "x"
    ids = small.encode_ordinary(text)
    assert small.decode(ids) == text
    assert ids == small.to_tiktoken().encode_ordinary(text)


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_bpe_dropout_segments_with_its_closed_form_probabilities(p):
    """Provilkov et al.'s Algorithm 1 on "abc" with merges ab < bc < abc: every step drops each
    applicable merge with probability p, applies the best survivor, and stops when none is left.
    Step 1 keeps ab (1 - p), or drops it and keeps bc (p(1 - p)), or drops both (p²); step 2
    then keeps the merge into abc with probability 1 - p."""
    ranks = {b"ab": 0, b"bc": 1, b"abc": 2}
    rng, n = random.Random(0), 40_000
    draws = (_byte_pair_merge(b"abc", ranks.get, dropout=p, rng=rng) for _ in range(n))
    seen = Counter(map(tuple, draws))
    expected = {
        (b"abc",): (1 - p) ** 2 * (1 + p),
        (b"ab", b"c"): (1 - p) * p,
        (b"a", b"bc"): p * p * (1 - p),
        (b"a", b"b", b"c"): p * p,
    }
    assert set(seen) == set(expected)
    for parts, probability in expected.items():
        assert seen[parts] / n == pytest.approx(probability, abs=0.012)


def test_bpe_dropout_round_trips_and_spans_bytes_to_the_deterministic_segmentation(small):
    text = CORPUS[:3000] + " \ud800 lone surrogate"
    rng = random.Random(1)
    expected = small.to_tiktoken().encode_ordinary(text)  # the independent reference
    assert small.encode_ordinary(text, 1e-12, rng) == expected  # p -> 0: ordinary BPE
    assert small.decode(small.encode_ordinary(text, 1.0, rng)) == small.decode(expected)
    assert all(i < 256 for i in small.encode_ordinary(text, 1.0, rng))  # p = 1: bytes
    dropped = small.encode_ordinary(text, 0.1, rng)
    assert small.decode(dropped) == small.decode(expected)
    assert len(expected) < len(dropped) < len(text.encode("utf-8", "replace"))
    assert dropped != small.encode_ordinary(text, 0.1, rng)  # a new draw each time


def test_decode_replaces_invalid_utf8(small):
    ids = small.encode_ordinary("é")
    assert small.decode_bytes(ids) == "é".encode()
    assert small.decode([0xC3]) == "\ufffd"
    assert small.decode([0xFF, ord("a")]) == "\ufffda"


def test_decode_rejects_unknown_ids(small):
    with pytest.raises(InvalidTokenIdError, match="99999"):
        small.decode([1, 99999])
    with pytest.raises(InvalidTokenIdError, match="-1"):
        small.decode([-1])
    with pytest.raises(InvalidTokenIdError):
        small.token_bytes(small.vocab_size)


def test_special_tokens(small):
    eot, pad = small.special_tokens["<|endoftext|>"], small.special_tokens["<|pad|>"]
    assert (eot, pad) == (598, 599) and small.vocab_size == 600
    text = "hello<|endoftext|>world<|pad|>"
    with pytest.raises(DisallowedSpecialTokenError, match="allowed_special"):
        small.encode(text)
    ids = small.encode(text, allowed_special="all")
    assert ids.count(eot) == 1 and ids[-1] == pad
    assert small.decode(ids) == text
    only_eot = small.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
    assert eot in only_eot and pad not in only_eot
    as_text = small.encode(text, disallowed_special=())
    assert eot not in as_text and small.decode(as_text) == text
    assert small.encode(text, disallowed_special=()) == small.encode_ordinary(text)
    with pytest.raises(SpecialTokenError, match="not special tokens"):
        small.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(SpecialTokenError):
        small.encode(text, allowed_special="none")


def test_special_tokens_are_kept_out_of_training():
    text = "<|sep|>" * 50 + "ab " * 5
    tokenizer = BPETokenizer.train(text, 270, special_tokens=["<|sep|>"], progress=False)
    learned = {tokenizer.token_bytes(i) for i in range(256, tokenizer.vocab_size - 1)}
    assert not any(b"|" in token or b"<" in token for token in learned)


def test_bad_training_input():
    with pytest.raises(EmptyCorpusError):
        BPETokenizer.train("", 300, progress=False)
    with pytest.raises(EmptyCorpusError):
        BPETokenizer.train(["", ""], 300, progress=False)
    with pytest.raises(VocabSizeError, match="258"):
        BPETokenizer.train("hello", 257, special_tokens=["<a>", "<b>"], progress=False)
    with pytest.raises(UnknownPatternError, match="gpt4"):
        BPETokenizer.train("hello", 300, pattern="gtp4", progress=False)
    with pytest.raises(UnknownPatternError, match="not a valid regex"):
        BPETokenizer.train("hello", 300, pattern="(unclosed", progress=False)
    with pytest.raises(SpecialTokenError):
        BPETokenizer.train("hello", 300, special_tokens=["<a>", "<a>"], progress=False)


def test_save_and_load_round_trip(tmp_path):
    custom = r"\p{L}+|\p{N}|[^\s\p{L}\p{N}]+|\s+"
    tokenizer = BPETokenizer.train(
        CORPUS[:20_000], 400, pattern=custom, special_tokens=["<|bos|>", "<|eos|>"], progress=False
    )
    path = tokenizer.save(tmp_path / "tok")  # no suffix: a directory
    assert path == tmp_path / "tok" / "tokenizer.bpe"
    loaded = BPETokenizer.load(tmp_path / "tok")
    assert loaded.pattern == custom
    assert loaded.special_tokens == {"<|bos|>": 398, "<|eos|>": 399}
    assert loaded.merges == tokenizer.merges
    text = CORPUS[20_000:30_000] + "<|eos|>"
    assert loaded.encode(text, allowed_special="all") == tokenizer.encode(
        text, allowed_special="all"
    )
    # The split pattern really is the stored one: digits are single chunks under it.
    assert loaded.encode("12345") == [ord(c) for c in "12345"]
    listing = (tmp_path / "tok" / "tokenizer.vocab").read_text(encoding="utf-8")
    assert "399 [<|eos|>] special" in listing


@pytest.mark.parametrize(
    "edit, line, message",
    [
        (lambda lines: ["PK\x03\x04 zip"] + lines[1:], 1, "not a tokenizer file"),
        (lambda lines: ["bpe-tokenizer v9"] + lines[1:], 1, "unsupported format version"),
        (lambda lines: lines[:3] + ['pattern "(unclosed"'] + lines[4:], 4, "pattern"),
        (lambda lines: lines[:10] + ["6 zz"] + lines[11:], 11, "two hex digits"),
        (lambda lines: lines[:270] + ["264 1 999"] + lines[271:], 271, "not defined above"),
        (lambda lines: lines[:270] + ["264 a b"] + lines[271:], 271, "integer"),
        (lambda lines: lines[:272] + ["266 104 101"] + lines[273:], 273, "repeats"),
        (lambda lines: lines[:272] + ["258 1 2"] + lines[273:], 273, "defined twice"),
        (lambda lines: lines[:280], 281, "file ends early"),
        (lambda lines: lines[:261] + ["merges many"] + lines[262:], 262, "number of merges"),
        (lambda lines: lines[:-1] + ["oops"], 308, "expected 'end'"),
    ],
)
def test_damaged_files_name_the_line(tmp_path, edit, line, message):
    tokenizer = BPETokenizer.train(CORPUS[:5000], 300, special_tokens=["<|x|>"], progress=False)
    path = tokenizer.save(tmp_path / "t.bpe")
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    path.write_text("\n".join(edit(lines)) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=message) as caught:
        BPETokenizer.load(path)
    assert f"line {line}:" in str(caught.value)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerFileError, match="not found"):
        BPETokenizer.load(tmp_path / "missing.bpe")
    binary = tmp_path / "binary.bpe"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TokenizerFileError, match="not UTF-8"):
        BPETokenizer.load(binary)
    empty = tmp_path / "empty.bpe"
    empty.write_text("")
    with pytest.raises(TokenizerFileError, match="line"):
        BPETokenizer.load(empty)


def test_untrained_tokenizer_is_bytes():
    tokenizer = BPETokenizer()
    assert tokenizer.vocab_size == 256
    assert tokenizer.encode("hé") == [104, 0xC3, 0xA9]
    assert "gpt4" in repr(tokenizer)


def test_bytes_to_unicode_is_the_byte_level_alphabet_of_hf_tokenizers():
    """GPT-2's printable stand-ins for the 256 bytes, against HF `tokenizers`' ByteLevel
    pre-tokenizer (which spells byte 32, the space, as "Ġ", byte 10 as "Ċ")."""
    pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers")
    alphabet = bytes_to_unicode()
    assert sorted(alphabet.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    text = bytes(range(256)).decode("latin-1")
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(
        text
    )
    theirs = "".join(piece for piece, _ in pieces)
    assert theirs == "".join(alphabet[b] for b in text.encode("utf-8"))
