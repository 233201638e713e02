"""Exact parity with tiktoken on cl100k_base and o200k_base: same ids, same special-token rules."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer import BPETokenizer, DisallowedSpecialTokenError
from tokenizer.pretokenize import GPT4_PATTERN, O200K_PATTERN

ENCODINGS = ["cl100k", "o200k"]

SAMPLES = [
    "",
    "hello world",
    "Hello, World! How's it going? I'm fine; you'll see, we've done it, they're here. She'd go.",
    "HOW'S IT GOING? I'M FINE. YOU'LL SEE. WE'VE. THEY'RE. SHE'D. IT'S",
    "camelCaseWords and PascalCaseWords, XMLHttpRequest, iPhone, McDonald's",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Ελληνικά, עברית, العربية, हिन्दी, ภาษาไทย, Tiếng Việt, naïve café résumé",
    "emoji: 🎉🚀👩‍👩‍👧‍👦🇫🇷 ❤️ 👍🏽 and astral math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\n\tif x != 0:\n",
    "    leading spaces\n\n\n   \n\t\t trailing   \r\n\r\n  ",
    "numbers 1 12 123 1234 12345 123456 3.14159 1,000,000 ٣٤٥ ௧௨௩ Ⅻ ½",
    "a" * 3000,
    " " * 500 + "x" + "\n" * 300,
    "https://example.com/path?q=1&r=two#frag /usr/local/bin ../a/b//c",
    "\u0000\u0001\u001f\u007f\u0085\u00a0\u2028\u2029\u200b\u3000\ufeff",
    "ſtraße 'S 'ſ 'T 'LL 'Ve 'rE ǅ ᾈ",
    "\u0300\u0301a\u0300 \u0301\u0302b 'm\u0301 x\u0308y",
    "it'ſ THEY'ſ 'ſx 'ſtraße don'T WON'ſ",  # ſ folds to s in the contractions
]
# Characters above U+FFFF of each category (Lu Ll Lm Lo M N, an emoji) next to each other and to
# BMP letters, digits and contractions: the split must treat each like its category.
ASTRAL = [
    "\U0001d400",
    "\U0001d41a",
    "\U00016f93",
    "\U00020000",
    "\U0001d167",
    "\U0001d7ce",
    "\U0001f389",
]
SAMPLES.append(
    " ".join(a + b + c for a in ASTRAL for b in ASTRAL + ["A", "a", "1"] for c in ["", "'s"])
)


@pytest.fixture(params=ENCODINGS)
def pair(request):
    return request.getfixturevalue(request.param)


def test_patterns_and_special_tokens_are_tiktokens(cl100k, o200k):
    for reference, ours in (cl100k, o200k):
        assert ours.pattern == reference._pat_str
        assert ours.special_tokens == reference._special_tokens
        assert ours.vocab_size == reference.n_vocab
    assert cl100k[1].pattern == GPT4_PATTERN
    assert o200k[1].pattern == O200K_PATTERN


@pytest.mark.parametrize("text", SAMPLES)
def test_samples(pair, text):
    reference, ours = pair
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


def test_tiny_shakespeare(pair, shakespeare):
    reference, ours = pair
    ours.clear_cache()
    ids = ours.encode_ordinary(shakespeare)
    assert ids == reference.encode_ordinary(shakespeare)
    assert ours.decode(ids) == shakespeare


def test_every_byte_and_every_token(pair):
    reference, ours = pair
    text = "".join(map(chr, range(256)))
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)
    for token_id in range(reference.n_vocab):
        try:
            expected = reference.decode_single_token_bytes(token_id)
        except KeyError:
            continue  # ids tiktoken leaves unused (between the ranks and the specials)
        assert ours.token_bytes(token_id) == expected


def test_decode_bytes_matches_on_invalid_utf8(pair):
    reference, ours = pair
    ids = ours.encode_ordinary("é 🎉 中") + [ours.encode_ordinary("é")[0]]
    broken = ids[:1] + ids[2:]  # may split a character's bytes
    assert ours.decode_bytes(broken) == reference.decode_bytes(broken)
    assert ours.decode(broken) == reference.decode(broken, errors="replace")


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=st.text(max_size=60))
def test_random_unicode(pair, text):
    reference, ours = pair
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    parts=st.lists(
        st.sampled_from(
            [
                " ",
                "  ",
                "\n",
                "\r\n",
                "\t",
                "'",
                "'s",
                "'LL",
                "1",
                "123",
                "4567",
                "a",
                "Ab",
                "AB",
                "é",
                "ß",
                "ſ",
                "中",
                "🎉",
                "\u0301",
                "/",
                ".",
                "!?",
                "\u00a0",
                "\u3000",
                "x y",
            ]
        ),
        max_size=30,
    )
)
def test_random_pattern_edges(pair, parts):
    """Strings built from the pieces the split patterns treat specially."""
    reference, ours = pair
    text = "".join(parts)
    assert ours.encode_ordinary(text) == reference.encode_ordinary(text)


def test_special_tokens_follow_tiktoken(pair):
    reference, ours = pair
    text = "a<|endoftext|>b <|endofprompt|>\n<|endoftext|>"
    for allowed in ["all", {"<|endoftext|>"}]:
        expected = reference.encode(text, allowed_special=allowed, disallowed_special=())
        assert ours.encode(text, allowed_special=allowed, disallowed_special=()) == expected
    assert ours.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())
    assert ours.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    # By default a special-token string in user text is an error, in both.
    with pytest.raises(ValueError):
        reference.encode(text)
    with pytest.raises(DisallowedSpecialTokenError, match="endoftext"):
        ours.encode(text)
    with pytest.raises(DisallowedSpecialTokenError, match="endofprompt"):
        ours.encode(text, allowed_special={"<|endoftext|>"})


def test_encode_batch(pair):
    reference, ours = pair
    texts = SAMPLES[:8]
    assert ours.encode_batch(texts) == reference.encode_batch(texts, num_threads=1)


def test_from_a_tiktoken_encoding_object(cl100k):
    reference, ours = cl100k
    again = BPETokenizer.from_tiktoken(reference)
    assert again.pattern == ours.pattern and again.special_tokens == ours.special_tokens
    text = SAMPLES[2] + SAMPLES[8]
    assert again.encode_ordinary(text) == reference.encode_ordinary(text)


def test_recovered_merges_save_and_load(cl100k, tmp_path):
    """Ranks come without merges: recover them, save, load, and encode as tiktoken does.

    The first 3,000 merges of cl100k_base are a complete BPE vocabulary of their own (every
    merge uses lower ranks), which keeps this fast; the full vocabulary is the slow test below.
    """
    import tiktoken

    reference, ours = cl100k
    ranks = {token: rank for token, rank in reference._mergeable_ranks.items() if rank < 3256}
    small_reference = tiktoken.Encoding(
        "cl100k-3256", pat_str=reference._pat_str, mergeable_ranks=ranks, special_tokens={}
    )
    small = BPETokenizer.from_tiktoken(small_reference)
    loaded = BPETokenizer.load(small.save(tmp_path / "small.bpe"))
    assert len(loaded.merges) == 3000
    assert loaded.merges == small.merges
    text = SAMPLES[2] + SAMPLES[6] + SAMPLES[9]
    assert loaded.encode(text) == small_reference.encode(text)
    assert "<-" in (tmp_path / "small.vocab").read_text(encoding="utf-8")


@pytest.mark.slow
def test_full_cl100k_save_and_load(cl100k, tmp_path):
    reference, ours = cl100k
    loaded = BPETokenizer.load(ours.save(tmp_path / "cl100k.bpe"))
    assert len(loaded.merges) == 100256 - 256
    text = SAMPLES[2] + SAMPLES[6] + SAMPLES[9]
    assert loaded.encode(text) == reference.encode(text)
    assert loaded.special_tokens == reference._special_tokens
