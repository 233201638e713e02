"""Text to image with a Stable Diffusion v1 checkpoint in the diffusers layout.

    python -m dali.txt2img --checkpoint stable-diffusion-v1-5 --prompt "a photo of an astronaut" \
        --steps 50 --guidance 7.5 --out image.png

Reads the directory (`model_index.json`, `tokenizer/`, `text_encoder/`, `vae/`, `unet/`,
`scheduler/`; safetensors only, nothing downloaded, no code run) into this package's modules
(`dali.stable_diffusion`), samples with DDIM on the checkpoint's β schedule and classifier-free
guidance of scale s (`--guidance`; ε̃ = ε(∅) + s(ε(c) − ε(∅)), i.e. Ho & Salimans' w = s − 1; 0
gives the unconditional model, 1 the conditional one), and writes a PNG (several `--n` images as a
grid). A prompt longer than CLIP's 77 tokens is truncated with a warning, as the reference
pipeline does.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from transformer.training import (
    CommandParser,
    add_common_arguments,
    autocast,
    float_in,
    positive_int,
    run_command,
    select_device,
    select_dtype,
)

from .data import DaliError, save_grid
from .stable_diffusion import load_stable_diffusion


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="dali.txt2img", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="a diffusers Stable Diffusion v1 directory")  # fmt: skip
    parser.add_argument("--prompt", required=True, help="what to draw")
    parser.add_argument("--negative-prompt", default="",
                        help="the prompt guidance steers away from (default: empty)")  # fmt: skip
    parser.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default: 50)")
    parser.add_argument("--guidance", type=float_in(0.0), default=7.5,
                        help="classifier-free guidance scale s (default: 7.5, SD's)")  # fmt: skip
    parser.add_argument("--height", type=positive_int, default=512, help="pixels (default: 512)")
    parser.add_argument("--width", type=positive_int, default=512, help="pixels (default: 512)")
    parser.add_argument("--n", type=positive_int, default=1, help="images (default: 1)")
    add_common_arguments(parser, training=False)
    parser._option_string_actions["--out"].help = "the PNG to write"
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is None:
        raise DaliError("--out is required: the PNG to write")
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    pipe = load_stable_diffusion(args.checkpoint)
    for model in (pipe.text_encoder, pipe.vae, pipe.unet):
        model.to(device)
    steps_max = pipe.diffusion.timesteps
    if args.steps > steps_max:
        raise DaliError(f"--steps must be at most the {steps_max} training timesteps")
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, autocast(device, dtype):
        warnings.simplefilter("always")
        try:
            latents = pipe.generate_latents(
                [args.prompt] * args.n, steps=args.steps, guidance=args.guidance,
                height=args.height, width=args.width, seed=args.seed,
                negative=args.negative_prompt, progress=True,
            )  # fmt: skip
        except ValueError as exc:
            raise DaliError(str(exc)) from None
        images = pipe.decode(latents).float().cpu()
    for warning in {str(w.message) for w in caught if issubclass(w.category, UserWarning)}:
        print(f"warning: {warning}", file=sys.stderr)
    out = save_grid(images, args.out)
    seconds = time.perf_counter() - started
    print(f"{args.n} image(s), {args.width}×{args.height}, {args.steps} DDIM steps, guidance "
          f"{args.guidance:g}, seed {args.seed}, in {seconds:.1f}s -> {out}")  # fmt: skip
    return 0


def cli() -> None:
    """Console script `dali-txt2img`: the same as `python -m dali.txt2img`."""
    sys.exit(run_command(main, prog="dali.txt2img"))


if __name__ == "__main__":
    cli()
