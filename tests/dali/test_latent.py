"""Latent diffusion trained here: the autoencoder's KL term against torch.distributions, the prompt
framing, and the two commands and `dali.sample --prompt` end to end at tiny sizes."""

import pytest
import torch

from dali import autoencoder, sample, train_latent
from dali.latent import BOS, EOS, encode_prompts, prompt_corpus
from dali.vae import AutoencoderKL
from tokenizer import BPETokenizer
from transformer.training import run_command


def test_kl_term_equals_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean, log_var = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    q = torch.distributions.Normal(mean, (0.5 * log_var).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(AutoencoderKL.kl(mean, log_var), expected)


def test_prompts_are_framed_and_padded_as_clip_frames_them():
    tok = BPETokenizer.train(prompt_corpus(), 280, special_tokens=[BOS, EOS], progress=False)
    ids = encode_prompts(tok, ["the number 7", ""], context=8)
    bos, eos = tok.special_tokens[BOS], tok.special_tokens[EOS]
    body = tok.encode_ordinary("the number 7")
    assert ids[0].tolist() == ([bos, *body, eos] + [eos] * 8)[:8]
    assert ids[1].tolist() == [bos] + [eos] * 7
    assert tok.decode(body) == "the number 7"


def test_autoencoder_latent_training_and_prompted_sampling(tmp_path, capsys, monkeypatch):
    from functools import partial

    from dali.quality import train_classifier

    # The evaluation's feature classifier: 30 steps here (1,500 in a real run) keeps this quick.
    monkeypatch.setattr(train_latent, "train_classifier", partial(train_classifier, steps=30))
    ae, ldm = tmp_path / "ae", tmp_path / "ldm"
    common = ["--device", "cpu", "--seed", "0"]
    assert run_command(autoencoder.main, ["--data", "digits", "--steps", "3", "--batch-size", "8",
                                          "--out", str(ae), *common]) == 0  # fmt: skip
    assert (ae / "autoencoder" / "model.safetensors").is_file()
    assert run_command(train_latent.main, ["--autoencoder", str(ae), "--steps", "3",
                                           "--batch-size", "8", "--eval-samples", "10",
                                           "--eval-steps", "2", "--eval-guidance", "0", "1",
                                           "--out", str(ldm), *common]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "held-out prompts, w = 1: requested digit" in out
    assert (ldm / "tokenizer.bpe").is_file() and (ldm / "autoencoder").is_dir()
    grid = tmp_path / "seven.png"
    args = ["--checkpoint", str(ldm), "--prompt", "a handwritten seven", "--n", "3",
            "--sampler", "ddim", "--steps", "2", "--out", str(grid), *common]  # fmt: skip
    assert run_command(sample.main, [*args, "--guidance", "2"]) == 0 and grid.is_file()
    capsys.readouterr()
    for argv, message in [
        (["--checkpoint", str(ldm), "--out", str(grid)], "sample it with --prompt"),
        ([*args, "--class", "3"], "without --class"),
        (["--checkpoint", str(ae / "autoencoder"), "--out", str(grid)], "is an autoencoder"),
    ]:
        assert run_command(sample.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("flag", [["--vocab-size", "100"], ["--p-uncond", "1.5"]])
def test_latent_training_refuses_bad_settings(tmp_path, capsys, flag):
    code = run_command(train_latent.main, ["--autoencoder", str(tmp_path), *flag,
                                           "--out", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
