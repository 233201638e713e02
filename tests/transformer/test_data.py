"""Parallel files, token-count batches and the embedded task."""

import gzip

import pytest

from transformer.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    DataError,
    WordVocabulary,
    collate,
    embedded_task,
    encode_pairs,
    read_parallel,
    reverse_and_spell,
    token_batches,
)


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
        assert (target_in[:, 0] == BOS_ID).all()
        lengths = (target_out != PAD_ID).sum(1)
        assert (target_out[range(len(batch)), lengths - 1] == EOS_ID).all()
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
