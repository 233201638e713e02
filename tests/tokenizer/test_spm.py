"""SentencePiece: a model trained through our command loads in SentencePieceTokenizer and gives
the ids of the sentencepiece library's own SentencePieceProcessor."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer import InvalidTokenIdError, SentencePieceTokenizer, TokenizerFileError
from tokenizer.data import embedded_corpus
from tokenizer.train import main as train_main

sentencepiece = pytest.importorskip("sentencepiece")

HELD_OUT = embedded_corpus()[-20_000:]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(ours, the library's processor) for a model trained by `tokenizer.train`."""
    corpus = tmp_path_factory.mktemp("spm") / "corpus.txt"
    corpus.write_text(embedded_corpus()[:150_000], encoding="utf-8")
    out = corpus.parent / "model"
    status = train_main(
        [
            "--backend",
            "sentencepiece",
            "--input",
            str(corpus),
            "--vocab-size",
            "800",
            "--out",
            str(out),
            "--special",
            "<|endoftext|>",
            "--no-progress",
        ]
    )
    assert status == 0
    ours = SentencePieceTokenizer(out)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    return ours, reference


def test_llama2_style_settings(trained):
    ours, reference = trained
    assert ours.vocab_size == reference.vocab_size() == 800
    assert (ours.unk_id, ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2, None)
    assert reference.pad_id() == -1
    assert ours.model.byte_fallback and ours.model.add_dummy_prefix
    assert not ours.model.remove_extra_whitespaces
    assert ours.special_tokens == {"<s>": 1, "</s>": 2, "<|endoftext|>": 3}
    for token_id in range(ours.vocab_size):
        assert ours.piece(token_id) == reference.id_to_piece(token_id)


def test_ids_match_the_library_on_held_out_text(trained):
    ours, reference = trained
    assert ours.encode(HELD_OUT) == reference.encode(HELD_OUT)
    assert ours.encode(HELD_OUT, bos=True, eos=True) == reference.encode(
        HELD_OUT, add_bos=True, add_eos=True
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "  two leading",
        "trailing  ",
        "Hello world",
        "日本語 🎉 naïve\tTAB\n\nnew",
        "a<|endoftext|>b <|endoftext|>",
        "\u2581already escaped",
        "x" * 500,
        "1234567 3.14",
    ],
)
def test_ids_and_text_match_the_library(trained, text):
    ours, reference = trained
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == reference.decode(ids)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=40))
def test_random_text_matches_the_library(trained, text):
    ours, reference = trained
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    assert ours.decode(ids) == reference.decode(ids)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 799), max_size=12))
def test_decoding_any_ids_matches_the_library(trained, ids):
    """Including byte tokens that do not form UTF-8, control and unknown tokens."""
    ours, reference = trained
    assert ours.decode(ids) == reference.decode(ids)


def test_errors(trained, tmp_path):
    ours, _ = trained
    with pytest.raises(InvalidTokenIdError):
        ours.decode([800])
    with pytest.raises(TokenizerFileError, match="not found"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    damaged = tmp_path / "damaged.model"
    damaged.write_bytes(ours.path.read_bytes()[:1000])
    with pytest.raises(TokenizerFileError, match="not a sentencepiece model"):
        SentencePieceTokenizer(damaged)


def test_a_control_token_splits_a_byte_fallback_run(trained):
    """<0xC2> <s> <0x80>: two stray bytes for SentencePiece, not the character U+0080."""
    ours, reference = trained
    byte_c2, byte_80 = reference.piece_to_id("<0xC2>"), reference.piece_to_id("<0x80>")
    ids = [byte_c2, reference.bos_id(), byte_80]
    assert reference.decode(ids) == "\ufffd\ufffd"
    assert ours.decode(ids) == reference.decode(ids)
