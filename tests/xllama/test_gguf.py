"""GGUF export read back with llama.cpp's own `gguf` reader (every tensor and metadata key), and, in
a slow test, run by llama.cpp itself (`llama-cpp-python`): its logits and its tokenization
against ours."""

import base64
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from tokenizer import BPETokenizer, bytes_to_unicode
from transformer.vocabulary import BPE
from xllama import Llama, XLlamaError
from xllama.convert import load_checkpoint
from xllama.export_gguf import export_gguf
from xllama.tokenization import (
    CharTokenizer,
    Tiktoken,
    chat_template,
    keep_tokenizer,
    load_tokenizer,
)
from xllama.train import PRESETS

gguf = pytest.importorskip("gguf")

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind.\n" * 30


@pytest.fixture(scope="module")
def tokenizer():
    return BPE.train(TEXT, 300)


def tiny_model(**overrides):
    torch.manual_seed(0)
    config = replace(
        PRESETS["tiny"].model, **{"vocab_size": 320, "rope_pairing": "half"} | overrides
    )
    model = Llama(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def to_adjacent(weight, n_heads):
    """Rows of W_q / W_k from the rotate-half pairing to Meta's adjacent one, row by row: inside
    each head, rows i and i + d/2 (a rotate-half pair) become rows 2i and 2i + 1."""
    d = weight.shape[0] // n_heads
    out = torch.empty_like(weight)
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = weight[h * d + i]
            out[h * d + 2 * i + 1] = weight[h * d + i + d // 2]
    return out


def read(path):
    reader = gguf.GGUFReader(str(path))
    fields = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            if field.types[-1] == gguf.GGUFValueType.STRING:
                fields[name] = [bytes(field.parts[i]).decode() for i in field.data]
            else:
                fields[name] = [field.parts[i].tolist()[0] for i in field.data]
        elif field.types and field.types[0] == gguf.GGUFValueType.STRING:
            fields[name] = bytes(field.parts[field.data[0]]).decode()
        elif field.types:
            fields[name] = field.parts[field.data[0]].tolist()[0]
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def test_f32_export_reads_back_tensor_for_tensor(tokenizer, tmp_path):
    model = tiny_model()
    c = model.config
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    fields, tensors = read(path)
    assert fields["general.architecture"] == "llama"
    expected = {"llama.block_count": c.n_layers, "llama.embedding_length": c.dim,
                "llama.feed_forward_length": c.hidden_dim, "llama.attention.head_count": c.n_heads,
                "llama.attention.head_count_kv": c.kv_heads, "llama.context_length": c.max_seq_len,
                "llama.rope.dimension_count": c.head_dim}  # fmt: skip
    for key, value in expected.items():
        assert fields[key] == value, key
    assert fields["llama.rope.freq_base"] == pytest.approx(c.rope_theta)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.norm_eps)
    state = model.state_dict()
    # Every tensor, by llama.cpp's name; W_q, W_k back in Meta's adjacent pairing (our model is in
    # the rotate-half pairing here).
    ours = {"token_embd.weight": state["tok_embeddings.weight"],
            "output_norm.weight": state["norm.weight"], "output.weight": state["output.weight"]}  # fmt: skip
    for i in range(c.n_layers):
        p = f"layers.{i}."
        ours |= {
            f"blk.{i}.attn_q.weight": to_adjacent(state[p + "attention.wq.weight"], c.n_heads),
            f"blk.{i}.attn_k.weight": to_adjacent(state[p + "attention.wk.weight"], c.kv_heads),
            f"blk.{i}.attn_v.weight": state[p + "attention.wv.weight"],
            f"blk.{i}.attn_output.weight": state[p + "attention.wo.weight"],
            f"blk.{i}.attn_norm.weight": state[p + "attention_norm.weight"],
            f"blk.{i}.ffn_norm.weight": state[p + "ffn_norm.weight"],
            f"blk.{i}.ffn_gate.weight": state[p + "feed_forward.w1.weight"],
            f"blk.{i}.ffn_down.weight": state[p + "feed_forward.w2.weight"],
            f"blk.{i}.ffn_up.weight": state[p + "feed_forward.w3.weight"],
        }  # fmt: skip
    assert set(tensors) == set(ours)
    for name, tensor in ours.items():
        data = np.asarray(tensors[name].data).reshape(tuple(tensor.shape))
        assert np.array_equal(data, tensor.numpy()), name
    # The vocabulary: every token spelled in GPT-2's byte alphabet, merges in the order learned.
    back = {ch: b for b, ch in bytes_to_unicode().items()}
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    for i in range(tokenizer.vocab_size):
        if i not in tokenizer.special_ids:
            assert bytes(back[ch] for ch in tokens[i]) == tokenizer.bpe.token_bytes(i)
    assert len(tokens) == c.vocab_size  # the model's extra rows are unused tokens
    merges = fields["tokenizer.ggml.merges"]
    first = min(tokenizer.bpe.merges.items(), key=lambda kv: kv[1])[0]
    assert merges[0] == " ".join(tokens[t] for t in first)
    assert len(merges) == len(tokenizer.bpe.merges)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_f16_and_q8_0_hold_the_weights_to_their_precision(tokenizer, tmp_path, kind):
    model = tiny_model()
    fields, tensors = read(export_gguf(model, tokenizer, tmp_path / f"{kind}.gguf", kind))
    w = model.state_dict()["layers.0.attention.wv.weight"].numpy()
    t = tensors["blk.0.attn_v.weight"]
    values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
    if kind == "f16":
        assert t.tensor_type == gguf.GGMLQuantizationType.F16
        np.testing.assert_allclose(values, w, rtol=1e-3, atol=1e-6)
    else:
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
        step = np.abs(w.reshape(-1, 32)).max(1, keepdims=True) / 127  # the block's step d
        # Half a step, plus the f16 rounding of d (2^-11 relative) times the largest code, 127.
        assert (np.abs(values - w).reshape(-1, 32) <= step * (0.5 + 127 * 2**-11) + 1e-8).all()
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_experts_are_stacked_and_bad_models_are_refused(tokenizer, tmp_path):
    model = tiny_model(n_experts=4, experts_per_token=2)
    fields, tensors = read(export_gguf(model, tokenizer, tmp_path / "moe.gguf"))
    assert fields["llama.expert_count"] == 4 and fields["llama.expert_used_count"] == 2
    gate = tensors["blk.1.ffn_gate_exps.weight"]
    expected = torch.stack([e.w1.weight for e in model.layers[1].feed_forward.experts]).detach()
    assert np.array_equal(np.asarray(gate.data).reshape(expected.shape), expected.numpy())
    with pytest.raises(XLlamaError, match="no tokenizer like this one"):
        export_gguf(tiny_model(), CharTokenizer.from_text(TEXT), tmp_path / "c.gguf")
    with pytest.raises(XLlamaError, match="not ALiBi"):
        export_gguf(tiny_model(position="alibi"), tokenizer, tmp_path / "a.gguf")
    assert not (tmp_path / "c.gguf").exists() and not (tmp_path / "a.gguf").exists()


def llama3_tokenizer(directory):
    """Meta's form of a Llama 3 tokenizer (tiktoken ranks as `tokenizer.model`), ~300 ranks."""
    ranks = BPETokenizer.train(TEXT, 300, progress=False).to_tiktoken()._mergeable_ranks
    lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items())
    (directory / "tokenizer.model").write_text("".join(lines))
    return Tiktoken(str(directory / "tokenizer.model"))


def llama3_model():
    """Llama 3.2's RoPE (theta 500,000, scaling 32 past 16 positions); 556 embeddings, room for
    the tokenizer's ~300 ranks and 256 special tokens. Queries and keys 20 times larger than the
    initialisation's make attention sharp, so the scaling shows in the logits."""
    model = tiny_model(vocab_size=556, rope_theta=500000.0, rope_scaling=32.0,
                       rope_scaling_type="llama3", rope_original_max_seq_len=16)  # fmt: skip
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wq.weight.mul_(20)
            layer.attention.wk.weight.mul_(20)
    return model


def test_llama3_rope_factors_and_tokenizer(tmp_path):
    model, tokenizer = llama3_model(), llama3_tokenizer(tmp_path)
    fields, tensors = read(export_gguf(model, tokenizer, tmp_path / "l3.gguf"))
    # llama.cpp's converter (convert_hf_to_gguf.py) for rope_type "llama3": per pair, 1 for a
    # wavelength under 16/4, the factor over 16/1, else 1 / ((1 - s) / factor + s).
    expected = []
    for i in range(0, model.config.head_dim, 2):
        wavelength = 2 * np.pi * 500000.0 ** (i / model.config.head_dim)
        s = (16 / wavelength - 1) / (4 - 1)
        expected.append(1 if wavelength < 4 else 32 if wavelength > 16 else 1 / ((1 - s) / 32 + s))
    np.testing.assert_allclose(np.asarray(tensors["rope_freqs.weight"].data), expected, rtol=1e-6)
    assert "llama.rope.scaling.type" not in fields
    assert fields["tokenizer.ggml.pre"] == "llama-bpe" and fields["tokenizer.ggml.add_bos_token"]
    n = len(tokenizer.bpe._ranks)  # the special tokens follow the ranks
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (
        n,
        n + 1,
    )
    assert fields["tokenizer.ggml.tokens"][n + 9] == "<|eot_id|>"


# Not Llama 3's template: a Jinja text like it, which GGUF export carries and never runs.
TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}")  # fmt: skip


def test_a_chat_models_template_goes_into_the_gguf_and_into_a_run(llama3, tmp_path):
    checkpoint = tmp_path / "hf"
    shutil.copytree(llama3["hf"], checkpoint)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    (checkpoint / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": TEMPLATE})
    )
    model, tokenizer, _ = load_checkpoint(checkpoint)
    fields, _ = read(export_gguf(model, tokenizer, tmp_path / "chat.gguf"))
    assert fields["tokenizer.chat_template"] == TEMPLATE
    keep_tokenizer(tokenizer, tmp_path / "run")  # what a fine-tuning run keeps
    assert chat_template(load_tokenizer(tokenizer.spec(), tmp_path / "run")) == TEMPLATE
    fields, _ = read(export_gguf(model, load_tokenizer(str(llama3["hf"] / "tokenizer.json")),
                                 tmp_path / "base.gguf"))  # fmt: skip
    assert "tokenizer.chat_template" not in fields


@pytest.mark.slow
def test_llama_cpp_runs_a_llama3_export_with_our_logits_and_tokens(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    model, tokenizer = llama3_model(), llama3_tokenizer(tmp_path)
    path = export_gguf(model, tokenizer, tmp_path / "l3.gguf")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    text = "whether 'tis nobler, To be, or not to be: that is the question"
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
        unscaled = Llama(replace(model.config, rope_scaling_type="linear", rope_scaling=1.0))
        unscaled.load_state_dict(model.state_dict())
        far = np.abs(unscaled(torch.tensor([ids]))[0].numpy() - ours).max()
    diff = np.abs(theirs - ours).max()
    print(f"llama3: llama.cpp vs ours, max |logit difference| = {diff:.2e} (unscaled: {far:.2e})")
    assert diff <= 1e-3 < far


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_llama_cpp_runs_the_export_with_our_logits_and_tokens(tokenizer, tmp_path, kind):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = tiny_model()
    path = export_gguf(model, tokenizer, tmp_path / f"{kind}.gguf", kind)
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    text = "whether 'tis nobler, To be"
    ids = tokenizer.encode(text)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    diff = np.abs(theirs - ours).max()
    print(f"{kind}: llama.cpp vs ours, max |logit difference| = {diff:.2e}")
    assert diff <= (1e-3 if kind == "f32" else 5e-2)  # q8_0: its own rounding (4.2e-3 here)


def test_export_command_writes_a_run_and_refuses_characters(tmp_path, capsys):
    from transformer.training import run_command
    from xllama.export_gguf import main as export_main
    from xllama.train import main as train_main

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    common = ["--config", "tiny", "--device", "cpu", "--text", str(text), "--steps", "2"]
    common += ["--max-seq-len", "32", "--sample-tokens", "0", "--eval-every", "0"]
    assert train_main(common + ["--vocab-size", "300", "--out", str(tmp_path / "bpe")]) == 0
    out = tmp_path / "bpe.gguf"
    assert (
        export_main(["--checkpoint", str(tmp_path / "bpe"), "--out", str(out), "--type", "f16"])
        == 0
    )
    assert out.is_file() and gguf.GGUFReader(str(out)).fields["general.architecture"]
    assert train_main(common + ["--tokenizer", "char", "--out", str(tmp_path / "char")]) == 0
    capsys.readouterr()
    code = run_command(export_main, ["--checkpoint", str(tmp_path / "char"), "--out",
                                     str(tmp_path / "char.gguf")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "llama.cpp has no tokenizer like this one" in err[0]
