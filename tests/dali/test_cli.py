"""The commands end to end on a tiny config: train, exact resume (EMA included), sample, evaluate,
bad input (one line, exit 2), and a 2-process torchrun (gloo) run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from dali import evaluate, sample, train
from dali.diffusion import GaussianDiffusion
from transformer.training import run_command

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--channels", "8", "--channel-mult", "1", "2", "--num-res-blocks", "1", "--norm-groups", "4",
    "--attention-resolutions", "4", "--timesteps", "20", "--batch-size", "8", "--eval-samples",
    "0", "--sample-every", "0", "--checkpoint-every", "2", "--log-every", "1", "--device", "cpu",
]  # fmt: skip


def _train(out, *extra):
    return run_command(train.main, ["--out", str(out), *TINY, *extra], "dali.train")


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run):
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def test_resume_is_exact_including_the_ema(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _train(straight, "--steps", "6", "--hflip") == 0
    assert _train(split, "--steps", "3", "--hflip") == 0
    assert _train(split, "--steps", "6", "--hflip", "--resume", str(split)) == 0
    assert _losses(split) == _losses(straight)
    a, b = _weights(straight), _weights(split)
    assert any(k.startswith("ema.") for k in a) and any(k.startswith("model.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (straight / "samples" / "final_ancestral.png").is_file()


def test_sample_and_evaluate_commands(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--steps", "2") == 0
    grid, chain, npz = tmp_path / "g.png", tmp_path / "chain.png", tmp_path / "s.npz"
    args = ["--checkpoint", str(run), "--n", "6", "--seed", "3", "--device", "cpu"]
    assert run_command(sample.main, [*args, "--out", str(grid), "--chain", str(chain),
                                     "--chain-every", "5", "--chain-rows", "2",
                                     "--save-npz", str(npz)]) == 0  # fmt: skip
    assert Image.open(grid).size[0] > 0
    assert Image.open(chain).size == (8 * (4 * 9 + 1), 8 * (2 * 9 + 1))  # x̂₀ at t = 15, 10, 5, 0
    first = np.load(npz)["images"]
    assert first.shape == (6, 8, 8, 1) and first.dtype == np.uint8
    assert run_command(sample.main, [*args, "--out", str(grid), "--save-npz", str(npz)]) == 0
    np.testing.assert_array_equal(np.load(npz)["images"], first)  # same seed, same samples
    assert run_command(sample.main, [*args, "--out", str(grid), "--sampler", "ddim",
                                     "--steps", "4", "--eta", "0.5"]) == 0  # fmt: skip
    capsys.readouterr()
    code = run_command(evaluate.main, ["--checkpoint", str(run), "--n", "40", "--steps", "5",
                                       "--device", "cpu"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "Fréchet distance" in out and "real-vs-real floor" in out
    assert "classes among samples" in out


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_input_gets_one_line_and_exit_2(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(run, "--steps", "2") == 0
    capsys.readouterr()
    # --steps above T
    code = run_command(sample.main, ["--checkpoint", str(run), "--sampler", "ddim", "--steps",
                                     "21", "--out", str(tmp_path / "g.png")], "dali.sample")  # fmt: skip
    assert code == 2 and "between 1 and T = 20" in _error_line(capsys)
    # a grayscale checkpoint asked to continue on RGB images
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(rgb / f"{i}.png")
    code = _train(run, "--steps", "4", "--data", f"folder:{rgb}", "--config", "digits",
                  "--in-channels", "3", "--resume", str(run))  # fmt: skip
    assert code == 2 and "in_channels (checkpoint 1, expected 3)" in _error_line(capsys)
    # empty and mixed-size folders
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _train(tmp_path / "x", "--data", f"folder:{empty}", "--config", "digits") == 2
    assert "no PNG or JPEG images" in _error_line(capsys)
    Image.new("RGB", (9, 8)).save(rgb / "odd.png")
    assert _train(tmp_path / "x", "--data", f"folder:{rgb}", "--config", "digits") == 2
    assert "different sizes" in _error_line(capsys)
    # a damaged idx file
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    (mnist / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    assert _train(tmp_path / "x", "--data", f"mnist:{mnist}", "--image-size", "8") == 2
    assert "damaged idx file" in _error_line(capsys)
    # not a checkpoint
    assert run_command(sample.main, ["--checkpoint", str(tmp_path), "--out", "g.png"]) == 2
    assert "no checkpoint found" in _error_line(capsys)


def test_non_finite_loss_stops_with_step_and_last_checkpoint(tmp_path, capsys, monkeypatch):
    real_loss = GaussianDiffusion.training_loss
    calls = {"n": 0}

    def loss_that_explodes(self, model, x0, t=None, noise=None):
        calls["n"] += 1
        loss = real_loss(self, model, x0, t, noise)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(GaussianDiffusion, "training_loss", loss_that_explodes)
    assert _train(tmp_path, "--steps", "6") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert "non-finite loss" in line and "step 4" in line and "step_0000002" in line


def test_two_process_torchrun_gloo(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", "29531", "-m", "dali.train", "--out", str(tmp_path), *TINY,
           "--steps", "3"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(_losses(tmp_path)) == 3
    assert "2 process(es)" in result.stderr + result.stdout
    assert (tmp_path / "checkpoints" / "step_0000003" / "model.safetensors").is_file()
