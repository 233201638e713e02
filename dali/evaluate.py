"""Measure a checkpoint's sample quality: Fréchet distance in a digit classifier's feature space.

    python -m dali.evaluate --checkpoint runs/digits --n 1000
    python -m dali.evaluate --checkpoint runs/mnist --n 10000 --sampler ddim --steps 50
    python -m dali.evaluate --checkpoint runs/mnist-cfg --class all --guidance 0 0.3 1 2 4

Trains the feature classifier on the checkpoint's own (labelled) training data, or on `--data`,
generates `--n` samples with the EMA weights, and prints the distance, the real-vs-real floor,
the label distribution and how many samples the classifier reads with confidence (see
dali/quality.py). A class-conditional model samples the classes of `--class` (`all`: equally many
of each) with classifier-free guidance; several `--guidance` weights make a sweep (Ho & Salimans
2022, Fig. 2's fidelity/diversity trade-off), one report each, from the same noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from transformer.training import (
    CommandParser,
    add_common_arguments,
    float_in,
    positive_int,
    run_command,
    select_device,
    select_dtype,
)

from .data import DaliError, ImageDataset, load_images
from .pipeline import (
    DDPM,
    add_sampler_arguments,
    check_ddim_steps,
    generate,
    load_ddpm,
    requested_labels,
)
from .quality import QualityReport, evaluate_samples, train_classifier


def measure_quality(
    ddpm: DDPM,
    data: ImageDataset,
    n: int,
    sampler: str = "ddim",
    steps: int | None = 100,
    eta: float = 0.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    samples: torch.Tensor | None = None,
    progress: bool = True,
    ddim_clip_x0: bool = True,
    labels: torch.Tensor | None = None,
    guidance: float = 0.0,
    classifier: tuple[torch.nn.Module, float] | None = None,
) -> QualityReport:
    """Generate `n` samples (unless given; of the classes `labels`, with guidance weight
    `guidance`, for a class-conditional model) and compare them with `data` in the feature space
    of a classifier trained on `data` (or the given `(classifier, held-out accuracy)`)."""
    if data.labels is None:
        raise DaliError(
            f"{data.name} has no labels to train the feature classifier on; "
            "use digits or mnist:DIR (or call dali.quality.evaluate_samples with your own features)"
        )
    if classifier is None:
        classifier = train_classifier(data.images, data.labels, seed=seed, device=device)
    classifier, accuracy = classifier
    if samples is None:
        samples = generate(
            ddpm,
            n,
            sampler,
            steps,
            eta=eta,
            seed=seed,
            device=device,
            dtype=dtype,
            batch_size=500,
            progress=progress,
            ddim_clip_x0=ddim_clip_x0,
            labels=labels,
            guidance=guidance,
        )
    report = evaluate_samples(
        samples, data.images, classifier.features, classifier, seed, device, requested=labels
    )
    report.classifier_accuracy = accuracy
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="dali.evaluate",
        description="Print the Fréchet distance of a checkpoint's samples to the real data, in the "
        "feature space of a classifier trained on that data, with the real-vs-real floor.",
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint or run directory"
    )
    parser.add_argument(
        "--n",
        type=positive_int,
        default=1000,
        help="samples to generate and compare (default: 1000)",
    )
    add_sampler_arguments(parser, sampler="ddim", steps=100)
    parser.add_argument(
        "--class",
        dest="label",
        default=None,
        help="class-conditional models: the class of every sample, or 'all' for equally many of "
        "each class (default: unconditional samples)",
    )
    parser.add_argument(
        "--guidance",
        type=float_in(0.0),
        nargs="+",
        default=[0.0],
        help="classifier-free guidance weight(s) w, ε̃ = (1 + w) ε(x, c) − w ε(x, ∅); several "
        "make a sweep, one report each (default: 0)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="labelled real data to compare with (default: the checkpoint's own)",
    )
    add_common_arguments(parser, training=False)
    parser._option_string_actions["--out"].help = "also write the numbers to this JSON file"
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 2:
        raise DaliError(f"--n must be at least 2, got {args.n}")
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    ddpm, config = load_ddpm(args.checkpoint, device)
    check_ddim_steps(ddpm.diffusion, args.sampler, args.steps)  # before the classifier trains
    c = ddpm.unet_config
    data = load_images(args.data or config.get("data", "digits"), c.image_size, c.in_channels)
    labels = requested_labels(args.label, args.n, c.num_classes)
    if labels is None and any(args.guidance):
        raise DaliError("--guidance needs --class: guidance steers samples towards a class")
    classifier = train_classifier(data.images, data.labels, seed=args.seed, device=device)
    steps = ddpm.diffusion.timesteps if args.sampler == "ancestral" else args.steps
    results = []
    for w in args.guidance:
        started = time.perf_counter()
        report = measure_quality(
            ddpm, data, args.n, args.sampler, args.steps, args.eta, args.seed, device, dtype,
            ddim_clip_x0=args.ddim_clip_x0, labels=labels, guidance=w, classifier=classifier,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        what = f", class {args.label}, guidance {w:g}" if labels is not None else ""
        print(f"{args.sampler} sampler, {steps} steps, {args.n} samples, seed {args.seed}{what}")
        for line in report.lines():
            print(line)
        print(f"took {seconds:.0f}s")
        results.append({**report.to_dict(), "sampler": args.sampler, "steps": steps,
                        "class": args.label, "guidance": w, "seconds": round(seconds, 1)})  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n"
        )
    return 0


def cli() -> None:
    """Console script `dali-evaluate`: the same as `python -m dali.evaluate`."""
    sys.exit(run_command(main, prog="dali.evaluate"))


if __name__ == "__main__":
    cli()
