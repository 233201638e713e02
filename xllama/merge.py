"""Merge LoRA adapters into the weights: `python -m xllama.merge --checkpoint DIR --out DIR`.

W = W₀ + (α / r) B A for every adapted layer (Hu et al. 2021, §4.1: no extra latency at
inference). DIR is a LoRA fine-tuning run of `xllama.train` (its adapters are in its checkpoints),
or any base checkpoint the project loads together with `--adapter ADAPTER_DIR` (ours, or Hugging
Face peft's). The merged model is written as an xllama checkpoint (`xllama.generate --checkpoint
OUT` reads it, with its tokenizer), or with `--format hf` as a Hugging Face Llama directory.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from transformer.lora import remove_lora
from transformer.quantize import dequantize_model
from transformer.training import CommandParser, run_command, save_checkpoint

from .adapters import load_any_adapter
from .convert import PACKAGE, export_hf, load_checkpoint
from .model import XLlamaError
from .tokenization import keep_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="xllama.merge", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a LoRA run of xllama.train, or a base checkpoint (xllama, HF or Meta) with --adapter",
    )
    parser.add_argument(
        "--adapter", type=Path, help="adapter directory to merge into --checkpoint (default: none)"
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer file, if the checkpoint names none (default: its own)"
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write")
    parser.add_argument(
        "--format",
        choices=["xllama", "hf"],
        default="xllama",
        help="xllama: a checkpoint of this project; hf: config.json + model.safetensors for "
        "transformers' LlamaForCausalLM (default: xllama)",
    )
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="a QLoRA run's base is quantised: dequantise it to float before merging (the merged "
        "weights then carry the quantisation error of the base) (default: refuse)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace what --out holds (default: refuse)"
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    model, tokenizer, config = load_checkpoint(args.checkpoint, args.tokenizer)  # LoRA merged
    quantized = (config or {}).get("quantize")
    if quantized and not args.dequantize:
        raise XLlamaError(
            f"{args.checkpoint} has a {quantized}-quantised base: merging needs --dequantize"
        )
    dequantize_model(model)  # a model quantised for decoding (a QLoRA run's base already is)
    if args.adapter is not None:
        load_any_adapter(model, args.adapter)
    remove_lora(model)
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise XLlamaError(f"{args.out} is not empty; pass --overwrite to replace what it holds")
    if args.format == "hf":
        export_hf(model, args.out)
    else:
        saved = {"package": PACKAGE, "model": asdict(model.config), "tokenizer": tokenizer.spec()}
        saved["merged_from"] = {"checkpoint": str(args.checkpoint), "adapter": str(args.adapter)}
        save_checkpoint(args.out, model, saved)  # replaces the directory atomically
        keep_tokenizer(tokenizer, args.out)
    print(f"merged model ({model.num_params() / 1e6:.2f}M parameters) written to {args.out}")
    return 0


def cli() -> None:
    sys.exit(run_command(main, prog="xllama.merge"))


if __name__ == "__main__":
    cli()
