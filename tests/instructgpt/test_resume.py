"""Exact resume of the reward model, PPO and DPO: a run stopped by Ctrl-C after k steps and
continued with --resume logs the same metrics and ends with the same weights, optimizer state, RNG
and data position as the run that was never stopped."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from instructgpt import dpo, ppo, reward
from tests.instructgpt.conftest import write_jsonl
from transformer.training import TrainingRun, find_checkpoint, load_train_state, run_command

RANKS = [
    {"prompt": f"The value {i} is", "responses": [" a new object.", " an object.", " not valid."]}
    for i in range(6)
]
DEMOS = [{"prompt": r["prompt"], "response": r["responses"][0]} for r in RANKS]
PROMPTS = [{"prompt": p} for p in ("The value of", "A new object", "It is not", "The module")]
PROMPTS = [{"prompt": f"{p['prompt']} {i}"} for i in range(3) for p in PROMPTS]  # 12 prompts


def _same(a, b) -> bool:
    """Exact equality of nested checkpoint state (dicts, lists, tuples, tensors, arrays)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "time"} for row in rows]


def _train_interrupted(module, argv, out, k, monkeypatch, capsys):
    """Run `module` into `out`, stopped as if Ctrl-C arrived during its k-th step, then resumed."""
    end_of_step = TrainingRun.end_of_step

    def ctrl_c_in_step_k(self, step, data_state=None):
        if step + 1 == k:
            self._on_sigint(None, None)
        return end_of_step(self, step, data_state)

    with monkeypatch.context() as patch:
        patch.setattr(TrainingRun, "end_of_step", ctrl_c_in_step_k)
        code = run_command(module.main, [*argv, "--out", str(out)], prog=module.__name__)
    assert code == 130
    assert f"interrupted after step {k}; checkpoint saved" in capsys.readouterr().err
    assert len(_metrics(out)) == k
    assert module.main([*argv, "--out", str(out), "--resume", str(out)]) == 0


def _assert_same_run(straight, split, steps):
    rows = _metrics(straight)
    assert len(rows) == steps and rows == _metrics(split)
    a, b = find_checkpoint(straight), find_checkpoint(split)
    assert a.name == b.name == f"step_{steps:07d}"
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    state_a, state_b = load_train_state(a), load_train_state(b)
    assert state_a.keys() == state_b.keys() == {"step", "rng", "data", "optimizer", "metrics_lines"}
    for key in state_a:
        assert _same(state_a[key], state_b[key]), key
    return rows, weights_a, state_a


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    return {
        "rankings": write_jsonl(tmp / "rank.jsonl", RANKS),
        "demos": write_jsonl(tmp / "demos.jsonl", DEMOS),
        "prompts": write_jsonl(tmp / "prompts.jsonl", PROMPTS),
    }


def _reward_argv(base_model, files):
    return ["--model", str(base_model), "--data", str(files["rankings"]), "--eval-data",
            str(files["rankings"]), "--demonstrations", str(files["demos"]), "--steps", "4",
            "--batch-size", "4", "--device", "cpu"]  # fmt: skip


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, base_model, files):
    """A 4-step reward model run, never interrupted (also the reward model of the PPO test)."""
    out = tmp_path_factory.mktemp("rm") / "straight"
    assert reward.main([*_reward_argv(base_model, files), "--out", str(out)]) == 0
    return out


def test_reward_model_resume_is_exact(
    tmp_path, base_model, files, reward_model, monkeypatch, capsys
):
    split = tmp_path / "split"
    _train_interrupted(reward, _reward_argv(base_model, files), split, 2, monkeypatch, capsys)
    _, _, state = _assert_same_run(reward_model, split, 4)
    assert state["data"] == {"epoch": 2, "position": 4}  # 4 steps × 4 of 6 rankings
    # the normalisation after training and the held-out accuracy come out the same too
    summary = json.loads((reward_model / "summary.json").read_text())
    assert summary == json.loads((split / "summary.json").read_text())


@pytest.mark.filterwarnings("ignore:iteration .* the KL estimate is negative")
def test_ppo_resume_is_exact(tmp_path, base_model, files, reward_model, monkeypatch, capsys):
    """Everything PPO carries across iterations: policy and value weights, their optimizer, the
    adaptive controller's β, the prompt order, the PPO-ptx text position and the RNG."""
    argv = ["--policy", str(base_model), "--reward-model", str(reward_model), "--prompts",
            str(files["prompts"]), "--iterations", "4", "--rollout-batch", "5", "--minibatch", "2",
            "--ppo-epochs", "2", "--max-new-tokens", "6", "--lr", "1e-3", "--adaptive-kl",
            "--kl-target", "0.5", "--kl-horizon", "20", "--ptx-coef", "0.5", "--ptx-batch", "2",
            "--ptx-len", "16", "--device", "cpu"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert ppo.main([*argv, "--out", str(straight)]) == 0
    _train_interrupted(ppo, argv, split, 2, monkeypatch, capsys)
    rows, weights, state = _assert_same_run(straight, split, 4)
    # the test covers what it claims to: β moved, both models trained, the data went round
    betas = [row["beta"] for row in rows]
    assert len(set(betas)) == 4 and state["data"]["beta"] not in betas
    assert {"ptx_loss", "value_loss", "kl", "score", "reward"} <= set(rows[0])
    assert any(k.startswith("policy.") for k in weights)
    assert any(k.startswith("value.") for k in weights)
    assert state["data"]["prompts"] == {"epoch": 1, "position": 8}  # 4 × 5 of 12 prompts
    # PPO-ptx reads on through the corpus: 4 iterations × 2 epochs × 3 minibatches × 2 windows
    assert state["data"]["ptx"] == {"epoch": 0, "position": 48}
    final = load_file(straight / "policy" / "model.safetensors")
    resumed = load_file(split / "policy" / "model.safetensors")
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def test_dpo_resume_is_exact(tmp_path, base_model, files, monkeypatch, capsys):
    argv = ["--model", str(base_model), "--data", str(files["rankings"]), "--eval-data",
            str(files["rankings"]), "--steps", "4", "--batch-size", "4", "--lr", "1e-3",
            "--warmup", "1", "--device", "cpu"]  # fmt: skip
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert dpo.main([*argv, "--out", str(straight)]) == 0
    _train_interrupted(dpo, argv, split, 2, monkeypatch, capsys)
    rows, _, state = _assert_same_run(straight, split, 4)
    assert rows[-1]["loss"] != rows[0]["loss"]
    assert state["data"] == {"epoch": 0, "position": 16}  # 18 pairs from 6 rankings of 3
    summary = json.loads((straight / "summary.json").read_text())
    assert summary == json.loads((split / "summary.json").read_text())
