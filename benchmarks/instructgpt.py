"""instructgpt benchmarks, side by side in one process.

1. PPO rollout throughput: generated tokens/s sampling with xllama's KV cache against recomputing
   the whole sequence at every step (what a rollout loop without a cache does).
2. DPO against TRL's `DPOTrainer`: the same model (exported to Hugging Face format by xllama), the
   same preference pairs, batch size, learning rate, schedule and β; median step time and the
   final implicit-reward accuracy on the same held-out pairs (both measured by our code).

    python benchmarks/instructgpt.py --policy runs/pipeline/sft --pairs runs/pipeline/rankings.jsonl \
        --heldout runs/pipeline/rankings_heldout.jsonl

Without --policy a fresh model of the pipeline's shape is used (throughput only makes sense then;
the DPO comparison still runs on the pairs given, or on pairs made up from the embedded task).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from instructgpt.checkpoints import load_policy  # noqa: E402
from instructgpt.data import corpus_text, read_rankings, task_demonstrations  # noqa: E402
from instructgpt.dpo import DPOConfig, preference_accuracy, ranking_pairs, train_dpo  # noqa: E402
from transformer.vocabulary import BPE  # noqa: E402
from xllama import Llama, LlamaConfig, generate  # noqa: E402

# ------------------------------------------------------------------------------------------------
# 1. rollouts


@torch.no_grad()
def generate_without_cache(model, prompts, max_new_tokens, eos_id, generator):
    """Sampling that re-runs the full (left-padded) sequence for every new token."""
    from xllama import left_pad, sample_next

    tokens, mask = left_pad(prompts, eos_id)
    for _ in range(max_new_tokens):
        logits = model(tokens, attention_mask=mask)[:, -1]
        nxt = sample_next(logits, 1.0, generator=generator)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return tokens[:, -max_new_tokens:]


def bench_rollouts(model, tokenizer, batch, new_tokens, repeats=3):
    model.eval()
    prompts = [tokenizer.encode(d.prompt) for d in task_demonstrations()[:batch]]
    timings = {}
    for name in ("kv_cache", "recompute"):
        best = float("inf")
        for r in range(repeats):
            g = torch.Generator().manual_seed(r)
            start = time.perf_counter()
            if name == "kv_cache":
                generate(model, prompts, new_tokens, temperature=1.0, generator=g)
            else:
                generate_without_cache(model, prompts, new_tokens, tokenizer.eos_id, g)
            best = min(best, time.perf_counter() - start)
        timings[name] = batch * new_tokens / best
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "kv_cache_tokens_per_s": round(timings["kv_cache"], 1),
        "recompute_tokens_per_s": round(timings["recompute"], 1),
        "speedup": round(timings["kv_cache"] / timings["recompute"], 2),
    }


# ------------------------------------------------------------------------------------------------
# 2. DPO vs TRL


def hf_tokenizer(task_tokenizer: BPE):
    """Our BPE tokenizer behind the `PreTrainedTokenizer` interface TRL expects (same ids)."""
    from transformers import PreTrainedTokenizer

    class OurTokenizer(PreTrainedTokenizer):
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, **kwargs):
            self.ours = task_tokenizer
            super().__init__(eos_token="<|endoftext|>", pad_token="<|endoftext|>", **kwargs)

        @property
        def vocab_size(self):
            return self.ours.vocab_size

        def get_vocab(self):
            return {self._convert_id_to_token(i): i for i in range(self.ours.vocab_size)}

        def _tokenize(self, text, **kwargs):
            return [str(i) for i in self.ours.encode(text)]

        def _convert_token_to_id(self, token):
            return self.ours.eos_id if token == "<|endoftext|>" else int(token)

        def _convert_id_to_token(self, index):
            return "<|endoftext|>" if index == self.ours.eos_id else str(index)

        def convert_tokens_to_string(self, tokens):
            return self.ours.decode([self._convert_token_to_id(t) for t in tokens])

        def save_vocabulary(self, save_directory, filename_prefix=None):
            return ()

    return OurTokenizer()


def bench_dpo_ours(policy_dir, pairs_path, heldout_path, steps, batch, lr, beta, out):
    from types import SimpleNamespace

    args = SimpleNamespace(
        device="cpu", dtype="float32", seed=0, out=out, resume=None, model=policy_dir,
        data=pairs_path, eval_data=heldout_path,
    )  # fmt: skip
    config = DPOConfig(steps=steps, batch_size=batch, lr=lr, beta=beta, warmup=10)
    start = time.perf_counter()
    _, summary = train_dpo(args, config)
    total = time.perf_counter() - start
    times = [json.loads(x)["time"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    step = statistics.median(b - a for a, b in zip(times, times[1:]))
    return {"median_step_s": round(step, 4), "total_s": round(total, 1),
            "heldout_accuracy": round(summary["heldout_accuracy"], 4)}  # fmt: skip


def bench_dpo_trl(policy_dir, pairs_path, heldout_path, steps, batch, lr, beta, out):
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from xllama.convert import export_hf, load_hf

    policy, tokenizer, _ = load_policy(policy_dir)
    hf_dir = export_hf(policy, out / "hf")
    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    ref = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    pairs = ranking_pairs(read_rankings(pairs_path))
    data = Dataset.from_dict(
        {"prompt": [p for p, _, _ in pairs], "chosen": [c for _, c, _ in pairs],
         "rejected": [r for _, _, r in pairs]}
    )  # fmt: skip
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    config = TRLConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=lr, beta=beta, warmup_steps=10, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, adam_beta2=0.95, max_grad_norm=1.0,
        weight_decay=0.0, report_to="none", save_strategy="no", logging_steps=10, use_cpu=True,
        precompute_ref_log_probs=True, max_length=64, seed=0, dataloader_num_workers=0,
        bf16=False, fp16=False,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=config, train_dataset=data,
        processing_class=hf_tokenizer(tokenizer), callbacks=[Clock()],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    trainer.model.save_pretrained(out / "trl-final", safe_serialization=True)
    trained = load_hf(out / "trl-final")
    reference = load_hf(hf_dir)
    heldout = ranking_pairs(read_rankings(heldout_path))
    acc = preference_accuracy(trained, reference, tokenizer, heldout, DPOConfig(beta=beta), "cpu")
    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    return {"median_step_s": round(step, 4), "total_s": round(total, 1),
            "heldout_accuracy": round(acc["accuracy"], 4)}  # fmt: skip


def fresh_policy(directory: Path) -> Path:
    """A randomly initialised model of the pipeline's shape, saved where load_policy finds it."""
    from instructgpt.checkpoints import model_config
    from transformer.training import save_checkpoint

    tokenizer = BPE.train(corpus_text(), 1024, progress=False)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=96, n_layers=3, n_heads=4, vocab_size=tokenizer.vocab_size,
                              multiple_of=32, max_seq_len=64))  # fmt: skip
    save_checkpoint(
        directory, model, {"package": "instructgpt", "model": model_config("policy", model.config)}
    )
    tokenizer.save(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--policy", type=Path, default=None, help="SFT run (default: a fresh model)"
    )
    parser.add_argument(
        "--pairs", type=Path, default=None, help="training rankings/comparisons JSONL"
    )
    parser.add_argument("--heldout", type=Path, default=None, help="held-out rankings JSONL")
    parser.add_argument("--batch", type=int, default=64, help="rollout batch (prompts)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--dpo-batch", type=int, default=16)
    parser.add_argument("--dpo-lr", type=float, default=5e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="instructgpt-bench-"))
    policy_dir = args.policy or fresh_policy(work / "policy")
    policy, tokenizer, _ = load_policy(policy_dir)
    results = {"rollouts": bench_rollouts(policy, tokenizer, args.batch, args.new_tokens)}
    print(json.dumps(results["rollouts"]), flush=True)
    if args.pairs is not None and args.heldout is not None:
        kw = dict(steps=args.dpo_steps, batch=args.dpo_batch, lr=args.dpo_lr, beta=args.beta)
        results["dpo_ours"] = bench_dpo_ours(
            policy_dir, args.pairs, args.heldout, out=work / "ours", **kw
        )
        print("ours", json.dumps(results["dpo_ours"]), flush=True)
        if not args.skip_trl:
            try:
                results["dpo_trl"] = bench_dpo_trl(
                    policy_dir, args.pairs, args.heldout, out=work, **kw
                )
                print("trl ", json.dumps(results["dpo_trl"]), flush=True)
                results["trl_over_ours_step_time"] = round(
                    results["dpo_trl"]["median_step_s"] / results["dpo_ours"]["median_step_s"], 2
                )
            except Exception as exc:  # report exactly why TRL could not run here
                results["dpo_trl_error"] = f"{type(exc).__name__}: {exc}"
                print("trl could not run:", results["dpo_trl_error"], flush=True)
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
