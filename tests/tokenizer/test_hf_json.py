"""Hugging Face byte-level BPE `tokenizer.json` files read by `BPETokenizer.from_tokenizer_json`,
checked against the `tokenizers` library on the same file.

The files are made the way Llama 3's was: `transformers`' own `TikTokenConverter` turns tiktoken
ranks (ours, trained here; or cl100k_base from the shared data) into a `tokenizers.Tokenizer`
with Llama 3's split pattern and added special tokens. The GPT-2 form (ByteLevel's own regex, the
end-of-text token listed in the vocabulary too) is that file with its pre-tokenizer swapped.
"""

import base64
import functools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer import BPETokenizer, TokenizerError, embedded_corpus, read_tokens
from tokenizer import encode as encode_command

converter = pytest.importorskip("transformers.convert_slow_tokenizer")
tokenizers = pytest.importorskip("tokenizers")

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
TEXTS = [
    "",
    "Hello, World! How's it going? I'M FINE; you'll see, we've done it. She'd go.",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000 ٣٤٥ Ⅻ ½",
    "    leading spaces\n\n\n   \n\t\t trailing   \r\n\r\n  ",
    "Съешь же ещё этих мягких булок; 日本語のテキスト、한국어 텍스트。 naïve café",
    "emoji: 🎉🚀👩‍👩‍👧‍👦 ❤️ and astral 𝔘𝔫𝔦 𝟙𝟚𝟛, def f(x):\n    return {'a': [1, 2]}\n",
    "<|eot_id|> is text here, and so is <|end_of_text|>",
]


def _converted(ranks_file, tmp_path, gpt2_form=False):
    """(the tokenizers.Tokenizer, its saved tokenizer.json) made from a tiktoken ranks file."""
    hf = converter.TikTokenConverter(str(ranks_file), extra_special_tokens=LLAMA3_SPECIALS)
    hf = hf.converted()
    if gpt2_form:
        hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    path = tmp_path / ("gpt2.json" if gpt2_form else "tokenizer.json")
    hf.save(str(path))
    return hf, path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Ranks of a 600-token BPE trained here, written as a `.tiktoken` file, and both forms."""
    tmp_path = tmp_path_factory.mktemp("hf_json")
    ours = BPETokenizer.train(embedded_corpus(), vocab_size=600, progress=False)
    ranks = ours.to_tiktoken()._mergeable_ranks
    lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
    (tmp_path / "ranks.tiktoken").write_text("".join(lines))
    return {form: _converted(tmp_path / "ranks.tiktoken", tmp_path, form == "gpt2")
            for form in ("llama3", "gpt2")}  # fmt: skip


_loaded = functools.cache(BPETokenizer.from_tokenizer_json)  # once per file, not per example


def _hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("form", ["llama3", "gpt2"])
def test_ids_equal_tokenizers_on_varied_text(trained, form):
    hf, path = trained[form]
    ours = BPETokenizer.from_tokenizer_json(path)
    assert ours.special_tokens == {t: 600 + i for i, t in enumerate(LLAMA3_SPECIALS)}
    for text in TEXTS[:-1]:
        assert ours.encode_ordinary(text) == _hf_ids(hf, text), text
        assert ours.decode(ours.encode_ordinary(text)) == text
    # Hugging Face matches added tokens inside text; ours does where they are allowed.
    assert ours.encode(TEXTS[-1], allowed_special="all") == _hf_ids(hf, TEXTS[-1])
    assert ours.encode(TEXTS[-1], disallowed_special=()) != _hf_ids(hf, TEXTS[-1])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(st.characters(codec="utf-8"), max_size=60))
def test_hypothesis_text_equals_tokenizers(trained, text):
    # Hugging Face matches its added tokens inside text (hypothesis tries this file's strings,
    # "<|eot_id|>" among them): ours does with allowed_special="all".
    for hf, path in trained.values():
        ours = _loaded(path)
        assert ours.encode(text, allowed_special="all") == _hf_ids(hf, text)


def test_cl100k_converted_as_llama3_equals_tokenizers(shared_data, tmp_path):
    ranks_file = shared_data / "tiktoken" / "cl100k_base.tiktoken"
    if not ranks_file.is_file():
        pytest.skip(f"{ranks_file} not found")
    hf, path = _converted(ranks_file, tmp_path)
    ours = BPETokenizer.from_tokenizer_json(path)
    assert ours.vocab_size == 100256 + len(LLAMA3_SPECIALS)
    text = "\n".join(TEXTS[:-1]) * 3 + embedded_corpus()[:20000]
    assert ours.encode_ordinary(text) == _hf_ids(hf, text)


def test_gpt2_end_of_text_in_the_vocabulary_becomes_special(trained, tmp_path):
    data = json.loads(trained["gpt2"][1].read_text())
    data["model"]["vocab"]["<|eot_id|>"] = 602  # GPT-2's file lists <|endoftext|> in both places
    (tmp_path / "t.json").write_text(json.dumps(data))
    ours = BPETokenizer.from_tokenizer_json(tmp_path / "t.json")
    assert ours.special_tokens["<|eot_id|>"] == 602 and ours.decode([602]) == "<|eot_id|>"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["model"].update(type="WordPiece"), "not a Hugging Face BPE"),
        (lambda d: d.update(normalizer={"type": "NFC"}), "normalizer"),
        (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "'Whitespace' is not supported"),
        (lambda d: d.update(pre_tokenizer=d["pre_tokenizer"]["pretokenizers"][0]), "not a byte"),
        (lambda d: d["model"]["merges"].reverse(), "merge 1 makes a token of lower id"),
        (lambda d: d["model"]["vocab"].pop("".join(d["model"]["merges"][0])), "not byte-level"),
        (lambda d: d["model"]["vocab"].pop("a"), "all 256 single bytes"),
        (lambda d: d.update(pre_tokenizer=[1]), "not byte-level BPE"),
        (lambda d: d.update(added_tokens=[5]), "not byte-level BPE"),
    ],
)
def test_files_it_cannot_read_exactly_are_one_clear_error(trained, tmp_path, change, message):
    data = json.loads(trained["llama3"][1].read_text())
    change(data)
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match=message):
        BPETokenizer.from_tokenizer_json(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(TokenizerError, match="cannot read"):
        BPETokenizer.from_tokenizer_json(tmp_path / "broken.json")


def test_encode_command_reads_tokenizer_json_and_meta_llama3_ranks(trained, tmp_path):
    # Meta ships Llama 3's ranks as `tokenizer.model`: `--tokenizer llama3 --ranks FILE` reads it
    # with Llama 3's pattern and numbers its special tokens after the ranks, as the HF file does.
    hf, path = trained["llama3"]
    (tmp_path / "in.txt").write_text(TEXTS[1] + TEXTS[4], encoding="utf-8")
    expected = _hf_ids(hf, TEXTS[1] + TEXTS[4])
    ranks_file = path.parent / "ranks.tiktoken"
    for where in (
        ["--tokenizer", str(path)],
        ["--tokenizer", "llama3", "--ranks", str(ranks_file)],
    ):
        out = tmp_path / "tokens.bin"
        args = where + ["--input", str(tmp_path / "in.txt"), "--out", str(out)]
        args += ["--separator", "<|end_of_text|>"]
        assert encode_command.main(args) == 0
        assert read_tokens(out).tolist() == expected + [601]
