"""Llama 3-style checkpoints end to end (tiny random weights, no downloads).

The Hugging Face directory holds a `tokenizer.json` made the way Llama 3's was (tiktoken ranks
through `transformers`' `TikTokenConverter`, Llama 3's 256 special tokens, `<|begin_of_text|>` and
`<|end_of_text|>` named in `tokenizer_config.json`), rope_type "llama3" and tied embeddings; the
Meta directory the same weights as `consolidated.*.pth` with `use_scaled_rope`, and the ranks as
Meta ships them, a tiktoken file named `tokenizer.model`. `xllama.generate` prints the text of
Hugging Face's greedy `generate` from either, and a LoRA fine-tune of the HF directory keeps its
`tokenizer.json` and its RoPE scaling."""

import base64
import json

import pytest
import torch

from tests.xllama.test_convert import write_meta_checkpoint
from tokenizer import BPETokenizer, embedded_corpus
from tokenizer.tiktoken_interop import LLAMA3_SPECIAL_TOKENS
from xllama.convert import load_checkpoint
from xllama.generate import main as generate_main
from xllama.model import XLlamaError
from xllama.tokenization import HuggingFaceBPE, Tiktoken, keep_tokenizer, load_tokenizer
from xllama.train import main as train_main

transformers = pytest.importorskip("transformers")
converter = pytest.importorskip("transformers.convert_slow_tokenizer")

BOS, EOS = 400, 401  # the first two special tokens, after the 400 ranks
# Meta's code scales with original length 8192 and frequency factors 1 and 4 (Llama 3.2: factor 32).
ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}  # fmt: skip
PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("hf")
    ranks = BPETokenizer.train(embedded_corpus(), 400, progress=False).to_tiktoken()
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks._mergeable_ranks.items())
    ranks_file = tmp_path_factory.mktemp("ranks") / "tokenizer.model"
    ranks_file.write_text("".join(lines))
    hf_tokenizer = converter.TikTokenConverter(
        str(ranks_file), extra_special_tokens=LLAMA3_SPECIAL_TOKENS
    ).converted()
    hf_tokenizer.save(str(hf_dir / "tokenizer.json"))
    roles = {"bos_token": "<|begin_of_text|>",
             "eos_token": {"content": "<|end_of_text|>", "special": True}}  # fmt: skip
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(roles))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=656, max_position_embeddings=128, rope_theta=500000.0,
        rope_scaling=ROPE, tie_word_embeddings=True, initializer_range=0.3,
        attn_implementation="eager",
    )  # fmt: skip
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(hf_dir)
    meta_dir = tmp_path_factory.mktemp("root") / "meta"
    write_meta_checkpoint(theirs, meta_dir, rope_theta=500000.0, use_scaled_rope=True,
                          rope_scaling_factor=32.0)  # fmt: skip
    (meta_dir / "tokenizer.model").write_bytes(ranks_file.read_bytes())
    ids = [BOS] + hf_tokenizer.encode(PROMPT, add_special_tokens=False).ids
    out = theirs.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                          pad_token_id=0, eos_token_id=None)  # fmt: skip
    expected = PROMPT + hf_tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
    return {"hf": hf_dir, "meta": meta_dir, "expected": expected, "hf_tokenizer": hf_tokenizer}


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
