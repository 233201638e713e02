"""The tokenizers a checkpoint may name: characters, our BPE, sentencepiece, tiktoken."""

import pytest

from transformer.vocabulary import BPE
from xllama import XLlamaError
from xllama.tokenization import CharTokenizer, load_tokenizer, same_tokens, tokenizer_for_checkpoint

TEXT = "The quick brown fox jumps over the lazy dog. " * 50


def test_char_round_trip_and_unknown_character():
    tok = CharTokenizer.from_text(TEXT)
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
    with pytest.raises(XLlamaError, match="not in the character vocabulary"):
        tok.encode("Z")
    assert load_tokenizer(tok.spec()).encode("dog") == tok.encode("dog")


def test_our_bpe_saved_beside_a_run_is_found_from_a_checkpoint(tmp_path):
    bpe = BPE.train(TEXT, 300)
    bpe.save(tmp_path / "tokenizer.bpe")
    ckpt = tmp_path / "checkpoints" / "step_0000010"
    ckpt.mkdir(parents=True)
    again = tokenizer_for_checkpoint(ckpt, {"tokenizer": bpe.spec()})
    ids = again.encode("the lazy dog")
    assert ids == bpe.encode("the lazy dog") and again.decode(ids) == "the lazy dog"
    assert again.eos_id == again.vocab_size - 1  # training may stop early: no pairs left


def test_sentencepiece_model_file(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([TEXT] * 4))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=60,
        model_type="bpe", minloglevel=2,
    )  # fmt: skip
    tok = load_tokenizer(str(tmp_path / "tokenizer.model"))
    assert tok.kind == "sentencepiece" and tok.bos_id == 1 and tok.eos_id == 2
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    assert tokenizer_for_checkpoint(tmp_path, None).vocab_size == 60


def test_tiktoken_ranks_file_matches_tiktoken(shared_data):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    path = shared_data / "tiktoken" / "cl100k_base.tiktoken"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    ours = load_tokenizer(str(path))
    ranks = load_tiktoken_bpe(str(path))
    reference = tiktoken.Encoding(
        name="cl100k_ref",
        pat_str=r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 100257},
    )
    sample = "Hello world! Ça va? 12345 tokens\n\n  indented"
    assert ours.encode(sample) == reference.encode_ordinary(sample)
    assert ours.eos_id == 100257


def test_same_tokens_reads_past_the_ids_a_vocabulary_skips(shared_data):
    """cl100k_base has no token 100256 (its special tokens follow a gap): comparing two tokenizers
    id by id (a draft and its target, a policy and its reward model) once stopped there."""
    paths = [
        shared_data / "tiktoken" / f"{name}.tiktoken" for name in ("cl100k_base", "o200k_base")
    ]
    if not all(p.is_file() for p in paths):
        pytest.skip("tiktoken ranks files not found")
    cl100k = load_tokenizer(str(paths[0]))
    assert same_tokens(cl100k, load_tokenizer(str(paths[0])))
    assert not same_tokens(cl100k, load_tokenizer(str(paths[1])))
