"""Draw samples from a trained DDPM with the paper's sampler or DDIM, and the x̂₀ chain.

    python -m dali.sample --checkpoint runs/digits --out grid.png
    python -m dali.sample --checkpoint runs/digits --sampler ddim --steps 50 --eta 0 --out grid.png
    python -m dali.sample --checkpoint runs/mnist --n 8 --chain chain.png --chain-every 100 --out g.png
    python -m dali.sample --checkpoint runs/digits-cfg --class all --guidance 1 --out grid.png

A class-conditional model (trained with `--num-classes`) samples the classes given by `--class`
(one label for every sample, or `all`: the classes in turn, one row of the grid each) with
classifier-free guidance of weight `--guidance` w (Ho & Salimans 2022; 0 = the conditional model
alone); without `--class` it samples unconditionally.

`--chain` writes the predictions x̂₀ made along the way, one row per sample and one column every
`--chain-every` steps, ending with the sample itself (the paper's Figure 6: large-scale features
appear first, details last). `--save-npz` keeps the raw samples (uint8, N×H×W×C) and the floats.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
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

from .data import DaliError, save_grid, to_uint8
from .pipeline import add_sampler_arguments, generate, load_ddpm, requested_labels


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="dali.sample",
        description="Sample images from a DDPM checkpoint (EMA weights).",
    )
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="checkpoint or run directory"
    )
    parser.add_argument(
        "--n", type=positive_int, default=64, help="number of samples (default: 64)"
    )
    add_sampler_arguments(parser, sampler="ancestral", steps=50)
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="samples generated at once (default: 256)",
    )
    parser.add_argument(
        "--class",
        dest="label",
        default=None,
        help="class-conditional models: the class of every sample, or 'all' for each class in "
        "turn (default: unconditional)",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="latent diffusion checkpoints (dali.train_latent): the text every sample is drawn "
        "for (default: none; pixel-space checkpoints take --class)",
    )
    parser.add_argument(
        "--guidance",
        type=float_in(0.0),
        default=0.0,
        help="classifier-free guidance weight w: ε̃ = (1 + w) ε(x, c) − w ε(x, ∅) (default: 0)",
    )
    parser.add_argument("--save-npz", type=Path, default=None, help="also save the raw samples")
    parser.add_argument("--chain", type=Path, default=None, help="write the x̂₀ chain strip PNG")
    parser.add_argument(
        "--chain-every",
        type=positive_int,
        default=None,
        help="chain column every k timesteps (default: T/10)",
    )
    parser.add_argument(
        "--chain-rows", type=positive_int, default=8, help="samples shown in the chain (default: 8)"
    )
    parser.add_argument(
        "--scale",
        type=positive_int,
        default=None,
        help="upscale factor of the PNGs (default: 64 / image size)",
    )
    add_common_arguments(parser, training=False)
    parser._option_string_actions[
        "--out"
    ].help = "the grid PNG (a path ending in .png), or a directory to write grid.png into"
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None:
        raise DaliError("--out is required: the grid PNG to write")
    if args.n < 1:
        raise DaliError(f"--n must be at least 1, got {args.n}")
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    if args.prompt is not None:
        return sample_latent(args, device)
    ddpm, _ = load_ddpm(args.checkpoint, device)
    labels = requested_labels(args.label, args.n, ddpm.unet_config.num_classes)
    T = ddpm.diffusion.timesteps
    every = args.chain_every or max(1, T // 10)
    chain: list[torch.Tensor] = []

    def record(t: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        if t % every == 0 or t == 0:
            chain.append(x0[: args.chain_rows].cpu())

    started = time.perf_counter()
    samples = generate(
        ddpm,
        args.n,
        args.sampler,
        args.steps,
        eta=args.eta,
        seed=args.seed,
        device=device,
        batch_size=args.batch_size,
        dtype=dtype,
        on_step=record if args.chain else None,
        progress=True,
        ddim_clip_x0=args.ddim_clip_x0,
        labels=labels,
        guidance=args.guidance,
    )
    seconds = time.perf_counter() - started
    out = args.out if args.out.suffix.lower() == ".png" else args.out / "grid.png"
    scale = args.scale or max(1, 64 // ddpm.unet_config.image_size)
    per_class = max(1, args.n // max(1, ddpm.unet_config.num_classes))
    save_grid(samples, out, scale=scale, **({"nrow": per_class} if args.label == "all" else {}))
    steps = T if args.sampler == "ancestral" else args.steps
    print(
        f"{args.n} samples ({args.sampler}, {steps} steps, seed {args.seed}) in {seconds:.1f}s -> {out}"
    )
    if args.chain:
        rows = torch.stack(chain, dim=1)  # (rows, columns, C, H, W): one row per sample
        save_grid(rows.flatten(0, 1), args.chain, nrow=len(chain), scale=scale)
        print(f"x̂₀ chain ({len(chain)} columns, every {every} steps) -> {args.chain}")
    if args.save_npz:
        args.save_npz.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.save_npz, images=to_uint8(samples), samples=samples.numpy())
        print(f"raw samples -> {args.save_npz}")
    return 0


def sample_latent(args, device) -> int:
    """`--prompt`: text-conditioned samples of a latent diffusion run, decoded by its autoencoder."""
    from .pipeline import load_latent
    from .train_latent import sample_images

    if args.label is not None or args.sampler != "ddim" or args.chain:
        raise DaliError("--prompt samples with DDIM only, without --class or --chain")
    ldm, tokenizer, vae, _ = load_latent(args.checkpoint, device)
    started = time.perf_counter()
    images = sample_images(ldm, tokenizer, vae, [args.prompt] * args.n, args.guidance,
                           args.steps, args.seed, device)  # fmt: skip
    out = args.out if args.out.suffix.lower() == ".png" else args.out / "grid.png"
    save_grid(images, out, scale=args.scale or 2)
    print(f"{args.n} samples for {args.prompt!r} (ddim, {args.steps} steps, guidance "
          f"{args.guidance:g}, seed {args.seed}) in {time.perf_counter() - started:.1f}s -> {out}")  # fmt: skip
    return 0


def cli() -> None:
    """Console script `dali-sample`: the same as `python -m dali.sample`."""
    sys.exit(run_command(main, prog="dali.sample"))


if __name__ == "__main__":
    cli()
