"""transformer.train and transformer.translate end to end on tiny settings, and their refusals."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformer import train, translate
from transformer.training import find_checkpoint, load_train_state
from transformer.translate import average_state_dicts

REPO = Path(__file__).resolve().parents[2]
# A few steps of a very small model on the embedded task (seconds).
TINY = (
    "--device cpu --d-model 16 --d-ff 32 --n-heads 2 --n-encoder-layers 1 --n-decoder-layers 1 "
    "--task-train-size 100 --task-valid-size 20 --batch-tokens 256 --micro-batch-tokens 128 "
    "--warmup-steps 5 --beam-size 2 --samples 1"
).split()


def _losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def _subprocess(args, launcher=None, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable]) + list(map(str, args))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, input=stdin)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train.main([*TINY, "--steps", "8", "--checkpoint-every", "2", "--out", str(out)]) == 0
    return out


def test_train_writes_run_and_checkpoints(trained, capsys):
    assert (trained / "config.json").is_file() and (trained / "vocabulary.json").is_file()
    assert len(list((trained / "checkpoints").glob("step_*"))) == 4  # steps 2, 4, 6, 8
    records = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert any("bleu" in r for r in records) and any("final_bleu" in r for r in records)
    assert all(k in records[0] for k in ("loss", "lr", "tok_s"))


def test_resume_continues_exactly(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*TINY, "--dropout", "0.1", "--weight-decay", "0.1", "--checkpoint-every", "3"]
    assert train.main([*common, "--steps", "8", "--out", str(straight)]) == 0
    assert train.main([*common, "--steps", "5", "--out", str(split)]) == 0
    # The split run stopped at step 5 (and wrote a checkpoint there); continue it to 8.
    assert train.main([*common, "--steps", "8", "--out", str(split), "--resume", str(split)]) == 0
    assert _losses(split) == _losses(straight)
    groups = load_train_state(find_checkpoint(split))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]  # matrices; biases and LayerNorm


def test_time_limit_stops_after_the_step_that_reaches_it_and_ends_as_usual(tmp_path, capsys):
    out = tmp_path / "run"
    # A limit of a microsecond has passed once the first step ends: one step, not 50.
    args = [*TINY, "--steps", "50", "--time-limit", "1.7e-8", "--out", str(out)]
    assert train.main(args) == 0
    assert "time limit of 1.7e-08 minutes reached after step 1" in capsys.readouterr().out
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_0000001"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1]  # one training row
    assert "final_bleu" in records[-1]  # the final validation still ran


def test_two_process_gloo_run(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*TINY, "--dropout", "0", "--steps", "3", "--checkpoint-every", "0"]
    assert _subprocess(["-m", "transformer.train", *args, "--out", one]).returncode == 0
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29531",
    ]
    result = _subprocess(["-m", "transformer.train", *args, "--out", two], launcher=torchrun)
    assert result.returncode == 0, result.stderr[-3000:]
    # Same global batch (two micro-batches per step, one per process): the same losses.
    torch.testing.assert_close(
        torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-4, atol=1e-5
    )


def test_translate_stdin_file_reference_and_average(trained, tmp_path, capsys):
    source = tmp_path / "src.txt"
    source.write_text("1 2 3\n4 5\n")
    reference = tmp_path / "ref.txt.gz"
    with gzip.open(reference, "wt") as f:
        f.write("three two one\nfive four\n")
    assert (
        translate.main(
            [
                "--checkpoint",
                str(trained),
                "--input",
                str(source),
                "--reference",
                str(reference),
                "--average",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "BLEU = " in captured.err and "nrefs:1" in captured.err
    result = _subprocess(
        ["-m", "transformer.translate", "--checkpoint", trained, "--beam", "1"], stdin="1 2\n"
    )
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1


def test_checkpoint_averaging_is_the_elementwise_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([1.0])}
    c = {"w": torch.tensor([2.0, 1.0]), "b": torch.tensor([-4.0])}
    avg = average_state_dicts([a, b, c])
    torch.testing.assert_close(avg["w"], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(avg["b"], torch.tensor([-1.0]))


def _error_line(main, argv, capsys):
    from transformer.training import run_command

    try:
        code = run_command(main, argv, prog="transformer")
    except SystemExit as exit:  # a flag refused by the parser
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_bad_input_gives_one_line_and_exit_2(trained, tmp_path, capsys):
    a, b, empty = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "empty.txt"
    a.write_text("x\ny\nz\n")
    b.write_text("x\ny\n")
    empty.write_text("\n")
    out = ["--out", str(tmp_path / "o")]
    assert "3 lines" in _error_line(train.main, ["--src", str(a), "--tgt", str(b), *out], capsys)
    assert "empty" in _error_line(train.main, ["--src", str(empty), "--tgt", str(b), *out], capsys)
    assert "not found" in _error_line(train.main, ["--src", "nope", "--tgt", str(b), *out], capsys)
    assert "unknown config" in _error_line(train.main, ["--config", "huge", *out], capsys)
    assert "BPE" in _error_line(train.main, ["--bpe-dropout", "0.1", *out], capsys)
    assert "[0, 1]" in _error_line(train.main, ["--bpe-dropout", "1.5", *out], capsys)
    assert "weight_decay" in _error_line(train.main, ["--weight-decay", "-0.1", *out], capsys)
    assert "time_limit" in _error_line(train.main, ["--time-limit", "-1", *out], capsys)
    ckpt = ["--checkpoint", str(trained)]
    assert "at least 1" in _error_line(translate.main, [*ckpt, "--beam", "0"], capsys)
    assert "needs 9" in _error_line(translate.main, [*ckpt, "--average", "9"], capsys)
    # a checkpoint of another package, and one made for another config
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)
    shutil.copytree(trained / "checkpoints" / "step_0000008", other / "checkpoints" / "step_1")
    (other / "checkpoints" / "latest").write_text("step_1\n")
    shutil.copy(trained / "vocabulary.json", other)
    config_path = other / "checkpoints" / "step_1" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "package": "xllama"}))
    assert "'xllama'" in _error_line(translate.main, ["--checkpoint", str(other)], capsys)
    config_path.write_text(json.dumps(config))
    resumed = [
        *TINY,
        "--d-model",
        "32",
        "--steps",
        "9",
        "--out",
        str(other),
        "--resume",
        str(other),
    ]
    assert "d_model" in _error_line(train.main, resumed, capsys)
    assert "no checkpoint found" in _error_line(translate.main, ["--checkpoint", str(a)], capsys)


def test_train_and_translate_real_files_with_joint_bpe(tmp_path, capsys):
    de = ["ein hund läuft.", "zwei katzen schlafen.", "ein mann liest ein buch.", "kinder spielen."]
    en = ["a dog runs.", "two cats sleep.", "a man reads a book.", "children play."]
    src, tgt = tmp_path / "train.de.gz", tmp_path / "train.en"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("\n".join(de * 10) + "\n")
    tgt.write_text("\n".join(en * 10) + "\n")
    out = tmp_path / "run"
    args = [*TINY, "--src", str(src), "--tgt", str(tgt), "--bpe-vocab-size", "300", "--steps", "2"]
    assert train.main([*args, "--out", str(out)]) == 0
    assert json.loads((out / "vocabulary.json").read_text())["kind"] == "bpe"
    capsys.readouterr()
    assert translate.main(["--checkpoint", str(out), "--input", str(src), "--beam", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 40


def test_bpe_dropout_run_resumes_exactly(tmp_path):
    """--bpe-dropout re-segments the training files every epoch (one step each here); a resumed
    run draws the same segmentations, and they change the losses."""
    src, tgt = tmp_path / "train.de", tmp_path / "train.en"
    src.write_text("ein Hund läuft.\nzwei Katzen schlafen.\nein Mann liest.\n" * 8)
    tgt.write_text("a dog runs.\ntwo cats sleep.\na man reads.\n" * 8)
    common = [*TINY, "--src", str(src), "--tgt", str(tgt), "--bpe-vocab-size", "300"]
    common += ["--batch-tokens", "512", "--micro-batch-tokens", "512", "--checkpoint-every", "3"]
    straight, split, fixed = tmp_path / "straight", tmp_path / "split", tmp_path / "fixed"
    dropout = [*common, "--bpe-dropout", "0.2"]
    assert train.main([*dropout, "--steps", "6", "--out", str(straight)]) == 0
    assert train.main([*dropout, "--steps", "4", "--out", str(split)]) == 0
    assert train.main([*dropout, "--steps", "6", "--out", str(split), "--resume", str(split)]) == 0
    assert train.main([*common, "--steps", "6", "--out", str(fixed)]) == 0
    assert _losses(split) == _losses(straight)
    assert _losses(fixed) != _losses(straight)


def test_bpe_run_on_parallel_files_translates_from_its_checkpoint(tmp_path, capsys):
    """Real-data path: a joint BPE vocabulary with <pad>/<s>/</s> after its merges; the model's
    padding id is the vocabulary's, and translate reads both back from the run."""
    de = ["ein Hund läuft.", "zwei Katzen schlafen.", "ein Mann liest.", "eine Frau singt."] * 6
    en = ["a dog runs.", "two cats sleep.", "a man reads.", "a woman sings."] * 6
    src, tgt = tmp_path / "train.de", tmp_path / "train.en"
    src.write_text("\n".join(de) + "\n")
    tgt.write_text("\n".join(en) + "\n")
    out = tmp_path / "run"
    args = [*TINY, "--src", src, "--tgt", tgt, "--bpe-vocab-size", "300", "--steps", "3"]
    assert train.main([*map(str, args), "--out", str(out)]) == 0
    vocabulary = json.loads((out / "vocabulary.json").read_text())
    assert vocabulary == {"kind": "bpe", "file": "tokenizer.bpe"}
    config = json.loads((out / "config.json").read_text())["model"]
    assert (config["vocab_size"], config["pad_id"]) == (300, 297)
    sentences = tmp_path / "test.de"
    sentences.write_text("ein Hund läuft.\nzwei Katzen schlafen.\n")
    capsys.readouterr()
    assert translate.main(["--checkpoint", str(out), "--input", str(sentences), "--beam", "2"]) == 0
    assert capsys.readouterr().out.count("\n") == 2  # one translation per line
