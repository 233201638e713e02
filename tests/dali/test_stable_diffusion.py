"""Stable Diffusion v1's parts against their reference implementations, on tiny random versions
built with `transformers` and `diffusers`, saved to disk and loaded here."""

import pytest
import torch

from dali.clip import CLIPTextConfig, CLIPTextEncoder, load_clip_text

from ..tokenizer.test_clip import learn_clip_files

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


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny random Stable Diffusion v1 pipeline saved by diffusers (DDIM as SD v1.5 configures
    it: scaled-linear β, steps_offset 1, set_alpha_to_one False, no clipping)."""
    root = tmp_path_factory.mktemp("sd")
    files = learn_clip_files(root / "tokenizer-files", vocab_size=400, lines=3000)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(files), model_max_length=77)
    text_config = transformers.CLIPTextConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=37,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
    )  # fmt: skip
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(text_config).eval()
    vae = tiny_hf_vae(root / "vae-alone")
    unet = tiny_hf_unet(root / "unet-alone")
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline", pipe


def test_the_whole_pipeline_equals_stable_diffusion_pipeline(pipeline_dir):
    """Latents after 4 DDIM steps with classifier-free guidance, same prompt and starting noise,
    and the decoded images."""
    from dali.stable_diffusion import load_stable_diffusion

    directory, pipe = pipeline_dir
    ours = load_stable_diffusion(directory)
    prompts = ["a photo of a red cat", "The number 7, handwritten"]
    start = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    kwargs = dict(num_inference_steps=4, guidance_scale=7.5, height=32, width=32)
    expected = pipe(prompts, latents=start, output_type="latent", **kwargs).images
    got = ours.generate_latents(prompts, steps=4, guidance=7.5, latents=start)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    images = pipe(prompts, latents=start, output_type="pt", **kwargs).images  # in [0, 1]
    torch.testing.assert_close((ours.decode(got) + 1) / 2, images, atol=1e-4, rtol=1e-4)


def test_a_bad_pipeline_directory_is_one_clear_error(pipeline_dir, tmp_path):
    import json
    import shutil

    from dali.stable_diffusion import load_stable_diffusion
    from transformer.training import CheckpointError

    directory, _ = pipeline_dir
    broken = tmp_path / "broken"
    shutil.copytree(directory, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(CheckpointError, match="lacks the component folder"):
        load_stable_diffusion(broken)
    shutil.copytree(directory / "vae", broken / "vae")
    index = json.loads((broken / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "MadeUpScheduler"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="MadeUpScheduler"):
        load_stable_diffusion(broken)
    # Weights of another component: named, with the tensors that do not fit.
    shutil.copy(directory / "model_index.json", broken / "model_index.json")
    for old in (broken / "text_encoder").glob("*.safetensors"):
        old.unlink()
    for weights in (directory / "vae").glob("*.safetensors"):
        shutil.copy(weights, broken / "text_encoder" / weights.name)
    with pytest.raises(CheckpointError, match=r"text_encoder does not fit the model: missing \['"):
        load_stable_diffusion(broken)
    # A config value of the wrong kind, in each model's config.json: the file, in one line.
    wrong = [("text_encoder", "hidden_size", "x"), ("vae", "block_out_channels", "x"),
             ("unet", "cross_attention_dim", "x")]  # fmt: skip
    for component, key, value in wrong:
        shutil.rmtree(broken)
        shutil.copytree(directory, broken)
        config = json.loads((broken / component / "config.json").read_text())
        (broken / component / "config.json").write_text(json.dumps(config | {key: value}))
        with pytest.raises(CheckpointError, match=f"{component}/config.json: a value of the wrong"):
            load_stable_diffusion(broken)


def test_txt2img_command_and_its_bad_input(pipeline_dir, tmp_path, capsys):
    from dali import txt2img
    from transformer.training import run_command

    directory, _ = pipeline_dir
    out = tmp_path / "image.png"
    base = ["--checkpoint", str(directory), "--steps", "2", "--height", "32", "--width", "32",
            "--device", "cpu"]  # fmt: skip
    assert (
        run_command(txt2img.main, [*base, "--prompt", "a cat", "--n", "2", "--out", str(out)]) == 0
    )
    from PIL import Image

    assert Image.open(out).size == (32 * 2 + 3, 32 + 2)  # a grid of two, padded
    capsys.readouterr()
    # A prompt over 77 tokens: truncated as the reference does, with one warning line.
    assert run_command(txt2img.main, [*base, "--prompt", "word " * 90, "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err if line.startswith("warning:")][0].count("CLIP reads 75") == 1
    with pytest.raises(SystemExit) as stop:  # refused by the flag's type, before any work
        txt2img.main([*base, "--prompt", "x", "--guidance", "-1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and "--guidance" in err[-1] and "[0, inf]" in err[-1]
    for argv, message in [
        ([*base, "--prompt", "x", "--height", "30", "--out", str(out)], "multiples of 4"),
        (["--checkpoint", str(tmp_path), "--prompt", "x", "--out", str(out)], "model_index.json"),
    ]:
        assert run_command(txt2img.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
