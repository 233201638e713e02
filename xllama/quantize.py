"""Quantise a model for decoding: `python -m xllama.quantize --checkpoint DIR --kind int4 --out DIR`.

Weight-only quantisation of every linear layer, the output head included (as gpt-fast quantises
Llama): int8 with one scale per output channel, or int4 in groups of 32, 64 or 128 input weights
(`transformer.quantize`). Batch-1 decoding reads every weight once per token, so a quarter or an
eighth of the bytes is that much less to read; on a CPU the forward runs PyTorch's weight-only
kernels directly on the packed weights. The result is an xllama checkpoint (safetensors, with its
tokenizer) that `xllama.generate --checkpoint OUT` decodes quantised; `xllama.generate --quantize`
does the same on the fly without writing anything.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from transformer.quantize import INT4_GROUP_SIZES, quantize_model, weight_bytes
from transformer.training import CommandParser, run_command, save_checkpoint

from .convert import PACKAGE, load_checkpoint
from .model import Llama, XLlamaError
from .tokenization import keep_tokenizer

KINDS = ("int8", "int4")


def quantize_for_decoding(model: Llama, kind: str, group_size: int = 64) -> dict:
    """Quantise every linear layer of `model` in place; the config entries that reload it."""
    quantize_model(model, kind, skip=(), group_size=group_size)
    entries = {"quantize": kind, "quantize_skip": []}
    if kind == "int4":
        entries["quantize_group_size"] = group_size
    return entries


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="xllama.quantize", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="any checkpoint the project loads (an xllama run, a Hugging Face or a Meta directory)",
    )
    parser.add_argument("--kind", choices=KINDS, required=True, help="int8 or int4 weights")
    parser.add_argument(
        "--group-size",
        type=int,
        choices=INT4_GROUP_SIZES,
        default=64,
        help="int4: input weights per scale and offset (default: 64)",
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer file, if the checkpoint names none (default: its own)"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace what --out holds (default: refuse)"
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise XLlamaError(f"{args.out} is not empty; pass --overwrite to replace what it holds")
    model, tokenizer, _ = load_checkpoint(args.checkpoint, args.tokenizer)
    before = weight_bytes(model)
    saved = {"package": PACKAGE, "model": asdict(model.config), "tokenizer": tokenizer.spec()}
    saved |= quantize_for_decoding(model, args.kind, args.group_size)
    saved["quantized_from"] = str(args.checkpoint)
    save_checkpoint(args.out, model, saved)  # replaces the directory atomically
    keep_tokenizer(tokenizer, args.out)
    print(
        f"{args.kind} model written to {args.out}: weights {weight_bytes(model) / 1e6:.2f} MB "
        f"(from {before / 1e6:.2f} MB)"
    )
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="xllama.quantize"))


if __name__ == "__main__":
    cli()
