"""transformer.bert_train end to end on tiny settings: pretraining (with and without NSP), exact
resume, two processes, fine-tuning from a pretraining run, and bad input."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenizer.data import embedded_corpus
from transformer import bert_train

REPO = Path(__file__).resolve().parents[2]
TINY = (
    "--device cpu --config tiny --d-model 32 --n-layers 1 --n-heads 2 --d-ff 64 --max-len 32 "
    "--seq-len 32 --batch-size 4 --wordpiece-vocab-size 300 --eval-batches 2 --eval-every 3 "
    "--warmup-steps 2 --dropout 0.1"
).split()


def _text(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(embedded_corpus().splitlines()[:1500]))
    return path


def _records(run_dir, key):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x[key] for x in lines if key in x]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    out = tmp / "run"
    args = [*TINY, "--text", str(_text(tmp)), "--steps", "6", "--checkpoint-every", "3"]
    assert bert_train.main([*args, "--out", str(out)]) == 0
    return out


def test_pretraining_writes_a_run_with_masked_lm_metrics(pretrained, capsys):
    assert (pretrained / "vocab.txt").is_file()
    assert len(list((pretrained / "checkpoints").glob("step_*"))) == 2
    assert len(_records(pretrained, "mlm_loss")) == 6 and _records(pretrained, "valid_mlm_acc")
    config = json.loads((pretrained / "config.json").read_text())
    assert config["task"] == "mlm" and config["package"] == "transformer.bert"


def test_resume_continues_exactly(tmp_path):
    """Resuming the step-4 checkpoint of a 6-step run gives that run's losses for steps 5 and 6
    (weights, optimizer, RNG and the data generator restored)."""
    common = [*TINY, "--text", str(_text(tmp_path)), "--checkpoint-every", "2", "--steps", "6"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert bert_train.main([*common, "--out", str(straight)]) == 0
    checkpoint = straight / "checkpoints" / "step_0000004"
    assert bert_train.main([*common, "--out", str(resumed), "--resume", str(checkpoint)]) == 0
    assert len(_records(resumed, "mlm_loss")) == 6
    assert _records(resumed, "mlm_loss") == _records(straight, "mlm_loss")


def test_next_sentence_prediction_option(tmp_path):
    out = tmp_path / "nsp"
    args = [*TINY, "--text", str(_text(tmp_path)), "--steps", "3", "--nsp"]
    assert bert_train.main([*args, "--out", str(out)]) == 0
    assert len(_records(out, "nsp_loss")) == 3 and _records(out, "valid_nsp_loss")


def test_two_process_gloo_run_matches_one(tmp_path):
    text = _text(tmp_path)
    args = [*TINY, "--text", text, "--steps", "3", "--dropout", "0", "--attention-dropout", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "transformer.bert_train", *map(str, args)]
    assert subprocess.run([*cmd, "--out", str(one)], env=env, capture_output=True).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", "29537", "-m", "transformer.bert_train"]  # fmt: skip
    result = subprocess.run([*torchrun, *map(str, args), "--out", str(two)], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(
        torch.tensor(_records(two, "mlm_loss")), torch.tensor(_records(one, "mlm_loss")),
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip


def _pairs(tmp_path):
    en = [
        f"a {c} dog runs on the {p} grass"
        for c in ("black", "white", "brown")
        for p in ("green", "wet", "dry")
    ]
    de = [
        f"ein {c} hund rennt auf dem {p} gras"
        for c in ("schwarzer", "weisser", "brauner")
        for p in ("grünen", "nassen", "trockenen")
    ]
    paths = []
    for name, lines in (("a.en.gz", en * 4), ("a.de.gz", de * 4)):
        with gzip.open(tmp_path / name, "wt") as f:
            f.write("\n".join(lines) + "\n")
        paths.append(tmp_path / name)
    return paths


def test_fine_tuning_from_a_pretraining_run(pretrained, tmp_path):
    en, de = _pairs(tmp_path)
    out = tmp_path / "pairs"
    args = ["--task", "pairs", "--src", str(en), "--tgt", str(de), "--init-from", str(pretrained),
            "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--device", "cpu"]  # fmt: skip
    assert bert_train.main([*args, "--out", str(out)]) == 0
    assert (
        _records(out, "valid_acc")
        and (out / "vocab.txt").read_text() == (pretrained / "vocab.txt").read_text()
    )
    # The classifier's encoder started from the pretrained weights: its embeddings moved little.
    from transformer.bert import Bert, BertClassifier, BertConfig
    from transformer.training import config_from_dict, load_weights

    config = config_from_dict(
        BertConfig, json.loads((pretrained / "config.json").read_text())["model"], "x"
    )
    base, tuned = Bert(config), BertClassifier(Bert(config))
    load_weights(pretrained / "checkpoints" / "step_0000006", base)
    load_weights(out / "checkpoints" / "step_0000004", tuned)
    drift = (tuned.bert.embeddings.tokens.weight - base.embeddings.tokens.weight).abs().max()
    assert drift < 0.05


def test_bad_input_gives_one_line_and_exit_2(pretrained, tmp_path, capsys):
    from transformer.training import run_command

    def fails(args, message):
        capsys.readouterr()
        assert (
            run_command(bert_train.main, [*args, "--out", str(tmp_path / "x"), "--overwrite"]) == 2
        )
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err

    text = str(_text(tmp_path))
    fails([*TINY, "--text", text, "--mask-prob", "1.5"], "mask_prob must be in (0, 1)")
    fails([*TINY, "--text", text, "--seq-len", "64"], "longer than the position table")
    no_unk = tmp_path / "vocab.txt"
    no_unk.write_text("[PAD]\n[CLS]\n[SEP]\n[MASK]\nthe\n")
    fails([*TINY, "--text", text, "--vocab", str(no_unk)], "no [UNK]")
    en, de = _pairs(tmp_path)
    fails(["--task", "pairs", "--src", str(en), "--tgt", str(de), "--init-from", str(tmp_path)],
          "no checkpoint found")  # fmt: skip
    fails(["--task", "pairs", "--src", str(en)], "needs --src and --tgt")
    fails(["--task", "pairs", "--src", str(en), "--tgt", str(de), "--init-from", str(pretrained),
           "--d-model", "64"], "shape comes from --init-from")  # fmt: skip
