"""Fixtures shared by every package's tests: the real datasets, and a tiny Llama 3-style checkpoint
in both published forms (xllama loads it; instructgpt trains on it).

The Llama 3 Hugging Face directory holds a `tokenizer.json` made the way Llama 3's was (tiktoken
ranks through `transformers`' `TikTokenConverter`, Llama 3's 256 special tokens,
`<|begin_of_text|>` and `<|end_of_text|>` named in `tokenizer_config.json`), rope_type "llama3"
and tied embeddings; the Meta directory the same weights as `consolidated.*.pth` with
`use_scaled_rope`, and the ranks as Meta ships them, a tiktoken file named `tokenizer.model`."""

import base64
import json
import os
from pathlib import Path

import pytest
import torch

from tokenizer import BPETokenizer, embedded_corpus
from tokenizer.tiktoken_interop import LLAMA3_SPECIAL_TOKENS

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_data_dir() -> Path:
    """`../shared/data` beside the repository, or `$SHARED_DATA` when set."""
    return Path(os.environ.get("SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real datasets (Multi30k, Tiny Shakespeare, MNIST, tiktoken ranks).

    Tests that read real data take this fixture; they skip with a clear reason when the folder is
    absent instead of failing or downloading.
    """
    path = _shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path} (set SHARED_DATA to point at it)")
    return path


BOS, EOS = 400, 401  # the first two special tokens, after the 400 ranks
# Meta's code scales with original length 8192 and frequency factors 1 and 4 (Llama 3.2: factor 32).
ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}  # fmt: skip
PROMPT = "To be, or not to be"


@pytest.fixture(scope="session")
def llama3(tmp_path_factory):
    """A tiny Llama 3 as Hugging Face ("hf") and Meta ("meta") directories, the `tokenizers`
    library's tokenizer ("hf_tokenizer") and its greedy continuation of PROMPT ("expected")."""
    transformers = pytest.importorskip("transformers")
    converter = pytest.importorskip("transformers.convert_slow_tokenizer")
    from tests.xllama.test_convert import write_meta_checkpoint  # needs transformers too

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
