"""The commands end to end on tiny settings: train (char, BPE, token file), resume, 2-process DDP,
generate from our checkpoint and from HF / Meta directories, and one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xllama.convert import load_ours
from xllama.generate import main as generate_main
from xllama.train import TrainConfig, learning_rate
from xllama.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
TEXT = (
    "To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 40
)
TINY = ["--config", "tiny", "--device", "cpu", "--sample-tokens", "10", "--checkpoint-every", "0"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_char_training_learns_resumes_exactly_and_generates(tmp_path, text_file, capsys):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = TINY + ["--text", str(text_file), "--tokenizer", "char", "--steps", "12"]
    args += ["--eval-every", "6", "--lr", "1e-2", "--max-seq-len", "32"]
    assert train_main(args + ["--out", str(straight)]) == 0
    out = capsys.readouterr().out
    assert "--- sample ---" in out
    losses = [m["loss"] for m in _metrics(straight) if "loss" in m]
    assert losses[-1] < losses[0] - 0.5  # it learns
    # Stop after 6 steps (a shorter run with the same schedule length is not the same run, so
    # interrupt through the checkpoint of a 12-step run that was killed at 6), then resume.
    assert train_main(args + ["--out", str(split), "--checkpoint-every", "6"]) == 0
    ckpt6 = split / "checkpoints" / "step_0000006"
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(split, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_0000012")
    (resumed / "checkpoints" / "latest").write_text("step_0000006\n")
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(lines[:6]) + "\n")
    assert ckpt6.is_dir()
    assert train_main(args + ["--out", str(resumed), "--resume", str(resumed)]) == 0
    a = [m["loss"] for m in _metrics(straight) if "loss" in m]
    b = [m["loss"] for m in _metrics(resumed) if "loss" in m]
    assert a == b
    # The checkpoint generates through the CLI, streaming, with tokens/s on stderr.
    capsys.readouterr()
    code = generate_main(
        ["--checkpoint", str(straight), "--prompt", "To be", "--max-new-tokens", "8"]
    )
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("To be") and "tokens/s" in captured.err
    model, config = load_ours(straight / "checkpoints" / "step_0000012")
    assert config["tokenizer"]["kind"] == "char"


def test_bpe_default_path_trains_a_tokenizer(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    args = TINY + ["--text", str(text_file), "--vocab-size", "300", "--steps", "3"]
    args += ["--out", str(run), "--max-seq-len", "16"]
    assert train_main(args) == 0
    assert (run / "tokenizer.bpe").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and rows[-1]["final_val_loss"] > 0
    assert generate_main(["--checkpoint", str(run), "--prompt", "To", "--max-new-tokens", "4"]) == 0


def test_the_run_keeps_and_reports_its_best_validation_checkpoint(tmp_path, text_file, capsys):
    run = tmp_path / "run"
    args = TINY + ["--text", str(text_file), "--tokenizer", "char", "--steps", "12"]
    args += ["--eval-every", "3", "--lr", "3e-2", "--out", str(run), "--max-seq-len", "16"]
    assert train_main(args) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["val_loss"], r["step"]) for r in rows if "val_loss" in r]
    evals.append((rows[-1]["final_val_loss"], 12))
    best_loss, best_step = min(evals, key=lambda e: e[0])  # the first of equal losses
    assert (rows[-1]["best_val_loss"], rows[-1]["best_step"]) == (best_loss, best_step)
    report = capsys.readouterr().out
    assert (
        f"best validation loss {best_loss:.4f} = " in report and f"at step {best_step} (" in report
    )
    model, config = load_ours(run / "checkpoints" / "best")
    assert config["best"] == {"step": best_step, "val_loss": best_loss}
    assert generate_main(["--checkpoint", str(run / "checkpoints" / "best"), "--prompt", "To",
                          "--max-new-tokens", "4"]) == 0  # fmt: skip


def test_token_file_with_wrong_dtype_is_one_clear_line(tmp_path, capsys):
    from tokenizer import data

    path = data.write_tokens(tmp_path / "t.bin", list(range(100)) * 5, vocab_size=256)
    meta = json.loads((tmp_path / "t.bin.json").read_text())
    meta["dtype"] = "uint32"
    (tmp_path / "t.bin.json").write_text(json.dumps(meta))
    from transformer.training import run_command

    code = run_command(train_main, TINY + ["--data", str(path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sidecar" in err[0]


@pytest.mark.parametrize("ffn", ["dense", "experts"])
def test_two_process_ddp_matches_one_process(tmp_path, text_file, ffn):
    """The same trajectory under torchrun (gloo); with experts, the balancing loss and the
    expert shares logged are averaged over the two processes too."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    common = ["-m", "xllama.train"] + TINY + ["--text", str(text_file), "--tokenizer", "char"]
    common += ["--steps", "4", "--batch-size", "4", "--eval-every", "0", "--max-seq-len", "16"]
    common += ["--sample-tokens", "0"]
    if ffn == "experts":
        common += ["--n-experts", "4", "--experts-per-token", "1"]
    one = subprocess.run(
        [sys.executable, *common, "--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    torchrun += ["--master-port", "29533"]
    two = subprocess.run(
        [*torchrun, *common, "--out", str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = [m["loss"] for m in _metrics(tmp_path / "one") if "loss" in m]
    b = [m["loss"] for m in _metrics(tmp_path / "two") if "loss" in m]
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    if ffn == "experts":
        a = [m["expert_fraction"] for m in _metrics(tmp_path / "one") if "loss" in m]
        b = [m["expert_fraction"] for m in _metrics(tmp_path / "two") if "loss" in m]
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=1e-3)


def test_generate_from_hf_directory_with_tokenizer_flag(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    (tmp_path / "chars.json").write_text(
        json.dumps({"kind": "char", "chars": "".join(chr(i) for i in range(128))})
    )
    args = ["--checkpoint", str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "chars.json")]
    assert generate_main(args + ["--prompt", "hello", "--temperature", "0"]) == 0


def run_cli(main, argv, capsys):
    from transformer.training import run_command

    try:
        code = run_command(main, argv, prog="xllama")
    except SystemExit as exit:  # a flag refused by the parser
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, text_file, capsys):
    code, err = run_cli(train_main, ["--config", "nope", "--out", str(tmp_path)], capsys)
    assert code == 2 and len(err) == 1 and "unknown config 'nope'" in err[0]
    run = tmp_path / "run"
    args = TINY + ["--text", str(text_file), "--tokenizer", "char", "--steps", "2"]
    assert train_main(args + ["--out", str(run), "--max-seq-len", "16", "--eval-every", "0"]) == 0
    capsys.readouterr()
    code, err = run_cli(generate_main, ["--checkpoint", str(run), "--prompt", "To be " * 8], capsys)
    assert code == 2 and len(err) == 1 and "longer than the context" in err[0]
    code, err = run_cli(generate_main, ["--checkpoint", str(run), "--top-p", "1.5"], capsys)
    assert code == 2 and len(err) == 1 and "--top-p: must be a finite number in (0, 1]" in err[0]
    code, err = run_cli(generate_main, ["--checkpoint", str(tmp_path / "none")], capsys)
    assert code == 2 and len(err) == 1 and "not found" in err[0]
    # Resuming with another n_kv_heads names the field.
    code, err = run_cli(
        train_main,
        args
        + ["--out", str(run), "--resume", str(run), "--n-kv-heads", "4", "--max-seq-len", "16"],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "n_kv_heads" in err[0]


def test_non_finite_loss_stops_with_the_step(tmp_path, text_file, capsys):
    args = TINY + ["--text", str(text_file), "--tokenizer", "char", "--steps", "30"]
    args += ["--lr", "1e30", "--warmup-steps", "0", "--grad-clip", "0", "--eval-every", "0"]
    code, err = run_cli(train_main, args + ["--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "non-finite" in err[-1] and "at step" in err[-1]


def test_learning_rate_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    assert learning_rate(50, cfg, progress=1.0) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    from xllama import Llama
    from xllama.train import PRESETS, make_optimizer

    model = Llama(PRESETS["tiny"].model)
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert all(p.dim() == 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(no_decay["params"]) == 2 * model.config.n_layers + 1


@pytest.mark.parametrize("main", [train_main, generate_main])
def test_help_lists_every_flag(main, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--device" in out and "--seed" in out
    if main is train_main:
        assert "--n-kv-heads" in out and "--rope-pairing" in out and "--grad-accum" in out


def test_mixture_of_experts_trains_and_logs_expert_usage(tmp_path, text_file, capsys):
    run = tmp_path / "moe"
    args = TINY + ["--text", str(text_file), "--tokenizer", "char", "--steps", "4"]
    args += ["--n-experts", "4", "--experts-per-token", "2", "--max-seq-len", "16"]
    assert train_main(args + ["--out", str(run), "--router-z-loss-coef", "0.001"]) == 0
    rows = [m for m in _metrics(run) if "loss" in m]
    assert len(rows) == 4
    for row in rows:
        assert len(row["expert_fraction"]) == 4
        assert sum(row["expert_fraction"]) == pytest.approx(1.0, abs=1e-3)
        assert row["balance_loss"] >= 1.99  # k = 2 is its minimum (n Σ f_i P_i, Σ f = k)
    model, _ = load_ours(run / "checkpoints" / "step_0000004")
    assert len(model.layers[0].feed_forward.experts) == 4
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(run), "--prompt", "To", "--max-new-tokens", "4"]) == 0


def test_expert_and_position_mistakes_give_one_line(tmp_path, text_file, capsys):
    args = TINY + ["--text", str(text_file), "--tokenizer", "char", "--steps", "2"]
    args += ["--max-seq-len", "16", "--eval-every", "0"]
    code, err = run_cli(
        train_main,
        args + ["--out", str(tmp_path / "a"), "--n-experts", "4", "--experts-per-token", "5"],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "experts_per_token (5)" in err[0]
    run = tmp_path / "rope"
    assert train_main(args + ["--out", str(run)]) == 0
    capsys.readouterr()
    code, err = run_cli(
        train_main, args + ["--out", str(run), "--resume", str(run), "--position", "alibi"], capsys
    )
    assert code == 2 and len(err) == 1 and "position" in err[0]
    code, err = run_cli(
        train_main,
        ["--init-from", str(run), "--text", str(text_file), "--position", "alibi"]
        + ["--out", str(tmp_path / "tune"), "--steps", "1"],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "trained with position=rope" in err[0]
