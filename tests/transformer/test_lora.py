"""LoRA (Hu et al. 2021) against hand computations: Eq. 3, the zero start, what trains, merging,
adapters alone on disk, the frozen reference, and the refusals."""

import copy

import pytest
import torch
from torch import nn

from transformer import Transformer, TransformerConfig
from transformer.lora import (
    LoRAError,
    LoRALinear,
    adapter_state_dict,
    adapters_disabled,
    add_lora,
    load_adapter,
    merge_lora,
    remove_lora,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq = nn.Linear(6, 8)
        self.wv = nn.Linear(6, 8, bias=False)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.wq(x) + self.wv(x)))


def toy(seed=0):
    torch.manual_seed(seed)
    return Toy()


def randomise_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))


def test_forward_is_eq_3_by_hand_and_starts_at_the_base_model():
    model = toy()
    x = torch.randn(5, 6)
    base_out = model(x)
    w0, b0 = model.wq.weight.detach().clone(), model.wq.bias.detach().clone()
    add_lora(model, ["wq"], rank=2, alpha=6.0)
    torch.testing.assert_close(model(x), base_out, rtol=0, atol=0)  # B = 0: exactly the base
    randomise_b(model)
    a, b = model.wq.lora_A.detach(), model.wq.lora_B.detach()
    expected = x @ w0.T + b0 + (6.0 / 2) * (x @ a.T @ b.T)
    torch.testing.assert_close(model.wq(x), expected)


def test_only_the_factors_train_and_the_base_does_not_move():
    model = toy()
    adapted = add_lora(model, ["wq", "wv"], rank=2, alpha=4.0)
    assert adapted == ["wq", "wv"]
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == ["wq.lora_A", "wq.lora_B", "wv.lora_A", "wv.lora_B"]
    lora, base = 2 * (2 * 6 + 8 * 2), 6 * 8 + 8 + 6 * 8 + 8 * 3 + 3
    assert trainable_parameters(model) == (lora, base + lora)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora" not in k}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()
    for k, v in model.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, frozen[k]), k
    assert model.wq.lora_B.abs().sum() > 0  # B got a gradient through A x ≠ 0


def test_merge_equals_the_hand_merged_weight_and_unmerge_restores_it():
    model = toy()
    x = torch.randn(5, 6)
    w0 = model.wq.weight.detach().clone()
    add_lora(model, ["wq"], rank=3, alpha=5.0)
    randomise_b(model)
    adapted = model(x)
    a, b = model.wq.lora_A.detach(), model.wq.lora_B.detach()
    merge_lora(model)
    torch.testing.assert_close(model.wq.base.weight.detach(), w0 + (5.0 / 3) * b @ a)
    torch.testing.assert_close(model(x), adapted)
    unmerge_lora(model)
    torch.testing.assert_close(model.wq.base.weight.detach(), w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), adapted)


def test_removed_adapters_leave_a_plain_model_with_the_base_names():
    model = toy()
    keys = set(model.state_dict())
    add_lora(model, ["wq"], rank=2, alpha=2.0)
    randomise_b(model)
    x = torch.randn(3, 6)
    adapted = model(x)
    remove_lora(model)
    assert type(model.wq) is nn.Linear and set(model.state_dict()) == keys
    torch.testing.assert_close(model(x), adapted)
    plain = toy()
    plain.load_state_dict(model.state_dict())
    torch.testing.assert_close(plain(x), adapted)


def test_adapter_saves_alone_and_loads_onto_a_fresh_base(tmp_path):
    model = toy()
    add_lora(model, ["wq", "wv"], rank=2, alpha=4.0)
    randomise_b(model)
    save_adapter(model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = toy()
    assert load_adapter(fresh, tmp_path) == ["wq", "wv"]
    x = torch.randn(4, 6)
    torch.testing.assert_close(fresh(x), model(x))
    assert set(adapter_state_dict(fresh)) == {"wq.lora_A", "wq.lora_B", "wv.lora_A", "wv.lora_B"}


def test_adapter_refuses_another_base(tmp_path):
    model = toy()
    add_lora(model, ["wq"], rank=2, alpha=4.0)
    save_adapter(model, tmp_path)

    class Wider(Toy):
        def __init__(self):
            super().__init__()
            self.wq = nn.Linear(6, 10)

    with pytest.raises(LoRAError, match="another model: wq has lora_A"):
        load_adapter(Wider(), tmp_path)

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(6, 8)

    with pytest.raises(LoRAError, match="adapts 'wq', which this model does not have"):
        load_adapter(Renamed(), tmp_path)
    with pytest.raises(LoRAError, match="not an adapter directory"):
        load_adapter(toy(), tmp_path / "nowhere")


def test_disabled_adapters_give_a_separate_frozen_copys_output():
    model = toy()
    reference = copy.deepcopy(model)
    add_lora(model, ["wq", "wv"], rank=2, alpha=4.0)
    randomise_b(model)
    x = torch.randn(4, 6)
    with adapters_disabled(model):
        torch.testing.assert_close(model(x), reference(x))
    assert not torch.allclose(model(x), reference(x))  # switched back on


def test_bad_settings_are_one_line():
    with pytest.raises(LoRAError, match="match no linear layer; the model's are: out, wq, wv"):
        add_lora(toy(), ["q_proj"])
    with pytest.raises(LoRAError, match="rank must be a positive integer"):
        add_lora(toy(), ["wq"], rank=0)
    with pytest.raises(LoRAError, match="alpha must be a positive number"):
        add_lora(toy(), ["wq"], alpha=0)
    model = toy()
    add_lora(model, ["wq"])
    with pytest.raises(LoRAError, match="already has LoRA adapters"):
        add_lora(model, ["wv"])


def test_the_translation_transformer_takes_the_same_adapters():
    """The code every package shares: LoRA on the encoder-decoder's attention projections."""
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=50, d_model=16, d_ff=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1
    )
    model = Transformer(config).eval()
    source, target = torch.randint(3, 50, (2, 7)), torch.randint(3, 50, (2, 5))
    before = model(source, target)
    adapted = add_lora(model, ["wq", "wv"], rank=2, alpha=4.0)
    assert len(adapted) == 6  # encoder self, decoder self and cross attention, W_q and W_v each
    torch.testing.assert_close(model(source, target), before, rtol=0, atol=0)
