"""Fine-tuning end to end on tiny settings: `xllama.train --init-from` with and without LoRA, the
adapters it writes, `xllama.generate --adapter`, `xllama.merge` (ours and HF format), and the
refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from transformer.lora import LoRALinear
from transformer.training import run_command
from xllama.convert import load_checkpoint, load_ours
from xllama.generate import main as generate_main
from xllama.merge import main as merge_main
from xllama.train import main as train_main

TEXT = "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n" * 40
TINY = ["--config", "tiny", "--device", "cpu", "--sample-tokens", "0", "--checkpoint-every", "0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    run = tmp_path_factory.mktemp("base")
    args = TINY + ["--vocab-size", "300", "--max-seq-len", "32", "--steps", "4"]
    assert train_main(args + ["--out", str(run)]) == 0
    return run


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "shakespeare.txt"
    path.write_text(TEXT)
    return path


def _command(main, argv) -> int:
    """A command's exit status as its console script gives it (argparse errors exit 2 too)."""
    try:
        return run_command(main, argv)
    except SystemExit as exit:
        return exit.code


def _greedy(checkpoint, capsys, *extra):
    capsys.readouterr()
    args = ["--checkpoint", str(checkpoint), "--prompt", "Now is", "--temperature", "0"]
    assert generate_main(args + ["--max-new-tokens", "12", "--no-stream", *extra]) == 0
    return capsys.readouterr().out


def test_lora_fine_tune_trains_adapters_only_and_merges_exactly(
    tmp_path, pretrained, text_file, capsys
):
    run = tmp_path / "lora"
    args = TINY + ["--init-from", str(pretrained), "--text", str(text_file), "--steps", "6"]
    args += ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2", "--out", str(run)]
    assert train_main(args) == 0
    log = capsys.readouterr().out
    assert "LoRA r=4 α=8 on wq, wk, wv, wo: 1,792 trainable parameters" in log
    config = json.loads((run / "config.json").read_text())
    assert config["lora"]["lora_rank"] == 4 and config["init_from"] == str(pretrained)
    assert (run / "tokenizer.bpe").is_file()  # the base's tokenizer, kept with the run

    # The base weights did not move; only the adapters did.
    base, _ = load_ours(pretrained / "checkpoints" / "step_0000004")
    tuned = load_file(str(run / "checkpoints" / "step_0000006" / "model.safetensors"))
    for name, tensor in base.state_dict().items():
        if name in tuned:
            assert torch.equal(tuned[name], tensor), name
    assert any(tuned[k].abs().sum() > 0 for k in tuned if k.endswith("lora_B"))
    assert sorted(p.name for p in (run / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert (run / "adapter-peft" / "adapter_config.json").is_file()

    # Three ways to the same tuned model give the same greedy text: the run itself, the base with
    # the adapter directory, and the merged checkpoint.
    from_run = _greedy(run, capsys)
    from_adapter = _greedy(pretrained, capsys, "--adapter", str(run / "adapter"))
    merged = tmp_path / "merged"
    assert merge_main(["--checkpoint", str(run), "--out", str(merged)]) == 0
    from_merged = _greedy(merged, capsys)
    assert from_run == from_adapter == from_merged
    assert from_run != _greedy(pretrained, capsys)  # and it is not the base model's
    model, _, _ = load_checkpoint(merged)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())

    hf = tmp_path / "hf"
    assert merge_main(["--checkpoint", str(run), "--out", str(hf), "--format", "hf"]) == 0
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()


def test_full_fine_tune_from_a_run_keeps_its_tokenizer(tmp_path, pretrained, text_file):
    run = tmp_path / "full"
    args = TINY + ["--init-from", str(pretrained), "--text", str(text_file), "--steps", "2"]
    assert train_main(args + ["--out", str(run)]) == 0
    model, _ = load_ours(run / "checkpoints" / "step_0000002")
    assert model.config == load_ours(pretrained / "checkpoints" / "step_0000004")[0].config


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-rank", "4"], "give --init-from"),
        (["--init-from", "{base}", "--dim", "64"], "--dim: the model's shape comes from"),
        (["--init-from", "{base}", "--lora-rank", "2", "--lora-targets", "q_proj"],
         "match no linear layer; the model's are: output, w1, w2, w3, wk, wo, wq, wv"),
        (["--init-from", "{base}", "--lora-rank", "-1"], "lora_rank must be >= 0"),
        (["--init-from", "{base}", "--lora-rank", "2", "--lora-alpha", "0"], "lora_alpha must be > 0"),
        (["--init-from", "{base}", "--tokenizer", "char"], "a fine-tune keeps its own"),
        (["--init-from", "{base}", "--quantize", "nf4"], "freezes the base: give --lora-rank"),
    ],
)  # fmt: skip
def test_fine_tune_refusals_are_one_line(tmp_path, pretrained, text_file, capsys, extra, message):
    args = TINY + ["--text", str(text_file), "--steps", "1", "--out", str(tmp_path / "r")]
    args += [a.replace("{base}", str(pretrained)) for a in extra]
    code = _command(train_main, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_lora_run_resumes_exactly(tmp_path, pretrained, text_file):
    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    args = TINY + ["--init-from", str(pretrained), "--text", str(text_file), "--steps", "6"]
    args += ["--lora-rank", "2", "--lora-dropout", "0.1", "--checkpoint-every", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_main(args + ["--out", str(straight)]) == 0
    assert train_main(args + ["--out", str(split)]) == 0
    import shutil

    shutil.rmtree(split / "checkpoints" / "step_0000006")  # as if killed after step 3
    (split / "checkpoints" / "latest").write_text("step_0000003\n")
    assert train_main(args + ["--out", str(split), "--resume", str(split)]) == 0
    assert losses(split) == losses(straight)


def test_qlora_fine_tune_stores_an_nf4_base_and_merges_only_when_dequantised(
    tmp_path, pretrained, text_file, capsys
):
    run = tmp_path / "qlora"
    args = TINY + ["--init-from", str(pretrained), "--text", str(text_file), "--steps", "4"]
    args += ["--lora-rank", "4", "--quantize", "nf4", "--lr", "1e-2", "--out", str(run)]
    assert train_main(args) == 0
    assert "base in nf4" in capsys.readouterr().out
    saved = load_file(str(run / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert saved["layers.0.attention.wq.base.packed"].dtype == torch.uint8
    assert saved["output.weight"].dtype == torch.float32  # the head stays in float
    from_run = _greedy(run, capsys)
    merged = tmp_path / "merged"
    import sys

    from xllama.merge import cli

    argv, sys.argv = sys.argv, ["xllama.merge", "--checkpoint", str(run), "--out", str(merged)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli()
    finally:
        sys.argv = argv
    assert exit_info.value.code == 2
    assert "nf4-quantised base: merging needs --dequantize" in capsys.readouterr().err
    assert merge_main(["--checkpoint", str(run), "--out", str(merged), "--dequantize"]) == 0
    assert _greedy(merged, capsys) == from_run


def test_two_process_qlora_fine_tune_matches_one_process(tmp_path, pretrained, text_file):
    """DDP over the adapters only (the NF4 base is frozen): gloo on CPU, same losses."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    common = ["-m", "xllama.train", *TINY, "--init-from", str(pretrained), "--text", str(text_file)]
    common += ["--steps", "3", "--batch-size", "4", "--eval-every", "0", "--lora-rank", "2"]
    common += ["--quantize", "nf4"]
    one = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    two = subprocess.run([*torchrun, "--master-port", "29541", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return torch.tensor([r["loss"] for r in rows if "loss" in r])

    torch.testing.assert_close(
        losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-4, atol=1e-5
    )


@pytest.mark.slow
def test_lora_benchmark_smoke(tmp_path):
    """benchmarks/lora.py end to end at tiny sizes (nine training processes: slow)."""
    from benchmarks.lora import main

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert main(["--smoke", "--text", str(text), "--steps", "3", "--out", str(tmp_path)]) == 0
