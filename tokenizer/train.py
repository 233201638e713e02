"""python -m tokenizer.train: train a tokenizer and print its statistics.

With no --input it trains on the embedded corpus (the ~465 KB of help texts that ship with
Python in `pydoc_data.topics`), so it runs on a fresh machine with no data and no network. The
last 10% of the text is held out: the compression reported (UTF-8 bytes per token) is measured
on text the tokenizer has not seen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tokenizer.data import read_corpus, split_held_out
from tokenizer.errors import TokenizerError, run_command
from tokenizer.model import BPETokenizer
from tokenizer.pretokenize import PATTERNS, pattern_name, resolve_pattern

DEFAULT_VOCAB_SIZE = 4096


class OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="python -m tokenizer.train",
        description=(
            "Train a byte-level BPE tokenizer (or a SentencePiece BPE model) and print its "
            "vocabulary size, training time and compression on a held-out slice."
        ),
        epilog="Bad input gives one line on stderr and exit status 2; Ctrl-C exits with 130.",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        metavar="FILE",
        help="UTF-8 text files to train on (default: the embedded corpus, pydoc_data.topics)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        metavar="N",
        help=f"vocabulary size including the 256 bytes and the special tokens "
        f"(default: {DEFAULT_VOCAB_SIZE})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/tokenizer"),
        metavar="DIR",
        help="directory to write the tokenizer into (default: runs/tokenizer)",
    )
    parser.add_argument(
        "--pattern",
        default="gpt4",
        help=f"split pattern: one of {', '.join(PATTERNS)} (tiktoken's strings), or a regex "
        f"(default: gpt4); used by the bpe backend",
    )
    parser.add_argument(
        "--special",
        action="append",
        default=[],
        metavar="TOKEN",
        help="a special token such as '<|endoftext|>' (repeat the flag for more); it gets its "
        "own id after the merges and is cut out of the training text",
    )
    parser.add_argument(
        "--backend",
        choices=["bpe", "sentencepiece", "wordpiece"],
        default="bpe",
        help="bpe: our byte-level BPE (writes tokenizer.bpe); sentencepiece: a Llama-2-style "
        "SentencePiece BPE model with byte fallback (writes tokenizer.model); wordpiece: BERT's "
        "lower-cased WordPiece with BERT's special tokens (writes vocab.txt) "
        "(default: bpe)",
    )
    parser.add_argument(
        "--held-out",
        type=float,
        default=0.1,
        metavar="FRACTION",
        help="fraction of the text, from the end, kept out of training to measure compression "
        "(default: 0.1)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed for the sentencepiece trainer; bpe training is deterministic "
        "(default: 0)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show the progress bar over merges"
    )
    return parser


def run(args: argparse.Namespace) -> dict:
    """Train as the arguments say, write the tokenizer, and return the statistics."""
    documents = read_corpus(args.input)
    source = ", ".join(args.input) if args.input else "embedded corpus (pydoc_data.topics)"
    train_documents, held_out = split_held_out(documents, args.held_out)
    train_chars = sum(map(len, train_documents))
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise TokenizerError(f"--out {out} exists and is not a directory")

    if args.backend == "wordpiece" and args.special:
        raise TokenizerError(
            "--special does not apply to wordpiece, which has BERT's [PAD] [UNK] [CLS] [SEP] [MASK]"
        )
    start = time.perf_counter()
    if args.backend == "bpe":
        pattern = resolve_pattern(args.pattern)
        tokenizer = BPETokenizer.train(
            train_documents,
            args.vocab_size,
            pattern=pattern,
            special_tokens=args.special,
            progress=not args.no_progress,
        )
        seconds = time.perf_counter() - start
        written = tokenizer.save(out / "tokenizer.bpe")
        files = [written, written.with_suffix(".vocab")]
        details = {
            "pattern": pattern_name(pattern) or pattern,
            "merges": len(tokenizer.merges),
        }
    elif args.backend == "wordpiece":
        from tokenizer.wordpiece import SPECIALS, WordPieceTokenizer

        tokenizer = WordPieceTokenizer.train(
            train_documents, args.vocab_size, progress=not args.no_progress
        )
        seconds = time.perf_counter() - start
        out.mkdir(parents=True, exist_ok=True)
        files = [tokenizer.save(out / "vocab.txt")]
        details = {"model": "wordpiece, lower-cased", "special_tokens": list(SPECIALS)}
    else:
        from tokenizer.spm import SentencePieceTokenizer, train_sentencepiece

        written = train_sentencepiece(
            train_documents, args.vocab_size, out, special_tokens=args.special, seed=args.seed
        )
        seconds = time.perf_counter() - start
        tokenizer = SentencePieceTokenizer(written)
        files = [written, written.with_suffix(".vocab")]
        details = {"model": "sentencepiece bpe, byte fallback"}

    held_out_bytes = len(held_out.encode("utf-8"))
    encode = tokenizer.encode if args.backend == "wordpiece" else tokenizer.encode_ordinary
    held_out_tokens = len(encode(held_out)) if held_out else 0
    stats = {
        "backend": args.backend,
        "input": source,
        "train_characters": train_chars,
        "vocab_size": tokenizer.vocab_size,
        "requested_vocab_size": args.vocab_size,
        "special_tokens": list(args.special),
        "train_seconds": round(seconds, 3),
        "held_out_characters": len(held_out),
        "held_out_bytes": held_out_bytes,
        "held_out_tokens": held_out_tokens,
        "bytes_per_token": round(held_out_bytes / held_out_tokens, 3) if held_out_tokens else None,
        **details,
    }
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "metrics.jsonl").write_text(json.dumps(stats) + "\n", encoding="utf-8")

    print(f"trained {args.backend} tokenizer on {train_chars:,} characters of {source}")
    note = ""
    if tokenizer.vocab_size < args.vocab_size:
        note = f" (requested {args.vocab_size}: the text ran out of pairs to merge)"
    print(f"vocab size: {tokenizer.vocab_size}{note}")
    print(f"training time: {seconds:.2f} s")
    if held_out_tokens:
        print(
            f"held-out compression: {stats['bytes_per_token']:.3f} bytes/token "
            f"({held_out_bytes:,} bytes -> {held_out_tokens:,} tokens, last "
            f"{args.held_out:.0%} of the text)"
        )
    print("wrote " + ", ".join(str(f) for f in files))
    return stats


def main(argv: list[str] | None = None) -> int:
    """The command: bad input is one line on stderr and exit status 2, Ctrl-C exit status 130."""
    return run_command(_parse_and_run, argv, "tokenizer.train")


def _parse_and_run(argv: list[str] | None) -> int:
    run(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
