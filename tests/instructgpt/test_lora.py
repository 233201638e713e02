"""The RLHF stages with LoRA policies: the reference is the policy's base with its adapters off
(no copy), equal to a separate frozen copy; every stage takes --lora-rank end to end, and the next
stage reads its model back merged."""

import copy
import json

import torch

from instructgpt import dpo, ppo, reward, sft
from instructgpt.checkpoints import load_policy, load_reward_model
from instructgpt.model import sequence_logprobs
from instructgpt.stage import AdaptersOff
from transformer.lora import LoRALinear, add_lora

from .conftest import write_jsonl
from .test_cli import DEMOS, RANKS

LORA = ["--lora-rank", "2", "--lora-alpha", "4", "--device", "cpu"]


def test_adapters_off_reference_equals_a_separate_frozen_copy(base_model):
    policy, tokenizer, _ = load_policy(base_model)
    frozen = copy.deepcopy(policy).eval()
    add_lora(policy, ["wq", "wk", "wv", "wo"], rank=2, alpha=4.0, dropout=0.1)
    g = torch.Generator().manual_seed(0)
    for m in policy.modules():
        if isinstance(m, LoRALinear):
            m.lora_B.data = torch.randn(m.lora_B.shape, generator=g)
    policy.train()  # as during a DPO or PPO step: dropout on, adapters on
    tokens = torch.randint(0, tokenizer.vocab_size, (3, 12), generator=g)
    attention = torch.ones_like(tokens)
    response = torch.zeros_like(tokens)
    response[:, 5:] = 1
    reference = AdaptersOff(policy)
    ours = reference(tokens, attention_mask=attention)
    with torch.no_grad():
        theirs = frozen(tokens, attention_mask=attention)
    torch.testing.assert_close(ours, theirs)
    ours, _ = sequence_logprobs(reference, tokens, attention, response)
    theirs, _ = sequence_logprobs(frozen, tokens, attention, response)
    torch.testing.assert_close(ours, theirs)
    assert policy.training  # the policy goes back to training mode
    with torch.no_grad():
        adapted, _ = sequence_logprobs(policy.eval(), tokens, attention, response)
    assert not torch.allclose(adapted, theirs)  # and its adapters are back on


def test_every_stage_trains_lora_adapters_and_hands_on_a_merged_model(tmp_path, base_model):
    demos = write_jsonl(tmp_path / "demos.jsonl", DEMOS)
    ranks = write_jsonl(tmp_path / "rank.jsonl", RANKS)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": d["prompt"]} for d in DEMOS])

    assert sft.main(["--model", str(base_model), "--data", str(demos), "--steps", "2",
                     "--batch-size", "4", "--out", str(tmp_path / "sft"), *LORA]) == 0  # fmt: skip
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["lora"]["lora_rank"] == 2
    base, _, _ = load_policy(base_model)
    tuned, _, _ = load_policy(tmp_path / "sft")  # merged: a plain model, every weight trainable
    assert not any(isinstance(m, LoRALinear) for m in tuned.modules())
    assert all(p.requires_grad for p in tuned.parameters())
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(".attention.w" in k for k in changed)  # only adapted matrices moved

    assert reward.main(["--model", str(tmp_path / "sft"), "--data", str(ranks), "--eval-data",
                        str(ranks), "--demonstrations", str(demos), "--steps", "2", "--batch-size",
                        "4", "--out", str(tmp_path / "rm"), *LORA]) == 0  # fmt: skip
    rm, _, _ = load_reward_model(tmp_path / "rm")
    assert rm.head.weight.abs().sum() > 0  # the head trained beside the adapters

    assert dpo.main(["--model", str(tmp_path / "sft"), "--data", str(ranks), "--steps", "2",
                     "--batch-size", "4", "--out", str(tmp_path / "dpo"), *LORA]) == 0  # fmt: skip
    first = json.loads((tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["margin"]) < 1e-6  # step 1: the policy is its reference (B = 0)

    assert ppo.main(["--policy", str(tmp_path / "sft"), "--reward-model", str(tmp_path / "rm"),
                     "--prompts", str(prompts), "--iterations", "1", "--rollout-batch", "4",
                     "--minibatch", "4", "--ppo-epochs", "1", "--max-new-tokens", "6",
                     "--out", str(tmp_path / "ppo"), *LORA]) == 0  # fmt: skip
    policy, _, _ = load_policy(tmp_path / "ppo")
    assert not any(isinstance(m, LoRALinear) for m in policy.modules())


def test_tiny_pipeline_with_lora_policies(tmp_path):
    """The policies train adapters; the reward model trains fully unless asked."""
    from instructgpt import pipeline

    args = ["--config", "tiny", "--out", str(tmp_path), "--lora-rank", "2", "--device", "cpu"]
    assert pipeline.main(args) == 0
    for stage in ("sft", "ppo-beta0.05", "dpo-beta0.1", "dpo-beta0.1-round2"):
        config = json.loads((tmp_path / stage / "config.json").read_text())
        assert config["lora"]["lora_rank"] == 2, stage
    assert "lora" not in json.loads((tmp_path / "reward" / "config.json").read_text())
    sft, _, _ = load_policy(tmp_path / "sft")
    reward, _, _ = load_reward_model(tmp_path / "reward")
    # Trained fully: the change from the SFT weights is not a rank-2 LoRA update merged in.
    delta = reward.backbone.layers[0].attention.wq.weight - sft.layers[0].attention.wq.weight
    assert torch.linalg.matrix_rank(delta) > 2
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["evaluation"]) == {"ppo-beta0.05", "dpo-beta0.1", "dpo-beta0.1-round2"}
