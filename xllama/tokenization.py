"""The tokenizers a Llama model may come with, behind one small interface.

- our byte-level BPE (`transformer.vocabulary.BPE`, the one BPE wrapper of every package, trained
  by `xllama.train` or `tokenizer.train`);
- characters (`CharTokenizer`: the Tiny Shakespeare character-level baseline);
- a sentencepiece `tokenizer.model` (Llama 2's own tokenizer);
- a tiktoken encoding (`tiktoken:cl100k_base`, or a `*.tiktoken` ranks file);
- a Hugging Face byte-level BPE `tokenizer.json` (Llama 3's own tokenizer; `HuggingFaceBPE`).

Each wrapper has `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `bos_id`,
`eos_id` (None when the tokenizer has none) and `spec()`, a JSON-able description that a checkpoint's
config stores so `xllama.generate` can rebuild the tokenizer.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tokenizer import BPETokenizer, TokenizerError
from tokenizer.fileformat import FILE_NAME
from transformer.vocabulary import BPE

from .model import XLlamaError

TOKENIZER_CONFIG = "tokenizer_config.json"


class CharTokenizer:
    """One token per character of a fixed alphabet (sorted characters of the training text)."""

    kind = "char"
    bos_id = None
    eos_id = None

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as exc:
            raise XLlamaError(
                f"character {exc.args[0]!r} is not in the character vocabulary"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def spec(self) -> dict:
        return {"kind": "char", "chars": self.chars}


class SentencePiece:
    """A sentencepiece model file (Llama 2's `tokenizer.model`)."""

    kind = "sentencepiece"

    def __init__(self, path: Path):
        import sentencepiece

        self.path = Path(path)
        self.file = self.path.name
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise XLlamaError(f"cannot read sentencepiece model {path}: {exc}") from None
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        return self.sp.decode(list(ids))

    def spec(self) -> dict:
        return {"kind": "sentencepiece", "file": self.file}


class Tiktoken(BPE):
    """A tiktoken encoding (`cl100k_base`, `o200k_base`, `r50k_base`), by name (tiktoken's cache)
    or from its ranks file (`cl100k_base.tiktoken`), or Meta's Llama 3 `tokenizer.model` (a ranks
    file under a sentencepiece name; `<|begin_of_text|>` begins a text, `<|end_of_text|>` ends
    it), through our `BPETokenizer.from_tiktoken`."""

    kind = "tiktoken"

    def __init__(self, name_or_path: str):
        path = Path(name_or_path)
        try:
            if path.suffix in (".tiktoken", ".model"):
                name = "llama3" if path.suffix == ".model" else path.stem
                bpe = BPETokenizer.from_tiktoken(name, ranks_file=path)
            else:
                bpe = BPETokenizer.from_tiktoken(str(name_or_path))
        except Exception as exc:
            raise XLlamaError(f"cannot load tiktoken encoding {name_or_path}: {exc}") from None
        super().__init__(bpe)
        self.name = str(name_or_path)

    def spec(self) -> dict:
        return {"kind": "tiktoken", "name": self.name}


class HuggingFaceBPE(BPE):
    """A Hugging Face byte-level BPE `tokenizer.json` (Llama 3's, GPT-2's) through our
    `BPETokenizer.from_tokenizer_json`, the same ids as Hugging Face's: as there, special tokens
    written in the text (a chat model's `<|start_header_id|>`, ...) become their ids. Which special
    tokens begin and end a text comes from the `tokenizer_config.json` beside it (Llama 3:
    `<|begin_of_text|>`; `<|end_of_text|>`, or `<|eot_id|>` in the chat models) unless given."""

    kind = "tokenizer.json"

    def __init__(self, path: Path, bos: str | None = None, eos: str | None = None):
        path = Path(path)
        try:
            bpe = BPETokenizer.from_tokenizer_json(path)
        except TokenizerError as exc:
            raise XLlamaError(str(exc)) from None
        super().__init__(bpe, path)
        if bos is None and eos is None:
            bos, eos = _roles_beside(path)
        for role, token in (("bos", bos), ("eos", eos)):
            if token is not None and token not in bpe.special_tokens:
                raise XLlamaError(f"{path}: the {role} token {token!r} is not an added token")
        self.bos, self.eos = bos, eos
        self.bos_id = None if bos is None else bpe.special_tokens[bos]
        self.eos_id = None if eos is None else bpe.special_tokens[eos]

    def encode(self, text: str) -> list[int]:
        return self.bpe.encode(text, allowed_special="all")

    def spec(self) -> dict:
        return {"kind": self.kind, "file": self.file, "bos": self.bos, "eos": self.eos}


def tokenizer_config_beside(path: Path) -> dict:
    """The Hugging Face `tokenizer_config.json` beside a tokenizer file, or {} without one (or
    with one that holds no JSON object)."""
    config_path = Path(path).with_name(TOKENIZER_CONFIG)
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise XLlamaError(f"cannot read {config_path}: {exc}") from None
    return config if isinstance(config, dict) else {}


def _roles_beside(path: Path) -> tuple[str | None, str | None]:
    """The bos and eos token strings of the `tokenizer_config.json` beside `path`, if any."""
    config = tokenizer_config_beside(path)
    roles = []
    for key in ("bos_token", "eos_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        roles.append(token if isinstance(token, str) else None)  # null or malformed: no role
    return roles[0], roles[1]


def chat_template(tokenizer) -> str | None:
    """The chat template (Jinja source) in the `tokenizer_config.json` beside the tokenizer's
    file, as a Hugging Face chat model ships it; None without one. Carried as text, for GGUF
    export (llama.cpp reads it to pick its dialog format); never run here (`xllama.chat` writes
    the dialog formats itself)."""
    path = getattr(tokenizer, "path", None)
    if path is None:
        return None
    template = tokenizer_config_beside(path).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)  # fmt: skip
    return template if isinstance(template, str) else None


def load_tokenizer(spec: dict | str, base_dir: Path | None = None):
    """A tokenizer from a checkpoint's spec dict, or from a path / `tiktoken:NAME` string."""
    if isinstance(spec, str):
        if spec.startswith("tiktoken:"):
            return Tiktoken(spec.split(":", 1)[1])
        path = Path(spec)
        if not path.is_file():
            raise XLlamaError(f"tokenizer file not found: {path}")
        if path.suffix == ".model":
            return model_file(path)
        if path.suffix == ".tiktoken":
            return Tiktoken(str(path))
        if path.suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise XLlamaError(f"cannot read tokenizer {path} as JSON: {exc}") from None
            if isinstance(data, dict) and data.get("kind") == "char":
                return CharTokenizer(data["chars"])
            return HuggingFaceBPE(path)
        return BPE.load(path)
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "tiktoken":
        return Tiktoken(spec["name"])
    if kind == HuggingFaceBPE.kind:
        return HuggingFaceBPE(find_beside(spec["file"], base_dir), spec["bos"], spec["eos"])
    if kind in ("bpe", "sentencepiece"):
        path = find_beside(spec["file"], base_dir)
        return BPE.load(path) if kind == "bpe" else SentencePiece(path)
    raise XLlamaError(f"unknown tokenizer kind {kind!r}")


def model_file(path: Path) -> SentencePiece | Tiktoken:
    """A `tokenizer.model`: sentencepiece's protobuf (Llama 2), or Meta's Llama 3 tiktoken ranks
    (text lines of base64 bytes and a rank), told apart by the first line."""
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError as exc:
        raise XLlamaError(f"cannot read {path}: {exc}") from None
    if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?\n?", first):
        return Tiktoken(str(path))
    return SentencePiece(path)


def find_beside(name: str, base_dir: Path | None) -> Path:
    """`name` in a checkpoint directory or in the run directory two levels up."""
    base = Path(base_dir or ".")
    for folder in (base, base.parent, base.parent.parent):
        if (folder / name).is_file():
            return folder / name
    raise XLlamaError(f"tokenizer file {name} not found in {base} or its run directory")


def tokenizer_for_checkpoint(directory: Path, config: dict | None):
    """The tokenizer a checkpoint names in its config, or a `tokenizer.model` (sentencepiece:
    Llama 2; tiktoken ranks: Meta's Llama 3) or else a `tokenizer.json` (Llama 3) beside it."""
    directory = Path(directory)
    if config and config.get("tokenizer"):
        return load_tokenizer(config["tokenizer"], directory)
    if (directory / "tokenizer.model").is_file():
        return model_file(directory / "tokenizer.model")
    if (directory / "tokenizer.json").is_file():
        return HuggingFaceBPE(directory / "tokenizer.json")
    return None


def same_tokens(a, b) -> bool:
    """Whether two tokenizers give every id the same text (a draft model and its target must; so
    must a policy and its reward model)."""
    if a.vocab_size != b.vocab_size:
        return False
    return all(_text_of(a, i) == _text_of(b, i) for i in range(a.vocab_size))


def _text_of(tokenizer, i: int) -> str | None:
    """The text of one id, or None for an id the vocabulary skips (cl100k_base has such gaps)."""
    try:
        return tokenizer.decode([i])
    except TokenizerError:
        return None


def keep_tokenizer(tokenizer, directory: Path) -> None:
    """Copy a tokenizer's file into a run directory, so the run's spec finds it there (with the
    Hugging Face `tokenizer_config.json` beside it, if any)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, (HuggingFaceBPE, SentencePiece)):
        if tokenizer.path.parent.resolve() != directory.resolve():
            shutil.copyfile(tokenizer.path, directory / tokenizer.file)
            config = tokenizer.path.with_name(TOKENIZER_CONFIG)  # its chat template goes along
            if config.is_file():
                shutil.copyfile(config, directory / TOKENIZER_CONFIG)
    elif isinstance(tokenizer, BPE) and not isinstance(tokenizer, Tiktoken):
        tokenizer.save(directory / (tokenizer.file or FILE_NAME))  # the name its spec gives
