"""benchmarks/gpu_reproduce.py runs every part at tiny sizes on a CPU (`--smoke`), so the one-shot
GPU reproduction is known to work before a GPU is used."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_reproduction_runs_every_part_in_smoke_mode(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_reproduce.py"), "--smoke",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["part"] for row in results["rows"]] == [
        "multi30k", "mnist", "gpt2-step", "shakespeare-char", "decode"
    ]  # fmt: skip
    for row in results["rows"]:
        assert row["value"] != "—" and row["seconds"] > 0, row
    # The table on stdout carries each number, and each part read its run's own outputs.
    assert all(row["value"] in done.stdout for row in results["rows"])
    assert (tmp_path / "shakespeare-char" / "checkpoints" / "best").is_dir()
    assert (tmp_path / "mnist" / "quality.json").is_file()


def test_the_full_sizes_refuse_a_machine_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_reproduce.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "no CUDA device" in err[0]
