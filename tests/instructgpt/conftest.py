"""Tiny models for the instructgpt tests: a BPE tokenizer and an xllama base checkpoint."""

import json

import pytest
import torch

from instructgpt.checkpoints import model_config
from instructgpt.data import corpus_text
from transformer.training import save_checkpoint
from transformer.vocabulary import BPE
from xllama import Llama, LlamaConfig

TINY = dict(dim=32, n_layers=1, n_heads=2, multiple_of=16, max_seq_len=64)


def make_base(path, vocab_size=300, seed=0):
    tokenizer = BPE.train(corpus_text()[:20000], vocab_size, progress=False)
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(vocab_size=tokenizer.vocab_size, **TINY))
    save_checkpoint(
        path, model, {"package": "instructgpt", "model": model_config("policy", model.config)}
    )
    tokenizer.save(path)
    return path


@pytest.fixture(scope="session")
def base_model(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="session")
def other_tokenizer_model(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("other") / "model", vocab_size=280)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path
