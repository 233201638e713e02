"""benchmarks/gpu_reproduce.py runs every part at tiny sizes on a CPU (`--smoke`), so the one-shot
GPU reproduction is known to work before a GPU is used."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_reproduce.py"


def test_the_gpu_reproduction_runs_every_part_in_smoke_mode(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["finished"] is True
    assert [row["part"] for row in results["rows"]] == [
        "multi30k", "mnist", "gpt2-step", "shakespeare-char", "decode"
    ]  # fmt: skip
    for row in results["rows"]:
        assert row["value"] != "—" and row["seconds"] > 0, row
    # the GPU run's torch.compile paths ran too: the training step and the decode steps
    compiled = [row for row in results["rows"] if row["part"] in ("gpt2-step", "decode")]
    assert all("compiled" in row["result"] for row in compiled), compiled
    # The table on stdout carries each number, and each part read its run's own outputs.
    assert all(row["value"] in done.stdout for row in results["rows"])
    assert (tmp_path / "shakespeare-char" / "checkpoints" / "best").is_dir()
    assert (tmp_path / "mnist" / "quality.json").is_file()
    # the DDPM row carries the three numbers: distance ratio, confident share, classes
    (ddpm,) = [row for row in results["rows"] if row["part"] == "mnist"]
    assert re.fullmatch(r"[\d.]+ \([\d.]+× floor\); [\d.]+% \(real [\d.]+%\); \d+/10",
                        ddpm["value"]), ddpm  # fmt: skip


def test_the_full_sizes_refuse_a_machine_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--parts", "gpt2-step"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "no CUDA device" in err[0]


def test_the_full_run_checks_its_data_before_any_work(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--data", str(tmp_path / "empty"),
         "--parts", "decode", "shakespeare-char"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert "tinyshakespeare" in err[0] and "not found" in err[0]
    assert not out.exists()
    # MNIST's images without its labels: the Fréchet distance's classifier needs them
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    (tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--data", str(tmp_path / "data"),
         "--parts", "mnist"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "t10k-labels-idx1-ubyte.gz not found" in done.stderr
    assert not out.exists()


def test_a_run_cut_short_keeps_the_parts_it_finished(tmp_path, monkeypatch):
    """A one-shot GPU run may be stopped by its time limit: results.json holds each finished part."""
    spec = importlib.util.spec_from_file_location("gpu_reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_reproduce", module)  # its dataclass looks itself up
    spec.loader.exec_module(module)
    row = {"result": "r", "value": "1.00", "target": "", "seconds": 1.0}

    def cut(*args):
        raise KeyboardInterrupt  # what the time limit's signal looks like from inside

    monkeypatch.setitem(module.RUNNERS, "multi30k", lambda *args: row)
    monkeypatch.setitem(module.RUNNERS, "mnist", cut)
    with pytest.raises(KeyboardInterrupt):
        module.main(["--smoke", "--out", str(tmp_path), "--parts", "multi30k", "mnist"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["finished"] is False
    assert results["rows"] == [{"part": "multi30k", **row}]


def test_the_smoke_run_takes_the_embedded_task_when_multi30k_is_incomplete(tmp_path):
    data = tmp_path / "data" / "multi30k"
    data.mkdir(parents=True)
    (data / "train.de.gz").write_bytes(b"")  # the rest of Multi30k absent
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path / "out"),
         "--data", str(tmp_path / "data"), "--parts", "multi30k"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "embedded digit task" in done.stdout
