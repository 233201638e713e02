"""python -m tokenizer.encode: turn text files into a token file for language-model training.

The output is a flat little-endian array of ids (``uint16`` when the vocabulary fits, else
``uint32``) plus a JSON sidecar ``OUT.json``; `tokenizer.read_tokens` maps it into memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from tokenizer import fileformat, spm
from tokenizer.data import read_text_file, write_tokens
from tokenizer.errors import SpecialTokenError, TokenizerError, TokenizerFileError, run_command
from tokenizer.model import BPETokenizer
from tokenizer.spm import SentencePieceTokenizer
from tokenizer.tiktoken_interop import TIKTOKEN_ENCODINGS
from tokenizer.train import OneLineErrorParser


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m tokenizer.encode",
        description="Encode UTF-8 text files with a trained tokenizer into one token file.",
        epilog="Bad input gives one line on stderr and exit status 2; Ctrl-C exits with 130.",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        metavar="DIR",
        help="a directory written by tokenizer.train (tokenizer.bpe or tokenizer.model), one of "
        "those files, a Hugging Face byte-level BPE tokenizer.json, or a tiktoken encoding name "
        f"({', '.join(TIKTOKEN_ENCODINGS)}; llama3: Meta's Llama 3 tokenizer.model) with --ranks",
    )
    parser.add_argument(
        "--ranks",
        type=Path,
        metavar="FILE",
        help="the local .tiktoken rank file when --tokenizer is a tiktoken encoding name",
    )
    parser.add_argument(
        "--input", required=True, nargs="+", metavar="FILE", help="UTF-8 text files to encode"
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="FILE.bin", help="the token file to write"
    )
    parser.add_argument(
        "--separator",
        metavar="TOKEN",
        help="a special token (e.g. '<|endoftext|>', or '</s>' for sentencepiece) appended "
        "after each input file's tokens",
    )
    parser.add_argument(
        "--specials-in-text",
        choices=["raise", "allow", "text"],
        default="raise",
        help="special-token strings inside the text (bpe): raise an error, allow them as "
        "control tokens, or encode them as plain text (default: raise)",
    )
    return parser


def load_tokenizer(where: str, ranks: Path | None = None) -> BPETokenizer | SentencePieceTokenizer:
    """A tokenizer from a train directory, a tokenizer file, or a tiktoken name + rank file."""
    if where in TIKTOKEN_ENCODINGS:
        return BPETokenizer.from_tiktoken(where, ranks_file=ranks)
    path = Path(where)
    if path.is_dir():
        if (path / fileformat.FILE_NAME).exists():
            return BPETokenizer.load(path / fileformat.FILE_NAME)
        if (path / spm.FILE_NAME).exists():
            return SentencePieceTokenizer(path / spm.FILE_NAME)
        raise TokenizerFileError(
            f"no tokenizer in {path} (expected {fileformat.FILE_NAME} or {spm.FILE_NAME})"
        )
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":  # a Hugging Face tokenizer.json
        return BPETokenizer.from_tokenizer_json(path)
    return BPETokenizer.load(path)


def separator_id(tokenizer, token: str) -> int:
    if isinstance(tokenizer, SentencePieceTokenizer):
        if token in tokenizer.special_tokens:
            return tokenizer.special_tokens[token]
    elif token in tokenizer.special_tokens:
        return tokenizer.special_tokens[token]
    known = ", ".join(tokenizer.special_tokens) or "none"
    raise SpecialTokenError(f"--separator {token!r} is not a special token (known: {known})")


def run(args: argparse.Namespace) -> dict:
    if args.out.is_dir():
        raise TokenizerError(f"--out {args.out} is a directory; give the token file's path")
    tokenizer = load_tokenizer(args.tokenizer, args.ranks)
    separator = separator_id(tokenizer, args.separator) if args.separator else None
    texts = [read_text_file(path) for path in args.input]  # fail on bad input before encoding
    arrays = []
    total_bytes = 0
    start = time.perf_counter()
    for path, text in zip(args.input, texts):
        if isinstance(tokenizer, BPETokenizer):
            if args.specials_in_text == "text":
                ids = tokenizer.encode(text, disallowed_special=())
            elif args.specials_in_text == "allow":
                ids = tokenizer.encode(text, allowed_special="all")
            else:
                try:
                    ids = tokenizer.encode(text)
                except SpecialTokenError as err:
                    raise SpecialTokenError(
                        f"{path}: {err} (or use --specials-in-text allow/text)"
                    ) from None
        else:
            ids = tokenizer.encode(text)
        if separator is not None:
            ids.append(separator)
        arrays.append(np.asarray(ids, dtype=np.int64))
        total_bytes += len(text.encode("utf-8"))
    seconds = time.perf_counter() - start
    ids = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    meta = {
        "tokenizer": str(args.tokenizer),
        "inputs": [str(p) for p in args.input],
        "separator": args.separator,
        "text_bytes": total_bytes,
    }
    write_tokens(args.out, ids, tokenizer.vocab_size, meta)
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    rate = total_bytes / seconds / 1e6 if seconds > 0 else float("inf")
    print(
        f"encoded {len(args.input)} file(s), {total_bytes:,} bytes -> {ids.size:,} tokens "
        f"({total_bytes / max(ids.size, 1):.3f} bytes/token) in {seconds:.2f} s ({rate:.1f} MB/s)"
    )
    print(f"wrote {args.out} ({dtype}) and {args.out}.json")
    return {"tokens": int(ids.size), "bytes": total_bytes, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """The command: bad input is one line on stderr and exit status 2, Ctrl-C exit status 130."""
    return run_command(_parse_and_run, argv, "tokenizer.encode")


def _parse_and_run(argv: list[str] | None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
