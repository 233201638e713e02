"""Parity with Hugging Face `LlamaForCausalLM` (random tiny weights, no downloads): HF -> our loader,
our export -> HF, and a Meta-format sharded checkpoint written here -> our loader; Llama 3's rope
scaling through all three."""

import json
from dataclasses import replace

import pytest
import torch

from transformer.training import CheckpointError
from xllama.convert import export_hf, load_hf, load_meta, load_model
from xllama.model import Llama, XLlamaError, llama3_frequencies
from xllama.sampling import generate

transformers = pytest.importorskip("transformers")

HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def hf_model(n_kv_heads, tie=False, rope_scaling=None, rope_theta=500.0, init_std=0.02):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=88,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        vocab_size=128,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        tie_word_embeddings=tie,
        rope_scaling=rope_scaling,
        attn_implementation="eager",
        initializer_range=init_std,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-initialises nothing we rely on, but norms start at 1: perturb
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_greedy(model, prompt, n):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", HEADS)
def test_hf_checkpoint_loads_with_identical_logits_and_greedy(kind, tmp_path):
    theirs = hf_model(HEADS[kind])
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    assert ours.config.kv_heads == HEADS[kind] and ours.config.rope_pairing == "half"
    tokens = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-5, rtol=1e-5)
    prompt = [3, 14, 15, 92, 65]
    assert generate(ours, [prompt], 20, temperature=0) == [hf_greedy(theirs, prompt, 20)]


def test_a_bfloat16_release_loads_in_bfloat16_with_hf_bfloat16_logits(tmp_path):
    theirs = hf_model(2).to(torch.bfloat16)
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path, dtype=None).eval()  # as stored: never a float32 copy
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ours.reset_rope_tables()
    tokens = torch.randint(0, 128, (2, 24))
    with torch.no_grad():  # the same bfloat16 weights; the kernels' roundings differ a little
        torch.testing.assert_close(ours(tokens).float(), theirs(tokens).logits.float(),
                                   atol=0.05, rtol=0.05)  # fmt: skip


@pytest.mark.parametrize("kind", HEADS)
def test_export_loads_in_hf_with_identical_logits(kind, tmp_path):
    theirs = hf_model(HEADS[kind])
    theirs.save_pretrained(tmp_path / "hf")
    # Our model in Meta's adjacent pairing, so the export has to permute W_q, W_k back.
    ours = load_hf(tmp_path / "hf", rope_pairing="adjacent").eval()
    export_hf(ours, tmp_path / "out")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_linear_rope_scaling_round_trip(tmp_path):
    theirs = hf_model(2, tie=True, rope_scaling={"rope_type": "linear", "factor": 2.0})
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    assert ours.config.tie_embeddings and ours.config.rope_scaling == 2.0
    tokens = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-5, rtol=1e-5)
    export_hf(ours, tmp_path / "out")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, ours(tokens), atol=1e-5, rtol=1e-5)


def test_llama3_frequencies_by_hand():
    # Original length 64, low/high frequency factors 1 and 4, factor 8: wavelengths 2π/θ of
    # 6.28 (< 64/4: kept), 31.4 (between: blended), 126 and 628 (> 64/1: divided by 8).
    # The blend: s = (64 / 31.416 - 1) / (4 - 1) = 0.34574, θ' = (1 - s)·0.2/8 + s·0.2 = 0.085505.
    inv_freq = torch.tensor([1.0, 0.2, 0.05, 0.01], dtype=torch.float64)
    scaled = llama3_frequencies(inv_freq, 8.0, 1.0, 4.0, 64)
    expected = torch.tensor([1.0, 0.085505, 0.00625, 0.00125], dtype=torch.float64)
    torch.testing.assert_close(scaled, expected, rtol=1e-4, atol=0)


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip


def test_llama3_rope_scaling_loads_and_exports_with_identical_logits_and_greedy(tmp_path):
    # Llama 3.2's settings (theta 500,000, factor 32, tied embeddings) with a short original
    # length so that 48 positions reach the scaled frequencies; larger weights make attention
    # sharp enough that the scaling changes the logits (checked against the unscaled model).
    theirs = hf_model(2, tie=True, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, init_std=0.3)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf").eval()
    c = ours.config
    assert (c.rope_scaling_type, c.rope_scaling, c.rope_original_max_seq_len) == ("llama3", 32, 16)
    tokens = torch.randint(0, 128, (2, 48))
    unscaled = Llama(replace(c, rope_scaling=1.0, rope_scaling_type="linear")).eval()
    unscaled.load_state_dict(ours.state_dict())
    with torch.no_grad():
        expected = theirs(tokens).logits
        torch.testing.assert_close(ours(tokens), expected, atol=1e-4, rtol=1e-5)
        assert (unscaled(tokens) - expected).abs().max() > 1.0
    prompt = [3, 14, 15, 92, 65]
    assert generate(ours, [prompt], 30, temperature=0) == [hf_greedy(theirs, prompt, 30)]
    export_hf(ours, tmp_path / "out")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, expected, atol=1e-4, rtol=1e-5)


def write_meta_checkpoint(hf, directory, shards=2, **params):
    """What Meta's release looks like, made from HF weights with the inverse of HF's conversion
    (permute W_q, W_k rows back to adjacent pairs) and split over `shards` model-parallel files."""
    c = hf.config
    directory.mkdir()
    sd = hf.state_dict()
    dim, heads, kv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads

    def unpermute(w, n):  # inverse of convert_llama_weights_to_hf.permute
        return w.view(n, 2, w.shape[0] // n // 2, dim).transpose(1, 2).reshape(w.shape[0], dim)

    full = {
        "tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
        "rope.freqs": torch.zeros(dim // heads // 2),
    }
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        full |= {
            f"layers.{i}.attention.wq.weight": unpermute(sd[p + "self_attn.q_proj.weight"], heads),
            f"layers.{i}.attention.wk.weight": unpermute(sd[p + "self_attn.k_proj.weight"], kv),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        }
    row_parallel = ("attention.wo", "feed_forward.w2", "tok_embeddings")
    for s in range(shards):
        shard = {}
        for name, t in full.items():
            if t.dim() == 1:
                shard[name] = t.clone()
            else:
                axis = 1 if any(r in name for r in row_parallel) else 0
                shard[name] = t.chunk(shards, dim=axis)[s].clone()
        torch.save(shard, directory / f"consolidated.{s:02d}.pth")
    params = {
        "dim": dim,
        "n_layers": c.num_hidden_layers,
        "n_heads": heads,
        "n_kv_heads": kv,
        "multiple_of": 8,
        "ffn_dim_multiplier": None,
        "norm_eps": c.rms_norm_eps,
        "rope_theta": 500.0,
        "vocab_size": -1,
    } | params
    (directory / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("kind", HEADS)
def test_meta_sharded_checkpoint_matches_hf_converted(kind, tmp_path):
    theirs = hf_model(HEADS[kind])
    write_meta_checkpoint(theirs, tmp_path / "meta", shards=2)
    # 88 = Llama's rule for dim 32, multiple_of 8: int(2*128/3) = 85 -> 88.
    meta = load_meta(tmp_path / "meta").eval()
    assert meta.config.rope_pairing == "adjacent" and meta.config.hidden_dim == 88
    theirs.save_pretrained(tmp_path / "hf")
    from_hf = load_model(tmp_path / "hf").eval()
    tokens = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(meta(tokens), from_hf(tokens), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(meta(tokens), theirs(tokens).logits, atol=1e-5, rtol=1e-5)


def test_meta_llama3_scaled_rope_matches_hf_and_needs_its_factor(tmp_path):
    # Meta's Llama 3.1 code scales with its own constants (original length 8192, factors 1 and 4);
    # theta 500,000 puts the slowest pairs' wavelengths (up to 118,000) past 8,192.
    rope = LLAMA3_ROPE | {"factor": 8.0, "original_max_position_embeddings": 8192}
    theirs = hf_model(2, rope_scaling=rope, rope_theta=500000.0, init_std=0.3)
    write_meta_checkpoint(theirs, tmp_path / "meta", rope_theta=500000.0, use_scaled_rope=True,
                          rope_scaling_factor=8)  # fmt: skip
    meta = load_meta(tmp_path / "meta").eval()
    tokens = torch.randint(0, 128, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(meta(tokens), theirs(tokens).logits, atol=1e-4, rtol=1e-5)
    write_meta_checkpoint(theirs, tmp_path / "no-factor", rope_theta=500000.0, use_scaled_rope=True)
    with pytest.raises(XLlamaError, match="use_scaled_rope but no rope_scaling_factor"):
        load_meta(tmp_path / "no-factor")


def test_meta_params_of_the_wrong_kind_are_one_clear_error(tmp_path):
    write_meta_checkpoint(hf_model(2), tmp_path / "meta", shards=1, dim="thirty-two")
    with pytest.raises(XLlamaError, match="params.json: invalid literal for int"):
        load_meta(tmp_path / "meta")


@pytest.mark.parametrize("key, value", [("hidden_size", "x"), ("rope_scaling", [1])])
def test_hf_config_values_of_the_wrong_kind_are_one_clear_error(tmp_path, key, value):
    hf_model(2).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {key: value}))
    with pytest.raises(XLlamaError, match="config.json: "):
        load_hf(tmp_path)


def test_hf_checkpoint_with_missing_tensor_names_it(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model(2).save_pretrained(tmp_path)
    path = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.extra.weight"] = torch.zeros(1)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        load_hf(tmp_path)
    message = str(err.value)
    assert "missing layers.1.feed_forward.w3.weight" in message
    assert "unexpected model.layers.0.extra.weight" in message


def test_hf_checkpoint_with_other_n_kv_heads_is_refused(tmp_path):
    hf_model(2).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_key_value_heads"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="n_kv_heads 1"):
        load_hf(tmp_path)
