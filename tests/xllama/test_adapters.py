"""LoRA adapters on Llama against Hugging Face `peft`, both directions, on tiny random models:
ours saved in peft's layout load with `PeftModel.from_pretrained` on the exported HF model and
give our logits; adapters `peft` saved load here and give peft's logits."""

from dataclasses import replace

import pytest
import torch

from transformer.lora import LoRAError, LoRALinear, add_lora, merge_lora, remove_lora
from xllama import Llama, LlamaConfig
from xllama.adapters import ATTENTION, FEED_FORWARD, load_any_adapter, save_peft_adapter
from xllama.convert import export_hf, load_hf

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = LlamaConfig(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64
)


def randomise_b(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


@pytest.mark.parametrize("pairing", ["adjacent", "half"])
def test_our_adapter_loads_in_peft_with_the_same_logits(tmp_path, pairing):
    torch.manual_seed(0)
    ours = Llama(replace(TINY, rope_pairing=pairing)).eval()
    export_hf(ours, tmp_path / "hf")  # the base W0
    add_lora(ours, ATTENTION + FEED_FORWARD + ("output",), rank=4, alpha=8.0)
    randomise_b(ours)
    save_peft_adapter(ours, tmp_path / "adapter")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        expected = ours(tokens)
        torch.testing.assert_close(theirs(tokens).logits, expected, atol=1e-4, rtol=1e-4)
        # the adapters matter: without them the logits differ
        with theirs.disable_adapter():
            assert not torch.allclose(theirs(tokens).logits, expected, atol=1e-3)


@pytest.mark.parametrize("pairing", ["adjacent", "half"])
def test_a_peft_adapter_loads_here_with_the_same_logits(tmp_path, pairing):
    torch.manual_seed(1)
    hf_config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(hf_config).eval()
    base.save_pretrained(tmp_path / "hf")
    lora = peft.LoraConfig(
        r=4, lora_alpha=12,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "lm_head"],
        init_lora_weights=False,  # random B, so the adapter changes the output
    )  # fmt: skip
    theirs = peft.get_peft_model(base, lora).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_hf(tmp_path / "hf", rope_pairing=pairing).eval()
    adapted = load_any_adapter(ours, tmp_path / "adapter")
    assert len(adapted) == 2 * 5 + 1
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        expected = theirs(tokens).logits
        torch.testing.assert_close(ours(tokens), expected, atol=1e-4, rtol=1e-4)
        merge_lora(ours)  # merged, the same model
        torch.testing.assert_close(ours(tokens), expected, atol=1e-4, rtol=1e-4)


def test_merged_model_exports_to_hf_with_the_adapted_logits(tmp_path):
    torch.manual_seed(2)
    ours = Llama(TINY).eval()
    add_lora(ours, ATTENTION, rank=2, alpha=4.0)
    randomise_b(ours)
    tokens = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        expected = ours(tokens)
    remove_lora(ours)  # merge, then plain layers
    export_hf(ours, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_peft_adapter_for_another_shape_is_one_line(tmp_path):
    torch.manual_seed(0)
    other = Llama(replace(TINY, dim=48, n_heads=4)).eval()
    add_lora(other, ATTENTION, rank=2, alpha=4.0)
    save_peft_adapter(other, tmp_path)
    with pytest.raises(LoRAError, match="is for another model"):
        load_any_adapter(Llama(TINY), tmp_path)
