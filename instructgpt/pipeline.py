"""The whole pipeline on the embedded task, end to end, offline, on a CPU.

    python -m instructgpt.pipeline --out runs/pipeline

1. base model: a BPE tokenizer and a small xllama pretrained on the embedded corpus (or --base);
2. SFT on the task's demonstrations (sentence openings and their real continuations);
3. K responses per training prompt sampled from the SFT model, ranked by the gold labeler;
4. the reward model trained on those rankings (held-out pairwise accuracy reported);
5. PPO against the reward model, and DPO on the same rankings, for each β asked for; with
   --dpo-rounds R > 1, each DPO policy then goes through R - 1 more rounds of iterative
   (on-policy) DPO: K fresh responses per training prompt from the previous round's policy,
   ranked by the labeler, and DPO from that policy (its own reference) on them;
6. every policy against SFT on held-out prompts under the gold labeler: win rate with its 95%
   interval, gold score and KL(π‖π_SFT); the reward-KL frontier and the over-optimisation plot.
Stages that finished are skipped when the command is run again with the same --out.
The gold labeler never enters training: it only ranks samples (steps 3 and 5) and judges (6).

Under torchrun (`torchrun --nproc-per-node N -m instructgpt.pipeline ...`) every process runs the
training stages, each data-parallel; the work of one process (ranking samples, marking stages
done, evaluating, plotting) is rank 0's while the others wait, then read what it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch

from transformer.lora import LoRAConfig
from transformer.training import (
    CommandParser,
    ConfigError,
    Distributed,
    TrainingRun,
    add_common_arguments,
    add_dataclass_arguments,
    check_config,
    choose_preset,
    claim_run_directory,
    dataclass_from_args,
    lock_run_directory,
    param,
    preset_flags,
    run_command,
    seed_everything,
    set_lr,
    setup_distributed,
    warmup_cosine,
)
from transformer.vocabulary import BPE
from xllama import Llama, LlamaConfig
from xllama.sampling import token_logprobs

from .batches import rank_slice
from .checkpoints import load_policy, model_config
from .data import corpus_text, read_rankings, task_prompts, write_jsonl
from .dpo import DPOConfig, train_dpo
from .evaluate import Judge, compare
from .ppo import PPOConfig, train_ppo
from .reward import RewardConfig, make_task_rankings, split_heldout, train_reward
from .sft import SFTConfig, train_sft
from .stage import check_k, ddp, optimizer_step


@dataclass
class PipelineConfig:
    vocab_size: int = param(1024, "BPE vocabulary of the base model (with <|endoftext|>)")
    dim: int = param(96, "base model width")
    n_layers: int = param(3, "base model blocks")
    n_heads: int = param(4, "attention heads")
    context: int = param(64, "context length in tokens")
    pretrain_steps: int = param(800, "pretraining steps on the corpus")
    pretrain_batch: int = param(32, "windows per pretraining step")
    pretrain_lr: float = param(2e-3, "peak pretraining learning rate")
    sft_steps: int = param(200, "SFT steps")
    sft_lr: float = param(3e-4, "SFT peak learning rate")
    k: int = param(8, "responses sampled per prompt and ranked by the labeler")
    rm_steps: int = param(300, "reward model steps")
    rm_lr: float = param(1e-4, "reward model peak learning rate")
    ppo_iterations: int = param(80, "PPO rollout batches per β")
    ppo_lr: float = param(
        1e-4, "PPO learning rate (5e-5 left one seed of six short of a 70 percent win rate; README)"
    )
    ppo_betas: list[float] = param(
        factory=lambda: [0.005],
        help="KL coefficients of the PPO runs (one run each; the README's sweep: 0.005 0.02 0.1)",
    )
    dpo_steps: int = param(300, "DPO steps per β (and per round)")
    dpo_lr: float = param(1e-4, "DPO learning rate")
    dpo_betas: list[float] = param(
        factory=lambda: [0.1],
        help="β of the DPO runs (one run each; the README's sweep: 0.03 0.05 0.1 0.3)",
    )
    dpo_rounds: int = param(
        2,
        "DPO rounds per β: round r > 1 ranks fresh samples of round r - 1's policy and continues from it (iterative, on-policy DPO; the labeler labels K more responses per prompt each round)",
    )
    eval_samples: int = param(4, "responses per held-out prompt for the win rates")
    max_new_tokens: int = param(32, "longest sampled response (rankings, PPO rollouts, evaluation)")

    def __post_init__(self):
        """Every stage's config is built (and so checked) here, before the first stage starts."""
        check_config(
            self,
            positive=("vocab_size", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                      "dpo_rounds", "eval_samples"),
        )  # fmt: skip
        check_k(self)
        if self.max_new_tokens >= self.context:
            raise ConfigError(
                f"PipelineConfig.max_new_tokens ({self.max_new_tokens}) leaves no room for a "
                f"prompt in the context ({self.context})"
            )
        self.llama(self.vocab_size)
        self.sft()
        self.reward()
        for beta in self.ppo_betas:
            self.ppo(beta)
        for beta in self.dpo_betas:
            self.dpo(beta)

    def llama(self, vocab_size: int) -> LlamaConfig:
        return LlamaConfig(
            dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads, vocab_size=vocab_size,
            multiple_of=32, max_seq_len=self.context,
        )  # fmt: skip

    def sft(self) -> SFTConfig:
        return SFTConfig(steps=self.sft_steps, lr=self.sft_lr)

    def reward(self) -> RewardConfig:
        return RewardConfig(steps=self.rm_steps, lr=self.rm_lr)

    def ppo(self, beta: float) -> PPOConfig:
        return PPOConfig(
            iterations=self.ppo_iterations, beta=beta, lr=self.ppo_lr,
            max_new_tokens=self.max_new_tokens,
        )  # fmt: skip

    def dpo(self, beta: float) -> DPOConfig:
        return DPOConfig(steps=self.dpo_steps, beta=beta, lr=self.dpo_lr)


def pretrain(
    out: Path, config: PipelineConfig, device, seed: int, dist: Distributed | None = None
) -> Path:
    """Step 1: tokenizer + next-token pretraining of a small xllama on the embedded corpus.

    Under torchrun, rank 0 trains the tokenizer, and each process takes its share of every step's
    windows (DDP averages the gradients), so the steps are those of one process."""
    dist = dist or Distributed()
    text = corpus_text()
    claim_run_directory(out, overwrite=True, dist=dist)  # an unfinished pretraining starts over
    if dist.is_main:
        BPE.train(text, config.vocab_size, progress=False).save(out)
    dist.barrier()
    tokenizer = BPE.load(out)
    ids = torch.tensor(tokenizer.encode(text))
    llama = config.llama(tokenizer.vocab_size)
    seed_everything(seed)
    model = Llama(llama).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.pretrain_lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    run = TrainingRun(
        out, package="instructgpt", model_config=model_config("policy", llama),
        train_config={"stage": "pretrain", **asdict(config)}, model=model, optimizer=optimizer,
        dist=dist, device=device, overwrite=True, extra_config={"tokenizer": tokenizer.spec()},
    )  # fmt: skip
    model_ddp = ddp(model, dist)
    for step in run.steps(config.pretrain_steps, desc="pretrain"):
        g = torch.Generator().manual_seed(seed * 100003 + step)
        starts = torch.randint(0, len(ids) - config.context, (config.pretrain_batch,), generator=g)
        starts = rank_slice(starts.tolist(), dist.rank, dist.world_size)
        x = torch.stack([ids[s : s + config.context] for s in starts]).to(device)
        set_lr(
            optimizer,
            warmup_cosine(
                step, config.pretrain_steps, config.pretrain_lr, 0.1 * config.pretrain_lr, 50
            ),
        )
        loss = -token_logprobs(model_ddp(x)[:, :-1], x[:, 1:]).mean()
        mean_loss = dist.all_reduce_mean(loss.detach())
        run.check_finite(step, loss=mean_loss)
        optimizer_step(optimizer, loss, model)
        run.log(step, loss=mean_loss.item())
        run.end_of_step(step)
    run.save(config.pretrain_steps)
    return out


def _args(common, out: Path, adapters: bool = True, **kw) -> SimpleNamespace:
    """A stage's arguments, with the pipeline's LoRA flags (`adapters=False`: rank 0, no adapters).
    A stage that was interrupted before it finished resumes from its last checkpoint; one that
    never wrote a checkpoint starts over."""
    resume = out if (out / "checkpoints" / "latest").is_file() else None
    lora = {f.name: getattr(common, f.name, None) for f in fields(LoRAConfig)}
    if not adapters:
        lora["lora_rank"] = 0
    return SimpleNamespace(
        device=common.device, dtype=common.dtype, seed=common.seed, out=out, resume=resume,
        overwrite=resume is None, **lora, **kw,
    )  # fmt: skip


def label_samples(policy_dir: Path, prompts: list[str], config: PipelineConfig, seed: int, device):
    """K responses per prompt from the policy in `policy_dir`, ranked by the gold labeler."""
    policy, tokenizer, _ = load_policy(policy_dir, device)
    return make_task_rankings(
        policy.eval(), tokenizer, prompts, config.k, config.context, seed, config.max_new_tokens
    )


def write_rankings(path: Path, rankings) -> None:
    write_jsonl(path, [{"prompt": r.prompt, "responses": r.responses} for r in rankings])


def _done(path: Path) -> bool:
    return (path / "DONE").is_file()


def _mark(path: Path, dist: Distributed, info: dict | None = None) -> None:
    """Mark a stage done (rank 0 writes; every process goes on once it is written)."""
    if dist.is_main:
        (path / "DONE").write_text(json.dumps(info or {}, indent=2) + "\n")
    dist.barrier()


def run_pipeline(common, config: PipelineConfig) -> dict:
    dist, device = setup_distributed(common.device)
    out = Path(common.out)
    if dist.is_main:
        lock_run_directory(out)  # one pipeline per directory; its finished stages are reused
    dist.barrier()
    results: dict = {"config": asdict(config)}

    base = Path(common.base) if common.base else out / "base"
    if not common.base and not _done(base):
        pretrain(base, config, device, common.seed, dist)
        _mark(base, dist)

    sft_dir = out / "sft"
    if not _done(sft_dir):
        train_sft(_args(common, sft_dir, model=base, data=None), config.sft())
        _mark(sft_dir, dist)

    # Step 3: the labeler ranks K samples per prompt from the SFT policy (rank 0; the others wait).
    rankings_path, heldout_path = out / "rankings.jsonl", out / "rankings_heldout.jsonl"
    if dist.is_main and not rankings_path.is_file():
        rankings = label_samples(sft_dir, task_prompts("train"), config, common.seed, device)
        train_rankings, heldout = split_heldout(rankings, 0.1, common.seed)
        write_rankings(heldout_path, heldout)
        write_rankings(rankings_path, train_rankings)
    dist.barrier()

    rm_dir = out / "reward"
    if not _done(rm_dir):
        _, summary = train_reward(
            _args(
                common,
                rm_dir,
                adapters=common.lora_reward_model,
                model=sft_dir,
                data=rankings_path,
                eval_data=heldout_path,
                demonstrations=None,
            ),
            config.reward(),
        )
        _mark(rm_dir, dist, summary)
    results["reward_model"] = json.loads((rm_dir / "DONE").read_text())

    policies = {}
    for beta in config.ppo_betas:
        d = out / f"ppo-beta{beta:g}"
        if not _done(d):
            train_ppo(
                _args(common, d, policy=sft_dir, reward_model=rm_dir, prompts=None),
                config.ppo(beta),
            )
            _mark(d, dist)
        policies[d.name] = d
    train_prompts = sorted({r.prompt for r in read_rankings(rankings_path)})
    for beta in config.dpo_betas:
        previous, data = sft_dir, rankings_path
        for round_ in range(1, config.dpo_rounds + 1):
            d = out / (f"dpo-beta{beta:g}" + (f"-round{round_}" if round_ > 1 else ""))
            if round_ > 1:  # iterative DPO: the labeler ranks the last round's own samples
                data = out / f"{d.name}-rankings.jsonl"
                if dist.is_main and not data.is_file():
                    fresh = label_samples(
                        previous, train_prompts, config, common.seed + round_, device
                    )
                    write_rankings(data, fresh)
                dist.barrier()
            if not _done(d):
                _, summary = train_dpo(
                    _args(common, d, model=previous, data=data, eval_data=heldout_path),
                    config.dpo(beta),
                )
                _mark(d, dist, summary)
            policies[d.name] = d
            previous = d

    if dist.is_main:
        evaluate_policies(out, sft_dir, policies, config, common.seed, device, results)
    dist.barrier()
    dist.close()
    return results if dist.is_main else json.loads((out / "results.json").read_text())


def evaluate_policies(
    out: Path, sft_dir: Path, policies: dict, config: PipelineConfig, seed: int, device, results
) -> None:
    """Step 6: every policy against SFT under the gold labeler, on held-out prompts; writes
    results.json (`results` with the evaluation added) and the two plots."""
    sft, tokenizer, _ = load_policy(sft_dir, device)
    sft.eval()
    prompts = task_prompts("heldout")
    evaluation = {}
    for name, d in policies.items():
        policy, _, _ = load_policy(d, device)
        result = compare(
            policy.eval(),
            sft,
            tokenizer,
            prompts,
            Judge(),
            config.eval_samples,
            config.max_new_tokens,
            seed,
        )
        evaluation[name] = result
        print(
            f"{name}: win rate vs SFT {result['win_rate']:.1%} "
            f"[{result['ci_low']:.1%}, {result['ci_high']:.1%}], gold {result['score_a']:.3f} "
            f"(SFT {result['score_b']:.3f}), KL to SFT {result['kl_a_to_b']:.2f}"
        )
    results["evaluation"] = evaluation
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    try:
        from .plots import plot_frontier, plot_overoptimisation

        plot_frontier(results, out / "frontier.png")
        plot_overoptimisation(out, out / "overoptimisation.png")
    except ImportError as exc:
        print(f"plots skipped ({exc}); install the 'plots' extra for matplotlib")


def main(argv=None) -> int:
    parser = CommandParser(
        prog="instructgpt.pipeline",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument(
        "--base", type=Path, default=None,
        help="start from this base model (an xllama or instructgpt run, or a Hugging Face or "
        "Meta Llama directory) instead of pretraining",
    )  # fmt: skip
    parser.add_argument(
        "--config", choices=list(PRESETS), default="default",
        help="preset: default (the run the README reports) or tiny (a seconds-long smoke run, "
        "for tests); flags override single fields (default: default)",
    )  # fmt: skip
    preset = choose_preset(PRESETS, preset_flags(argv, config="default").config)
    add_dataclass_arguments(parser, PipelineConfig, "pipeline (the preset's values)", preset)
    lora = add_dataclass_arguments(
        parser,
        LoRAConfig,
        "LoRA (Hu et al. 2021): the policies (SFT, PPO, DPO) train adapters only",
    )
    lora.add_argument(
        "--lora-reward-model", action=argparse.BooleanOptionalAction, default=False,
        help="adapters on the reward model too (default: no; it is not a policy and trains "
        "fully, as InstructGPT trains its reward model as a model of its own; with adapters it "
        "ranked held-out pairs 5 points worse here and PPO drifted against it)",
    )  # fmt: skip
    add_common_arguments(parser, training=False)
    args = parser.parse_args(argv)
    config = dataclass_from_args(PipelineConfig, args, base=preset)
    if args.out is None:
        from .data import InstructGPTError

        raise InstructGPTError("--out DIR is required: the directory for every stage's run")
    run_pipeline(args, config)
    return 0


PRESETS: dict[str, PipelineConfig] = {
    "default": PipelineConfig(),
    "tiny": PipelineConfig(
        vocab_size=300, dim=32, n_layers=1, n_heads=2, context=48, pretrain_steps=5, sft_steps=3,
        k=4, rm_steps=3, ppo_iterations=1, max_new_tokens=12, ppo_betas=[0.05], dpo_steps=2,
        dpo_betas=[0.1], dpo_rounds=2, eval_samples=1,
    ),
}  # fmt: skip


def cli() -> None:
    sys.exit(run_command(main, prog="instructgpt-pipeline"))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="instructgpt.pipeline"))
