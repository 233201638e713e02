"""Train the Transformer as in §5 of the paper.

    python -m transformer.train --out runs/digits                 # the embedded digit task, ~1 min
    python -m transformer.train --src train.de.gz --tgt train.en.gz \\
        --valid-src val.de.gz --valid-tgt val.en.gz --config small --out runs/m30k

- Optimizer (§5.3): Adam with β1 = 0.9, β2 = 0.98, ε = 1e-9 and the warmup / inverse-square-root
  learning rate of Eq. (3); not in the paper, `--weight-decay` adds AdamW's decoupled decay.
- Regularisation (§5.4): residual dropout (in the model config) and label smoothing ε_ls = 0.1;
  not in the paper, `--bpe-dropout` (Provilkov et al. 2020) re-segments the training pairs
  every epoch.
- Batches (§5.1): sentence pairs grouped by length, about `--batch-tokens` source and target
  tokens per optimizer step (paper: 25,000 each). A step accumulates gradients over micro-batches
  of `--micro-batch-tokens` (what fits on the device) and over `torchrun` processes.
- Every epoch: validation loss, greedy-decoded BLEU (sacreBLEU) and exact match. At the end: the
  validation set translated with beam search, and a few examples printed.

Without `--src` the embedded task is used (see `transformer.data`): digit strings "translated" to
their spelled-out words in reverse order, generated offline; the default `tiny` config reaches
≥ 99% exact match on its held-out validation set in a few minutes on two CPU cores. With files,
a joint BPE vocabulary is trained on the training split and saved in the run directory.
`--config` picks a model + training preset: `tiny` (default without files), `small` (default with
files), or the paper's `base` / `big`; individual flags override the preset.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from .data import (
    DataError,
    ParallelData,
    collate,
    embedded_task,
    encode_pairs,
    read_parallel,
    resegment,
    token_batches,
)
from .model import Transformer, TransformerConfig, label_smoothed_loss, learning_rate
from .training import (
    CommandParser,
    TrainingRun,
    UserError,
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
    select_dtype,
    setup_distributed,
    weight_decay_groups,
)
from .translate import corpus_bleu, translate_sentences
from .vocabulary import (
    BPE,
    TRANSLATION_SPECIALS,
    WordVocabulary,
    load_vocabulary,
    save_vocabulary,
)

PACKAGE = "transformer"


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the defaults are the paper's base-model recipe (§5)."""

    steps: int = param(100000, "optimizer steps in total (paper: 100k for base, 300k for big)")
    batch_tokens: int = param(
        25000,
        "source (and target) tokens per optimizer step, summed over processes (paper: about 25,000)",
    )
    micro_batch_tokens: int = param(
        4096, "padded tokens per forward/backward pass; gradients accumulate up to --batch-tokens"
    )
    warmup_steps: int = param(
        4000, "linear warmup of the learning rate before its inverse-square-root decay (Eq. 3)"
    )
    lr_scale: float = param(1.0, "multiplies the whole Eq. (3) schedule (1 in the paper)")
    adam_beta1: float = param(0.9, "Adam β1 (§5.3)")
    adam_beta2: float = param(0.98, "Adam β2 (§5.3)")
    adam_eps: float = param(1e-9, "Adam ε (§5.3)")
    weight_decay: float = param(
        0.0,
        "decoupled weight decay (AdamW, Loshchilov & Hutter 2019) on the weight matrices and "
        "embeddings, not on biases and LayerNorm; 0 = the paper's Adam",
    )
    label_smoothing: float = param(0.1, "ε_ls of label smoothing (§5.4)")
    bpe_vocab_size: int = param(
        37000,
        "size of the joint BPE vocabulary trained on the training files, special tokens included "
        "(paper: about 37,000)",
    )
    bpe_dropout: float = param(
        0.0,
        "BPE-dropout (Provilkov et al. 2020): every epoch re-segments the training pairs, dropping "
        "each applicable merge with this probability (their 0.1); 0 = the paper's fixed segmentation",
    )
    max_sentence_tokens: int = param(
        256, "training pairs with a side longer than this many tokens are skipped"
    )
    time_limit: float = param(
        0.0,
        "stop after the first step that ends this many minutes after the command started (the "
        "BPE included), then checkpoint and validate as at the end; 0 = no limit. Eq. 3 does not "
        "depend on --steps, so this is --steps N with the N this machine reaches in that time",
    )
    checkpoint_every: int = param(1000, "write a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = param(
        5, "how many recent checkpoints to keep (translate --average N needs N)"
    )
    beam_size: int = param(4, "beam size of the final validation translation (§6.1)")
    length_penalty: float = param(0.6, "length penalty α of beam search (§6.1)")
    task_train_size: int = param(20000, "embedded task: number of generated training pairs")
    task_valid_size: int = param(500, "embedded task: number of held-out validation pairs")
    samples: int = param(5, "validation translations printed at the end")
    target_exact_match: float = param(
        0.0,
        "stop early once the validation exact match (greedy, checked each epoch) reaches this; 0 = never",
    )

    def __post_init__(self):
        check_config(
            self,
            positive=("steps", "batch_tokens", "micro_batch_tokens", "warmup_steps", "lr_scale",
                      "adam_eps", "bpe_vocab_size", "max_sentence_tokens", "beam_size",
                      "task_train_size", "task_valid_size"),
            non_negative=("checkpoint_every", "keep_checkpoints", "length_penalty", "samples",
                          "weight_decay", "time_limit"),
            below_one=("adam_beta1", "adam_beta2", "label_smoothing"),
            probability=("target_exact_match", "bpe_dropout"),
        )  # fmt: skip


@dataclass(frozen=True)
class Preset:
    """A named preset (`--config NAME`): one record of the model's shape and its training values.
    Flags override single fields; `--help` shows the values of the preset chosen."""

    model: TransformerConfig
    train: TrainConfig


PRESETS: dict[str, Preset] = {
    # The paper's base and big models and their recipes (Table 3, §5).
    "base": Preset(TransformerConfig(), TrainConfig()),
    "big": Preset(
        TransformerConfig(d_model=1024, n_heads=16, d_ff=4096, dropout=0.3),
        TrainConfig(steps=300000),
    ),
    # CPU budget: Multi30k in an hour of two CPU cores (2,500 steps, about 18 epochs; on a slower
    # machine the 58-minute limit stops it first, leaving the final beam pass inside the hour). A
    # 5,000-token joint BPE (Sennrich & Zhang 2019's advice for small corpora) scored higher in 60
    # minutes than 8,000 did in 67 (transformer/README.md).
    "small": Preset(
        TransformerConfig(
            d_model=256, n_encoder_layers=3, n_decoder_layers=3, n_heads=4, d_ff=1024
        ),
        TrainConfig(
            steps=2500,
            batch_tokens=4096,
            micro_batch_tokens=4096,
            warmup_steps=400,
            lr_scale=0.5,
            bpe_vocab_size=5000,
            time_limit=58,
            checkpoint_every=100,
        ),
    ),
    # The embedded task (the default without --src): pre-norm trained more steadily than
    # post-norm at this size.
    "tiny": Preset(
        TransformerConfig(
            d_model=64,
            n_encoder_layers=2,
            n_decoder_layers=2,
            n_heads=4,
            d_ff=256,
            dropout=0.0,
            pre_norm=True,
        ),
        TrainConfig(
            steps=3000,
            batch_tokens=2048,
            micro_batch_tokens=2048,
            warmup_steps=200,
            lr_scale=0.5,
            checkpoint_every=200,
            target_exact_match=0.995,
        ),
    ),
}


class TrainError(UserError):
    """A training request that cannot be carried out as asked."""


def build_parser(preset: Preset | None = None) -> argparse.ArgumentParser:
    """The flags; `preset` (default: tiny) supplies the defaults `--help` shows."""
    preset = preset or PRESETS["tiny"]
    parser = CommandParser(
        prog="transformer.train",
        description="Train the encoder-decoder Transformer (Vaswani et al. 2017). Without --src it "
        "trains on the embedded, generated digit task (no files, no downloads).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--src", type=Path, help="training source sentences, one per line (.gz ok)")
    data.add_argument("--tgt", type=Path, help="training target sentences, line-aligned with --src")
    data.add_argument("--valid-src", type=Path, help="validation source sentences")
    data.add_argument("--valid-tgt", type=Path, help="validation target sentences")
    parser.add_argument(
        "--config",
        default=None,
        help=f"model + training preset: {', '.join(PRESETS)} (default: tiny for the embedded "
        "task, small with --src)",
    )
    add_dataclass_arguments(parser, TransformerConfig, "model (the preset's values; flags override)",
                            preset.model)  # fmt: skip
    add_dataclass_arguments(parser, TrainConfig, "training (the preset's values; flags override)",
                            preset.train)  # fmt: skip
    add_common_arguments(parser)
    return parser


def load_data(args, config: TrainConfig):
    """(train source, train target, valid source, valid target) texts."""
    if args.src is None and args.tgt is None:
        if args.valid_src is not None or args.valid_tgt is not None:
            raise DataError("--valid-src/--valid-tgt need --src and --tgt")
        return embedded_task(config.task_train_size, config.task_valid_size)
    if args.src is None or args.tgt is None:
        raise DataError("give both --src and --tgt (or neither, for the embedded task)")
    train_src, train_tgt = read_parallel(args.src, args.tgt)
    if (args.valid_src is None) != (args.valid_tgt is None):
        raise DataError("give both --valid-src and --valid-tgt, or neither")
    if args.valid_src is None:  # hold out the last 1% (at most 1000 pairs) for validation
        n = min(1000, max(1, len(train_src) // 100))
        return train_src[:-n], train_tgt[:-n], train_src[-n:], train_tgt[-n:]
    valid_src, valid_tgt = read_parallel(args.valid_src, args.valid_tgt)
    return train_src, train_tgt, valid_src, valid_tgt


def build_vocabulary(args, config: TrainConfig, texts: list[str], dist, out: Path):
    """The joint vocabulary: restored from the run on --resume, else trained on rank 0 and saved."""
    if args.resume is not None:
        checkpoint = find_checkpoint(args.resume)
        run_dir = (
            checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else args.resume
        )
        return load_vocabulary(run_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if args.src is None:
            vocab = WordVocabulary.train(texts)
        else:
            vocab = BPE.train(
                texts, config.bpe_vocab_size, special_tokens=TRANSLATION_SPECIALS, progress=False
            )
        save_vocabulary(vocab, out)
    dist.barrier()
    return load_vocabulary(out)


@torch.no_grad()
def validate(model, vocab, valid: ParallelData, config: TrainConfig, device, dtype, beam_size=1):
    """Validation loss per target token, and BLEU / exact match of decoded translations."""
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for indices in token_batches(valid, 8192):
        source, target_in, target_out = (t.to(device) for t in collate(valid, indices))
        with autocast(device, dtype):
            logits = model(source, target_in)
        loss, n = label_smoothed_loss(logits, target_out, config.label_smoothing, valid.pad_id)
        total_loss, total_tokens = total_loss + loss.item(), total_tokens + n
    hypotheses = translate_sentences(
        model,
        vocab,
        valid.source_text,
        beam_size,
        config.length_penalty,
        device=device,
        dtype=dtype,
    )
    bleu, _ = corpus_bleu(hypotheses, valid.target_text)
    exact = sum(h == r for h, r in zip(hypotheses, valid.target_text)) / len(hypotheses)
    model.train()
    return total_loss / total_tokens, bleu.score, exact, hypotheses


def main(argv=None) -> int:
    started = time.perf_counter()  # --time-limit counts from here
    early = preset_flags(argv, config=None, src=None)
    preset = early.config or ("tiny" if early.src is None else "small")
    args = build_parser(choose_preset(PRESETS, preset)).parse_args(argv)
    model_config = dataclass_from_args(TransformerConfig, args, base=PRESETS[preset].model)
    config = dataclass_from_args(TrainConfig, args, base=PRESETS[preset].train)
    if args.out is None:
        raise TrainError("--out DIR is required: the run directory to write into")
    if config.bpe_dropout > 0 and args.src is None:
        raise TrainError("--bpe-dropout needs a BPE vocabulary: train on files (--src/--tgt)")

    dist, device = setup_distributed(args.device)
    dtype = select_dtype(args.dtype, device)
    train_src, train_tgt, valid_src, valid_tgt = load_data(args, config)
    claim_run_directory(args.out, args.resume, args.overwrite, dist)  # before the vocabulary
    vocab = build_vocabulary(args, config, train_src + train_tgt, dist, args.out)
    train = encode_pairs(vocab, train_src, train_tgt, config.max_sentence_tokens)
    valid = encode_pairs(vocab, valid_src, valid_tgt)
    model_config = replace(model_config, vocab_size=vocab.vocab_size, pad_id=vocab.pad_id)

    torch.manual_seed(args.seed)  # identical initial weights on every process
    model = Transformer(model_config).to(device)
    optimizer = torch.optim.AdamW(  # with weight decay 0 (the default) it is the paper's Adam
        weight_decay_groups(model, config.weight_decay),
        lr=0.0,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
    )
    run = TrainingRun(
        args.out,
        package=PACKAGE,
        model_config=asdict(model_config),
        train_config=asdict(config),
        model=model,
        optimizer=optimizer,
        dist=dist,
        device=device,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_every=config.checkpoint_every,
        keep_last=config.keep_checkpoints,
        extra_config={"preset": preset, "seed": args.seed, "vocabulary": vocab.kind},
        deadline=started + config.time_limit * 60 if config.time_limit else None,
    )
    if args.resume is None:
        torch.manual_seed(args.seed + 1 + dist.rank)  # dropout streams differ between processes
    n_params = sum(p.numel() for p in model.parameters())
    run.write(
        f"transformer: {preset} config, {n_params / 1e6:.2f}M parameters, vocabulary "
        f"{vocab.vocab_size} ({vocab.kind}), {len(train)} training / {len(valid)} validation pairs, "
        f"device {device}, {dist.world_size} process(es)"
    )
    trained = model
    if args.compile:
        trained = torch.compile(trained)
    if dist.enabled:
        trained = DistributedDataParallel(trained)

    # Micro-batches per optimizer step, over all processes: process r takes every world-th one.
    per_step = max(1, math.ceil(config.batch_tokens / config.micro_batch_tokens))
    per_step = math.ceil(per_step / dist.world_size) * dist.world_size

    def epoch_batches(epoch: int) -> tuple[ParallelData, list[list[int]]]:
        """The training pairs as segmented for `epoch` (fixed, or drawn anew by BPE-dropout) and
        their micro-batches in that epoch's order."""
        pairs = train
        if config.bpe_dropout > 0:
            pairs = resegment(train, vocab, config.bpe_dropout, seed=f"{args.seed} {epoch}")
        return pairs, token_batches(pairs, config.micro_batch_tokens, args.seed + epoch)

    state = run.data_state or {"epoch": 0, "index": 0}
    pairs, batches = epoch_batches(state["epoch"])
    if len(batches) < per_step:
        raise TrainError(
            f"the training data fills {len(batches)} micro-batches, fewer than the {per_step} "
            "one step needs; lower --batch-tokens"
        )
    last_time, tokens_since = time.perf_counter(), 0
    done_steps = config.steps
    trained.train()
    for step in run.steps(config.steps):
        mine = batches[state["index"] + dist.rank : state["index"] + per_step : dist.world_size]
        micro = [collate(pairs, indices) for indices in mine]
        local_tokens = sum(int((m[2] != train.pad_id).sum()) for m in micro)
        total = torch.tensor([float(local_tokens), 0.0], device=device)
        if dist.enabled:
            torch_dist.all_reduce(total)
        step_tokens = total[0].item()
        loss_sum = torch.zeros((), device=device)
        for j, (source, target_in, target_out) in enumerate(micro):
            source, target_in, target_out = (
                source.to(device),
                target_in.to(device),
                target_out.to(device),
            )
            syncing = (
                trained.no_sync()
                if dist.enabled and j < len(micro) - 1
                else contextlib.nullcontext()
            )
            with syncing, autocast(device, dtype):
                logits = trained(source, target_in)
                loss, _ = label_smoothed_loss(
                    logits, target_out, config.label_smoothing, train.pad_id
                )
                # DDP averages gradients over processes: scale so the step's gradient is the
                # mean over every target token of the global batch.
                (loss * dist.world_size / step_tokens).backward()
            loss_sum += loss.detach()
        step_loss = loss_sum / step_tokens
        if dist.enabled:
            step_loss = dist.all_reduce_mean(step_loss) * dist.world_size
        run.check_finite(step, loss=step_loss)
        lr = learning_rate(step + 1, model_config.d_model, config.warmup_steps, config.lr_scale)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_since += step_tokens
        now = time.perf_counter()
        run.log(step, loss=step_loss.item(), lr=lr, tok_s=round(tokens_since / (now - last_time)))
        last_time, tokens_since = now, 0

        state["index"] += per_step
        if state["index"] + per_step > len(batches):  # end of an epoch: validate, reshuffle
            if dist.is_main:
                valid_loss, bleu, exact, _ = validate(
                    run.raw_model, vocab, valid, config, device, dtype
                )
                run.log(
                    step, epoch=state["epoch"] + 1, valid_loss=valid_loss, bleu=bleu, exact=exact
                )
                run.write(
                    f"epoch {state['epoch'] + 1} (step {step + 1}): valid loss {valid_loss:.4f}, "
                    f"BLEU {bleu:.2f} (greedy), exact match {exact:.2%}"
                )
            reached = dist.is_main and 0 < config.target_exact_match <= exact
            state = {"epoch": state["epoch"] + 1, "index": 0}
            pairs, batches = epoch_batches(state["epoch"])
            last_time = time.perf_counter()
            if dist.any(reached, device):
                run.write(f"validation exact match reached {config.target_exact_match:.1%}: stop")
                done_steps = step + 1
                break
        if run.end_of_step(step, state):
            run.write(f"time limit of {config.time_limit:g} minutes reached after step {step + 1}")
            done_steps = step + 1
            break
    if run.last_checkpoint is None or checkpoint_step(run.last_checkpoint) != done_steps:
        run.save(done_steps, state)

    if dist.is_main:
        valid_loss, bleu, exact, hypotheses = validate(
            run.raw_model, vocab, valid, config, device, dtype, beam_size=config.beam_size
        )
        run.log(done_steps - 1, final_valid_loss=valid_loss, final_bleu=bleu, final_exact=exact)
        run.write(
            f"final (beam {config.beam_size}, α {config.length_penalty}): valid loss "
            f"{valid_loss:.4f}, BLEU {bleu:.2f}, exact match {exact:.2%}"
        )
        for i in range(min(config.samples, len(valid))):
            run.write(f"  source:      {valid.source_text[i]}")
            run.write(f"  reference:   {valid.target_text[i]}")
            run.write(f"  translation: {hypotheses[i]}")
        run.write(f"checkpoint: {run.last_checkpoint}")
    dist.close()
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="transformer-train"))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="transformer.train"))
