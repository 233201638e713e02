"""Llama 3-style checkpoints end to end (tiny random weights, no downloads; the `llama3` fixture
of tests/conftest.py): `xllama.generate` prints the text of Hugging Face's greedy `generate` from
the Hugging Face and the Meta form, and a LoRA fine-tune of the HF directory keeps its
`tokenizer.json` and its RoPE scaling."""

import json

import pytest

from tests.conftest import BOS, EOS, PROMPT
from tokenizer import embedded_corpus
from xllama.convert import load_checkpoint
from xllama.generate import main as generate_main
from xllama.model import XLlamaError
from xllama.tokenization import HuggingFaceBPE, Tiktoken, keep_tokenizer, load_tokenizer
from xllama.train import main as train_main

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("kind", ["hf", "meta"])
def test_generate_prints_hugging_face_greedy_text(llama3, kind, capsys):
    args = ["--checkpoint", str(llama3[kind]), "--prompt", PROMPT, "--temperature", "0",
            "--max-new-tokens", "24", "--no-stop-at-eos", "--device", "cpu"]  # fmt: skip
    assert generate_main(args) == 0
    assert capsys.readouterr().out.rstrip("\n") == llama3["expected"]


def test_tokenizer_roles_come_from_its_config_and_survive_a_copy(llama3, tmp_path):
    _, tokenizer, _ = load_checkpoint(llama3["hf"])
    assert isinstance(tokenizer, HuggingFaceBPE)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (BOS, EOS, 656)
    keep_tokenizer(tokenizer, tmp_path)  # what a fine-tuning run keeps in its directory
    again = load_tokenizer(tokenizer.spec(), tmp_path)
    assert (again.bos_id, again.eos_id, again.vocab_size) == (BOS, EOS, 656)
    assert again.encode("a b c") == tokenizer.encode("a b c")
    # As Hugging Face does, a chat prompt's special tokens are their ids, not text.
    assert tokenizer.encode("<|eot_id|>a") == [BOS + 9, *tokenizer.encode("a")]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(XLlamaError, match="the bos token '<s>' is not an added token"):
        HuggingFaceBPE(tmp_path / "tokenizer.json")


def test_meta_tokenizer_model_is_read_as_tiktoken_ranks(llama3):
    _, tokenizer, _ = load_checkpoint(llama3["meta"])
    assert isinstance(tokenizer, Tiktoken)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (BOS, EOS, 656)
    assert tokenizer.bpe.special_tokens["<|eot_id|>"] == BOS + 9  # 128009 in Llama 3
    text = embedded_corpus()[:3000]  # the same ids as the tokenizers library on the HF form
    assert (
        tokenizer.encode(text) == llama3["hf_tokenizer"].encode(text, add_special_tokens=False).ids
    )


def test_lora_fine_tune_keeps_the_tokenizer_json(llama3, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text(embedded_corpus()[:20000])
    args = ["--init-from", str(llama3["hf"]), "--text", str(text), "--lora-rank", "4",
            "--steps", "3", "--device", "cpu", "--sample-tokens", "0", "--checkpoint-every", "0",
            "--out", str(tmp_path / "ft")]  # fmt: skip
    assert train_main(args) == 0
    assert (tmp_path / "ft" / "tokenizer.json").is_file()
    _, tokenizer, config = load_checkpoint(tmp_path / "ft")
    assert config["model"]["rope_scaling_type"] == "llama3"
    assert (tokenizer.kind, tokenizer.bos_id, tokenizer.eos_id) == ("tokenizer.json", BOS, EOS)
    capsys.readouterr()
    args = ["--checkpoint", str(tmp_path / "ft"), "--prompt", PROMPT, "--max-new-tokens", "5"]
    assert generate_main(args) == 0
    assert capsys.readouterr().out.startswith(PROMPT)
