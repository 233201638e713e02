"""Stable Diffusion v1's parts against their reference implementations, on tiny random versions
built with `transformers` and `diffusers`, saved to disk and loaded here."""

import pytest
import torch

from dali.clip import CLIPTextConfig, CLIPTextEncoder, load_clip_text

transformers = pytest.importorskip("transformers")


def tiny_hf_clip_text(directory):
    config = transformers.CLIPTextConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    model.save_pretrained(directory)
    return model


def test_clip_text_encoder_equals_transformers(tmp_path):
    hf = tiny_hf_clip_text(tmp_path / "text_encoder")
    ours = load_clip_text(tmp_path / "text_encoder")
    ids = torch.randint(0, 99, (3, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).last_hidden_state
        torch.testing.assert_close(ours(ids), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(ids[:, :9]), hf(ids[:, :9]).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def test_clip_text_encoder_is_causal_and_counts_vit_l14():
    torch.manual_seed(0)
    model = CLIPTextEncoder(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=2)).eval()  # fmt: skip
    ids = torch.randint(0, 50, (1, 10))
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1) % 50
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # earlier positions cannot see position 6
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    with torch.device("meta"):
        full = CLIPTextEncoder()
    assert sum(p.numel() for p in full.parameters()) == 123_060_480  # SD v1's text encoder


diffusers = pytest.importorskip("diffusers")


def tiny_hf_vae(directory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=4, sample_size=16,
    ).eval()  # fmt: skip
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight count
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae.save_pretrained(directory)
    return vae


def test_vae_encode_and_decode_equal_diffusers(tmp_path):
    from dali.stable_diffusion import load_vae

    hf = tiny_hf_vae(tmp_path / "vae")
    ours = load_vae(tmp_path / "vae")
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = hf.encode(x).latent_dist
        mean, log_var = ours.encode(x)
        torch.testing.assert_close(mean, posterior.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(log_var, posterior.logvar, atol=1e-5, rtol=1e-5)
        assert mean.shape == (2, 4, 4, 4)  # f = 4 with three levels
        z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(ours.decode(z), hf.decode(z).sample, atol=1e-5, rtol=1e-5)


def test_vae_counts_stable_diffusion_v1():
    from dali.vae import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL()
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863


def tiny_hf_unet(directory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=8,
    ).eval()  # fmt: skip
    with torch.no_grad():  # diffusers starts some layers at zero: make every weight count
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    unet.save_pretrained(directory)
    return unet


def test_unet_noise_prediction_equals_diffusers(tmp_path):
    from dali.stable_diffusion import load_unet

    hf = tiny_hf_unet(tmp_path / "unet")
    ours = load_unet(tmp_path / "unet")
    g = torch.Generator().manual_seed(3)
    z, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 16, generator=g)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        expected = hf(z, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(ours(z, t, context), expected, atol=1e-4, rtol=1e-4)
        assert (ours(z, t, context) - expected).abs().max() < 1e-4


def test_unet_counts_stable_diffusion_v1():
    from dali.ldm import LatentUNet

    with torch.device("meta"):
        unet = LatentUNet()
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
