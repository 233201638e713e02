"""Chat: the dialog formats of Llama 2-Chat and Llama 3 Instruct, as Meta's reference code writes
them.

A dialog is a list of messages `{"role": ..., "content": ...}` (roles "system", "user",
"assistant"), the form Meta's, Hugging Face's and OpenAI's chat code all use. A chat model was
fine-tuned on dialogs written one way; given any other, it answers worse or not at all.

- **Llama 2-Chat** (Touvron et al. 2023, fine-tuned in §3; the format is Meta's
  `llama/generation.py`): each exchange is one sequence, `<s>[INST] {user} [/INST] {answer} </s>`,
  and the system prompt (§3.3 trains the model to keep it across turns) opens the first user
  message between `<<SYS>>` and `<</SYS>>`. The prompt ends with `<s>[INST] {user} [/INST]`.
- **Llama 3 Instruct** (Meta's `llama3` and `llama-models` code): `<|begin_of_text|>`, then per
  message `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`, then the
  assistant's header; the model ends its turn with `<|eot_id|>` (Llama 3.1's tool calls with
  `<|eom_id|>`).

Message contents are stripped of surrounding whitespace and encoded as plain text: a special token
written in a message is text, not a control token (as in Meta's code). `TurnCache` keeps a chat's
KV cache from one turn to the next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from transformer.training.checkpoint import read_json_object
from transformer.vocabulary import BPE

from .cache import Cache
from .model import XLlamaError
from .tokenization import SentencePiece

FORMATS = ("llama2", "llama3")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>")  # Llama 3: end of a turn; 3.1: end of a tool message

Dialog = Sequence[Mapping[str, str]]


def chat_format(tokenizer, name: str = "auto") -> str:
    """The format `name` names, or for "auto" the one the tokenizer is made for: Llama 3's when it
    has the header tokens, Llama 2's for a sentencepiece tokenizer."""
    specials = tokenizer.bpe.special_tokens if isinstance(tokenizer, BPE) else {}
    if name == "auto":
        if HEADER_START in specials:
            name = "llama3"
        elif isinstance(tokenizer, SentencePiece):
            name = "llama2"
        else:
            raise XLlamaError(
                "this checkpoint's tokenizer is neither Llama 2's (sentencepiece) nor Llama 3's "
                "(with <|start_header_id|>); name a chat format with --chat llama2 or llama3"
            )
    if name == "llama3":
        missing = [t for t in (HEADER_START, HEADER_END, END_OF_TURN[0]) if t not in specials]
        if missing or tokenizer.bos_id is None:
            raise XLlamaError(f"the llama3 chat format needs {', '.join(missing or ['a BOS'])} "
                              "in the tokenizer")  # fmt: skip
    elif name == "llama2":
        if tokenizer.bos_id is None or tokenizer.eos_id is None:
            raise XLlamaError("the llama2 chat format needs a tokenizer with BOS and EOS tokens")
    else:
        raise XLlamaError(f"unknown chat format {name!r}; choose from {', '.join(FORMATS)}")
    return name


def check_dialog(dialog: Dialog) -> None:
    """A system message first if any, then user and assistant in turn, ending with the user's."""
    roles = [m["role"] for m in dialog]
    if roles[:1] == ["system"]:
        roles = roles[1:]
    expected = ["user", "assistant"] * (len(roles) // 2) + ["user"]
    if roles != expected[: len(roles)] or not roles or roles[-1] != "user":
        raise XLlamaError(
            "a dialog is an optional system message, then user and assistant messages in turn, "
            f"ending with the user's; got roles {[m['role'] for m in dialog]}"
        )


def llama2_prompt(tokenizer, dialog: Dialog) -> list[int]:
    """Llama 2-Chat's prompt: one `<s>[INST] ... [/INST] ... </s>` sequence per exchange."""
    check_dialog(dialog)
    messages = [m["content"].strip() for m in dialog]
    if dialog[0]["role"] == "system":  # the system prompt opens the first user message
        messages = [B_SYS + messages[0] + E_SYS + messages[1], *messages[2:]]
    ids: list[int] = []
    for user, answer in zip(messages[:-1:2], messages[1::2]):
        text = f"{B_INST} {user} {E_INST} {answer} "
        ids += [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    return ids + [tokenizer.bos_id, *tokenizer.encode(f"{B_INST} {messages[-1]} {E_INST}")]


def llama3_prompt(tokenizer, dialog: Dialog) -> list[int]:
    """Llama 3 Instruct's prompt: every message under its role's header, then the assistant's."""
    check_dialog(dialog)
    bpe = tokenizer.bpe
    special = bpe.special_tokens

    def header(role: str) -> list[int]:
        return [special[HEADER_START], *bpe.encode_ordinary(role), special[HEADER_END],
                *bpe.encode_ordinary("\n\n")]  # fmt: skip

    ids = [tokenizer.bos_id]
    for message in dialog:
        content = bpe.encode_ordinary(message["content"].strip())
        ids += [*header(message["role"]), *content, special[END_OF_TURN[0]]]
    return ids + header("assistant")


def dialog_prompt(tokenizer, dialog: Dialog, name: str) -> list[int]:
    """The token ids that ask a chat model for the dialog's next (assistant) message."""
    return (llama3_prompt if name == "llama3" else llama2_prompt)(tokenizer, dialog)


def answer_ids(tokenizer, answer: str, name: str) -> list[int]:
    """The ids of an assistant's answer after `dialog_prompt`, with the token that ends it, as
    the format writes an answer in a dialog: Llama 3's `{answer}<|eot_id|>`, Llama 2's
    `{answer} </s>` (sentencepiece's leading "▁" stands for the space after `[/INST]`). What
    fine-tuning on dialogs trains the model to produce."""
    if name == "llama3":
        end = tokenizer.bpe.special_tokens[END_OF_TURN[0]]
        return [*tokenizer.bpe.encode_ordinary(answer.strip()), end]
    return [*tokenizer.encode(f"{answer.strip()} "), tokenizer.eos_id]


def stop_ids(tokenizer, directory: Path | None = None) -> set[int]:
    """The tokens that end a generation: the tokenizer's EOS, Llama 3's end-of-turn tokens where
    the tokenizer has them (Meta's code stops at both), and the `eos_token_id`s of a Hugging Face
    checkpoint's `generation_config.json` (Llama 3 Instruct lists all three)."""
    stops = {tokenizer.eos_id} - {None}
    if isinstance(tokenizer, BPE):
        stops |= {tokenizer.bpe.special_tokens[t] for t in END_OF_TURN
                  if t in tokenizer.bpe.special_tokens}  # fmt: skip
    path = None if directory is None else Path(directory) / "generation_config.json"
    if path is not None and path.is_file():
        eos = read_json_object(path).get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else eos if eos is not None else []
        if not isinstance(eos, list) or not all(isinstance(i, int) for i in eos):
            raise XLlamaError(f"{path}: eos_token_id must be a token id or a list of them")
        stops |= set(eos)
    return stops


class TurnCache:
    """A chat's KV cache from one turn to the next, and the tokens it holds: the next prompt
    repeats the dialog so far, so only what it does not share with them is read again."""

    def __init__(self, model):
        self.model, self.cache, self.held = model, None, []

    def cache_for(self, ids: list[int]) -> Cache:
        """The cache, rolled back to the longest prefix of `ids` it holds (at most all but the
        last token, which gives the next token's logits). The answer's text, read back, may not
        give the tokens that were sampled; a dropped exchange changes everything after the system
        message. A sliding window's rolling cache cannot roll back: it starts afresh."""
        keep = 0
        for held, new in zip(self.held, ids[:-1]):
            if held != new:
                break
            keep += 1
        if self.cache is None or (self.cache.rolling and keep < self.cache.length):
            self.cache, keep = self.model.make_cache(1), 0
        if keep < self.cache.length:
            self.cache.rollback(keep)
        return self.cache

    def remember(self, tokens: list[int]) -> None:
        """The turn just decoded from `cache_for`'s cache, prompt and new tokens: the cache holds
        all of them but the last."""
        self.held = tokens[: self.cache.length]
