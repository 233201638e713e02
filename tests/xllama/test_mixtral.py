"""The Mistral family against Hugging Face `transformers` (tiny random models, no downloads):
Mistral (sliding window, rolling cache) and Mixtral (sparse mixture of experts) checkpoints both
ways, the MoE layer against `MixtralSparseMoeBlock`, and the router losses against HF's
`load_balancing_loss_func` and closed forms."""

import json

import pytest
import torch

from transformer.training import CheckpointError
from xllama import Llama, LlamaConfig
from xllama.convert import export_hf, load_hf
from xllama.model import MoEFeedForward, XLlamaError, router_losses
from xllama.sampling import generate

from .test_convert import hf_greedy

transformers = pytest.importorskip("transformers")


# The shape every model here shares (HF's config names).
SHAPE = dict(
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
    max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500.0, attn_implementation="eager",
)  # fmt: skip


def _build(config_class, model_class, **fields):
    torch.manual_seed(0)
    model = model_class(config_class(hidden_size=32, **SHAPE, **fields))
    with torch.no_grad():  # norms start at 1: perturb them so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_mistral(window=4):
    return _build(transformers.MistralConfig, transformers.MistralForCausalLM,
                  intermediate_size=64, sliding_window=window)  # fmt: skip


def hf_mixtral(window=None, experts=4, top_k=2):
    return _build(transformers.MixtralConfig, transformers.MixtralForCausalLM,
                  intermediate_size=48, sliding_window=window, num_local_experts=experts,
                  num_experts_per_tok=top_k)  # fmt: skip


MODELS = {
    "mistral": lambda: hf_mistral(window=4),
    "mixtral": lambda: hf_mixtral(),
    "mixtral-window": lambda: hf_mixtral(window=5),
}


@pytest.mark.parametrize("kind", MODELS)
def test_hf_checkpoint_loads_with_identical_logits_and_greedy(kind, tmp_path):
    theirs = MODELS[kind]()
    theirs.save_pretrained(tmp_path)
    ours = load_hf(tmp_path).eval()
    c = ours.config
    assert c.sliding_window == theirs.config.sliding_window
    assert c.n_experts == getattr(theirs.config, "num_local_experts", None)
    tokens = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-4, rtol=1e-4)
    # Greedy decoding with the KV cache (the rolling buffer where the window is shorter than the
    # 5 + 20 tokens), against HF's generate.
    prompt = [3, 14, 15, 92, 65]
    assert generate(ours, [prompt], 20, temperature=0) == [hf_greedy(theirs, prompt, 20)]


@pytest.mark.parametrize("kind", MODELS)
def test_export_loads_in_hf_with_identical_logits_and_greedy(kind, tmp_path):
    MODELS[kind]().save_pretrained(tmp_path / "hf")
    ours = load_hf(tmp_path / "hf", rope_pairing="adjacent").eval()  # the export must permute back
    export_hf(ours, tmp_path / "out")
    architecture = json.loads((tmp_path / "out" / "config.json").read_text())["architectures"][0]
    assert architecture == ("MistralForCausalLM" if kind == "mistral" else "MixtralForCausalLM")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == architecture
    tokens = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)
    prompt = [7, 1, 2, 99]
    assert generate(ours, [prompt], 16, temperature=0) == [hf_greedy(reloaded, prompt, 16)]


def test_mixtral_whose_expert_count_disagrees_with_its_config_is_refused(tmp_path, capsys):
    hf_mixtral(experts=4).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_local_experts"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing layers.0.feed_forward.experts.4.w1"):
        load_hf(tmp_path)
    # Through a command: one line on stderr, exit status 2.
    from transformer.training import run_command
    from xllama.generate import main as generate_main

    capsys.readouterr()  # transformers' saving progress bar
    code = run_command(generate_main, ["--checkpoint", str(tmp_path), "--tokenizer", "char"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "experts.4.w1" in err[0]


def test_alibi_model_is_not_exported_to_hf(tmp_path):
    model = Llama(LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32, position="alibi"))
    with pytest.raises(XLlamaError, match="rotary positions only"):
        export_hf(model, tmp_path)


# --------------------------------------------------------------------------------------------------
# The layer and its losses
# --------------------------------------------------------------------------------------------------


def _hf_block_with_our_weights(ours: MoEFeedForward, experts: int, top_k: int):
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = transformers.MixtralConfig(
        hidden_size=ours.gate.in_features,
        intermediate_size=ours.experts[0].w1.out_features,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
    )
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(ours.gate.weight)
        block.experts.gate_up_proj.copy_(
            torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in ours.experts])
        )
        block.experts.down_proj.copy_(torch.stack([e.w2.weight for e in ours.experts]))
    return block


@pytest.mark.parametrize("experts,top_k", [(8, 2), (4, 1), (3, 3)])
def test_moe_layer_equals_mixtral_sparse_moe_block_with_gradients(experts, top_k):
    torch.manual_seed(0)
    ours = MoEFeedForward(16, 24, experts, top_k)
    theirs = _hf_block_with_our_weights(ours, experts, top_k)
    x = torch.randn(3, 10, 16, requires_grad=True)
    x_hf = x.detach().clone().requires_grad_(True)
    y, y_hf = ours(x), theirs(x_hf)
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    y_hf.square().sum().backward()
    torch.testing.assert_close(x.grad, x_hf.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.gate.weight.grad, theirs.gate.weight.grad, atol=1e-5, rtol=1e-4)
    w1_grad = torch.stack([e.w1.weight.grad for e in ours.experts])
    torch.testing.assert_close(
        w1_grad, theirs.experts.gate_up_proj.grad[:, :24], atol=1e-5, rtol=1e-4
    )


def test_balancing_loss_equals_hf_and_is_k_when_balanced():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    model = Llama(
        LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32, n_experts=4, multiple_of=8)
    )
    model(torch.randint(0, 32, (2, 9)))
    balance, z_loss, fractions = router_losses(model)
    logits = model.layers[0].feed_forward.router_logits
    torch.testing.assert_close(balance, load_balancing_loss_func((logits,), 4, 2))
    assert fractions.sum().item() == pytest.approx(1.0)
    assert z_loss.item() == pytest.approx(torch.logsumexp(logits, -1).square().mean().item())
    # A router that scores every expert alike: P_i = 1/n, Σ f_i = k, so the loss is k exactly, and
    # z = (log n)² for every token.
    with torch.no_grad():
        model.layers[0].feed_forward.gate.weight.zero_()
    model(torch.randint(0, 32, (2, 9)))
    balance, z_loss, _ = router_losses(model)
    assert balance.item() == pytest.approx(2.0)
    assert z_loss.item() == pytest.approx(torch.tensor(4.0).log().item() ** 2)


def test_expert_config_is_validated():
    for bad in (0, 5, -1):
        with pytest.raises(XLlamaError, match="experts_per_token"):
            LlamaConfig(n_experts=4, experts_per_token=bad)
    with pytest.raises(XLlamaError, match="forward pass of a mixture-of-experts"):
        router_losses(Llama(LlamaConfig(dim=16, n_layers=1, n_heads=2, vocab_size=32)))
