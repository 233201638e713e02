"""Parallel files, token-count batches and the embedded task."""

import gzip

import pytest

from transformer.data import (
    DataError,
    collate,
    embedded_task,
    encode_pairs,
    read_parallel,
    resegment,
    reverse_and_spell,
    token_batches,
)
from transformer.vocabulary import BPE, TRANSLATION_SPECIALS, WordVocabulary


def test_embedded_task_is_reverse_and_spell_with_held_out_validation():
    assert reverse_and_spell("3 1 4") == "four one three"
    train_src, train_tgt, valid_src, valid_tgt = embedded_task(500, 50, seed=3)
    assert len(train_src) == 500 and len(valid_src) == 50
    assert all(len(s.split()) < 4 for s in set(train_src) & set(valid_src))
    assert sum(len(s.split()) == 1 for s in train_src) > 20  # the shortest are not starved
    assert all(reverse_and_spell(s) == t for s, t in zip(valid_src, valid_tgt))


def test_token_batches_cover_every_pair_once_within_the_budget():
    src, tgt, _, _ = embedded_task(400, 10, seed=0)
    vocab = WordVocabulary.train(src + tgt)
    data = encode_pairs(vocab, src, tgt)
    batches = token_batches(data, max_tokens=64, shuffle_seed=5)
    assert sorted(i for b in batches for i in b) == list(range(len(data)))
    for batch in batches:
        source, target_in, target_out = collate(data, batch)
        assert source.numel() <= 64 and target_out.numel() <= 64
        assert (target_in[:, 0] == 1).all()  # the word vocabulary's BOS, EOS and padding ids
        lengths = (target_out != 0).sum(1)
        assert (target_out[range(len(batch)), lengths - 1] == 2).all()
    assert token_batches(data, 64, shuffle_seed=5) == batches  # reproducible for resume
    assert token_batches(data, 64, shuffle_seed=6) != batches


def test_read_parallel_gz_and_mismatch(tmp_path):
    a, b = tmp_path / "a.gz", tmp_path / "b.txt"
    with gzip.open(a, "wt", encoding="utf-8") as f:
        f.write("Ein Hund.\nZwei Katzen.\n")
    b.write_text("A dog.\nTwo cats.\n")
    assert read_parallel(a, b) == (["Ein Hund.", "Zwei Katzen."], ["A dog.", "Two cats."])
    b.write_text("A dog.\n")
    with pytest.raises(DataError, match="2 lines"):
        read_parallel(a, b)


def test_bpe_translation_vocabulary_has_its_specials_after_the_merges():
    """The joint BPE vocabulary: 256 bytes, the merges, then <pad>, <s>, </s>; batches pad and
    terminate with those ids, and decoding drops them."""
    texts = ["ein Hund läuft", "a dog runs", "zwei Hunde laufen", "two dogs run"] * 5
    vocab = BPE.train(texts, 270, special_tokens=TRANSLATION_SPECIALS, progress=False)
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id) == (267, 268, 269)
    data = encode_pairs(vocab, ["ein Hund", "zwei Hunde laufen"], ["a dog", "two dogs run"])
    source, target_in, target_out = collate(data, [0, 1])
    assert target_in[:, 0].tolist() == [268, 268]
    assert source[0].tolist() == vocab.encode("ein Hund") + [269] + [267] * (
        source.size(1) - len(vocab.encode("ein Hund")) - 1
    )
    assert vocab.decode(target_out[0].tolist()) == "a dog"


def test_resegment_draws_a_reproducible_bpe_dropout_segmentation_of_the_same_pairs():
    texts = ["ein Hund läuft im Park", "a dog runs in the park", "zwei Hunde laufen"] * 5
    vocab = BPE.train(texts, 300, special_tokens=TRANSLATION_SPECIALS, progress=False)
    data = encode_pairs(vocab, texts[0::2], texts[1::2])
    first = resegment(data, vocab, 0.3, seed="0 1")
    assert first.source_text == data.source_text and first.target_text == data.target_text
    assert [vocab.decode(ids) for ids in first.source] == data.source_text
    assert [vocab.decode(ids) for ids in first.target] == data.target_text
    assert sum(map(len, first.source)) > sum(map(len, data.source))
    assert resegment(data, vocab, 0.3, seed="0 1") == first  # what resume relies on
    assert resegment(data, vocab, 0.3, seed="0 2").source != first.source
