"""WordPiece against Hugging Face's BertTokenizer (the `tokenizers` backend) on the same vocabulary,
and the trainer's merges against the likelihood score computed by hand."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer import InvalidTokenIdError, TokenizerError, VocabSizeError
from tokenizer.data import embedded_corpus
from tokenizer.train import main as train_main
from tokenizer.wordpiece import WordPieceError, WordPieceTokenizer, basic_tokenize, train_wordpiece

transformers = pytest.importorskip("transformers")

VARIED = [
    "Hello, World! It's 3:45pm -- isn't it?",
    "Héllo Ñandú CAFÉ naïve Ångström façade",
    "日本語のテキスト、中文字符和한국어 mixed with English",
    "tabs\tand\nnew lines\r\nand\u00a0no-break\u2003spaces\u2028line sep",
    "control\x00chars\x07and\ufffdreplacement\u200bzero width",
    "emoji 🙂👍🏽 and symbols $5 + 3 = 8 < 9 > 2 ^ ` | ~ ©®™ §¶ «quotes» „low“",
    "İstanbul ǅ ß ﬁ ẞ Σσς Ωmega",
    "a" * 120 + " " + "supercalifragilisticexpialidocious",
    "   ",
    "",
    "Paris is the [MASK] of France. a[MASK]b [mask] [Mask] x [CLS][SEP] [PAD]y [[UNK]] [ MASK ]",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(ours, HF BertTokenizer) on a vocabulary trained here on the embedded corpus."""
    corpus = embedded_corpus()[:60_000]
    ours = WordPieceTokenizer.train(corpus + "".join(VARIED), vocab_size=1200)
    folder = tmp_path_factory.mktemp("bert")
    ours.save(folder)
    return ours, transformers.BertTokenizer.from_pretrained(str(folder))


def _hf_words(hf, text):
    backend = hf.backend_tokenizer
    normalized = backend.normalizer.normalize_str(text)
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]


@pytest.mark.parametrize("text", VARIED)
def test_basic_tokenizer_equals_bert_normalizer_and_pre_tokenizer(trained, text):
    assert basic_tokenize(text) == _hf_words(trained[1], text)


@pytest.mark.parametrize("text", VARIED + [embedded_corpus()[60_000:70_000]])
def test_ids_equal_bert_tokenizer(trained, text):
    ours, hf = trained
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


def test_bert_tokenizer_fast_reads_the_same_vocabulary(trained, tmp_path):
    ours, _ = trained
    fast = transformers.BertTokenizerFast.from_pretrained(str(ours.save(tmp_path).parent))
    text = " ".join(VARIED)
    assert ours.encode(text) == fast.encode(text, add_special_tokens=False)
    assert ours.decode(ours.encode("Hello, world!")) == fast.decode(
        fast.encode("Hello, world!", add_special_tokens=False)
    )


def test_pairs_equal_bert_tokenizer_with_segment_ids(trained):
    ours, hf = trained
    first, second = "The quick brown fox.", "Jumps over the lazy dog!"
    expected = hf(first, second)
    assert ours.encode_pair(first, second) == (expected["input_ids"], expected["token_type_ids"])
    single = hf(first)
    assert ours.encode_pair(first) == (single["input_ids"], single["token_type_ids"])


# Latin, Greek, Cyrillic, Hebrew, Thai, Hangul, punctuation, symbols, CJK, emoji: blocks whose
# characters are in every Unicode version involved. Outside them the two differ by Unicode version
# only (module docstring of tokenizer.wordpiece), e.g. a Po added in Unicode 10.
BLOCKS = [(0x0, 0x5FF), (0xE00, 0xE7F), (0x1100, 0x11FF), (0x1E00, 0x1FFF), (0x2000, 0x206F)]
BLOCKS += [(0x20A0, 0x20BF), (0x2100, 0x27BF), (0x3000, 0x30FF), (0x4E00, 0x9FFF)]
BLOCKS += [(0xAC00, 0xD7A3), (0xF900, 0xFAFF), (0xFB00, 0xFFFD), (0x1F300, 0x1F64F)]
KNOWN_CHARACTERS = st.one_of(
    [
        st.characters(min_codepoint=a, max_codepoint=b, exclude_categories=["Cn", "Cs"])
        for a, b in BLOCKS
    ]
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(alphabet=KNOWN_CHARACTERS, max_size=40))
def test_hypothesis_text_equals_bert_tokenizer(trained, text):
    ours, hf = trained
    assert basic_tokenize(text) == _hf_words(hf, text)
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.one_of(st.text(alphabet=KNOWN_CHARACTERS, max_size=8),
                          st.sampled_from(["[MASK]", "[UNK]", "[CLS]", "[SEP]", "[PAD]", "[mask]"])),
                max_size=8))  # fmt: skip
def test_hypothesis_text_with_special_tokens_equals_bert_tokenizer(trained, pieces):
    # Hugging Face cuts the special tokens out of the text first (exact, case-sensitive match).
    ours, hf = trained
    text = "".join(pieces)
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)


def test_greedy_longest_match_first_by_hand():
    tok = WordPieceTokenizer(["[UNK]", "un", "##aff", "##able", "##a", "unaff", "##ff", "x"])
    assert tok.encode("unaffable") == [5, 3]  # unaff + ##able, not un + ##aff + ##able
    assert tok.encode("unx") == [0]  # "##x" is missing: the whole word is [UNK]
    assert tok.encode("UN, x") == [1, 0, 7]  # lower-cased; "," is its own (unknown) word
    assert tok.decode([5, 3, 7]) == "unaffable x"


def test_trainer_merges_the_pair_with_the_best_likelihood_score():
    """Words hug ×10, pug ×5, pun ×12, bun ×4, hugs ×5 (the Hugging Face course's corpus). Symbol
    counts: h 15, ##u 36, ##g 20, p 17, ##n 16, b 4, ##s 5. The first merge is the pair with the
    highest count(ab) / (count(a)·count(b)): ##g ##s, 5 / (20·5) = 0.05; every other pair scores
    1/36 (e.g. h ##u: 15 / (15·36))."""
    text = " ".join(["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5)
    vocab = train_wordpiece(text, vocab_size=5 + 7 + 1)
    assert vocab == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        ["h", "##u", "##g", "p", "##n", "b", "##s"]
    ) + ["##gs"]
    # Then every pair scores 1/36 again (##u ##gs: 5 / (36·5)); the tie goes to the most frequent
    # pair, p ##u (17). That leaves ##u 19 times: h ##u scores 15 / (15·19) = 1/19, level with
    # b ##u (4 / (4·19)) and above pu ##n (12 / (17·16)); the more frequent, h ##u, is merged.
    assert train_wordpiece(text, vocab_size=15)[-2:] == ["pu", "hu"]


def test_vocabulary_file_round_trip_and_bad_files(tmp_path):
    tok = WordPieceTokenizer.train("the cat sat on the mat", vocab_size=30)
    loaded = WordPieceTokenizer.load(tok.save(tmp_path))
    assert loaded.vocab == tok.vocab and loaded.encode("the cat") == tok.encode("the cat")
    no_unk = tmp_path / "no_unk.txt"
    no_unk.write_text("[PAD]\nthe\n##s\n")
    with pytest.raises(WordPieceError, match=r"no \[UNK\]"):
        WordPieceTokenizer.load(no_unk)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(WordPieceError, match="empty"):
        WordPieceTokenizer.load(tmp_path / "empty.txt")
    with pytest.raises(VocabSizeError, match="below"):
        train_wordpiece("abcdef", vocab_size=6)
    with pytest.raises(TokenizerError, match="no words"):
        train_wordpiece(" \n ", vocab_size=60)
    with pytest.raises(InvalidTokenIdError):
        tok.decode([len(tok.vocab)])


def test_train_command_writes_a_vocabulary_hf_reads(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(embedded_corpus()[:20_000])
    out = tmp_path / "wp"
    args = ["--backend", "wordpiece", "--input", str(corpus), "--vocab-size", "500"]
    assert train_main([*args, "--out", str(out), "--no-progress"]) == 0
    hf = transformers.BertTokenizer.from_pretrained(str(out))
    ours = WordPieceTokenizer.load(out / "vocab.txt")
    assert len(hf) == ours.vocab_size == 500
    text = embedded_corpus()[30_000:32_000]
    assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert train_main([*args, "--out", str(out), "--special", "<s>"]) == 2
    assert "does not apply to wordpiece" in capsys.readouterr().err
