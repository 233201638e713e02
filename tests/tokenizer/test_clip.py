"""CLIP's tokenizer against Hugging Face's `CLIPTokenizer` on the same vocab.json and merges.txt.

The files are learned here by the `tokenizers` library's own BPE trainer, set up as CLIP's
(NFC, white space, lower case, CLIP's split pattern, byte-level alphabet, `</w>` word ends), on
the embedded corpus; our tokenizer and transformers' then read the same files."""

import random

import pytest

from tokenizer.clip import CLIPTokenizer
from tokenizer.data import embedded_corpus

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

TEXTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An Astronaut, Riding A HORSE on Mars!!",
    "It's 12:30 -- don't   stop; we'll see what they've done (and what I'm doing).",
    "Ünïcödé café naïve Straße ÉCOLE",
    "e\u0301te\u0301 vs \u00e9t\u00e9",  # NFC joins the combining accents
    "日本語のテキストと한국어",
    "emoji 🙂👍 and symbols ∑∫ ≤ ≥ → ©®",
    "tabs\tand\nnew\r\nlines\u00a0and\u2003spaces",
    "<|startoftext|>already special<|endoftext|> text",
    "3.14159 2026-12-02 1,000,000 #42 @user $5",
    "x",
    "",
    "   ",
    "'s'll'VE 'D''t",
    "a highly detailed oil painting of a cat wearing a top hat, trending on artstation, 8k",
]


def learn_clip_files(directory, vocab_size: int = 1500, lines: int | None = None):
    """vocab.json + merges.txt learned by the `tokenizers` library's BPE trainer set up as CLIP's,
    on the embedded corpus (its first `lines` lines)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])  # fmt: skip
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
    )
    tok.train_from_iterator(embedded_corpus().splitlines()[:lines], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.model.save(str(directory))
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = learn_clip_files(tmp_path_factory.mktemp("clip"))
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) > 500 and any("</w>" in line for line in lines)
    return directory


@pytest.fixture(scope="module")
def pair(files):
    return CLIPTokenizer.load(files), transformers.CLIPTokenizer.from_pretrained(str(files))


def test_ids_equal_transformers_on_varied_text(pair):
    ours, hf = pair
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"], text


def test_ids_equal_transformers_on_random_text(pair):
    ours, hf = pair
    rng = random.Random(0)
    alphabet = "abcdefghij XYZ éüß日本 0123456789 .,!?'-\n\t🙂'sllvedmt"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert ours.encode(text) == hf(text)["input_ids"], repr(text)


def test_batches_are_truncated_and_padded_as_stable_diffusion_calls_it(pair):
    ours, hf = pair
    prompts = ["a red cube on a blue sphere", "word " * 100]
    expected = hf(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    with pytest.warns(UserWarning, match="CLIP reads 75"):
        got = ours.batch(prompts)
    assert got == expected and all(len(row) == 77 for row in got)


def test_decode_inverts_encode_up_to_normalisation(pair):
    ours, hf = pair
    text = "A Photo of   two cats, 3 dogs & more!"
    assert ours.decode(ours.encode(text)) == "a photo of two cats , 3 dogs & more !"
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


def test_files_without_the_special_tokens_or_damaged_are_one_clear_error(tmp_path, files):
    from tokenizer.errors import TokenizerFileError

    with pytest.raises(TokenizerFileError, match="vocab.json and merges.txt"):
        CLIPTokenizer.load(tmp_path)
    (tmp_path / "vocab.json").write_text('{"a": 0}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(TokenizerFileError, match="no <\\|startoftext\\|> token"):
        CLIPTokenizer.load(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(TokenizerFileError, match="merges.txt:2"):
        CLIPTokenizer.load(tmp_path)
