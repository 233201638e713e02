"""The shared training infrastructure: exact resume, DDP parity, atomic checkpoints, refusals."""

import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformer.training import (
    CheckpointError,
    add_dataclass_arguments,
    check_checkpoint,
    dataclass_from_args,
    load_weights,
    param,
    save_checkpoint,
)
from transformer.training import checkpoint as ckpt

TOY = Path(__file__).with_name("toy_train.py")
REPO = Path(__file__).resolve().parents[2]


def _run(args, launcher=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable]) + [str(TOY), "--device", "cpu", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _losses(run_dir):
    return [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]


def test_resume_after_interruption_reproduces_losses_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _run(["--out", straight, "--steps", 10]).returncode == 0
    interrupted = _run(["--out", split, "--steps", 10, "--interrupt-at", 4])
    assert interrupted.returncode == 130, interrupted.stderr
    assert "checkpoint saved" in interrupted.stderr.strip().splitlines()[-1]
    assert len(_losses(split)) == 5
    resumed = _run(["--out", split, "--steps", 10, "--resume", split])
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(split) == _losses(straight)  # bit-identical, dropout RNG included


def test_two_process_ddp_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(["--out", one, "--steps", 6, "--dropout", 0]).returncode == 0
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29517",
    ]
    result = _run(["--out", two, "--steps", 6, "--dropout", 0], launcher=torchrun)
    assert result.returncode == 0, result.stderr[-2000:]
    torch.testing.assert_close(
        torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-5, atol=1e-6
    )


def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path):
    result = _run(["--out", tmp_path, "--steps", 10, "--nan-at", 7])
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "step 8" in line and "step_0000006" in line  # the 8th step (index 7)


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    target = tmp_path / "ckpt"
    save_checkpoint(target, model, {"package": "toy", "model": {"n": 3}}, {"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, model, {"package": "toy", "model": {"n": 3}}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left behind
    fresh = torch.nn.Linear(3, 2)
    load_weights(target, fresh)
    torch.testing.assert_close(fresh.state_dict(), before)
    assert ckpt.load_train_state(target)["step"] == 1


def test_checkpoint_from_other_config_or_package_is_refused(tmp_path):
    save_checkpoint(
        tmp_path / "c", torch.nn.Linear(2, 2), {"package": "toy", "model": {"d": 2, "h": 1}}
    )
    with pytest.raises(CheckpointError, match=r"differs in: d \(checkpoint 2, expected 4\); h"):
        check_checkpoint(tmp_path / "c", "toy", {"d": 4, "h": 2})
    with pytest.raises(CheckpointError, match="checkpoint of 'toy', not of 'xllama'"):
        check_checkpoint(tmp_path / "c", "xllama")
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(tmp_path / "c", torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(CheckpointError, match="not found"):
        check_checkpoint(tmp_path / "nope", "toy")


def test_resume_with_other_model_config_names_the_field(tmp_path):
    assert _run(["--out", tmp_path, "--steps", 3]).returncode == 0
    result = _run(["--out", tmp_path, "--steps", 6, "--width", 8, "--resume", tmp_path])
    assert result.returncode == 2
    assert "width (checkpoint 16, expected 8)" in result.stderr


def test_dataclass_flags_take_their_meaning_and_override_presets():
    import argparse
    from dataclasses import dataclass

    @dataclass
    class Config:
        d_model: int = param(512, "Model width.")
        dropout: float = param(0.1, "Dropout rate.")
        pre_norm: bool = param(False, "Pre-norm residual blocks.")
        sizes: tuple[int, ...] = param((1, 2), "Channel multipliers.")

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Config)
    help_text = parser.format_help()
    assert "Model width. (default: 512)" in help_text
    args = parser.parse_args(["--dropout", "0.3", "--pre-norm", "--sizes", "1", "4"])
    got = dataclass_from_args(Config, args, base=Config(d_model=64))
    assert got == Config(d_model=64, dropout=0.3, pre_norm=True, sizes=(1, 4))


JOIN_TWICE = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformer.training import setup_distributed

outer, _ = setup_distributed("cpu")  # e.g. a pipeline
inner, _ = setup_distributed("cpu")  # a command it runs, which joins and closes as if alone
assert outer.owns_group and not inner.owns_group
inner.close()
assert outer.all_reduce_mean(torch.tensor([float(outer.rank)])).item() == 0.5
outer.close()
assert not dist.is_initialized()
Path(sys.argv[1], f"closed{outer.rank}").touch()  # a file per rank: stdout lines interleave
"""


def test_setup_distributed_twice_in_one_process_joins_once(tmp_path):
    script = tmp_path / "join_twice.py"
    script.write_text(JOIN_TWICE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", "29541", str(script), str(tmp_path)]  # fmt: skip
    result = subprocess.run(torchrun, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "closed0").is_file() and (tmp_path / "closed1").is_file()


def test_every_config_field_has_a_meaning_for_help():
    """Flags get their help from `param(default, "meaning")`, not from source files: a field
    without one would show an empty help line."""
    import dataclasses

    from dali.diffusion import DiffusionConfig
    from dali.model import UNetConfig
    from dali.train import TrainConfig as DaliTrain
    from instructgpt.dpo import DPOConfig
    from instructgpt.pipeline import PipelineConfig
    from instructgpt.ppo import PPOConfig
    from instructgpt.reward import RewardConfig
    from instructgpt.sft import SFTConfig
    from transformer.model import TransformerConfig
    from transformer.train import TrainConfig as TransformerTrain
    from xllama.model import LlamaConfig
    from xllama.train import TrainConfig as XllamaTrain

    configs = [DiffusionConfig, UNetConfig, DaliTrain, DPOConfig, PipelineConfig, PPOConfig,
               RewardConfig, SFTConfig, TransformerConfig, TransformerTrain, LlamaConfig,
               XllamaTrain]  # fmt: skip
    missing = [f"{c.__name__}.{f.name}" for c in configs for f in dataclasses.fields(c)
               if not f.metadata.get("help")]  # fmt: skip
    assert missing == []


def test_configs_written_before_a_field_was_added_still_load():
    """TransformerConfig.activation came later (`param(..., added=True)`): a checkpoint config
    without it reads as the old behaviour, ReLU; any other missing field is still refused."""
    from transformer.model import TransformerConfig
    from transformer.training import ConfigError, config_from_dict

    old = dataclasses.asdict(TransformerConfig(d_model=64, n_heads=4))
    del old["activation"]
    assert config_from_dict(TransformerConfig, old, "old.json").activation == "relu"
    del old["d_model"]
    with pytest.raises(ConfigError, match="missing d_model"):
        config_from_dict(TransformerConfig, old, "old.json")


def test_a_state_that_does_not_fit_is_named_in_one_error():
    from transformer.training import CheckpointError
    from transformer.training.checkpoint import load_state_exactly

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    good = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    load_state_exactly(model, good, "good.safetensors")
    assert all(torch.equal(v, good[k]) for k, v in model.state_dict().items())
    bad = dict(good, extra=torch.zeros(1))
    del bad["1.bias"]
    bad["0.weight"] = torch.zeros(3, 2)
    with pytest.raises(CheckpointError) as err:
        load_state_exactly(model, bad, "bad.safetensors")
    assert str(err.value) == (
        "bad.safetensors does not fit the model: missing ['1.bias'], unexpected ['extra'], "
        "other shapes ['0.weight']"
    )


def test_the_final_checkpoint_is_written_once(tmp_path):
    """A trainer's last save after its loop: when `checkpoint_every` divides the step count,
    `end_of_step` has just written that step, and `save_final` returns it instead of writing a
    second copy beside it; otherwise (and after a step that changed the weights) it writes."""
    from transformer.training import TrainingRun
    from transformer.training.run import list_checkpoints

    def train(out, steps, every, resume=None):
        model = torch.nn.Linear(3, 2)
        run = TrainingRun(out, "toy", {"d": 3}, {}, model, checkpoint_every=every, resume=resume)
        for step in run.steps(steps, desc="toy"):
            with torch.no_grad():
                model.weight.add_(1.0)
            run.end_of_step(step)
        return run, run.save_final(steps), model

    run, final, _ = train(tmp_path / "divides", 4, every=2)
    assert final.name == "step_0000004"
    assert [p.name for p in list_checkpoints(tmp_path / "divides")] == [
        "step_0000002",
        "step_0000004",
    ]
    assert not list((tmp_path / "divides" / "checkpoints").glob("*.1"))
    run, final, model = train(tmp_path / "odd", 5, every=2)
    assert final.name == "step_0000005"
    fresh = torch.nn.Linear(3, 2)
    load_weights(final, fresh)
    assert torch.equal(fresh.weight, model.weight)  # the last step's weights were written
    # A resumed run with no step left returns the checkpoint it resumed from.
    run, again, _ = train(tmp_path / "divides", 4, every=2, resume=tmp_path / "divides")
    assert again == tmp_path / "divides" / "checkpoints" / "step_0000004"
    assert not list((tmp_path / "divides" / "checkpoints").glob("*.1"))


def test_the_best_validation_checkpoint_is_kept_and_survives_resume(tmp_path):
    from transformer.training import TrainingRun
    from transformer.training.run import list_checkpoints

    model = torch.nn.Linear(3, 2)
    run = TrainingRun(tmp_path / "run", "toy", {"d": 3}, {}, model, keep_last=1)
    val_losses = [3.0, 2.0, 2.5, 1.5, 1.7, float("nan")]
    weights_at = {}
    for step, val in enumerate(val_losses):
        with torch.no_grad():
            model.weight.fill_(step)
        weights_at[step + 1] = model.weight.clone()
        run.keep_best(step, val)
        run.save(step + 1)
    # The lowest finite loss (1.5, after step 4), its weights, in an ordinary loadable checkpoint.
    assert run.best == {"step": 4, "val_loss": 1.5}
    best = tmp_path / "run" / "checkpoints" / "best"
    assert check_checkpoint(best, "toy", {"d": 3})["best"] == {"step": 4, "val_loss": 1.5}
    fresh = torch.nn.Linear(3, 2)
    load_weights(best, fresh)
    assert torch.equal(fresh.weight, weights_at[4])
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000006"]  # not pruned
    # Resuming restores the record: a worse loss does not replace it, a better one does.
    resumed_model = torch.nn.Linear(3, 2)
    resumed = TrainingRun(tmp_path / "run", "toy", {"d": 3}, {}, resumed_model,
                          resume=tmp_path / "run")  # fmt: skip
    assert resumed.best == {"step": 4, "val_loss": 1.5}
    assert not resumed.keep_best(6, 1.6)
    assert resumed.load_best() == {"step": 4, "val_loss": 1.5}
    assert torch.equal(resumed_model.weight, weights_at[4])
    assert resumed.keep_best(7, 1.2) and resumed.best == {"step": 8, "val_loss": 1.2}


_FAULTS_ON_REUSE = """
import resource, sys, torch
from transformer.training import select_device
if sys.argv[1] == "cpu":
    select_device("cpu")
def fill():  # a block above glibc's 32 MB mmap ceiling, written once, then freed
    torch.empty(16 * 2**20).fill_(1.0)
for _ in range(3):  # a small allocation between two fills can take the freed block's start once
    fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_on_the_cpu_freed_memory_is_reused_without_page_faults():
    # 64 MB is 16,384 pages of 4 KB: glibc's default maps them afresh and faults each one in again
    def faults(mode):
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_ON_REUSE, mode], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        return int(out.stdout)

    assert faults("default") > 10000
    assert faults("cpu") < 1000


def test_weight_decay_is_decoupled_and_spares_biases_and_layer_norms():
    """AdamW's decay (Loshchilov & Hutter 2019, Algorithm 2, line 12): with zero gradients, one
    step shrinks every weight matrix and the tied embedding by exactly lr·λ of itself and leaves
    biases and LayerNorm alone (a coupled L2 penalty would move each weight by about lr instead)."""
    from transformer import Transformer
    from transformer.train import PRESETS
    from transformer.training import weight_decay_groups

    model = Transformer(dataclasses.replace(PRESETS["tiny"].model, vocab_size=40))  # pre-norm
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.1), lr=0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    spared = [name for name in before if name.endswith(".bias") or "norm" in name]
    assert len(spared) > 10 and "source_embedding.tokens.weight" in before
    for name, p in model.named_parameters():
        expected = before[name] if name in spared else before[name] * (1 - 0.01 * 0.1)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7, msg=name)


def test_an_optimizer_state_that_does_not_fit_is_one_error(tmp_path):
    """A checkpoint whose optimizer had other parameter groups (e.g. saved before a trainer split
    its parameters for weight decay) is refused by name, not with torch's traceback."""
    from transformer.training import TrainingRun

    model = torch.nn.Linear(3, 2)
    one_group = torch.optim.SGD(model.parameters(), lr=0.1)
    TrainingRun(tmp_path / "a", "toy", {"d": 3}, {}, model, one_group).save(1)
    two_groups = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    with pytest.raises(CheckpointError, match="optimizer state does not fit"):
        TrainingRun(tmp_path / "b", "toy", {"d": 3}, {}, model, two_groups, resume=tmp_path / "a")
