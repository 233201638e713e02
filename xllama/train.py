"""Train a small Llama: `python -m xllama.train [--data FILE.bin | --text FILE ...] --out DIR`.

With no data it trains a byte-level BPE tokenizer (our `tokenizer` package) on the embedded corpus
(`pydoc_data.topics`, ships with CPython), tokenizes it, trains the `small` config for a few minutes
on a CPU, reports the validation loss and prints a generated sample. `--tokenizer char` trains
character-level instead (the Tiny Shakespeare baseline: `--config shakespeare-char --text
input.txt --tokenizer char`).

Optimisation follows Llama 2 (§2.2): AdamW (β1 0.9, β2 0.95, ε 1e-5, weight decay 0.1 on matrices
only), linear warm-up then cosine decay to `min_lr`, gradient clipping at 1.0. Gradient
accumulation, bf16 autocast and `--compile` on GPU, `torchrun` data parallelism, `--resume`, Ctrl-C
and non-finite losses go through the shared `transformer` infrastructure.

Every rank draws the same global batch from one seeded generator and trains on its slice, so a
`torchrun` job follows the same trajectory as one process with the same global batch.

Fine-tuning: `--init-from DIR` starts from any checkpoint the project loads (an xllama run, a
Hugging Face or a Meta Llama directory) and its tokenizer, on `--text` files. With `--lora-rank R`
only LoRA adapters train (Hu et al. 2021, `transformer.lora`); the run directory then also holds
the adapters alone, in our layout (`adapter/`) and in Hugging Face peft's (`adapter-peft/`, for the
base exported with `xllama.convert.export_hf`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from transformer.lora import LoRAConfig, save_adapter, trainable_parameters
from transformer.quantize import quantize_model, weight_bytes
from transformer.training import (
    CommandParser,
    ConfigError,
    TrainingRun,
    add_common_arguments,
    add_dataclass_arguments,
    autocast,
    check_config,
    checkpoint_step,
    choose_preset,
    claim_run_directory,
    dataclass_from_args,
    find_checkpoint,
    param,
    preset_flags,
    run_command,
    seed_everything,
    select_dtype,
    setup_distributed,
    warmup_cosine,
    weight_decay_groups,
)
from transformer.vocabulary import BPE

from .adapters import save_peft_adapter
from .convert import QUANTIZE_SKIP, load_checkpoint
from .data import embedded_corpus, random_windows, read_texts, read_token_file, split_train_val
from .model import Llama, LlamaConfig, XLlamaError, flops_per_token, loss_fn, router_losses
from .sampling import generate
from .tokenization import CharTokenizer, keep_tokenizer, load_tokenizer


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults follow Llama 2 §2.2 scaled to a CPU-sized run."""

    steps: int = param(1000, "optimizer steps (the cosine schedule spans them)")
    batch_size: int = param(
        32, "sequences per optimizer step, summed over gradient-accumulation steps and processes"
    )
    grad_accum: int = param(1, "micro-batches per optimizer step (gradient accumulation)")
    lr: float = param(1e-3, "peak learning rate")
    min_lr: float = param(
        1e-4, "learning rate at the end of the cosine decay (Llama 2: a tenth of the peak)"
    )
    warmup_steps: int = param(50, "linear warm-up steps")
    weight_decay: float = param(0.1, "AdamW decoupled weight decay, on matrices only (not norms)")
    beta1: float = param(0.9, "AdamW β1")
    beta2: float = param(0.95, "AdamW β2")
    eps: float = param(1e-5, "AdamW ε")
    grad_clip: float = param(1.0, "clip the global gradient norm to this (0 = off)")
    time_limit: float | None = param(
        None,
        "minutes of training: the cosine schedule follows elapsed time and training stops there (0 = no limit: the schedule follows steps)",
    )
    eval_every: int = param(200, "estimate the validation loss every N steps (0 = only at the end)")
    eval_batches: int = param(20, "batches of batch_size windows per validation estimate")
    val_fraction: float = param(0.1, "last fraction of the token stream held out for validation")
    checkpoint_every: int = param(500, "write a checkpoint every N steps (0 = only at the end)")
    router_aux_loss_coef: float = param(
        0.01,
        "mixture of experts: weight of the Switch load-balancing loss (Fedus et al. 2022: 0.01; HF's router_aux_loss_coef)",
        added=True,
    )
    router_z_loss_coef: float = param(
        0.0, "mixture of experts: weight of ST-MoE's router z-loss (Zoph et al.: 0.001)", added=True
    )
    sample_tokens: int = param(200, "tokens to generate at the end")
    sample_prompt: str = param("\n", "text the final sample continues")

    def __post_init__(self):
        check_config(
            self,
            positive=("steps", "batch_size", "grad_accum", "lr", "eps", "eval_batches"),
            non_negative=("min_lr", "warmup_steps", "weight_decay", "grad_clip", "time_limit",
                          "eval_every", "checkpoint_every", "sample_tokens",
                          "router_aux_loss_coef", "router_z_loss_coef"),
            below_one=("beta1", "beta2"),
        )  # fmt: skip
        if not 0 < self.val_fraction < 1:
            raise ConfigError(
                f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"TrainConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")


@dataclass(frozen=True)
class Preset:
    """A named preset (`--config NAME`): one record of the model's shape and its training values.
    Flags override single fields; `--help` shows the values of the preset chosen."""

    model: LlamaConfig
    train: TrainConfig


_SHAKESPEARE_CHAR = Preset(
    LlamaConfig(
        dim=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        vocab_size=65,
        multiple_of=32,
        max_seq_len=64,
    ),
    TrainConfig(
        steps=5000,
        batch_size=12,
        lr=2e-3,
        min_lr=2e-4,
        warmup_steps=100,
        time_limit=3.0,
        weight_decay=0.1,
        eval_every=500,
        sample_tokens=300,
    ),
)

PRESETS: dict[str, Preset] = {
    # Tests: a few thousand parameters, seconds.
    "tiny": Preset(
        LlamaConfig(
            dim=32,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            vocab_size=256,
            multiple_of=16,
            max_seq_len=64,
        ),
        TrainConfig(
            steps=20, batch_size=4, warmup_steps=2, eval_every=10, eval_batches=2, sample_tokens=20
        ),
    ),
    # The default (`python -m xllama.train`): BPE on the embedded corpus, a few CPU minutes.
    # Sized to fit its 115k training tokens: without dropout and with 2,000 steps the validation
    # loss was best at step 800 (4.38) and 11% worse at the end; dropout 0.1 and 1,200 steps
    # (about 11 epochs) end at their best (4.12).
    "small": Preset(
        LlamaConfig(
            dim=192,
            n_layers=4,
            n_heads=6,
            n_kv_heads=2,
            vocab_size=2048,
            multiple_of=32,
            max_seq_len=128,
            dropout=0.1,
        ),
        TrainConfig(
            steps=1200,
            batch_size=8,
            lr=2e-3,
            min_lr=2e-4,
            warmup_steps=50,
            time_limit=4.0,
            eval_every=100,
            eval_batches=10,
        ),
    ),
    # Tiny Shakespeare, characters, 3 minutes of CPU (nanoGPT's shakespeare_char CPU run).
    "shakespeare-char": _SHAKESPEARE_CHAR,
    # Tiny Shakespeare with our BPE (vocabulary 512), the same model and budget.
    "shakespeare-bpe": Preset(
        replace(_SHAKESPEARE_CHAR.model, vocab_size=512),
        replace(_SHAKESPEARE_CHAR.train, sample_tokens=200),
    ),
    # GPT-2 small's size (124M with GPT-2's vocabulary), for GPU runs.
    "gpt2-124m": Preset(
        LlamaConfig(
            dim=768,
            n_layers=12,
            n_heads=12,
            n_kv_heads=12,
            vocab_size=50304,
            multiple_of=256,
            max_seq_len=1024,
            tie_embeddings=True,
        ),
        TrainConfig(
            steps=5000,
            batch_size=64,
            grad_accum=1,
            lr=6e-4,
            min_lr=6e-5,
            warmup_steps=200,
            eval_every=500,
            checkpoint_every=1000,
        ),
    ),
}

# Peak dense bf16 tensor-core FLOP/s, for the MFU column on GPUs we know.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def learning_rate(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Llama 2 §2.2: linear warm-up to `lr`, then cosine decay to `min_lr` (a tenth of the peak).

    `progress` in [0, 1] (the fraction of the time limit used) replaces step / steps when given.
    """
    return warmup_cosine(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps, progress)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, projections) but not on norm gains."""
    return torch.optim.AdamW(
        weight_decay_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=device.type == "cuda" or None,
    )


def build_parser(preset: Preset | None = None) -> argparse.ArgumentParser:
    """The flags; `preset` (default: small) supplies the defaults `--help` shows."""
    preset = preset or PRESETS["small"]
    parser = CommandParser(
        prog="xllama.train",
        description=__doc__.split("\n\n")[0],
    )
    data = parser.add_argument_group("data")
    source = data.add_mutually_exclusive_group()
    source.add_argument(
        "--data",
        type=Path,
        help="token file FILE.bin with its FILE.bin.json sidecar (tokenizer.data.write_tokens)",
    )
    source.add_argument(
        "--text",
        type=Path,
        nargs="+",
        help="UTF-8 text file(s) to train on (default: the embedded pydoc corpus)",
    )
    data.add_argument(
        "--tokenizer",
        default="bpe",
        help="bpe: train our byte-level BPE on the text (vocab = --vocab-size); char: one token "
        "per character; or a tokenizer file (tokenizer.bpe, sentencepiece .model, .tiktoken, "
        "tiktoken:NAME) (default: bpe)",
    )
    parser.add_argument(
        "--config",
        default="small",
        help=f"preset of model and training values: {', '.join(PRESETS)} (default: small)",
    )
    tune = parser.add_argument_group("fine-tuning")
    tune.add_argument(
        "--init-from",
        type=Path,
        help="start from this checkpoint (an xllama run or checkpoint, a Hugging Face or a Meta "
        "Llama directory) and its tokenizer; the model's shape is the checkpoint's (only "
        "--dropout and a shorter --max-seq-len may change) (default: train from scratch)",
    )
    tune.add_argument(
        "--quantize",
        choices=["none", "int8", "nf4"],
        default="none",
        help="store the frozen base quantised while LoRA trains: nf4 = QLoRA (4-bit NormalFloat, "
        "double quantisation), int8 = absmax per output channel; the output head stays in float "
        "(needs --lora-rank) (default: none)",
    )
    add_dataclass_arguments(parser, LoRAConfig, "LoRA (Hu et al. 2021): train adapters only")
    add_dataclass_arguments(parser, LlamaConfig, "model (the preset's values; flags override)",
                            preset.model)  # fmt: skip
    add_dataclass_arguments(parser, TrainConfig, "training (the preset's values; flags override)",
                            preset.train)  # fmt: skip
    add_common_arguments(parser, training=True)
    return parser


def fine_tuning_start(args) -> tuple[Llama, object]:
    """(model, tokenizer) of `--init-from`, with the few model flags a fine-tune may change."""
    named = None if args.tokenizer in ("bpe", "char") else args.tokenizer
    model, tokenizer, _ = load_checkpoint(args.init_from, named)
    changeable = {"dropout", "max_seq_len"}
    fixed = [f.name for f in fields(LlamaConfig) if getattr(args, f.name) is not None
             and f.name not in changeable]  # fmt: skip
    if args.position is not None and args.position != model.config.position:
        raise XLlamaError(
            f"--position {args.position}: {args.init_from} was trained with "
            f"position={model.config.position}, and a model cannot change how it reads positions"
        )
    if fixed:
        flags = ", ".join("--" + name.replace("_", "-") for name in fixed)
        raise XLlamaError(f"{flags}: the model's shape comes from --init-from {args.init_from}")
    config = model.config
    for name in changeable:
        if getattr(args, name) is not None:
            config = replace(config, **{name: getattr(args, name)})
    if config.max_seq_len > model.config.max_seq_len:
        raise XLlamaError(
            f"--max-seq-len {config.max_seq_len} is longer than the checkpoint's context "
            f"({model.config.max_seq_len})"
        )
    if config != model.config:
        state = model.state_dict()
        model = Llama(config)
        model.load_state_dict(state)
    if tokenizer.vocab_size > config.vocab_size:
        raise XLlamaError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the model {config.vocab_size}"
        )
    return model, tokenizer


def prepare_data(args, out: Path, resume: Path | None, dist, model_vocab: int, tokenizer=None):
    """(tokenizer or None, train ids, val ids, tokenizer spec) from the flags; `tokenizer` (a
    fine-tune's) encodes the text instead of one the flags choose."""
    if args.data is not None:
        ids, meta = read_token_file(args.data)
        tokenizer = None
        if meta.get("tokenizer"):
            try:
                tokenizer = load_tokenizer(str(args.data.parent / meta["tokenizer"]))
            except XLlamaError:
                tokenizer = None
        return tokenizer, ids, int(meta["vocab_size"])
    text = read_texts(args.text) if args.text else embedded_corpus()
    if tokenizer is not None:
        return tokenizer, tokenizer.encode(text), tokenizer.vocab_size
    if args.tokenizer == "char":
        tokenizer = CharTokenizer.from_text(text)
    elif args.tokenizer == "bpe":
        saved = out / "tokenizer.bpe"
        if resume is not None or (not dist.is_main and dist.enabled):
            dist.barrier()
            tokenizer = BPE.load(saved)
        else:
            tokenizer = BPE.train(text, model_vocab)
            out.mkdir(parents=True, exist_ok=True)
            tokenizer.save(saved)
            dist.barrier()
    else:
        tokenizer = load_tokenizer(args.tokenizer)
    ids = tokenizer.encode(text)
    return tokenizer, ids, tokenizer.vocab_size


def main(argv=None) -> int:
    preset = choose_preset(PRESETS, preset_flags(argv, config="small").config)
    args = build_parser(preset).parse_args(argv)
    train_cfg = dataclass_from_args(TrainConfig, args, base=preset.train)
    model_cfg = dataclass_from_args(LlamaConfig, args, base=preset.model)
    if args.out is None:
        raise XLlamaError("--out DIR is required: the run directory to write into")
    if train_cfg.batch_size < 1 or train_cfg.grad_accum < 1:
        raise XLlamaError("batch_size and grad_accum must be positive")
    lora_cfg = dataclass_from_args(LoRAConfig, args)
    if lora_cfg.lora_rank and args.init_from is None:
        raise XLlamaError("--lora-rank fine-tunes a trained model: give --init-from DIR")
    if args.quantize != "none" and not lora_cfg.lora_rank:
        raise XLlamaError(f"--quantize {args.quantize} freezes the base: give --lora-rank R too")
    base = None
    if args.init_from is not None:
        if args.tokenizer == "char":
            raise XLlamaError("--tokenizer char trains a new tokenizer; a fine-tune keeps its own")
        base, tokenizer = fine_tuning_start(args)
        model_cfg = base.config

    dist, device = setup_distributed(args.device)
    dtype = select_dtype(args.dtype, device)
    if args.resume is not None:
        args.resume = find_checkpoint(args.resume)
    claim_run_directory(
        args.out, args.resume, args.overwrite, dist
    )  # before the tokenizer is saved
    per_rank, rem = divmod(train_cfg.batch_size, train_cfg.grad_accum * dist.world_size)
    if rem or per_rank == 0:
        raise XLlamaError(
            f"batch_size {train_cfg.batch_size} must be a multiple of grad_accum "
            f"({train_cfg.grad_accum}) x processes ({dist.world_size})"
        )

    if base is not None:
        if dist.is_main:
            keep_tokenizer(tokenizer, args.out)  # the run names it, found beside its checkpoints
        tokenizer, ids, vocab = prepare_data(args, args.out, args.resume, dist, 0, tokenizer)
    else:
        tokenizer, ids, vocab = prepare_data(
            args, args.out, args.resume, dist, model_cfg.vocab_size
        )
    if (
        base is None
        and (args.data is not None or args.tokenizer != "bpe")
        and args.vocab_size is None
    ):
        model_cfg = replace(model_cfg, vocab_size=vocab)  # the tokenizer decides
    if model_cfg.vocab_size < vocab:
        raise XLlamaError(f"vocab_size {model_cfg.vocab_size} < the tokenizer's {vocab}")
    train_ids, val_ids = split_train_val(ids, train_cfg.val_fraction)
    seq_len = model_cfg.max_seq_len

    torch.manual_seed(args.seed)  # identical initial weights (and LoRA A) on every rank
    model = (Llama(model_cfg) if base is None else base).to(device)
    if args.quantize != "none":
        quantize_model(model, args.quantize, skip=QUANTIZE_SKIP)
    lora_cfg.apply(model)  # only the adapters train (rank 0: nothing changes)
    optimizer = make_optimizer(model, train_cfg, device)
    run = TrainingRun(
        args.out,
        package="xllama",
        model_config=model_cfg.to_dict(),
        train_config=asdict(train_cfg),
        model=model,
        optimizer=optimizer,
        dist=dist,
        device=device,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_every=train_cfg.checkpoint_every,
        extra_config={
            "tokenizer": tokenizer.spec() if tokenizer is not None else None,
            "data": str(args.data or (args.text and [str(t) for t in args.text]) or "embedded"),
            **({"init_from": str(args.init_from)} if base is not None else {}),
            **({"lora": asdict(lora_cfg)} if lora_cfg.lora_rank else {}),
            **({"quantize": args.quantize} if args.quantize != "none" else {}),
        },
    )
    if args.resume is None:
        seed_everything(args.seed + 1 + dist.rank)  # dropout differs per rank
    data_gen = torch.Generator().manual_seed(args.seed)
    data_state = run.data_state or {}
    if "generator" in data_state:
        data_gen.set_state(data_state["generator"])
    elapsed_before = float(data_state.get("elapsed", 0.0))

    n = model.num_params()
    if lora_cfg.lora_rank:
        trainable, total = trainable_parameters(model)
        quantized = f", base in {args.quantize}" if args.quantize != "none" else ""
        run.write(
            f"LoRA r={lora_cfg.lora_rank} α={lora_cfg.lora_alpha:g} on "
            f"{', '.join(lora_cfg.lora_targets)}: {trainable:,} trainable parameters of "
            f"{total:,} ({trainable / total:.2%}){quantized}; weights {weight_bytes(model) / 1e6:.2f} MB"
        )
    chars_per_token = None
    if tokenizer is not None and len(val_ids):
        chars_per_token = len(tokenizer.decode(val_ids.tolist())) / len(val_ids)
    run.write(
        f"xllama: {n / 1e6:.2f}M parameters, {len(train_ids):,} training / {len(val_ids):,} "
        f"validation tokens, vocab {model_cfg.vocab_size}, context {seq_len}, device {device}"
    )
    train_model = model
    if args.compile:
        train_model = torch.compile(train_model)
    if dist.enabled:
        train_model = DistributedDataParallel(train_model)

    def evaluate() -> float:
        gen = torch.Generator().manual_seed(args.seed + 12345)  # the same windows every time
        model.eval()
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for _ in range(train_cfg.eval_batches):
                x, y = random_windows(val_ids, train_cfg.batch_size, seq_len, gen)
                rows = slice(dist.rank * (len(x) // dist.world_size), None)
                rows = slice(rows.start, rows.start + len(x) // dist.world_size)
                x, y = x[rows].to(device), y[rows].to(device)
                with autocast(device, dtype):
                    total += loss_fn(model(x), y)
        model.train()
        return float(dist.all_reduce_mean(total / train_cfg.eval_batches))

    tokens_per_step = train_cfg.batch_size * seq_len
    flops = flops_per_token(model_cfg, seq_len) * tokens_per_step
    peak = next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in
                 torch.cuda.get_device_name(device)), None)  # fmt: skip
    start = time.perf_counter()
    limit_s = train_cfg.time_limit * 60 if train_cfg.time_limit else None
    val_loss = None
    last_step = run.start_step
    model.train()
    for step in run.steps(train_cfg.steps):
        t0 = time.perf_counter()
        elapsed = elapsed_before + (t0 - start)
        if limit_s is not None and elapsed >= limit_s:
            run.write(f"time limit of {train_cfg.time_limit:g} min reached after {step} steps")
            break
        progress = None if limit_s is None else elapsed / limit_s
        lr = learning_rate(step, train_cfg, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = random_windows(train_ids, train_cfg.batch_size, seq_len, data_gen)
        mine = slice(dist.rank * per_rank * train_cfg.grad_accum, None)
        x = x[mine][: per_rank * train_cfg.grad_accum].to(device)
        y = y[mine][: per_rank * train_cfg.grad_accum].to(device)
        loss_sum = torch.zeros((), device=device)
        router = torch.zeros(2 + (model_cfg.n_experts or 0), device=device)  # balance, z, fractions
        for micro in range(train_cfg.grad_accum):
            rows = slice(micro * per_rank, (micro + 1) * per_rank)
            last = micro == train_cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not dist.enabled else train_model.no_sync()
            with sync:
                with autocast(device, dtype):
                    loss = loss_fn(train_model(x[rows]), y[rows]) / train_cfg.grad_accum
                    objective = loss
                    if model_cfg.n_experts is not None:  # Mixtral: keep the experts in use
                        reduce = dist.all_reduce_mean if dist.enabled else None
                        balance, z_loss, fractions = router_losses(model, reduce)
                        aux = train_cfg.router_aux_loss_coef * balance
                        aux = aux + train_cfg.router_z_loss_coef * z_loss
                        objective = loss + aux / train_cfg.grad_accum
                        router += torch.cat([torch.stack([balance, z_loss]).detach(), fractions])
                objective.backward()
            loss_sum += loss.detach()
        run.check_finite(step, loss=loss_sum)
        if train_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        metrics = {"loss": float(dist.all_reduce_mean(loss_sum)), "lr": lr}
        if model_cfg.n_experts is not None:
            router = dist.all_reduce_mean(router / train_cfg.grad_accum).tolist()
            metrics["balance_loss"], metrics["z_loss"] = round(router[0], 5), round(router[1], 4)
            metrics["expert_fraction"] = [round(f, 4) for f in router[2:]]
        metrics["tokens_per_s"] = round(tokens_per_step / dt)
        if peak is not None:
            metrics["mfu"] = round(flops / dt / (peak * dist.world_size), 4)
        if train_cfg.eval_every and (step + 1) % train_cfg.eval_every == 0:
            val_loss = evaluate()
            metrics["val_loss"] = val_loss
            best = " (best so far)" if run.keep_best(step, val_loss) else ""
            run.write(
                f"step {step + 1}: train loss {metrics['loss']:.4f}, val loss {val_loss:.4f}{best}"
            )
        run.log(step, **metrics)
        last_step = step + 1
        state = {
            "generator": data_gen.get_state(),
            "elapsed": elapsed_before + time.perf_counter() - start,
        }
        run.end_of_step(step, state)

    val_loss = evaluate()
    run.keep_best(max(0, last_step - 1), val_loss)
    total_time = elapsed_before + time.perf_counter() - start
    state = {"generator": data_gen.get_state(), "elapsed": total_time}
    path = run.last_checkpoint
    if path is None or checkpoint_step(path) != last_step:  # not saved at this step already
        path = run.save(last_step, state)

    def per_char(loss: float) -> str:
        return "" if chars_per_token is None else f" = {loss / chars_per_token:.4f} per character"

    best = run.best
    run.log(
        max(0, last_step - 1),
        final_val_loss=val_loss,
        best_val_loss=best["val_loss"],
        best_step=best["step"],
    )
    if lora_cfg.lora_rank and dist.is_main:
        save_adapter(model, args.out / "adapter")
        save_peft_adapter(model, args.out / "adapter-peft")
    run.write(
        f"validation loss {val_loss:.4f}{per_char(val_loss)} after {last_step} steps "
        f"({last_step * tokens_per_step:,} tokens, {total_time:.0f} s); checkpoint {path}"
    )
    run.write(
        f"best validation loss {best['val_loss']:.4f}{per_char(best['val_loss'])} at step "
        f"{best['step']} ({val_loss / best['val_loss'] - 1:+.1%} at the end); "
        f"checkpoint {run.best_checkpoint}"
    )
    run.load_best()  # the sample shows the model the run is judged by
    if dist.is_main and tokenizer is not None and train_cfg.sample_tokens > 0:
        sample = sample_text(model, tokenizer, train_cfg, val_ids, args.seed)
        (args.out / "sample.txt").write_text(sample)
        print("--- sample ---\n" + sample + "\n--------------")
    dist.close()
    return 0


def sample_text(model: Llama, tokenizer, cfg: TrainConfig, val_ids, seed: int) -> str:
    """A continuation of `sample_prompt` (temperature 0.8, top-k 200, as nanoGPT samples)."""
    try:
        prompt = tokenizer.encode(cfg.sample_prompt) or [int(val_ids[0])]
    except XLlamaError:
        prompt = [int(val_ids[0])]
    room = model.config.max_seq_len - len(prompt)
    n = min(cfg.sample_tokens, room)
    out, ids = [], list(prompt)
    gen = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    while n > 0:  # longer than the context: keep the last half as the next prompt
        new = generate(model, [ids], n, temperature=0.8, top_k=200, generator=gen)[0]
        out += new
        ids = (ids + new)[-model.config.max_seq_len // 2 :]
        n = min(cfg.sample_tokens - len(out), model.config.max_seq_len - len(ids))
    return tokenizer.decode(list(prompt) + out)


def cli() -> None:
    sys.exit(run_command(main, prog="xllama.train"))


if __name__ == "__main__":
    cli()
