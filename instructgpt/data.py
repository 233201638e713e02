"""Data: the JSONL formats users bring, batching, and the embedded task with its gold labeler.

Formats (one JSON object per line):
- SFT demonstrations   {"prompt": str, "response": str}, or for a chat model {"messages": [...]}
- comparisons          {"prompt": str, "chosen": str, "rejected": str}
- rankings             {"prompt": str, "responses": [best, ..., worst]}  (K ≥ 2)
A comparison is the K = 2 ranking [chosen, rejected]; the reward model reads both formats.
For a chat model, a prompt may be a dialog, a list of messages `{"role", "content"}` (an optional
system message, then user and assistant in turn, ending with the user's), and a response the
assistant's message (a string, or `[{"role": "assistant", "content": ...}]` as TRL writes it): it is
then written in the model's chat format (`xllama.chat`) and the response ends with the format's
end of turn. Every problem is reported as `FILE:LINE: what is wrong`.

The embedded task (offline, stands in for human raters; DPO paper §6.1 "controlled sentiment
generation" with a word lexicon in place of the sentiment classifier): prompts are the first words
of sentences of the Python documentation shipped with CPython (`pydoc_data.topics`); a response
continues the sentence. `GoldLabeler` scores a continuation by a fixed lexicon of "upbeat" and
"downbeat" words of that domain (each distinct word counted once), plus fluency: the fraction of
adjacent word pairs that occur in the corpus, minus one per repeated content word and per word the
corpus never uses. It makes the comparisons the reward model learns from and judges the final
policies; it is never an input to training.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from transformer.training import UserError
from xllama.chat import answer_ids, chat_format, check_dialog, dialog_prompt
from xllama.model import XLlamaError


class InstructGPTError(UserError):
    """A user mistake in instructgpt: bad data file, bad flag value, incompatible checkpoints."""


class DataError(InstructGPTError):
    """A data file that is missing fields or holds bad values (reported with file and line)."""


# ------------------------------------------------------------------------------------------------
# JSONL formats


Dialog = tuple[tuple[str, str], ...]
"""a chat prompt: (role, content) messages, hashable like a text prompt"""
Prompt = str | Dialog


@dataclass
class Demonstration:
    prompt: Prompt
    response: str


@dataclass
class Ranking:
    prompt: Prompt
    responses: list[str]
    """best first; a comparison is [chosen, rejected]"""

    @property
    def chosen(self) -> str:
        return self.responses[0]

    @property
    def rejected(self) -> str:
        return self.responses[-1]


def _records(path: Path):
    from tokenizer.data import read_text_file  # one line naming the file if missing, binary, empty

    path = Path(path)
    # JSON Lines ends records at "\n" only: str.splitlines() would also split inside a string
    # holding U+2028 or U+0085, which json.dumps(ensure_ascii=False) writes as they are.
    for number, line in enumerate(read_text_file(path).split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object")
        yield f"{path}:{number}", record


def _field(where: str, record: dict, key: str, fmt: str):
    if key not in record:
        raise DataError(f"{where}: missing field {key!r} (expected {fmt})")
    return record[key]


def _string(where: str, value, name: str, kinds: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} must be {kinds}")
    if not value.strip():
        raise DataError(f"{where}: {name} is empty")
    return value


def _prompt(where: str, record: dict, fmt: str) -> Prompt:
    """A prompt: text, or a dialog of {"role", "content"} messages (a tuple of pairs)."""
    value = _field(where, record, "prompt", fmt)
    if not isinstance(value, list):
        return _string(where, value, "field 'prompt'", "a string or a list of messages")
    return _dialog(where, value)


def _dialog(where: str, value: list) -> Dialog:
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
               and isinstance(m.get("content"), str) for m in value):  # fmt: skip
        raise DataError(f'{where}: a dialog prompt is a list of {{"role": ..., "content": ...}}')
    try:
        check_dialog(value)
    except XLlamaError as exc:
        raise DataError(f"{where}: {exc}") from None
    return tuple((m["role"], m["content"]) for m in value)


def _response(where: str, value, name: str) -> str:
    """A response: text, or TRL's [{"role": "assistant", "content": ...}]."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") == "assistant":
            value = value[0].get("content")
    return _string(where, value, name, "a string or one assistant message")


SFT_FORMAT = '{"prompt": ..., "response": ...}'
RANKING_FORMAT = '{"prompt": ..., "chosen": ..., "rejected": ...} or {"prompt": ..., "responses": [best, ..., worst]}'


def _demonstration(where: str, record: dict) -> Demonstration:
    if "messages" in record and "prompt" not in record:  # TRL's conversational SFT form
        messages = record["messages"]
        if not (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                and messages[-1].get("role") == "assistant"):  # fmt: skip
            raise DataError(f"{where}: 'messages' must end with the assistant's message")
        return Demonstration(_dialog(where, messages[:-1]),
                             _response(where, messages[-1:], "the last message"))  # fmt: skip
    return Demonstration(
        _prompt(where, record, SFT_FORMAT),
        _response(where, _field(where, record, "response", SFT_FORMAT), "field 'response'"),
    )


def read_demonstrations(path: Path) -> list[Demonstration]:
    """SFT data: {"prompt", "response"} per line, or a chat model's {"messages": [...]} whose
    last message, the assistant's, is the response (the earlier ones are its prompt)."""
    out = [_demonstration(w, r) for w, r in _records(path)]
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def read_prompts(path: Path) -> list[Prompt]:
    """Prompts for PPO or evaluation: the "prompt" field of each line (other fields ignored)."""
    out = [_prompt(w, r, '{"prompt": ...}') for w, r in _records(path)]
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def read_rankings(path: Path) -> list[Ranking]:
    """Preference data: comparisons {"prompt","chosen","rejected"} or rankings
    {"prompt","responses":[best..worst]} (a file may mix them)."""
    out = []
    for where, record in _records(path):
        prompt = _prompt(where, record, RANKING_FORMAT)
        if "responses" in record:
            responses = record["responses"]
            if not isinstance(responses, list):
                raise DataError(f"{where}: 'responses' must be a list of strings, best first")
            if len(responses) < 2:
                raise DataError(
                    f"{where}: a ranking needs at least 2 responses, found {len(responses)}"
                )
            responses = [_response(where, r, f"response {i}") for i, r in enumerate(responses)]
        else:
            responses = [
                _response(where, _field(where, record, key, RANKING_FORMAT), f"field {key!r}")
                for key in ("chosen", "rejected")
            ]
        out.append(Ranking(prompt, list(responses)))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def write_jsonl(path: Path, records) -> None:
    """Records (dicts, `Demonstration`s, `Ranking`s) as JSON lines the readers above read back: a
    dialog prompt as its list of messages."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            record = dict(record if isinstance(record, dict) else record.__dict__)
            if isinstance(record.get("prompt"), tuple):
                record["prompt"] = [{"role": r, "content": c} for r, c in record["prompt"]]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------------
# Tokens and batches


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """A prompt's ids: text after the tokenizer's BOS when it has one (the Llama models'
    tokenizers do, and their models expect it; the embedded task's BPE has none), or a dialog in
    the tokenizer's chat format, asking for the assistant's answer (`xllama.chat`)."""
    if isinstance(prompt, tuple):
        messages = [{"role": role, "content": content} for role, content in prompt]
        return dialog_prompt(tokenizer, messages, chat_format(tokenizer))
    return ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(prompt)


def encode_response(tokenizer, prompt: Prompt, response: str) -> list[int]:
    """A response's ids with the token that ends it: EOS after a text prompt; after a dialog, the
    chat format's end of the assistant's turn (Llama 3: `<|eot_id|>`)."""
    if isinstance(prompt, tuple):
        return answer_ids(tokenizer, response, chat_format(tokenizer))
    return [*tokenizer.encode(response), tokenizer.eos_id]


def encode_pair(tokenizer, prompt: Prompt, response: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of prompt + response with its end (see `encode_prompt`, `encode_response`) and
    the index where the response starts.

    The prompt and the response are encoded separately (so the response tokens are exactly the
    ones a policy generates after the prompt), and the response is cut to fit `max_len`, keeping
    its end token; a prompt of `max_len` tokens or more keeps its first token (BOS) and its last
    `max_len // 2` tokens.
    """
    prompt_ids = encode_prompt(tokenizer, prompt)
    bos = 0 if tokenizer.bos_id is None else 1
    if len(prompt_ids) == bos:
        raise DataError(f"prompt {prompt!r} encodes to no tokens")
    if len(prompt_ids) >= max_len:
        prompt_ids = prompt_ids[:bos] + prompt_ids[-(max_len // 2) :]
    *response_ids, end = encode_response(tokenizer, prompt, response)
    return prompt_ids + response_ids[: max_len - len(prompt_ids) - 1] + [end], len(prompt_ids)


@dataclass
class Batch:
    tokens: torch.Tensor
    """(batch, T) token ids, padded"""
    attention_mask: torch.Tensor
    """(batch, T) 1 for real tokens, 0 for padding"""
    response_mask: torch.Tensor
    """(batch, T) 1 where the token belongs to the response (these carry the loss)"""

    def to(self, device) -> Batch:
        return Batch(
            *(t.to(device) for t in (self.tokens, self.attention_mask, self.response_mask))
        )


def collate(sequences: list[tuple[list[int], int]], pad_id: int, side: str = "right") -> Batch:
    """Pad (tokens, response_start) pairs to one batch, on the right or on the left."""
    width = max(len(ids) for ids, _ in sequences)
    n = len(sequences)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros(n, width, dtype=torch.long)
    response = torch.zeros(n, width, dtype=torch.long)
    for row, (ids, start) in enumerate(sequences):
        offset = 0 if side == "right" else width - len(ids)
        tokens[row, offset : offset + len(ids)] = torch.tensor(ids)
        attention[row, offset : offset + len(ids)] = 1
        response[row, offset + start : offset + len(ids)] = 1
    return Batch(tokens, attention, response)


class ByteTokenizer:
    """Bytes as tokens, plus an end-of-sequence id: for tests and as a dependency-free fallback."""

    def __init__(self):
        self.vocab_size, self.bos_id, self.eos_id = 257, None, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------------
# The embedded task: corpus, prompts, demonstrations


WORD = re.compile(r"[a-z]+")
PROMPT_WORDS = 4
"""a prompt is the first 4 words of a sentence"""
MAX_RESPONSE_WORDS = 14
"""a demonstration continues the sentence for at most 14 words"""
HELDOUT_PERCENT = 12
"""share of sentence openings kept for evaluation only (chosen by a hash of the opening)"""


@cache
def corpus_paragraphs() -> tuple[str, ...]:
    """The prose paragraphs of `pydoc_data.topics` (code examples and headings dropped), with
    whitespace normalised and markup characters removed."""
    import pydoc_data.topics

    paragraphs = []
    for key in sorted(pydoc_data.topics.topics):
        for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[key]):
            if para.startswith((" ", "*", ">>>", "=", "-")) or len(para.split()) < 4:
                continue
            paragraphs.append(" ".join(re.sub(r'[*"`]', "", para).split()))
    return tuple(paragraphs)


def corpus_text() -> str:
    """Pretraining text: the prose paragraphs, one per line."""
    return "\n".join(corpus_paragraphs()) + "\n"


@cache
def corpus_sentences() -> tuple[str, ...]:
    """Plain-prose sentences of the corpus (6-40 words, ending with a full stop), deduplicated."""
    seen, out = set(), []
    for para in corpus_paragraphs():
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para):
            n = len(s.split())
            if (
                6 <= n <= 40
                and s.endswith(".")
                and re.fullmatch(r"[A-Za-z][A-Za-z0-9 ,'\-():;_.]*", s)
                and s not in seen
            ):
                seen.add(s)
                out.append(s)
    return tuple(out)


def is_heldout(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.encode()).digest()
    return digest[0] * 100 // 256 < HELDOUT_PERCENT


def task_demonstrations(split: str = "train") -> list[Demonstration]:
    """Prompt (first words of a sentence) → demonstration (the sentence's own continuation).

    `split` is "train" or "heldout"; the two never share a prompt.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    out = []
    for s in corpus_sentences():
        words = s.split()
        prompt = " ".join(words[:PROMPT_WORDS])
        if is_heldout(prompt) != (split == "heldout"):
            continue
        out.append(Demonstration(prompt, " " + " ".join(words[PROMPT_WORDS:][:MAX_RESPONSE_WORDS])))
    return out


def task_prompts(split: str = "train") -> list[str]:
    """The distinct prompts of a split, in corpus order."""
    return list(dict.fromkeys(d.prompt for d in task_demonstrations(split)))


# ------------------------------------------------------------------------------------------------
# The gold labeler


UPBEAT = frozenset(
    "new true useful simple valid allowed possible support supports supported succeeds success "
    "efficient clear convenient works correct easy best good better powerful safe same "
    "always available complete enabled".split()
)
"""words that make a continuation more upbeat (+1 each, counted once per continuation)"""
DOWNBEAT = frozenset(
    "not no error errors cannot invalid never false bad wrong fail fails failure exception "
    "exceptions raised raise raises undefined deprecated illegal impossible lost broken "
    "unable without".split()
)
"""words that make it more downbeat (−1 each, counted once per continuation)"""
FUNCTION_WORDS = frozenset(
    "a an the of to in is are be and or for as by on it its this that with which from at if "
    "can may".split()
)
"""words that may repeat without a fluency penalty"""


class GoldLabeler:
    """The programmatic stand-in for human raters: prefers upbeat, fluent continuations.

    score = Σ_{distinct words} lexicon(w) + bigram fluency ∈ [0, 1]
            − 1 per repeated content word − 1 per word absent from the corpus
    and −2 for a continuation of fewer than 3 words. Built only from the corpus and the fixed word
    lists above; no learned parameters.
    """

    def __init__(self, text: str | None = None):
        words = WORD.findall((text or corpus_text()).lower())
        self.vocabulary = frozenset(words)
        self.bigrams = frozenset(zip(words, words[1:]))

    def score(self, prompt: str, response: str) -> float:
        words = WORD.findall(response.lower())
        if len(words) < 3:
            return -2.0
        sentiment = sum((w in UPBEAT) - (w in DOWNBEAT) for w in set(words))
        seen, repeats = set(), 0
        for w in words:
            repeats += w in seen and w not in FUNCTION_WORDS
            seen.add(w)
        unknown = sum(w not in self.vocabulary for w in words)
        context = WORD.findall(prompt.lower())[-1:] + words
        pairs = list(zip(context, context[1:]))
        fluency = sum(p in self.bigrams for p in pairs) / len(pairs)
        return float(sentiment + fluency - repeats - unknown)

    def rank(self, prompt: str, responses: list[str]) -> list[str]:
        """Responses best first, keeping one response per distinct score (ties say nothing)."""
        by_score: dict[float, str] = {}
        for r in responses:
            by_score.setdefault(round(self.score(prompt, r), 6), r)
        return [by_score[s] for s in sorted(by_score, reverse=True)]
