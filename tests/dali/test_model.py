"""The U-Net: shapes for every config, the paper's parameter count, the time embedding, training."""

from dataclasses import replace

import pytest
import torch

from dali.diffusion import DiffusionConfig, GaussianDiffusion
from dali.model import UNet, UNetConfig, timestep_embedding
from dali.pipeline import DDPM, ema_decay_at, ema_update, generate
from dali.train import PRESETS

TINY = UNetConfig(8, 1, 8, (1, 2), 1, (4,), norm_groups=4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_output_shape_for_every_config(name):
    config = PRESETS[name].unet
    torch.manual_seed(0)
    model = UNet(config).eval()
    x = torch.randn(2, config.in_channels, config.image_size, config.image_size)
    with torch.no_grad():
        y = model(x, torch.tensor([0, 999]))
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_cifar10_model_has_the_papers_35_7M_parameters():
    model = UNet(PRESETS["cifar10"].unet)
    assert model.num_parameters() == 35_746_307  # "35.7 million parameters" (Ho et al., §4)
    attention = [m for m in model.modules() if type(m).__name__ == "AttentionBlock"]
    assert len(attention) == 2 + 3 + 1  # 16×16, way down (2) and up (3), plus the middle


def test_timestep_embedding_matches_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0, 1, 17, 500, 999])
    expected = embeddings.get_timestep_embedding(
        t, 64, flip_sin_to_cos=False, downscale_freq_shift=1
    )
    torch.testing.assert_close(timestep_embedding(t, 64), expected)


def test_config_that_cannot_be_halved_is_refused():
    with pytest.raises(ValueError, match="cannot be halved"):
        UNetConfig(image_size=28, channel_mult=(1, 2, 2, 2))


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(DiffusionConfig())
    model = UNet(TINY)
    model.train()
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    t, noise = torch.randint(0, 1000, (16,)), torch.randn(16, 1, 8, 8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.eval()  # no dropout, so the two losses differ only by the step
    before = diffusion.training_loss(model, x0, t, noise)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    after = diffusion.training_loss(model, x0, t, noise)
    assert after.item() < before.item()


def test_ema_update_maths():
    model, ema = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(-2.0)
        ema.weight.fill_(0.0), ema.bias.fill_(0.0)
    ema_update(ema, model, 0.9)
    torch.testing.assert_close(ema.weight, torch.full((1, 2), 0.1))
    ema_update(ema, model, 0.9)
    torch.testing.assert_close(ema.weight, torch.full((1, 2), 0.19))  # 0.9·0.1 + 0.1·1
    torch.testing.assert_close(ema.bias, torch.full((1,), -0.38))
    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999
    assert ema_decay_at(0, 0.9999, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999, warmup=True) == pytest.approx(0.91)
    assert ema_decay_at(10**6, 0.999, warmup=True) == 0.999


def test_generate_is_reproducible_for_a_seed_and_uses_the_ema():
    torch.manual_seed(0)
    ddpm = DDPM(TINY, DiffusionConfig(timesteps=20))
    a = generate(ddpm, 3, "ddim", 5, eta=1.0, seed=4)
    b = generate(ddpm, 3, "ddim", 5, eta=1.0, seed=4)
    c = generate(ddpm, 3, "ddim", 5, eta=1.0, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 1, 8, 8) and a.abs().max() <= 1.0
    with torch.no_grad():
        for p in ddpm.model.parameters():
            p.add_(0.5)
    assert torch.equal(generate(ddpm, 3, "ddim", 5, eta=1.0, seed=4), a)  # EMA unchanged
    assert not torch.equal(generate(ddpm, 3, "ddim", 5, eta=1.0, seed=4, use_ema=False), a)


def test_generate_ddim_clipping_is_a_choice_and_images_stay_in_range():
    torch.manual_seed(0)  # PyTorch's initialisation: a network that predicts noise, badly
    ddpm = DDPM(replace(TINY, init="torch"), DiffusionConfig(timesteps=20))
    clipped = generate(ddpm, 3, "ddim", 5, seed=4)
    raw = generate(ddpm, 3, "ddim", 5, seed=4, ddim_clip_x0=False)
    unclamped = ddpm.diffusion.sample_ddim(
        ddpm.ema, (3, 1, 8, 8), 5, 0.0, torch.Generator().manual_seed(4), clip_x0=False
    )
    assert not torch.equal(clipped, raw)
    assert unclamped.abs().max() > 1  # an untrained network overshoots ...
    torch.testing.assert_close(raw, unclamped.clamp(-1, 1))  # ... and images are clamped


def test_ddpm_initialisation_starts_at_zero_noise_prediction():
    """Ho et al.'s code zeroes the last layer of every residual branch and the output layer:
    ε̂ = 0 at initialisation, where PyTorch's defaults give mean |ε̂| well above 0."""
    torch.manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    with torch.no_grad():
        assert UNet(TINY).eval()(x, t).abs().max() == 0
        assert UNet(replace(TINY, init="torch")).eval()(x, t).abs().mean() > 0.05


def test_ddpm_initialisation_is_fan_average_uniform_with_zero_biases():
    """variance_scaling(scale 1, fan_avg, uniform): U(-a, a) with a = sqrt(6 / (fan_in + fan_out)),
    fans counting kernel positions; variance a² / 3. Checked on every non-zeroed conv/linear."""
    from dali.model import AttentionBlock, ResBlock

    torch.manual_seed(0)
    model = UNet(replace(TINY, channels=32, norm_groups=8))
    zeroed = {id(model.conv_out.weight)}
    for m in model.modules():
        if isinstance(m, ResBlock):
            zeroed.add(id(m.conv2.weight))
        if isinstance(m, AttentionBlock):
            zeroed.add(id(m.attention.wo.weight))
    checked = 0
    for m in model.modules():
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        w = m.weight
        if m.bias is not None:
            assert m.bias.abs().max() == 0
        if id(w) in zeroed:
            assert w.abs().max() == 0
            continue
        receptive = w[0, 0].numel() if w.dim() == 4 else 1
        fan_in, fan_out = w.size(1) * receptive, w.size(0) * receptive
        a = (6 / (fan_in + fan_out)) ** 0.5
        assert w.abs().max() <= a
        if w.numel() >= 2000:
            assert abs(w.var().item() / (a * a / 3) - 1) < 0.15
            checked += 1
    assert checked >= 5 and len(zeroed) >= 6
