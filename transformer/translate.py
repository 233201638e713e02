"""Translate with a trained Transformer: greedy or beam search (§6.1), checkpoint averaging, BLEU.

    python -m transformer.translate --checkpoint runs/digits --input src.txt
    echo "3 1 4" | python -m transformer.translate --checkpoint runs/digits
    python -m transformer.translate --checkpoint runs/m30k --average 5 --beam 4 \\
        --input test.de.gz --reference test.en.gz

`--checkpoint` is a run directory (its latest checkpoint) or one checkpoint directory. With
`--average N` the weights of the run's last N checkpoints are averaged first, as the paper did for
its base models (last 5 checkpoints, §6.1). With `--reference` the translations are scored with
sacreBLEU (detokenized corpus BLEU, default 13a tokenization) and its signature is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .data import DataError, read_lines, source_batches, source_tensor
from .model import Transformer, TransformerConfig, beam_search, greedy_decode
from .training import (
    CheckpointError,
    CommandParser,
    add_common_arguments,
    autocast,
    check_checkpoint,
    checkpoint_step,
    config_from_dict,
    find_checkpoint,
    list_checkpoints,
    load_weights,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_command,
    select_device,
    select_dtype,
    steps_bar,
)
from .vocabulary import load_vocabulary

PACKAGE = "transformer"


def _run_directory(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (run/checkpoints/step_N -> run)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


@torch.no_grad()
def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """§6.1 checkpoint averaging: the element-wise mean of each parameter over the checkpoints."""
    if not state_dicts:
        raise ValueError("nothing to average")
    averaged = {}
    for name in state_dicts[0]:
        stacked = torch.stack([sd[name].double() for sd in state_dicts])
        averaged[name] = stacked.mean(0).to(state_dicts[0][name].dtype)
    return averaged


def load_model(path: Path, average: int = 1) -> tuple[Transformer, object, dict]:
    """A trained model (optionally the average of the run's last `average` checkpoints), its
    vocabulary and the run's config."""
    checkpoint = find_checkpoint(Path(path))
    config = check_checkpoint(checkpoint, PACKAGE)
    model_config = config_from_dict(
        TransformerConfig, config.get("model"), f"{checkpoint}/config.json: model"
    )
    model = Transformer(model_config)
    run_dir = _run_directory(checkpoint)
    if average > 1:
        step = checkpoint_step(checkpoint)
        available = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) <= step]
        if len(available) < average:
            raise CheckpointError(
                f"--average {average} needs {average} checkpoints, {run_dir} has {len(available)}"
            )
        state_dicts = []
        for c in available[-average:]:
            check_checkpoint(c, PACKAGE, config["model"])
            load_weights(c, model)
            state_dicts.append({k: v.clone() for k, v in model.state_dict().items()})
        model.load_state_dict(average_state_dicts(state_dicts))
    else:
        load_weights(checkpoint, model)
    vocab_dir = checkpoint if (checkpoint / "vocabulary.json").is_file() else run_dir
    return model.eval(), load_vocabulary(vocab_dir), config


@torch.no_grad()
def translate_sentences(
    model: Transformer,
    vocab,
    sentences: list[str],
    beam_size: int = 4,
    alpha: float = 0.6,
    max_extra: int = 50,
    batch_tokens: int = 4096,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> list[str]:
    """Translate sentences in length-sorted batches; beam_size 1 is greedy decoding."""
    device = device or torch.device("cpu")
    ids = [vocab.encode(s) for s in sentences]
    out: list[str] = [""] * len(sentences)
    batches = source_batches(ids, batch_tokens if beam_size == 1 else batch_tokens // beam_size)
    batches = steps_bar(batches, progress, "translating", unit="batch")
    for indices in batches:
        source = source_tensor(ids, indices, vocab).to(device)
        with autocast(device, dtype):
            if beam_size == 1:
                hyps = greedy_decode(model, source, vocab.bos_id, vocab.eos_id, max_extra)
            else:
                hyps = beam_search(
                    model, source, vocab.bos_id, vocab.eos_id, beam_size, alpha, max_extra
                )
        for i, hyp in zip(indices, hyps):
            out[i] = vocab.decode(hyp)
    return out


def corpus_bleu(hypotheses: list[str], references: list[str]):
    """sacreBLEU corpus BLEU (detokenized input, 13a tokenization) and its signature."""
    import sacrebleu

    metric = sacrebleu.BLEU()
    score = metric.corpus_score(hypotheses, [references])
    return score, str(metric.get_signature())


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="transformer.translate",
        description="Translate sentences (one per line, from --input or stdin) with a trained "
        "Transformer, and score them against --reference with sacreBLEU.",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a run directory (uses its latest checkpoint) or a checkpoint directory",
    )
    parser.add_argument(
        "--input", type=Path, help="source sentences, one per line (.gz accepted); default stdin"
    )
    parser.add_argument(
        "--reference", type=Path, help="reference translations, line-aligned: print sacreBLEU"
    )
    parser.add_argument(
        "--beam",
        type=positive_int,
        default=4,
        help="beam size; 1 = greedy decoding (default: 4, §6.1)",
    )
    parser.add_argument(
        "--alpha",
        type=non_negative_float,
        default=0.6,
        help="length penalty α (default: 0.6, §6.1)",
    )
    parser.add_argument(
        "--max-extra",
        type=non_negative_int,
        default=50,
        help="maximum output length = input length + this (default: 50, §6.1)",
    )
    parser.add_argument(
        "--average",
        type=positive_int,
        default=1,
        help="average the weights of the run's last N checkpoints (paper: 5) (default: 1)",
    )
    parser.add_argument(
        "--batch-tokens",
        type=positive_int,
        default=4096,
        help="source tokens decoded together (divided by the beam size) (default: 4096)",
    )
    add_common_arguments(parser, training=False)
    parser.set_defaults(out=None)
    for action in parser._actions:
        if action.dest == "out":
            action.help = "also write translations.txt (and bleu.json with --reference) here"
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.beam < 1:
        raise DataError(f"--beam must be at least 1, got {args.beam}")
    if args.average < 1:
        raise DataError(f"--average must be at least 1, got {args.average}")
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    model, vocab, _ = load_model(args.checkpoint, args.average)
    model.to(device)
    if args.input is not None:
        sentences = read_lines(args.input)
    else:
        sentences = [line.rstrip("\r\n") for line in sys.stdin]
        if not any(s.strip() for s in sentences):
            raise DataError("no input: give --input FILE or sentences on stdin")
    references = None
    if args.reference is not None:
        references = read_lines(args.reference)
        if len(references) != len(sentences):
            raise DataError(
                f"{len(sentences)} source lines but {len(references)} reference lines "
                f"in {args.reference}"
            )
    translations = translate_sentences(
        model,
        vocab,
        sentences,
        args.beam,
        args.alpha,
        args.max_extra,
        args.batch_tokens,
        device,
        dtype,
        progress=sys.stderr.isatty(),
    )
    for line in translations:
        print(line)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "translations.txt").write_text("\n".join(translations) + "\n")
    if references is not None:
        score, signature = corpus_bleu(translations, references)
        print(f"BLEU = {score.score:.2f} {signature}", file=sys.stderr)
        if args.out is not None:
            (args.out / "bleu.json").write_text(
                json.dumps({"bleu": score.score, "signature": signature}) + "\n"
            )
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="transformer-translate"))


if __name__ == "__main__":
    sys.exit(run_command(main, prog="transformer.translate"))
