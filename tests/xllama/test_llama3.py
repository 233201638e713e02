"""A Llama 3-style Hugging Face directory end to end (tiny random weights, no downloads): a
`tokenizer.json` made the way Llama 3's was (tiktoken ranks through `transformers`'
`TikTokenConverter`, with `<|begin_of_text|>` and `<|end_of_text|>` named in
`tokenizer_config.json`), rope_type "llama3", tied embeddings. `xllama.generate` prints the text
Hugging Face's greedy `generate` gives for the same prompt."""

import base64
import json

import pytest
import torch

from tokenizer import BPETokenizer, embedded_corpus
from xllama.convert import load_checkpoint
from xllama.generate import main as generate_main
from xllama.tokenization import HuggingFaceBPE, keep_tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
converter = pytest.importorskip("transformers.convert_slow_tokenizer")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}  # fmt: skip


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama3")
    ranks = BPETokenizer.train(embedded_corpus(), 400, progress=False).to_tiktoken()
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks._mergeable_ranks.items())
    (directory / "ranks.tiktoken").write_text("".join(lines))
    hf_tokenizer = converter.TikTokenConverter(
        str(directory / "ranks.tiktoken"), extra_special_tokens=SPECIALS
    ).converted()
    hf_tokenizer.save(str(directory / "tokenizer.json"))
    roles = {"bos_token": SPECIALS[0], "eos_token": {"content": SPECIALS[1], "special": True}}
    (directory / "tokenizer_config.json").write_text(json.dumps(roles))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=403, max_position_embeddings=128, rope_theta=500000.0,
        rope_scaling=ROPE, tie_word_embeddings=True, initializer_range=0.3,
        attn_implementation="eager",
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory, hf_tokenizer


def test_generate_prints_hugging_face_greedy_text(llama3_dir, capsys):
    directory, hf_tokenizer = llama3_dir
    theirs = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
    prompt = "To be, or not to be"
    ids = [400] + hf_tokenizer.encode(prompt, add_special_tokens=False).ids  # BOS first
    out = theirs.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                          pad_token_id=0, eos_token_id=None)  # fmt: skip
    new = out[0, len(ids) :].tolist()
    expected = prompt + hf_tokenizer.decode(new, skip_special_tokens=True)
    args = ["--checkpoint", str(directory), "--prompt", prompt, "--temperature", "0",
            "--max-new-tokens", "24", "--no-stop-at-eos", "--device", "cpu"]  # fmt: skip
    assert generate_main(args) == 0
    assert capsys.readouterr().out.rstrip("\n") == expected


def test_tokenizer_roles_come_from_its_config_and_survive_a_copy(llama3_dir, tmp_path):
    directory, _ = llama3_dir
    _, tokenizer, _ = load_checkpoint(directory)
    assert isinstance(tokenizer, HuggingFaceBPE)
    assert (tokenizer.bos_id, tokenizer.eos_id) == (400, 401)
    keep_tokenizer(tokenizer, tmp_path)  # what a fine-tuning run keeps in its directory
    again = load_tokenizer(tokenizer.spec(), tmp_path)
    assert (again.bos_id, again.eos_id, again.vocab_size) == (400, 401, 403)
    assert again.encode("a b c") == tokenizer.encode("a b c")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(Exception, match="the bos token '<s>' is not an added token"):
        HuggingFaceBPE(tmp_path / "tokenizer.json")
