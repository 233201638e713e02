"""Generate text: `python -m xllama.generate --checkpoint DIR --prompt "..."`.

DIR is a run directory or checkpoint of `xllama.train`, a Hugging Face Llama directory
(`config.json` + `*.safetensors`) or a Meta Llama directory (`params.json` +
`consolidated.*.pth`). Tokens stream to the terminal as they are decoded; tokens/s goes to stderr.
With `--chat`, a Llama 2-Chat or Llama 3 Instruct model answers in its dialog format
(`xllama.chat`): one message (`--prompt`) or a conversation read from standard input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from transformer.lora import remove_lora
from transformer.quantize import INT4_GROUP_SIZES, weight_bytes
from transformer.training import (
    CommandParser,
    add_common_arguments,
    float_in,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_command,
    select_device,
    select_dtype,
)

from .adapters import load_any_adapter
from .chat import FORMATS, TurnCache, chat_format, dialog_prompt, stop_ids
from .convert import load_checkpoint
from .model import XLlamaError
from .quantize import KINDS, quantize_for_decoding
from .sampling import check_sampling_args, generate
from .speculative import speculative_generate
from .tokenization import same_tokens


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="xllama.generate",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    parser.add_argument(
        "--prompt",
        default=None,
        help="text to continue (default: a newline); with --chat, the one user message (default: "
        "a conversation, one user message per line of standard input)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=non_negative_int,
        default=200,
        help="tokens to generate (default: 200)",
    )
    parser.add_argument(
        "--temperature",
        type=non_negative_float,
        default=0.8,
        help="softmax temperature; 0 = greedy (default: 0.8)",
    )
    parser.add_argument(
        "--top-k",
        type=positive_int,
        default=200,
        help="sample among the k most likely (default: 200)",
    )
    parser.add_argument(
        "--top-p",
        type=float_in(0.0, 1.0, low_open=True),
        default=None,
        help="nucleus sampling: the smallest set of tokens with mass p (default: off)",
    )
    parser.add_argument(
        "--no-stop-at-eos",
        action="store_true",
        help="keep going after the end-of-text token (and a chat model's end of turn)",
    )
    parser.add_argument(
        "--chat",
        nargs="?",
        const="auto",
        choices=["auto", *FORMATS],
        help="answer as a chat model, in Llama 2-Chat's or Llama 3 Instruct's dialog format; "
        "bare --chat picks the tokenizer's (default: off, plain text continuation)",
    )
    parser.add_argument(
        "--system",
        default=None,
        help="with --chat: the system message that opens the dialog (default: none)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer file (tokenizer.bpe, sentencepiece .model, Hugging Face tokenizer.json, "
        ".tiktoken, tiktoken:NAME); default: the one the checkpoint names, or tokenizer.model or "
        "tokenizer.json beside it",
    )
    parser.add_argument(
        "--adapter",
        type=Path,
        help="a LoRA adapter directory (ours, or Hugging Face peft's for this base) merged into "
        "the weights before decoding (default: none)",
    )
    parser.add_argument(
        "--quantize",
        choices=["none", *KINDS],
        default="none",
        help="decode with weight-only int8 or int4 weights in every linear layer (quantised here, "
        "after loading; xllama.quantize saves such a model) (default: none)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=INT4_GROUP_SIZES,
        default=64,
        help="--quantize int4: input weights per scale and offset (default: 64)",
    )
    parser.add_argument(
        "--draft",
        type=Path,
        help="speculative decoding: a small model over the same tokens (any checkpoint the "
        "project loads) proposes tokens that this model checks in one pass; the output is "
        "distributed as this model's own (default: none)",
    )
    parser.add_argument(
        "--speculate",
        type=positive_int,
        default=4,
        help="with --draft: tokens the draft proposes per round (k) (default: 4)",
    )
    parser.add_argument("--no-stream", action="store_true", help="print the text at the end only")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the one-token decoding step under torch.compile: the same forward, compiled on "
        "the first step (tens of seconds on a CPU, which needs a C++ compiler); pays off for long "
        "generations (default: off)",
    )
    add_common_arguments(parser, training=False)
    return parser


class Streamer:
    """Prints the text of the tokens so far as it grows, holding back an incomplete character."""

    def __init__(self, tokenizer, out=None):
        # sys.stdout when streaming starts, not at import: a redirected stdout gets all the text.
        self.tokenizer, self.out = tokenizer, sys.stdout if out is None else out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, next_tokens: torch.Tensor) -> None:
        self.ids.append(int(next_tokens[0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0:
        raise XLlamaError("--max-new-tokens must be >= 0")
    device = select_device(args.device)
    dtype = select_dtype(args.dtype, device)
    if args.system is not None and args.chat is None:
        raise XLlamaError("--system is the opening message of a chat; add --chat")
    # Read in the decoding dtype (a bfloat16 release stays bfloat16), unless adapters are merged
    # or weights quantised first: those work from float32 weights.
    load_dtype = dtype if args.adapter is None and args.quantize == "none" else torch.float32
    model, tokenizer, _ = load_checkpoint(args.checkpoint, args.tokenizer, load_dtype)
    chat = None if args.chat is None else chat_format(tokenizer, args.chat)
    if args.adapter is not None:
        load_any_adapter(model, args.adapter)
        remove_lora(model)  # merged: decoding runs plain linear layers
    draft = None
    if args.draft is not None:
        if args.compile:
            raise XLlamaError("--compile applies to plain decoding; speculative decoding is eager")
        draft, draft_tokenizer, _ = load_checkpoint(args.draft, args.tokenizer, dtype)
        if not same_tokens(tokenizer, draft_tokenizer):
            raise XLlamaError(
                f"--draft {args.draft} uses another tokenizer than {args.checkpoint}: "
                "speculation needs the same tokens"
            )
        draft = draft.to(device=device, dtype=dtype).eval()
        draft.reset_rope_tables()
    if args.quantize != "none":
        quantize_for_decoding(model, args.quantize, args.group_size)
    model = model.to(device=device, dtype=dtype).eval()
    model.reset_rope_tables()  # keep the rotary tables in float32
    context = model.config.max_seq_len
    stops = set() if args.no_stop_at_eos else stop_ids(tokenizer, args.checkpoint)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    stop_ids=stops)  # fmt: skip

    def complete(ids: list[int], turns: TurnCache | None = None) -> str:
        """The text of up to --max-new-tokens tokens after `ids`, printed (streamed unless
        --no-stream) on stdout; the speed goes to stderr. With `turns`, the KV cache of the
        chat's earlier turns is kept for what `ids` shares with them."""
        n_new = min(args.max_new_tokens, context - len(ids))
        if n_new < args.max_new_tokens:
            print(f"(generating {n_new} tokens: the context is {context})", file=sys.stderr)
        stream = None if args.no_stream else Streamer(tokenizer)
        start = time.perf_counter()
        if draft is None:
            cache = None if turns is None else turns.cache_for(ids)
            new = generate(model, [ids], n_new, compile=args.compile, on_token=stream,
                           cache=cache, **sampling)[0]  # fmt: skip
            if turns is not None:
                turns.remember(ids + new)
        else:
            new, stats = speculative_generate(model, draft, ids, n_new, k=args.speculate,
                                              on_token=stream, **sampling)  # fmt: skip
        elapsed = time.perf_counter() - start
        text = tokenizer.decode(new)
        sys.stdout.write(text[0 if stream is None else stream.printed :] + "\n")
        sys.stdout.flush()
        print(
            f"{len(new)} tokens in {elapsed:.2f} s: {len(new) / max(elapsed, 1e-9):.1f} tokens/s "
            f"(prompt {len(ids)} tokens, {weight_bytes(model) / 1e6:.1f} MB of weights, {device})",
            file=sys.stderr,
        )
        if draft is not None:
            print(
                f"speculative: {stats.rounds} target passes, {stats.accepted}/{stats.drafted} "
                f"drafted tokens accepted ({stats.acceptance_rate:.0%}), k={args.speculate}",
                file=sys.stderr,
            )
        return text

    torch.manual_seed(args.seed)
    if chat is None:
        prompt = "\n" if args.prompt is None else args.prompt
        ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(
            prompt
        )
        if not ids:
            raise XLlamaError("the prompt is empty and the tokenizer has no BOS token")
        if len(ids) > context:
            raise XLlamaError(f"prompt of {len(ids)} tokens is longer than the context ({context})")
        sys.stdout.write(prompt)
        sys.stdout.flush()
        sample = prompt + complete(ids)
    else:
        dialog = [] if args.system is None else [{"role": "system", "content": args.system}]
        turns = TurnCache(model)
        for message in [args.prompt] if args.prompt is not None else user_messages():
            dialog.append({"role": "user", "content": message})
            answer = complete(fit_context(dialog, tokenizer, chat, context), turns)
            dialog.append({"role": "assistant", "content": answer.strip()})
        sample = "".join(f"{m['role']}: {m['content']}\n\n" for m in dialog)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sample.txt").write_text(sample.rstrip("\n") + "\n")
    return 0


def user_messages():
    """The lines of standard input that hold text, prompting with "> " on a terminal."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def fit_context(dialog: list[dict], tokenizer, chat: str, context: int) -> list[int]:
    """The dialog's prompt ids, its oldest exchanges left out (the system message kept) until the
    prompt leaves room for an answer."""
    ids = dialog_prompt(tokenizer, dialog, chat)
    first = 1 if dialog[0]["role"] == "system" else 0
    while len(ids) >= context and len(dialog) - first > 1:
        del dialog[first : first + 2]
        print("(the conversation outgrew the context: its oldest exchange is left out)",
              file=sys.stderr)  # fmt: skip
        ids = dialog_prompt(tokenizer, dialog, chat)
    if len(ids) >= context:
        raise XLlamaError(f"the message makes a prompt of {len(ids)} tokens; the context is "
                          f"{context}")  # fmt: skip
    return ids


def cli() -> None:
    sys.exit(run_command(main, prog="xllama.generate"))


if __name__ == "__main__":
    cli()
