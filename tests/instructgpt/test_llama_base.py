"""A Llama release directory as instructgpt's base model (the tiny Llama 3 of tests/conftest.py, in
Hugging Face's and Meta's form): its tokenizer and BOS come along, the SFT loss is the
cross-entropy that Hugging Face's model gives the same tokens, and every stage, with LoRA, runs
from it and hands its output to the next."""

import json

import pytest
import torch
import torch.nn.functional as F

from instructgpt import dpo, evaluate, ppo, reward, sft
from instructgpt.checkpoints import load_policy, load_reward_model
from instructgpt.data import collate, encode_pair
from instructgpt.model import sft_loss
from tests.conftest import BOS, EOS
from tests.instructgpt.conftest import write_jsonl

transformers = pytest.importorskip("transformers")

# Dialogs as TRL writes them (conversational prompts, the assistant's messages as responses).
ASK = [[{"role": "user", "content": f"What is the value {i}?"}] for i in range(8)]
DEMOS = [
    {"prompt": a, "response": [{"role": "assistant", "content": "A new object."}]} for a in ASK
]
RANKS = [{"prompt": a, "chosen": "A new object.", "rejected": "Not valid."} for a in ASK]


DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not"}]
# Meta's model card: the Llama 3 Instruct prompt, and the answer as the model is trained to end it.
DIALOG_TEXT = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nTo be, or not<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n")  # fmt: skip


@pytest.mark.parametrize("kind", ["hf", "meta"])
@pytest.mark.parametrize("form", ["text", "dialog"])
def test_sft_loss_on_a_llama_release_is_hugging_faces_cross_entropy(llama3, kind, form):
    policy, tokenizer, _ = load_policy(llama3[kind])
    hf_tokenizer = llama3["hf_tokenizer"]
    response = " to be: that is the question"
    if form == "text":
        prompt = "To be, or not"
        prompt_ids = [BOS, *hf_tokenizer.encode(prompt, add_special_tokens=False).ids]
        response_ids = [*hf_tokenizer.encode(response, add_special_tokens=False).ids, EOS]
    else:
        prompt = tuple((m["role"], m["content"]) for m in DIALOG)
        prompt_ids = hf_tokenizer.encode(DIALOG_TEXT, add_special_tokens=False).ids
        response_ids = hf_tokenizer.encode(response.strip() + "<|eot_id|>",
                                           add_special_tokens=False).ids  # fmt: skip
    ids, start = encode_pair(tokenizer, prompt, response, 64)
    assert ids == prompt_ids + response_ids and start == len(prompt_ids)
    batch = collate([(ids, start)], tokenizer.eos_id)
    with torch.no_grad():
        ours = sft_loss(policy(batch.tokens, batch.attention_mask), batch.tokens,
                        batch.response_mask)  # fmt: skip
        theirs = transformers.LlamaForCausalLM.from_pretrained(llama3["hf"]).eval()
        logits = theirs(torch.tensor([ids])).logits[0, start - 1 : -1]
    assert ours.item() == pytest.approx(F.cross_entropy(logits, torch.tensor(ids[start:])).item(),
                                        abs=1e-5)  # fmt: skip


def test_every_stage_runs_from_a_hugging_face_llama_with_lora(llama3, tmp_path):
    demos = write_jsonl(tmp_path / "demos.jsonl", DEMOS)
    ranks = write_jsonl(tmp_path / "ranks.jsonl", RANKS)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": d["prompt"]} for d in DEMOS])
    common = ["--device", "cpu", "--lora-rank", "4", "--batch-size", "4", "--steps", "2"]
    assert sft.main(["--model", str(llama3["hf"]), "--data", str(demos),
                     "--out", str(tmp_path / "sft"), *common]) == 0  # fmt: skip
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["tokenizer"]["kind"] == "tokenizer.json"
    assert (tmp_path / "sft" / "tokenizer.json").is_file()  # the run keeps the tokenizer's file
    policy, tokenizer, _ = load_policy(tmp_path / "sft")
    assert (tokenizer.bos_id, tokenizer.eos_id) == (BOS, EOS)
    assert policy.config.rope_scaling_type == "llama3" and policy.config.tie_embeddings

    assert reward.main(["--model", str(tmp_path / "sft"), "--data", str(ranks),
                        "--eval-data", str(ranks), "--demonstrations", str(demos),
                        "--out", str(tmp_path / "rm"), *common]) == 0  # fmt: skip
    rm, rm_tokenizer, _ = load_reward_model(tmp_path / "rm")
    assert rm_tokenizer.spec() == tokenizer.spec()
    assert dpo.main(["--model", str(tmp_path / "sft"), "--data", str(ranks),
                     "--out", str(tmp_path / "dpo"), *common]) == 0  # fmt: skip
    assert ppo.main(["--policy", str(tmp_path / "sft"), "--reward-model", str(tmp_path / "rm"),
                     "--prompts", str(prompts), "--iterations", "1", "--rollout-batch", "4",
                     "--minibatch", "4", "--ppo-epochs", "1", "--max-new-tokens", "6",
                     "--lora-rank", "4", "--out", str(tmp_path / "ppo"),
                     "--device", "cpu"]) == 0  # fmt: skip
    assert evaluate.main(["--a", str(tmp_path / "ppo"), "--b", str(tmp_path / "dpo"),
                          "--prompts", str(prompts), "--samples", "1", "--max-new-tokens", "6",
                          "--device", "cpu"]) == 0  # fmt: skip
