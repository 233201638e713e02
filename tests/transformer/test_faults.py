"""Faults injected into real (tiny) training runs of the platform (`transformer.training`): kills during
checkpoint writes, crashes inside a same-step save, two processes on one run directory, kill then
resume, non-finite weights, unsafe pickles. Each promise of the run directory has a test here that
fails without the mechanism behind it."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transformer.training import (
    CheckpointError,
    RunDirectoryError,
    TrainingRun,
    find_checkpoint,
    list_checkpoints,
    load_train_state,
    load_weights,
    read_config,
)
from transformer.training import checkpoint as checkpoint_module
from transformer.training import run as run_module

TOY = Path(__file__).with_name("toy_train.py")
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _command(args):
    return [sys.executable, str(TOY), "--device", "cpu", *map(str, args)]


def _run(args, timeout=120):
    return subprocess.run(_command(args), capture_output=True, text=True, env=ENV, timeout=timeout)


def _start(args):
    return subprocess.Popen(
        _command(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV
    )


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


def _assert_loadable(run_dir) -> Path:
    """`latest` names a complete checkpoint whose every tensor is finite."""
    checkpoint = find_checkpoint(run_dir)
    assert read_config(checkpoint)["package"] == "toy"
    state = load_train_state(checkpoint)
    from safetensors.torch import load_file

    weights = load_file(checkpoint / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert state["step"] >= 1
    return checkpoint


def _wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_sigkill_during_checkpoint_writes_always_leaves_a_loadable_latest(tmp_path):
    """Kill a run that checkpoints every step (12 MB each) at random moments; each time `latest`
    names a complete checkpoint, and the next start removes the half-written temporaries."""
    rng = random.Random(0)
    run_dir = tmp_path / "run"
    for trial in range(4):
        args = ["--out", run_dir, "--steps", 400, "--big", 1000, "--checkpoint-every", 1]
        args += ["--resume", run_dir] if trial else []
        proc = _start(args)
        latest = run_dir / "checkpoints" / "latest"
        _wait_for(lambda latest=latest, proc=proc: latest.is_file() and proc.poll() is None)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _assert_loadable(run_dir)
    # The next start cleans up and resumes to the end.
    result = _run(["--out", run_dir, "--steps", 60, "--big", 1000, "--checkpoint-every", 20,
                   "--resume", run_dir])  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert load_train_state(_assert_loadable(run_dir))["step"] == 60


def _tiny_run(out, **kwargs):
    model = torch.nn.Linear(3, 2)
    return TrainingRun(out, package="toy", model_config={"n": 3}, train_config={}, model=model,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)  # fmt: skip


@pytest.mark.parametrize("crash_at", range(1, 8))
def test_a_crash_anywhere_in_a_same_step_save_leaves_latest_complete(
    tmp_path, monkeypatch, crash_at
):
    """The final save lands on a step already checkpointed; a crash at the n-th file-system move of
    that save (renames and removals) never leaves `latest` naming a missing or partial folder."""
    run = _tiny_run(tmp_path / "run")
    run.save(3)
    calls = {"n": 0}

    def counting(real):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise KeyboardInterrupt("simulated crash")
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(checkpoint_module.os, "replace", counting(os.replace))
    monkeypatch.setattr(run_module.shutil, "rmtree", counting(run_module.shutil.rmtree))
    monkeypatch.setattr(Path, "replace", counting(Path.replace))
    try:
        run.save(3)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert load_train_state(find_checkpoint(tmp_path / "run"))["step"] == 3
    fresh = torch.nn.Linear(3, 2)
    load_weights(find_checkpoint(tmp_path / "run"), fresh)


def test_latest_never_resolves_outside_its_run_directory(tmp_path):
    run = _tiny_run(tmp_path / "run")
    run.save(1)
    (tmp_path / "elsewhere").mkdir()
    torch.save({}, tmp_path / "elsewhere" / "model.safetensors")
    for name in ("../../elsewhere", "/etc", "step_1/../../../elsewhere"):
        (tmp_path / "run" / "checkpoints" / "latest").write_text(name + "\n")
        with pytest.raises(CheckpointError, match="not a checkpoint of this run"):
            find_checkpoint(tmp_path / "run")


def test_two_processes_on_one_run_directory_and_a_dead_owner(tmp_path):
    run_dir = tmp_path / "run"
    first = _start(["--out", run_dir, "--steps", 500, "--sleep", 0.05, "--checkpoint-every", 2])
    _wait_for(lambda: (run_dir / "checkpoints" / "latest").is_file())
    second = _run(["--out", run_dir, "--steps", 5, "--overwrite"])
    assert second.returncode == 2
    line = second.stderr.strip()
    assert len(line.splitlines()) == 1 and f"in use by process {first.pid}" in line
    first.send_signal(signal.SIGKILL)
    first.wait()
    # The dead owner's lock is taken over: resuming works, and it finishes.
    third = _run(["--out", run_dir, "--steps", 20, "--checkpoint-every", 2, "--resume", run_dir])
    assert third.returncode == 0, third.stderr[-2000:]


def test_a_used_run_directory_needs_resume_or_overwrite(tmp_path):
    run_dir = tmp_path / "run"
    assert _run(["--out", run_dir, "--steps", 9, "--checkpoint-every", 3]).returncode == 0
    again = _run(["--out", run_dir, "--steps", 4, "--checkpoint-every", 2])
    assert again.returncode == 2
    assert "already holds a run" in again.stderr and "--resume" in again.stderr
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000006", "step_0000009"]
    replaced = _run(["--out", run_dir, "--steps", 4, "--checkpoint-every", 2, "--overwrite"])
    assert replaced.returncode == 0, replaced.stderr
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_0000002", "step_0000004"]
    assert find_checkpoint(run_dir).name == "step_0000004"
    assert [step for step, _ in _losses(run_dir)] == [1, 2, 3, 4]


def test_sigkill_then_resume_reproduces_metrics_exactly(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["--steps", 30, "--checkpoint-every", 4, "--dropout", 0.1]
    assert _run(["--out", straight, *common]).returncode == 0
    proc = _start(["--out", killed, *common, "--sleep", 0.05])
    _wait_for(lambda: len(_losses(killed)) >= 11 if (killed / "metrics.jsonl").is_file() else False)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(_losses(killed)) > load_train_state(find_checkpoint(killed))["step"]
    resumed = _run(["--out", killed, *common, "--resume", killed])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _losses(killed) == _losses(straight)  # no duplicated or lost step, bit for bit


def test_resume_from_an_earlier_checkpoint_keeps_its_own_lineage(tmp_path):
    """Resuming from step 4 of a run that reached step 8: pruning never removes what this run
    writes, and the later checkpoint is replaced, not kept as 'latest'."""
    run_dir = tmp_path / "run"
    assert _run(["--out", run_dir, "--steps", 8, "--checkpoint-every", 4]).returncode == 0
    early = run_dir / "checkpoints" / "step_0000004"
    result = _run(["--out", run_dir, "--steps", 10, "--checkpoint-every", 2, "--resume", early])
    assert result.returncode == 0, result.stderr[-2000:]
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names[-1] == "step_0000010" == find_checkpoint(run_dir).name
    assert "step_0000008.1" in names and "step_0000008" not in names  # this run's step 8
    assert [step for step, _ in _losses(run_dir)] == list(range(1, 11))


def test_non_finite_weights_stop_training_and_name_a_finite_checkpoint(tmp_path):
    result = _run(["--out", tmp_path / "run", "--steps", 10, "--nan-weights-at", 4])
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert "non-finite weights" in line and "at step 5" in line and "step_0000003" in line
    assert find_checkpoint(tmp_path / "run").name == "step_0000003"
    _assert_loadable(tmp_path / "run")


def test_no_checkpoint_is_written_with_a_non_finite_tensor(tmp_path):
    run = _tiny_run(tmp_path / "run")
    run.save(1)
    with torch.no_grad():
        run.model.bias[0] = float("inf")
    with pytest.raises(Exception, match="non-finite weights .*bias"):
        run.save(2)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_0000001"]


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_an_unsafe_pickle_is_refused_in_one_line_without_torch_advice(tmp_path):
    run_dir = tmp_path / "run"
    assert _run(["--out", run_dir, "--steps", 3, "--checkpoint-every", 3]).returncode == 0
    state_file = find_checkpoint(run_dir) / "train_state.pt"
    with open(state_file, "wb") as f:
        pickle.dump({"step": Payload()}, f)
    result = _run(["--out", run_dir, "--steps", 6, "--resume", run_dir])
    assert result.returncode == 2
    assert "this must never run" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused to read" in lines[0], lines
    assert "weights_only" not in lines[0]


def test_checkpoint_folders_follow_the_umask(tmp_path):
    run = _tiny_run(tmp_path / "run")
    path = run.save(1)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~mask


def test_a_run_directory_that_is_a_file_or_used_in_process_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="not a directory"):
        _tiny_run(tmp_path / "file")
    with pytest.raises(RunDirectoryError, match="--resume continues a run"):
        _tiny_run(tmp_path / "new", resume=tmp_path / "x", overwrite=True)


@pytest.mark.parametrize("delay", [0.3, 0.9])
def test_ctrl_c_while_a_command_starts_is_one_line_and_exit_130(tmp_path, delay):
    """Before `run_command` is reached (torch is still importing) as well as after."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "xllama.train", "--out", str(tmp_path / "run"), "--steps", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("xllama.train: interrupted"), lines


def test_importing_dali_does_not_load_the_tokenizer():
    code = "import sys, dali; print(sorted(m for m in sys.modules if m.startswith('tokenizer')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
