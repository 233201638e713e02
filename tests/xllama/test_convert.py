"""Parity with Hugging Face `LlamaForCausalLM` (random tiny weights, no downloads): HF -> our loader,
our export -> HF, and a Meta-format sharded checkpoint written here -> our loader."""

import json

import pytest
import torch

from transformer.training import CheckpointError
from xllama.convert import export_hf, load_hf, load_meta, load_model
from xllama.sampling import generate

transformers = pytest.importorskip("transformers")

HEADS = {"mha": 4, "gqa": 2, "mqa": 1}


def hf_model(n_kv_heads, tie=False, rope_scaling=None):
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
        rope_theta=500.0,
        tie_word_embeddings=tie,
        rope_scaling=rope_scaling,
        attn_implementation="eager",
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


def write_meta_checkpoint(hf, directory, shards=2):
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
    }
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
