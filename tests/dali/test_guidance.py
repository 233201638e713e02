"""Classifier-free guidance (Ho & Salimans 2022): the class-conditional U-Net, Eq. 6 in the
samplers against the two network calls written out, label dropout in training, the commands."""

import json
from dataclasses import replace

import pytest
import torch

from dali import evaluate, sample, train
from dali.diffusion import DiffusionConfig
from dali.model import UNet, UNetConfig
from dali.pipeline import DDPM, generate
from dali.train import batch_indices
from transformer.training import run_command

CONDITIONAL = UNetConfig(8, 1, 8, (1, 2), 1, (4,), norm_groups=4, num_classes=3, init="torch")


def test_the_label_changes_the_prediction_and_none_means_the_null_label():
    torch.manual_seed(0)
    net = UNet(CONDITIONAL).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 600])
    with torch.no_grad():
        a, b = net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([1, 1]))
        null = net(x, t, torch.tensor([3, 3]))
        assert not torch.allclose(a, b)
        torch.testing.assert_close(net(x, t), null)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(replace(CONDITIONAL, num_classes=0))(x, t, torch.tensor([0, 0]))


@pytest.mark.parametrize("sampler,steps", [("ancestral", None), ("ddim", 4)])
def test_guided_sampling_is_equation_6(sampler, steps):
    """generate(guidance=w) against ε̃ = (1 + w) ε(x, c) − w ε(x, ∅) from two separate calls."""
    torch.manual_seed(0)
    ddpm = DDPM(CONDITIONAL, DiffusionConfig(timesteps=20))
    labels, w = torch.tensor([0, 1, 2, 1]), 2.0
    got = generate(ddpm, 4, sampler, steps, seed=5, labels=labels, guidance=w)
    net = ddpm.ema

    def by_hand(x, t):
        return (1 + w) * net(x, t, labels) - w * net(x, t, None)

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        expected = ddpm.diffusion.sample(by_hand, (4, 1, 8, 8), sampler, steps, 0.0, g)
    torch.testing.assert_close(got, expected.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    conditional = generate(ddpm, 4, sampler, steps, seed=5, labels=labels)
    assert not torch.allclose(conditional, got)  # w matters


def test_label_dropout_rate_and_determinism():
    """batch_indices' third draw decides which labels become ∅: a pure function of (seed, step)."""
    draws = torch.cat([batch_indices(0, step, 100, 64)[2] for step in range(200)])
    assert abs((draws < 0.1).float().mean().item() - 0.1) < 0.01
    assert torch.equal(batch_indices(3, 7, 100, 64)[2], batch_indices(3, 7, 100, 64)[2])


TINY = [
    "--channels", "8", "--channel-mult", "1", "2", "--num-res-blocks", "1", "--norm-groups", "4",
    "--attention-resolutions", "4", "--timesteps", "20", "--batch-size", "8", "--eval-samples",
    "0", "--sample-every", "0", "--checkpoint-every", "0", "--device", "cpu", "--steps", "2",
]  # fmt: skip


def test_conditional_training_and_sampling_commands(tmp_path, capsys):
    run = tmp_path / "cfg"
    assert run_command(train.main, [*TINY, "--num-classes", "10", "--out", str(run)]) == 0
    grid = tmp_path / "grid.png"
    args = ["--checkpoint", str(run), "--n", "20", "--sampler", "ddim", "--steps", "3"]
    assert (
        run_command(sample.main, [*args, "--class", "all", "--guidance", "1", "--out", str(grid)])
        == 0
    )
    assert grid.is_file()
    # The guidance sweep of dali.evaluate: one report per weight, the same noise and labels.
    sweep = tmp_path / "sweep.json"
    assert run_command(evaluate.main, ["--checkpoint", str(run), "--n", "20", "--steps", "3",
                                       "--class", "all", "--guidance", "0", "2",
                                       "--out", str(sweep)]) == 0  # fmt: skip
    rows = json.loads(sweep.read_text())
    assert [r["guidance"] for r in rows] == [0, 2]
    assert all(0 <= r["requested_accuracy"] <= 1 and 0 <= r["confident"] <= 1 for r in rows)
    assert rows[0]["frechet_distance"] != rows[1]["frechet_distance"]  # the weight is used
    assert rows[0]["floor"] == rows[1]["floor"]  # the same real halves and classifier
    plain = tmp_path / "plain"
    assert run_command(train.main, [*TINY, "--out", str(plain)]) == 0
    capsys.readouterr()
    for argv, message in [
        ([*args, "--class", "12", "--out", str(grid)], "class labels must be in 0..9"),
        ([*args, "--guidance", "2", "--out", str(grid)], "--guidance needs --class"),
        ([*args, "--class", "seven", "--out", str(grid)], "class number or 'all'"),
        (
            ["--checkpoint", str(plain), "--class", "1", "--out", str(grid)],
            "class-conditional model",
        ),
    ]:
        assert run_command(sample.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert run_command(train.main, [*TINY, "--num-classes", "5", "--out", str(tmp_path / "x")]) == 2
    assert "more than --num-classes 5" in capsys.readouterr().err
