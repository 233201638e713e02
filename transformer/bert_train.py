"""Pretrain BERT (§3.1: masked LM, next sentence prediction as an option) and fine-tune it on a
sentence-pair classification task (§4).

    python -m transformer.bert_train --out runs/bert                   # MLM on the embedded corpus
    D=../shared/data/multi30k
    python -m transformer.bert_train --text $D/train.en.gz $D/train.de.gz --out runs/bert-m30k
    python -m transformer.bert_train --task pairs --src $D/train.en.gz --tgt $D/train.de.gz \\
        --valid-src $D/val.en.gz --valid-tgt $D/val.de.gz --init-from runs/bert-m30k --out runs/pairs

**Pretraining** (`--task mlm`, the default): the text's non-empty lines are the sentences. A
WordPiece vocabulary of `--wordpiece-vocab-size` is trained on them (or `--vocab FILE` is used). Without
`--nsp` (the default, as RoBERTa, Liu et al. 2019, found NSP unhelpful), each example is a window
of `--seq-len` − 2 consecutive tokens across sentences, `[CLS] … [SEP]`; with `--nsp`, sentence A
is followed by its true next sentence half of the time and by a random one otherwise, and the NSP
loss is added. 15% of the tokens are chosen for the masked-LM loss (80% [MASK], 10% random, 10%
kept). Optimiser as in the paper: Adam with decoupled weight decay 0.01 (not on biases and
LayerNorm), β = (0.9, 0.999), linear warm-up then linear decay. The last `--valid-fraction` of the
sentences is held out: masked-LM loss and accuracy on them.

**Fine-tuning** (`--task pairs`): line-aligned files A and B (e.g. English and German captions).
Each example is `[CLS] a [SEP] b [SEP]`, labelled "pair" when b is a's own line and "not a pair"
when b is another line's: with `--negatives hard` (default) the B line of the A line with the
most words in common among 64 random ones (a near miss), with `random` any other line. `--init-from
RUN` starts from a pretraining run (its vocabulary and weights); without it the same model starts
from random weights, with a vocabulary trained on the pairs. Reported: validation accuracy, every
line with its own pair and its negative.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tokenizer import WordPieceTokenizer
from tokenizer.data import embedded_corpus
from tokenizer.wordpiece import SPECIALS

from .bert import IGNORE, Bert, BertClassifier, BertConfig, mask_tokens
from .bert import PRESETS as MODEL_PRESETS
from .data import DataError, read_lines, read_parallel
from .training import (
    CommandParser,
    ConfigError,
    TrainingRun,
    UserError,
    add_common_arguments,
    add_dataclass_arguments,
    autocast,
    check_config,
    checkpoint_step,
    choose_preset,
    claim_run_directory,
    config_from_dict,
    dataclass_from_args,
    find_checkpoint,
    load_weights,
    param,
    preset_flags,
    read_config,
    run_command,
    select_dtype,
    setup_distributed,
    weight_decay_groups,
)

PACKAGE = "transformer.bert"
VOCAB_FILE = "vocab.txt"
POOL = 64  # candidates searched for each hard negative


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the defaults are the paper's pretraining recipe (§3.1, Appendix A.2)."""

    steps: int = param(1_000_000, "optimizer steps (paper: 1M)")
    batch_size: int = param(256, "sequences per step, over all processes (paper: 256)")
    seq_len: int = param(512, "tokens per sequence, [CLS] and [SEP] included (paper: 512)")
    lr: float = param(1e-4, "peak learning rate (paper: 1e-4 pretraining, 2e-5..5e-5 fine-tuning)")
    warmup_steps: int = param(10_000, "linear warm-up steps, then linear decay to 0 (paper: 10k)")
    weight_decay: float = param(0.01, "decoupled weight decay, not on biases and LayerNorm")
    adam_beta1: float = param(0.9, "Adam β1")
    adam_beta2: float = param(0.999, "Adam β2")
    adam_eps: float = param(1e-6, "Adam ε (BERT's code: 1e-6)")
    mask_prob: float = param(0.15, "fraction of tokens chosen for the masked-LM loss (§3.1)")
    nsp: bool = param(
        False, "add next sentence prediction (the paper's Task #2; off as in RoBERTa)"
    )
    wordpiece_vocab_size: int = param(
        30522, "size of the WordPiece vocabulary trained on the text (BERT: 30,522)"
    )
    negatives: str = param("hard", "pairs task: hard (a near-miss line) or random negatives")
    valid_fraction: float = param(0.02, "mlm: fraction of the sentences held out, from the end")
    eval_every: int = param(500, "validate every this many steps (and at the end)")
    eval_batches: int = param(20, "mlm: validation batches (fixed masks)")
    checkpoint_every: int = param(1000, "write a checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = param(2, "how many recent checkpoints to keep")

    def __post_init__(self):
        check_config(
            self,
            positive=("steps", "batch_size", "seq_len", "lr", "adam_eps", "wordpiece_vocab_size",
                      "eval_every", "eval_batches"),
            non_negative=("warmup_steps", "weight_decay", "checkpoint_every", "keep_checkpoints"),
            below_one=("adam_beta1", "adam_beta2"),
        )  # fmt: skip
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"TrainConfig.mask_prob must be in (0, 1), got {self.mask_prob}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ConfigError(
                f"TrainConfig.valid_fraction must be in (0, 1), got {self.valid_fraction}"
            )
        if self.negatives not in ("hard", "random"):
            raise ConfigError(
                f"TrainConfig.negatives must be hard or random, got {self.negatives!r}"
            )
        if self.seq_len < 8:
            raise ConfigError(
                f"TrainConfig.seq_len {self.seq_len} is too short for [CLS] A [SEP] B [SEP]"
            )


@dataclass(frozen=True)
class Preset:
    model: BertConfig
    train: TrainConfig


_CPU = TrainConfig(steps=3000, batch_size=32, seq_len=64, lr=5e-4, warmup_steps=200,
                   wordpiece_vocab_size=8000, eval_every=250, checkpoint_every=500)  # fmt: skip
PRESETS = {
    "base": Preset(MODEL_PRESETS["base"], TrainConfig()),
    "large": Preset(MODEL_PRESETS["large"], TrainConfig()),
    # CPU sizes (Turc et al. 2019's BERT-mini and -tiny shapes), minutes on two cores.
    "mini": Preset(replace(MODEL_PRESETS["mini"], max_len=64), _CPU),
    "tiny": Preset(
        replace(MODEL_PRESETS["tiny"], max_len=64), replace(_CPU, wordpiece_vocab_size=4000)
    ),
}


class BertTrainError(UserError):
    """A training request that cannot be carried out as asked."""


def build_parser(preset: Preset | None = None) -> argparse.ArgumentParser:
    preset = preset or PRESETS["mini"]
    parser = CommandParser(
        prog="transformer.bert_train",
        description="Pretrain BERT with the masked-LM objective (and NSP with --nsp), or fine-tune "
        "it on sentence pairs (--task pairs). Without files it pretrains on the embedded corpus.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--task",
        choices=["mlm", "pairs"],
        default="mlm",
        help="mlm: pretrain (§3.1); pairs: fine-tune a pair classifier (§4) (default: mlm)",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--text", type=Path, nargs="+", help="mlm: text files, one sentence per "
                      "line (.gz ok) (default: the embedded pydoc corpus)")  # fmt: skip
    data.add_argument("--src", type=Path, help="pairs: the A lines (.gz ok)")
    data.add_argument("--tgt", type=Path, help="pairs: the B lines, line-aligned with --src")
    data.add_argument("--valid-src", type=Path, help="pairs: validation A lines")
    data.add_argument("--valid-tgt", type=Path, help="pairs: validation B lines")
    data.add_argument(
        "--vocab", type=Path, help="a WordPiece vocab.txt to use instead of training one"
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        help="pairs: start from this pretraining run or checkpoint (its vocabulary, shape and "
        "weights) (default: random initialisation)",
    )
    parser.add_argument(
        "--config",
        default="mini",
        help=f"preset of model and training values: {', '.join(PRESETS)} (default: mini)",
    )
    add_dataclass_arguments(parser, BertConfig, "model (the preset's values; flags override)",
                            preset.model)  # fmt: skip
    add_dataclass_arguments(parser, TrainConfig, "training (the preset's values; flags override)",
                            preset.train)  # fmt: skip
    add_common_arguments(parser)
    return parser


# -- data -------------------------------------------------------------------------------------------


def read_sentences(paths: list[Path] | None) -> list[str]:
    lines = (
        embedded_corpus().splitlines() if not paths else [x for p in paths for x in read_lines(p)]
    )
    sentences = [line.strip() for line in lines if line.strip()]
    if len(sentences) < 2:
        raise DataError("the text has fewer than two non-empty lines")
    return sentences


def vocabulary(args, config: TrainConfig, texts: list[str], dist, out: Path) -> WordPieceTokenizer:
    """The run's WordPiece vocabulary: the resumed run's, --vocab, or trained on rank 0 and saved."""
    if args.resume is not None:
        checkpoint = find_checkpoint(args.resume)
        run_dir = (
            checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else args.resume
        )
        return WordPieceTokenizer.load(run_dir / VOCAB_FILE)
    if dist.is_main:
        if args.vocab is not None:
            tokenizer = WordPieceTokenizer.load(args.vocab)
        else:
            tokenizer = WordPieceTokenizer.train(texts, config.wordpiece_vocab_size, progress=True)
        tokenizer.save(out / VOCAB_FILE)
    dist.barrier()
    return WordPieceTokenizer.load(out / VOCAB_FILE)


def special_ids(tokenizer: WordPieceTokenizer) -> tuple[int, int, int, int]:
    missing = [t for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]") if t not in tokenizer.token_to_id]
    if missing:
        raise BertTrainError(f"the vocabulary has no {', '.join(missing)}")
    return tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """(ids, segments, attention mask) tensors of (ids, segments) rows, right-padded."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    segments = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row_ids, row_segments) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        segments[r, : len(row_segments)] = torch.tensor(row_segments)
    return ids, segments, ids != pad_id


def truncate_pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Drop tokens from the end of the longer sequence until both fit (BERT's truncation)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) > len(b) else b).pop()
    return a, b


def pair_row(a: list[int], b: list[int], seq_len: int, cls: int, sep: int):
    a, b = truncate_pair(a, b, seq_len - 3)
    return [cls, *a, sep, *b, sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)


class MaskedLMData:
    """Sentences as WordPiece ids; batches of windows (or NSP sentence pairs), masked."""

    def __init__(self, sentences: list[list[int]], tokenizer, config: TrainConfig):
        self.sentences = [s for s in sentences if s]
        self.stream = torch.tensor([i for s in self.sentences for i in s], dtype=torch.long)
        self.config = config
        self.cls, self.sep, self.mask, self.pad = special_ids(tokenizer)
        self.vocab_size = tokenizer.vocab_size
        self.random_from = (
            len(SPECIALS) if tokenizer.vocab[: len(SPECIALS)] == list(SPECIALS) else 0
        )
        if len(self.stream) < config.seq_len or len(self.sentences) < 2:
            raise DataError(
                f"the text has {len(self.stream)} tokens, fewer than one sequence of {config.seq_len}"
            )

    def batch(self, size: int, gen: torch.Generator):
        """(ids, segments, attention, labels, nsp labels or None), all of `size` rows."""
        n = self.config.seq_len
        if not self.config.nsp:
            starts = torch.randint(0, len(self.stream) - (n - 2) + 1, (size,), generator=gen)
            windows = torch.stack([self.stream[s : s + n - 2] for s in starts.tolist()])
            column = lambda value: torch.full((size, 1), value, dtype=torch.long)  # noqa: E731
            ids = torch.cat([column(self.cls), windows, column(self.sep)], 1)
            segments, attention, nsp = (
                torch.zeros_like(ids),
                torch.ones_like(ids, dtype=torch.bool),
                None,
            )
        else:
            first = torch.randint(0, len(self.sentences) - 1, (size,), generator=gen).tolist()
            is_random = (torch.rand(size, generator=gen) < 0.5).tolist()
            other = torch.randint(0, len(self.sentences), (size,), generator=gen).tolist()
            rows = [
                pair_row(
                    self.sentences[i], self.sentences[j if r else i + 1], n, self.cls, self.sep
                )
                for i, j, r in zip(first, other, is_random)
            ]
            ids, segments, attention = pad_batch(rows, self.pad)
            nsp = torch.tensor(is_random, dtype=torch.long)  # 0 IsNext, 1 NotNext
        maskable = attention & (ids != self.cls) & (ids != self.sep)
        inputs, labels = mask_tokens(ids, maskable, self.mask, self.vocab_size, gen,
                                     self.config.mask_prob, self.random_from)  # fmt: skip
        return inputs, segments, attention, labels, nsp


class PairData:
    """Line pairs (a, b) with their negatives: the b of another line, chosen at random or as the
    near miss among POOL random lines (most words of a in common)."""

    def __init__(self, a_lines, b_lines, tokenizer, config: TrainConfig, seed: int):
        self.a = [tokenizer.encode(x) for x in a_lines]
        self.b = [tokenizer.encode(x) for x in b_lines]
        self.config = config
        self.cls, self.sep, _, self.pad = special_ids(tokenizer)
        if len(self.a) < 2:
            raise DataError("the pair files need at least two lines")
        rng = random.Random(seed)
        n = len(self.a)
        words = [set(x.lower().split()) for x in a_lines]
        self.negative = []
        for i in range(n):
            pool = [j for j in (rng.randrange(n) for _ in range(POOL)) if b_lines[j] != b_lines[i]]
            if not pool:
                pool = [(i + 1) % n]
            if config.negatives == "hard":
                pool = [max(pool, key=lambda j, mine=words[i]: _jaccard(mine, words[j]))]
            self.negative.append(pool[0])

    def __len__(self) -> int:
        return len(self.a)

    def example(self, i: int, negative: bool):
        b = self.b[self.negative[i]] if negative else self.b[i]
        return pair_row(self.a[i], b, self.config.seq_len, self.cls, self.sep)

    def batch(self, size: int, gen: torch.Generator):
        index = torch.randint(0, len(self), (size,), generator=gen).tolist()
        negative = (torch.rand(size, generator=gen) < 0.5).tolist()
        ids, segments, attention = pad_batch(
            [self.example(i, r) for i, r in zip(index, negative)], self.pad
        )
        return ids, segments, attention, torch.tensor(negative, dtype=torch.long)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / (len(a | b) or 1)


# -- the losses ----------------------------------------------------------------------------------


class PretrainingLoss(nn.Module):
    """§3.1: the masked-LM loss summed over the chosen positions (divided by the global count in
    the loop), plus the mean NSP loss when there are NSP labels. A module so DDP sees one forward."""

    def __init__(self, bert: Bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids, segments, attention, labels, nsp_labels=None):
        hidden = self.bert(ids, segments, attention)
        chosen = labels != IGNORE
        logits = self.bert.mlm_logits(hidden[chosen])
        mlm_sum = F.cross_entropy(logits.float(), labels[chosen], reduction="sum")
        correct = (logits.argmax(-1) == labels[chosen]).sum()
        nsp = None
        if nsp_labels is not None:
            nsp = F.cross_entropy(self.bert.nsp_logits(hidden).float(), nsp_labels)
        return mlm_sum, correct, nsp


def linear_schedule(step: int, config: TrainConfig) -> float:
    """Linear warm-up to the peak, then linear decay to 0 at the last step (BERT's schedule)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    return config.lr * max(0.0, (config.steps - step) / max(1, config.steps - config.warmup_steps))


# -- the command ---------------------------------------------------------------------------------


def start_model(args, model_cfg: BertConfig):
    """(BertConfig, checkpoint to start from or None) for --init-from."""
    if args.init_from is None:
        return model_cfg, None
    checkpoint = find_checkpoint(args.init_from)
    config = read_config(checkpoint)
    if config.get("package") != PACKAGE or config.get("task") != "mlm":
        raise BertTrainError(f"--init-from {args.init_from} is not a BERT pretraining run")
    shape = [f.name for f in fields(BertConfig) if getattr(args, f.name) is not None
             and f.name not in ("dropout", "attention_dropout")]  # fmt: skip
    if shape:
        flags = ", ".join("--" + name.replace("_", "-") for name in shape)
        raise BertTrainError(f"{flags}: the model's shape comes from --init-from {args.init_from}")
    if args.vocab is not None:
        raise BertTrainError("--vocab: a fine-tune uses the vocabulary of --init-from")
    base = config_from_dict(BertConfig, config.get("model"), f"{checkpoint}/config.json model")
    keep = {
        k: getattr(args, k)
        for k in ("dropout", "attention_dropout")
        if getattr(args, k) is not None
    }
    return replace(base, **keep), checkpoint


def main(argv=None) -> int:
    name = preset_flags(argv, config="mini").config
    preset = choose_preset(PRESETS, name)
    args = build_parser(preset).parse_args(argv)
    train_cfg = dataclass_from_args(TrainConfig, args, base=preset.train)
    model_cfg = dataclass_from_args(BertConfig, args, base=preset.model)
    if args.out is None:
        raise BertTrainError("--out DIR is required: the run directory to write into")
    if args.task == "mlm" and (args.src or args.tgt or args.init_from):
        raise BertTrainError("--src/--tgt/--init-from are for --task pairs")
    if args.task == "pairs" and args.text:
        raise BertTrainError("--text is for --task mlm; pairs read --src and --tgt")
    if args.task == "pairs" and (args.src is None or args.tgt is None):
        raise BertTrainError("--task pairs needs --src and --tgt")
    model_cfg, init_checkpoint = start_model(args, model_cfg)
    if init_checkpoint is not None and args.seq_len is None:  # as long as the model allows
        train_cfg = replace(train_cfg, seq_len=min(train_cfg.seq_len, model_cfg.max_len))
    if train_cfg.seq_len > model_cfg.max_len:
        raise BertTrainError(
            f"--seq-len {train_cfg.seq_len} is longer than the position table (--max-len "
            f"{model_cfg.max_len})"
        )

    dist, device = setup_distributed(args.device)
    dtype = select_dtype(args.dtype, device)
    if train_cfg.batch_size % dist.world_size:
        raise BertTrainError(
            f"batch_size {train_cfg.batch_size} must be a multiple of the {dist.world_size} processes"
        )
    # Data first: a bad file is refused before the run directory is touched.
    if args.task == "mlm":
        sentences = read_sentences(args.text)
        texts = sentences
    else:
        a_lines, b_lines = read_parallel(args.src, args.tgt)
        if (args.valid_src is None) != (args.valid_tgt is None):
            raise DataError("give both --valid-src and --valid-tgt, or neither")
        if args.valid_src is None:
            n = min(1000, max(2, len(a_lines) // 50))
            valid_a, valid_b = a_lines[-n:], b_lines[-n:]
            a_lines, b_lines = a_lines[:-n], b_lines[:-n]
        else:
            valid_a, valid_b = read_parallel(args.valid_src, args.valid_tgt)
        texts = a_lines + b_lines
    if args.resume is not None:
        args.resume = find_checkpoint(args.resume)
    claim_run_directory(args.out, args.resume, args.overwrite, dist)  # before the vocabulary
    if init_checkpoint is not None and args.resume is None:
        run_dir = init_checkpoint.parent.parent
        args.vocab = run_dir / VOCAB_FILE
    tokenizer = vocabulary(args, train_cfg, texts, dist, args.out)
    if init_checkpoint is None:
        model_cfg = replace(
            model_cfg, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id or 0
        )
    elif model_cfg.vocab_size != tokenizer.vocab_size:
        raise BertTrainError(f"the vocabulary of --init-from has {tokenizer.vocab_size} tokens, "
                             f"its model {model_cfg.vocab_size}")  # fmt: skip

    torch.manual_seed(args.seed)  # identical initial weights on every process
    bert = Bert(model_cfg)
    if args.task == "mlm":
        split = max(1, int(len(sentences) * (1 - train_cfg.valid_fraction)))
        encoded = [tokenizer.encode(s) for s in sentences]
        train_data = MaskedLMData(encoded[:split], tokenizer, train_cfg)
        valid_data = MaskedLMData(encoded[split:], tokenizer, train_cfg)
        if not train_cfg.nsp:  # the pooler and the NSP layer get no gradient: freeze them
            for module in (bert.pooler, bert.nsp):
                module.requires_grad_(False)
        model, trained = bert, PretrainingLoss(bert)
    else:
        if init_checkpoint is not None:
            load_weights(init_checkpoint, bert)
        for module in (bert.mlm_transform, bert.mlm_norm, bert.nsp):
            module.requires_grad_(False)
        bert.mlm_bias.requires_grad_(False)
        model = trained = BertClassifier(bert)
        train_data = PairData(a_lines, b_lines, tokenizer, train_cfg, args.seed)
        valid_data = PairData(valid_a, valid_b, tokenizer, train_cfg, args.seed + 1)
    model.to(device)
    optimizer = torch.optim.AdamW(  # BERT decays every weight matrix, not biases and LayerNorm
        weight_decay_groups(model, train_cfg.weight_decay),
        lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2), eps=train_cfg.adam_eps,
    )  # fmt: skip
    run = TrainingRun(
        args.out,
        package=PACKAGE,
        model_config=model_cfg.to_dict(),
        train_config=asdict(train_cfg),
        model=model,
        optimizer=optimizer,
        dist=dist,
        device=device,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_every=train_cfg.checkpoint_every,
        keep_last=train_cfg.keep_checkpoints,
        extra_config={
            "task": args.task,
            "preset": name,
            "seed": args.seed,
            "data": [str(p) for p in args.text] if args.text else (
                [str(args.src), str(args.tgt)] if args.src else "embedded"),
            **({"init_from": str(init_checkpoint)} if init_checkpoint else {}),
        },
    )  # fmt: skip
    if args.resume is None:
        torch.manual_seed(args.seed + 1 + dist.rank)  # dropout differs per process
    gen = torch.Generator().manual_seed(args.seed)
    state = run.data_state or {}
    if "generator" in state:
        gen.set_state(state["generator"])
    n_params = sum(p.numel() for p in model.parameters())
    what = (
        f"{len(train_data.sentences):,} sentences ({len(train_data.stream):,} tokens)"
        if args.task == "mlm"
        else f"{len(train_data):,} pairs, {train_cfg.negatives} negatives"
    )
    start = f"{name} preset, random initialisation"
    if init_checkpoint is not None:
        start = f"from {init_checkpoint}"
    run.write(
        f"BERT {args.task}: {n_params / 1e6:.2f}M parameters (L={model_cfg.n_layers}, "
        f"H={model_cfg.d_model}, A={model_cfg.n_heads}), {start}; WordPiece {tokenizer.vocab_size}; "
        f"{what}; device {device}, {dist.world_size} process(es)"
    )
    step_model = trained
    if args.compile:
        step_model = torch.compile(step_model)
    if dist.enabled:
        step_model = DistributedDataParallel(step_model)
    rows = slice(dist.rank * (train_cfg.batch_size // dist.world_size),
                 (dist.rank + 1) * (train_cfg.batch_size // dist.world_size))  # fmt: skip

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            if args.task == "mlm":
                result = validate_mlm(bert, valid_data, train_cfg, device, dtype, args.seed)
            else:
                result = validate_pairs(model, valid_data, device, dtype)
        model.train()
        return result

    model.train()
    last = time.perf_counter()
    result = {}
    for step in run.steps(train_cfg.steps):
        lr = linear_schedule(step, train_cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [
            t[rows] if t is not None else None for t in train_data.batch(train_cfg.batch_size, gen)
        ]
        batch = [t.to(device) if t is not None else None for t in batch]
        with autocast(device, dtype):
            if args.task == "mlm":
                ids, segments, attention, labels, nsp_labels = batch
                chosen = torch.tensor(float((labels != IGNORE).sum()), device=device)
                if dist.enabled:
                    torch_dist.all_reduce(chosen)
                mlm_sum, correct, nsp = step_model(ids, segments, attention, labels, nsp_labels)
                # DDP averages gradients over processes: scale to the mean over all chosen tokens.
                loss = mlm_sum * dist.world_size / chosen.clamp_min(1)
                if nsp is not None:
                    loss = loss + nsp
                stats = {"mlm_loss": dist.all_reduce_mean(mlm_sum.detach()) * dist.world_size
                         / chosen.clamp_min(1),
                         "mlm_acc": dist.all_reduce_mean(correct.float()) * dist.world_size
                         / chosen.clamp_min(1)}  # fmt: skip
                if nsp is not None:
                    stats["nsp_loss"] = dist.all_reduce_mean(nsp.detach())
            else:
                ids, segments, attention, labels = batch
                logits = step_model(ids, segments, attention)
                loss = F.cross_entropy(logits.float(), labels)
                acc = (logits.argmax(-1) == labels).float().mean()
                stats = {
                    "loss": dist.all_reduce_mean(loss.detach()),
                    "acc": dist.all_reduce_mean(acc),
                }
        run.check_finite(step, **stats)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        now = time.perf_counter()
        run.log(step, lr=lr, **{k: float(v) for k, v in stats.items()}, step_s=round(now - last, 4))
        last = now
        if (step + 1) % train_cfg.eval_every == 0 or step + 1 == train_cfg.steps:
            result = evaluate()
            run.log(step, **result)
            run.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        run.end_of_step(step, {"generator": gen.get_state()})
    if run.last_checkpoint is None or checkpoint_step(run.last_checkpoint) != train_cfg.steps:
        run.save(train_cfg.steps, {"generator": gen.get_state()})
    if dist.is_main:
        result = result or evaluate()
        if args.task == "mlm":
            show_fill_in(bert, tokenizer, sentences[split:], train_cfg, device, run.write)
        run.write(f"checkpoint: {run.last_checkpoint}")
    dist.close()
    return 0


def validate_mlm(bert, data: MaskedLMData, config: TrainConfig, device, dtype, seed) -> dict:
    """Masked-LM loss and accuracy on held-out text, the same masks every time."""
    gen = torch.Generator().manual_seed(seed + 12345)
    total, correct, chosen, nsp_total = 0.0, 0, 0, 0.0
    loss_module = PretrainingLoss(bert)
    for _ in range(config.eval_batches):
        ids, segments, attention, labels, nsp = (
            t.to(device) if t is not None else None for t in data.batch(config.batch_size, gen)
        )
        with autocast(device, dtype):
            mlm_sum, right, nsp_loss = loss_module(ids, segments, attention, labels, nsp)
        total, correct = total + float(mlm_sum), correct + int(right)
        chosen += int((labels != IGNORE).sum())
        nsp_total += float(nsp_loss) if nsp_loss is not None else 0.0
    result = {"valid_mlm_loss": total / max(1, chosen), "valid_mlm_acc": correct / max(1, chosen)}
    if config.nsp:
        result["valid_nsp_loss"] = nsp_total / config.eval_batches
    return result


def validate_pairs(model, data: PairData, device, dtype) -> dict:
    """Accuracy over every validation line with its own pair and with its negative."""
    right, total = 0, 0
    examples = [(i, neg) for i in range(len(data)) for neg in (False, True)]
    for start in range(0, len(examples), 256):
        chunk = examples[start : start + 256]
        ids, segments, attention = pad_batch([data.example(i, neg) for i, neg in chunk], data.pad)
        labels = torch.tensor([int(neg) for _, neg in chunk], device=device)
        with autocast(device, dtype):
            logits = model(ids.to(device), segments.to(device), attention.to(device))
        right += int((logits.argmax(-1) == labels).sum())
        total += len(chunk)
    return {"valid_acc": right / total}


def show_fill_in(bert, tokenizer, sentences, config, device, write, n: int = 3) -> None:
    """The end-of-training sample: held-out sentences with a word masked, and the top guesses."""
    bert.eval()
    rng = random.Random(0)
    cls, sep, mask, _ = special_ids(tokenizer)
    shown = 0
    for sentence in sentences:
        ids = tokenizer.encode(sentence)[: config.seq_len - 2]
        words = [
            i
            for i, t in enumerate(ids)
            if tokenizer.vocab[t].isalpha() and len(tokenizer.vocab[t]) > 3
        ]
        if len(ids) < 6 or not words:
            continue
        where = rng.choice(words)
        masked = [cls, *ids[:where], mask, *ids[where + 1 :], sep]
        with torch.no_grad():
            x = torch.tensor([masked], device=device)
            logits = bert.mlm_logits(bert(x))[0, where + 1]
        guesses = [tokenizer.vocab[i] for i in logits.topk(3).indices.tolist()]
        text = tokenizer.decode(masked[1:-1])
        write(f"  {text!r}: [MASK] = {tokenizer.vocab[ids[where]]!r}; guesses {guesses}")
        shown += 1
        if shown == n:
            break


def cli() -> None:
    sys.exit(run_command(main, prog="transformer-bert-train"))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="transformer.bert_train"))
