"""Commands: --help, bad input (one line, exit 2), a short run of each stage, and 2-process DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructgpt import dpo, evaluate, pipeline, ppo, reward, sft
from tests.instructgpt.conftest import write_jsonl
from transformer.training import run_command

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {
    "sft": sft,
    "reward": reward,
    "ppo": ppo,
    "dpo": dpo,
    "pipeline": pipeline,
    "evaluate": evaluate,
}
DEMOS = [{"prompt": f"The value {i} is", "response": " a new object."} for i in range(8)]
RANKS = [
    {"prompt": f"The value {i} is", "responses": [" a new object.", " an object.", " not valid."]}
    for i in range(8)
]


def _run(module, argv, capsys):
    code = run_command(module.main, argv, prog=module.__name__)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        COMMANDS[name].main(["--help"])
    assert exit_.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_bad_jsonl_line_empty_prompt_and_short_ranking_exit_2(tmp_path, base_model, capsys):
    bad = write_jsonl(tmp_path / "sft.jsonl", DEMOS[:2] + [{"prompt": "x"}])
    code, err = _run(
        sft,
        [
            "--model",
            str(base_model),
            "--data",
            str(bad),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "sft.jsonl:3: missing field 'response'" in err[0]

    empty = write_jsonl(tmp_path / "empty.jsonl", [{"prompt": "", "response": "r"}])
    code, err = _run(
        sft,
        [
            "--model",
            str(base_model),
            "--data",
            str(empty),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "empty.jsonl:1: field 'prompt' is empty" in err[0]

    short = write_jsonl(tmp_path / "rank.jsonl", [{"prompt": "p", "responses": ["only one"]}])
    code, err = _run(
        reward,
        [
            "--model",
            str(base_model),
            "--data",
            str(short),
            "--out",
            str(tmp_path / "r"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "at least 2 responses" in err[0]


def test_nonpositive_beta_exits_2(tmp_path, base_model, capsys):
    data = write_jsonl(tmp_path / "rank.jsonl", RANKS)
    code, err = _run(
        dpo,
        [
            "--model",
            str(base_model),
            "--data",
            str(data),
            "--beta",
            "0",
            "--out",
            str(tmp_path / "d"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 2 and len(err) == 1 and "DPOConfig.beta must be > 0" in err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_model):
    """A reward model made from the base model by a 2-step reward run."""
    tmp = tmp_path_factory.mktemp("stages")
    data = write_jsonl(tmp / "rank.jsonl", RANKS)
    demos = write_jsonl(tmp / "demos.jsonl", DEMOS)
    code = reward.main(["--model", str(base_model), "--data", str(data), "--eval-data", str(data),
                        "--demonstrations", str(demos), "--steps", "2", "--batch-size", "4",
                        "--out", str(tmp / "rm"), "--device", "cpu"])  # fmt: skip
    assert code == 0
    return tmp


def test_policy_and_reward_model_with_different_tokenizers_exit_2(
    trained, other_tokenizer_model, capsys
):
    code, err = _run(ppo, ["--policy", str(other_tokenizer_model), "--reward-model", str(trained / "rm"),
                           "--out", str(trained / "p"), "--device", "cpu"], capsys)  # fmt: skip
    assert code == 2 and len(err) == 1 and "different tokenizers" in err[0]


def test_reward_normalisation_and_ppo_and_dpo_runs(trained, base_model, capsys):
    summary = json.loads((trained / "rm" / "summary.json").read_text())
    assert 0 <= summary["heldout_accuracy"] <= 1
    # after normalisation the demonstrations score 0 on average
    from instructgpt.checkpoints import load_reward_model
    from instructgpt.data import read_demonstrations
    from instructgpt.reward import mean_score

    rm, tok, _ = load_reward_model(trained / "rm")
    demos = [(d.prompt, d.response) for d in read_demonstrations(trained / "demos.jsonl")]
    assert abs(mean_score(rm, tok, demos, 64, "cpu")) < 1e-4

    prompts = write_jsonl(trained / "prompts.jsonl", [{"prompt": d["prompt"]} for d in DEMOS])
    code = ppo.main(["--policy", str(base_model), "--reward-model", str(trained / "rm"), "--prompts", str(prompts),
                     "--iterations", "2", "--rollout-batch", "8", "--minibatch", "4", "--ppo-epochs", "1",
                     "--max-new-tokens", "8", "--ptx-coef", "0.5", "--adaptive-kl", "--out", str(trained / "ppo"),
                     "--device", "cpu"])  # fmt: skip
    assert code == 0
    rows = [json.loads(x) for x in (trained / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and {
        "score",
        "kl",
        "beta",
        "clip_fraction",
        "value_loss",
        "entropy",
        "approx_kl",
        "ptx_loss",
    } <= set(rows[0])
    assert (trained / "ppo" / "policy" / "model.safetensors").is_file()

    data = write_jsonl(trained / "pairs.jsonl", RANKS)
    code = dpo.main(["--model", str(base_model), "--data", str(data), "--eval-data", str(data), "--steps", "2",
                     "--batch-size", "4", "--out", str(trained / "dpo"), "--device", "cpu"])  # fmt: skip
    assert code == 0
    first = json.loads((trained / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3) and first[
        "chosen_reward"
    ] == pytest.approx(0, abs=1e-5)

    code, _ = _run(evaluate, ["--a", str(trained / "ppo"), "--b", str(base_model), "--prompts", str(prompts),
                              "--samples", "2", "--max-new-tokens", "8", "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_process_gloo_sft_matches_one_process(tmp_path, base_model):
    data = write_jsonl(tmp_path / "demos.jsonl", DEMOS)
    args = ["-m", "instructgpt.sft", "--model", str(base_model), "--data", str(data), "--steps", "3",
            "--batch-size", "4", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29531",
    ]
    two = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two")):
        assert a == pytest.approx(b, rel=1e-4)


def test_tiny_pipeline_runs_every_stage(tmp_path):
    code = pipeline.main(["--config", "tiny", "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["evaluation"]) == {"ppo-beta0.05", "dpo-beta0.1", "dpo-beta0.1-round2"}
    for r in results["evaluation"].values():
        assert 0 <= r["ci_low"] <= r["win_rate"] <= r["ci_high"] <= 1

    # Round 2 of iterative DPO: fresh rankings of round 1's samples, on training prompts only,
    # and DPO continuing from round 1's policy (also its reference).
    def prompts(name):
        return {json.loads(line)["prompt"] for line in (tmp_path / name).open()}

    fresh = prompts("dpo-beta0.1-round2-rankings.jsonl")
    assert fresh and fresh <= prompts("rankings.jsonl")
    assert not fresh & prompts("rankings_heldout.jsonl")
    round2 = json.loads((tmp_path / "dpo-beta0.1-round2" / "config.json").read_text())
    reference = Path(round2["reference_model"]).resolve()
    assert (tmp_path / "dpo-beta0.1").resolve() in reference.parents


def test_tiny_pipeline_under_two_process_torchrun(tmp_path):
    """One torchrun job (gloo) runs the whole pipeline: every process trains each stage with DDP,
    rank 0 alone ranks samples, marks stages done and evaluates."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           "29533", "-m", "instructgpt.pipeline", "--config", "tiny", "--out", str(tmp_path / "two"),
           "--device", "cpu"]  # fmt: skip
    two = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert set(results["evaluation"]) == {"ppo-beta0.05", "dpo-beta0.1", "dpo-beta0.1-round2"}
    assert 0 <= results["reward_model"]["heldout_accuracy"] <= 1
    for stage in ("base", "sft", "reward", "ppo-beta0.05", "dpo-beta0.1", "dpo-beta0.1-round2"):
        assert (tmp_path / "two" / stage / "DONE").is_file()
    # pretraining split each step's windows over the two processes and averaged the gradients:
    # the losses of one process on the whole batch
    pipeline.pretrain(tmp_path / "one", pipeline.PRESETS["tiny"], torch.device("cpu"), seed=0)
    for a, b in zip(_losses(tmp_path / "one"), _losses(tmp_path / "two" / "base")):
        assert a == pytest.approx(b, rel=1e-6)


def test_an_xllama_training_run_is_a_base_model(tmp_path):
    from xllama import train as xllama_train

    base = tmp_path / "xl"
    assert xllama_train.main(["--config", "tiny", "--vocab-size", "300", "--steps", "2", "--batch-size", "2",
                              "--out", str(base), "--device", "cpu"]) in (0, None)  # fmt: skip
    data = write_jsonl(tmp_path / "demos.jsonl", DEMOS)
    assert sft.main(["--model", str(base), "--data", str(data), "--steps", "1", "--batch-size", "2",
                     "--out", str(tmp_path / "sft"), "--device", "cpu"]) == 0  # fmt: skip


# ---- faults: every stage stops at the first non-finite value; binary files are named -----------


def test_ppo_with_an_exploding_learning_rate_stops_with_the_iteration(trained, base_model, capsys):
    """`--lr 1e30` used to end in a multinomial traceback from NaN weights; now the first
    non-finite statistic (the second iteration's policy loss) stops the run, naming it."""
    prompts = write_jsonl(trained / "prompts-nan.jsonl", [{"prompt": d["prompt"]} for d in DEMOS])
    out = trained / "ppo-nan"
    code, err = _run(ppo, ["--policy", str(base_model), "--reward-model", str(trained / "rm"),
                           "--prompts", str(prompts), "--iterations", "3", "--rollout-batch", "4",
                           "--minibatch", "4", "--ppo-epochs", "1", "--max-new-tokens", "6",
                           "--lr", "1e30", "--out", str(out), "--device", "cpu"], capsys)  # fmt: skip
    assert code == 2 and "non-finite" in err[-1] and "at step 2" in err[-1], err
    assert "none written yet" in err[-1]
    assert (
        not list((out / "checkpoints").glob("step_*")) if (out / "checkpoints").exists() else True
    )


@pytest.mark.parametrize("name", ["sft", "reward", "dpo", "ppo", "evaluate"])
def test_a_binary_jsonl_file_is_named_in_one_line(name, trained, base_model, tmp_path, capsys):
    binary = tmp_path / "data.jsonl"
    binary.write_bytes(bytes(range(256)) * 4)
    model, rm = str(base_model), str(trained / "rm")
    argv = {
        "sft": ["--model", model, "--data", str(binary)],
        "reward": ["--model", model, "--data", str(binary)],
        "dpo": ["--model", model, "--data", str(binary)],
        "ppo": ["--policy", model, "--reward-model", rm, "--prompts", str(binary)],
        "evaluate": ["--a", model, "--b", model, "--prompts", str(binary)],
    }[name]
    if name != "evaluate":
        argv += ["--out", str(tmp_path / "o")]
    code, err = _run(COMMANDS[name], [*argv, "--device", "cpu"], capsys)
    assert code == 2 and len(err) == 1, err
    assert str(binary) in err[0] and "not UTF-8" in err[0]
