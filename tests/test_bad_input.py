"""Bad flags and bad files, for every command: one line on stderr naming the mistake, exit status 2,
and no work done. The flags are the ones that once gave a traceback or were silently accepted.

Each case runs the command's `main` in this process through the same `run_command` its console
script uses (a flag refused by the parser exits 2 through argparse). A few cases also run as real
subprocesses at the end, to prove the entry points."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dali import evaluate as dali_evaluate
from dali import sample as dali_sample
from dali import train as dali_train
from dali import txt2img as dali_txt2img
from instructgpt import dpo, pipeline, ppo, reward, sft
from instructgpt import evaluate as igpt_evaluate
from tokenizer import encode as tok_encode
from tokenizer import train as tok_train
from transformer import bert_train
from transformer import train as tr_train
from transformer import translate as tr_translate
from transformer.training import run_command, save_checkpoint
from xllama import Llama, LlamaConfig
from xllama import generate as xl_generate
from xllama import merge as xl_merge
from xllama import train as xl_train

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_COMMANDS = {tok_train, tok_encode}


def _fails(module, argv, capsys) -> str:
    """Run a command; assert exit 2 with exactly one stderr line; return that line."""
    try:
        if module in TOKENIZER_COMMANDS:  # their main wraps itself
            code = module.main(argv)
        else:
            code = run_command(module.main, argv, prog=module.__name__)
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, (code, captured.err[-2000:])
    assert len(lines) == 1, lines
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A directory, a binary file, and checkpoint folders with damaged or foreign config.json."""
    root = tmp_path_factory.mktemp("bad")
    (root / "dir").mkdir()
    (root / "binary").write_bytes(bytes(range(256)) * 8)
    config = LlamaConfig(
        dim=16, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16
    )
    good = {"package": "xllama", "model": config.to_dict(), "tokenizer": None}
    variants = {
        "wrong-type": {**good, "model": {**config.to_dict(), "dim": "sixteen"}},
        "missing-field": {
            **good,
            "model": {k: v for k, v in config.to_dict().items() if k != "dim"},
        },
        "null-model": {**good, "model": None},
        "list": [1, 2, 3],
        "zero-heads": {**good, "model": {**config.to_dict(), "n_heads": 0}},
        "dali": {"package": "dali", "model": {}},
    }
    for name, content in variants.items():
        save_checkpoint(root / name, Llama(config), good)
        (root / name / "config.json").write_text(json.dumps(content))
    save_checkpoint(root / "binary-config", Llama(config), good)
    (root / "binary-config" / "config.json").write_bytes(bytes(range(256)))
    save_checkpoint(root / "good", Llama(config), good)
    (root / "broken.json").write_text("{")
    (root / "list.json").write_text("[1, 2]")
    return root


OUT = ["--out", "unused-out"]  # refused before anything is written

FLAGS = [
    # xllama.train: model and training configs
    (xl_train, ["--n-heads", "0", *OUT], "LlamaConfig.n_heads must be > 0"),
    (xl_train, ["--dim", "-32", *OUT], "LlamaConfig.dim must be > 0"),
    (xl_train, ["--dropout", "1.5", *OUT], "LlamaConfig.dropout must be in [0, 1)"),
    (xl_train, ["--n-kv-heads", "4", "--n-heads", "6", *OUT], "multiple of n_kv_heads"),
    (xl_train, ["--lr", "nan", *OUT], "TrainConfig.lr must be a finite number"),
    (xl_train, ["--beta1", "2", *OUT], "TrainConfig.beta1 must be in [0, 1)"),
    (xl_train, ["--batch-size", "0", *OUT], "TrainConfig.batch_size must be > 0"),
    (xl_train, ["--warmup-steps", "-1", *OUT], "TrainConfig.warmup_steps must be >= 0"),
    (xl_train, ["--val-fraction", "0", *OUT], "TrainConfig.val_fraction must be in (0, 1)"),
    (xl_train, ["--device", "tpu", *OUT], "invalid choice: 'tpu'"),
    (xl_train, ["--steps", "5"], "--out DIR is required"),
    # transformer.train
    (tr_train, ["--n-heads", "0", *OUT], "TransformerConfig.n_heads must be > 0"),
    (tr_train, ["--d-model", "30", *OUT], "must be divisible by n_heads"),
    (tr_train, ["--warmup-steps", "0", *OUT], "TrainConfig.warmup_steps must be > 0"),
    (tr_train, ["--label-smoothing", "nan", *OUT], "TrainConfig.label_smoothing must be"),
    (tr_train, ["--lr-scale", "-1", *OUT], "TrainConfig.lr_scale must be > 0"),
    (tr_train, ["--target-exact-match", "2", *OUT], "target_exact_match must be in [0, 1]"),
    (tr_train, ["--activation", "swish", *OUT], "activation 'swish' is not one of relu, gelu"),
    (bert_train, ["--mask-prob", "0", *OUT], "mask_prob must be in (0, 1)"),
    (bert_train, ["--seq-len", "600", "--config", "base", *OUT], "longer than the position table"),
    (bert_train, ["--negatives", "easy", *OUT], "negatives must be hard or random"),
    (bert_train, ["--task", "pairs", *OUT], "--task pairs needs --src and --tgt"),
    (bert_train, ["--n-heads", "5", *OUT], "must be divisible by n_heads"),
    # dali.train
    (dali_train, ["--attention-heads", "3", *OUT], "do not split into attention_heads 3"),
    (dali_train, ["--ema-decay", "2", *OUT], "TrainConfig.ema_decay must be in [0, 1]"),
    (dali_train, ["--init", "xavier", *OUT], "UNetConfig.init must be ddpm or torch"),
    (dali_train, ["--p-uncond", "1.5", *OUT], "TrainConfig.p_uncond must be in [0, 1]"),
    (dali_train, ["--num-classes", "-1", *OUT], "UNetConfig.num_classes must be >= 0"),
    (dali_train, ["--steps", "-1", *OUT], "TrainConfig.steps must be > 0"),
    (dali_train, ["--dropout", "1.5", *OUT], "UNetConfig.dropout must be in [0, 1)"),
    (dali_train, ["--beta-end", "2", *OUT], "beta_end < 1"),
    (dali_train, ["--timesteps", "0", *OUT], "DiffusionConfig.timesteps must be > 0"),
    (dali_train, ["--eval-sampler", "euler", *OUT], "invalid choice: 'euler'"),
    # samplers and decoders: command-only numbers
    (dali_sample, ["--checkpoint", "x", "--eta", "nan"], "argument --eta: must be a finite number"),
    (dali_sample, ["--checkpoint", "x", "--steps", "-1"], "argument --steps: must be at least 1"),
    (dali_sample, ["--checkpoint", "x", "--n", "0"], "argument --n: must be at least 1"),
    (dali_evaluate, ["--checkpoint", "x", "--n", "0"], "argument --n: must be at least 1"),
    (dali_evaluate, ["--checkpoint", "x", "--guidance", "-0.5"], "argument --guidance: must be"),
    (
        dali_txt2img,
        ["--checkpoint", "x", "--prompt", "p", "--guidance", "-1"],
        "argument --guidance: must be",
    ),
    (
        dali_txt2img,
        ["--checkpoint", "x", "--prompt", "p", "--steps", "0"],
        "argument --steps: must be at least 1",
    ),
    (tr_translate, ["--checkpoint", "x", "--beam", "0"], "argument --beam: must be at least 1"),
    (
        tr_translate,
        ["--checkpoint", "x", "--average", "0"],
        "argument --average: must be at least 1",
    ),
    (tr_translate, ["--checkpoint", "x", "--alpha", "nan"], "argument --alpha: must be a finite"),
    (xl_generate, ["--checkpoint", "x", "--temperature", "nan"], "--temperature: must be a finite"),
    (xl_generate, ["--checkpoint", "x", "--temperature", "inf"], "--temperature: must be a finite"),
    (xl_generate, ["--checkpoint", "x", "--max-new-tokens", "-1"], "--max-new-tokens: must be at"),
    (xl_generate, ["--checkpoint", "x", "--top-p", "0"], "--top-p: must be a finite number in (0"),
    (xl_generate, ["--checkpoint", "x", "--top-k", "0"], "--top-k: must be at least 1"),
    (xl_generate, ["--checkpoint", "x", "--system", "Hi"], "--system is the opening message of"),
    (xl_generate, ["--checkpoint", "x", "--chat", "llama4"], "--chat: invalid choice: 'llama4'"),
    (xl_merge, ["--checkpoint", "x", "--out", "y", "--format", "gguf"], "invalid choice: 'gguf'"),
    (xl_train, ["--lora-rank", "4", *OUT], "--lora-rank fine-tunes a trained model"),
    (xl_train, ["--lora-alpha", "nan", *OUT], "LoRAConfig.lora_alpha must be a finite"),
    (xl_train, ["--quantize", "int4", *OUT], "invalid choice: 'int4'"),
    # instructgpt stages: configs are checked before any model is loaded
    (sft, ["--model", "x", "--steps", "0", *OUT], "SFTConfig.steps must be > 0"),
    (sft, ["--model", "x", "--lr", "nan", *OUT], "SFTConfig.lr must be a finite number"),
    (sft, ["--model", "x", "--padding-side", "up", *OUT], "invalid choice: 'up'"),
    (reward, ["--model", "x", "--max-len", "0", *OUT], "RewardConfig.max_len must be > 0"),
    (reward, ["--model", "x", "--k", "1", *OUT], "RewardConfig.k must be at least 2"),
    (ppo, ["--policy", "x", "--reward-model", "y", "--clip", "nan", *OUT], "PPOConfig.clip must"),
    (
        ppo,
        ["--policy", "x", "--reward-model", "y", "--iterations", "-1", *OUT],
        "iterations must be > 0",
    ),
    (
        ppo,
        ["--policy", "x", "--reward-model", "y", "--kl-target", "0", *OUT],
        "kl_target must be > 0",
    ),
    (
        ppo,
        ["--policy", "x", "--reward-model", "y", "--gamma", "2", *OUT],
        "gamma must be in [0, 1]",
    ),
    (
        ppo,
        ["--policy", "x", "--reward-model", "y", "--value-init", "z", *OUT],
        "invalid choice: 'z'",
    ),
    (
        ppo,
        ["--policy", "x", "--reward-model", "y", "--checkpoint-every", "-1", *OUT],
        "must be at least 0",
    ),
    (dpo, ["--model", "x", "--beta", "0", *OUT], "DPOConfig.beta must be > 0"),
    (
        dpo,
        ["--model", "x", "--label-smoothing", "0.5", *OUT],
        "label_smoothing must be in [0, 0.5)",
    ),
    (pipeline, ["--dpo-rounds", "0", *OUT], "PipelineConfig.dpo_rounds must be > 0"),
    (pipeline, ["--ppo-betas", "0.1", "-1", *OUT], "PPOConfig.beta must be > 0, got -1.0"),
    (pipeline, ["--dpo-betas", "nan", *OUT], "dpo_betas must be a list, each item a finite"),
    (pipeline, ["--n-heads", "5", *OUT], "dim (96) must be divisible by n_heads (5)"),
    (pipeline, ["--max-new-tokens", "64", *OUT], "leaves no room for a prompt"),
    (pipeline, ["--k", "1", *OUT], "PipelineConfig.k must be at least 2"),
    (pipeline, ["--config", "huge", *OUT], "unknown config 'huge'"),
    (igpt_evaluate, ["--a", "x", "--b", "y", "--samples", "0"], "--samples: must be at least 1"),
    # the tokenizer's own commands
    (tok_train, ["--vocab-size", "10", *OUT], "vocab"),
    (tok_encode, ["--tokenizer", "x", "--out", "o.bin"], "required: --input"),
]


@pytest.mark.parametrize(
    "module, argv, message",
    FLAGS,
    ids=[f"{m.__name__}:{' '.join(a[:2])}" for m, a, _ in FLAGS],
)
def test_a_bad_flag_is_one_line_and_exit_2(module, argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _fails(module, argv, capsys)
    assert message in line, line
    assert not (tmp_path / "unused-out").exists()  # refused before any work


@pytest.mark.parametrize(
    "variant, message",
    [
        ("wrong-type", "LlamaConfig.dim must be int, got 'sixteen'"),
        ("missing-field", "is not a LlamaConfig: missing dim"),
        ("null-model", "expected a JSON object of LlamaConfig fields, got None"),
        ("list", "expected a JSON object, got list"),
        ("zero-heads", "LlamaConfig.n_heads must be > 0, got 0"),
        ("binary-config", "not JSON text"),
        ("dali", "is a checkpoint of the 'dali' package, not an xllama model"),
    ],
)
def test_a_damaged_or_foreign_checkpoint_config_is_one_line(files, variant, message, capsys):
    line = _fails(xl_generate, ["--checkpoint", str(files / variant)], capsys)
    assert message in line and str(files / variant) in line, line


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (xl_train, ["--data", "{dir}"], "is a directory; expected a token file"),
        (xl_train, ["--text", "{dir}"], "input is a directory, not a file"),
        (xl_train, ["--text", "{binary}"], "is not UTF-8 text"),
        (xl_train, ["--text", "{dir}/missing.txt"], "input file not found"),
        (tr_train, ["--src", "{dir}", "--tgt", "{dir}"], "is a directory; expected a text file"),
        (tr_train, ["--src", "{binary}", "--tgt", "{binary}"], "is not UTF-8 text"),
        (dali_train, ["--data", "mnist:{binary}"], "MNIST directory is a file, not a directory"),
        (dali_sample, ["--checkpoint", "{dir}", "--out", "{dir}/x.png"], "no checkpoint found"),
        (
            dali_txt2img,
            ["--checkpoint", "{dir}", "--prompt", "p", "--out", "{dir}/x.png"],
            "no model_index.json",
        ),
        (tr_translate, ["--checkpoint", "{binary-config}"], "not JSON text"),
        (xl_merge, ["--checkpoint", "{binary-config}", "--out", "{dir}/m"], "not JSON text"),
        (xl_merge, ["--checkpoint", "{dir}", "--out", "{dir}/m"], "is not a checkpoint"),
        (tok_train, ["--input", "{binary}"], "is not UTF-8 text"),
        (
            xl_generate,
            ["--checkpoint", "{good}", "--tokenizer", "{broken}"],
            "cannot read tokenizer",
        ),
        (
            xl_generate,
            ["--checkpoint", "{good}", "--tokenizer", "{list}"],
            "not a Hugging Face BPE",
        ),
        (
            tok_encode,
            ["--tokenizer", "{list}", "--input", "{binary}", "--out", "{dir}/x.bin"],
            "not a Hugging Face BPE",
        ),  # fmt: skip
        (
            tok_encode,
            ["--tokenizer", "llama3", "--input", "{binary}", "--out", "{dir}/x.bin"],
            "llama3 is not a tiktoken download",
        ),  # fmt: skip
        (
            tok_encode,
            ["--tokenizer", "{binary}", "--input", "{binary}", "--out", "{dir}/x.bin"],
            "binary",
        ),
    ],
)
def test_a_bad_file_is_named_in_one_line(files, module, argv, message, capsys, tmp_path):
    argv = [a.format(dir=files / "dir", binary=files / "binary", good=files / "good",
                     broken=files / "broken.json", list=files / "list.json",
                     **{"binary-config": files / "binary-config"}) for a in argv]  # fmt: skip
    if module in (xl_train, tr_train, dali_train, tok_train):
        argv += ["--out", str(tmp_path / "out")]
    line = _fails(module, argv, capsys)
    assert message in line, line


def test_a_truncated_sentencepiece_model_says_so(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from tokenizer import SentencePieceTokenizer, TokenizerFileError

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"),
                                   vocab_size=40, model_type="bpe")  # fmt: skip
    data = (tmp_path / "m.model").read_bytes()
    # Cut the file right after the pieces, before the trainer spec: every field parses.
    cut = data.index(b"\x12", len(data) // 3)  # first TrainerSpec key byte after the pieces
    while data[cut - 1] > 0x7F:  # make sure it is a field start, not inside a varint
        cut = data.index(b"\x12", cut + 1)
    (tmp_path / "cut.model").write_bytes(data[:cut])
    with pytest.raises(TokenizerFileError, match="truncated or damaged|damaged protobuf") as err:
        SentencePieceTokenizer(tmp_path / "cut.model")
    assert "model of type" not in str(err.value)


def test_sampling_refuses_nan_rows_and_handles_extreme_logits():
    """±inf, NaN, 1e38, fp16 and bf16 logits: a token from a NaN or all −inf row is never emitted;
    +inf rows sample among their +inf entries; huge finite logits do not overflow."""
    from xllama.model import XLlamaError
    from xllama.sampling import sample_next

    inf = float("inf")
    g = torch.Generator().manual_seed(0)
    for temperature in (0.0, 0.7, 1.0):
        with pytest.raises(XLlamaError, match=r"row\(s\) \[1\]"):
            sample_next(torch.tensor([[0.0, 1.0], [float("nan"), 1.0]]), temperature, generator=g)
        with pytest.raises(XLlamaError, match="NaN or all -inf"):
            sample_next(torch.tensor([[-inf, -inf]]), temperature, generator=g)
        # +inf entries share all the mass; -inf entries get none.
        draws = torch.stack([sample_next(torch.tensor([[inf, 0.0, inf, -inf]]), temperature,
                                         generator=g) for _ in range(200)])  # fmt: skip
        assert set(draws.flatten().tolist()) <= {0, 2}
        # 1e38 logits (x / 0.7 overflows float32 without the max subtraction).
        huge = torch.tensor([[1e38, -1e38, 1e38]])
        assert set(torch.stack([sample_next(huge, temperature, generator=g)
                                for _ in range(100)]).flatten().tolist()) <= {0, 2}  # fmt: skip
    for dtype in (torch.float16, torch.bfloat16):
        logits = torch.tensor([[0.0, 8.0, -inf, 2.0]], dtype=dtype)
        assert sample_next(logits, 0.0).item() == 1
        probs_ok = {sample_next(logits, 1.0, generator=g).item() for _ in range(300)}
        assert 2 not in probs_ok and 1 in probs_ok
        with pytest.raises(XLlamaError):
            sample_next(torch.tensor([[float("nan"), 1.0]], dtype=dtype), 0.0)


@pytest.mark.parametrize(
    "command, message",
    [
        (["xllama.train", "--n-heads", "0", "--out", "o"], "LlamaConfig.n_heads must be > 0"),
        (["dali.sample", "--checkpoint", "x", "--eta", "nan"], "--eta: must be a finite"),
        (["instructgpt.pipeline", "--dpo-rounds", "0", "--out", "o"], "dpo_rounds must be > 0"),
    ],
)
def test_the_real_entry_points_print_one_line(command, message, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
