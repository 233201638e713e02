"""The tokenizer file (`tokenizer.bpe`): versioned, line based, UTF-8, readable; described in
tokenizer/README.md. `write` and `read` are what `BPETokenizer.save` and `.load` call; `read` names
the line of every error."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

from tokenizer.errors import TokenizerError, TokenizerFileError
from tokenizer.merge import BYTE
from tokenizer.pretokenize import resolve_pattern

FILE_MAGIC = "bpe-tokenizer"
FILE_VERSION = 1
FILE_NAME = "tokenizer.bpe"  # what `save_dir`/`load` use inside a directory


def write(tokenizer, path: str | Path) -> Path:
    """Write the tokenizer file and, beside it, a readable vocabulary listing (`.vocab`)."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / FILE_NAME
    merges = tokenizer.merges
    lines = [
        f"{FILE_MAGIC} v{FILE_VERSION}",
        "# byte-level BPE tokenizer: split pattern, byte tokens, merges, special tokens.",
        "# merges: new id, left id, right id; the new token's bytes are left's then right's.",
        f"pattern {json.dumps(tokenizer.pattern)}",
        "bytes 256",
    ]
    byte_ids = sorted((tokenizer._ranks[BYTE[b]], b) for b in range(256))
    lines += [f"{token_id} {b:02x}" for token_id, b in byte_ids]
    lines.append(f"merges {len(merges)}")
    for (left, right), new_id in sorted(merges.items(), key=lambda item: item[1]):
        lines.append(f"{new_id} {left} {right}")
    lines.append(f"specials {len(tokenizer.special_tokens)}")
    for token, token_id in sorted(tokenizer.special_tokens.items(), key=lambda item: item[1]):
        lines.append(f"{token_id} {json.dumps(token)}")
    lines.append("end")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.with_suffix(".vocab").write_text(vocab_listing(tokenizer), encoding="utf-8")
    return path


def vocab_listing(tokenizer) -> str:
    """One line per token: id, its bytes shown as text, and the pair it was merged from."""
    made_from = {new_id: pair for pair, new_id in tokenizer.merges.items()}
    specials = set(tokenizer.special_tokens.values())
    lines = ["# id [token] <- [left] [right]   (bytes that are not UTF-8 shown as \\xNN)"]
    for token_id in sorted(tokenizer._decoder):
        token = render_bytes(tokenizer.token_bytes(token_id))
        if token_id in specials:
            lines.append(f"{token_id} [{token}] special")
        elif token_id in made_from:
            left, right = (render_bytes(tokenizer.token_bytes(i)) for i in made_from[token_id])
            lines.append(f"{token_id} [{token}] <- [{left}] [{right}]")
        else:
            lines.append(f"{token_id} [{token}]")
    return "\n".join(lines) + "\n"


def read(cls, path: str | Path):
    """A `cls` (BPETokenizer) from a file written by `write`, or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TokenizerFileError(f"tokenizer file not found: {path}") from None
    except OSError as err:
        raise TokenizerFileError(f"cannot read tokenizer file {path}: {err.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenizerFileError(
            f"{path} is not a tokenizer file (not UTF-8 text; expected a "
            f"'{FILE_MAGIC} v{FILE_VERSION}' file written by BPETokenizer.save)"
        ) from None
    return _Reader(path, text).read(cls)


class _Reader:
    """Parses a `save`d file line by line, naming the line in every error."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines = text.splitlines()
        self.number = 0  # 1-based number of the line last returned
        self.seen: set[bytes] = set()  # bytes of every token defined so far

    def fail(self, message: str) -> TokenizerFileError:
        return TokenizerFileError(f"{self.path} line {self.number}: {message}")

    def next_line(self, what: str) -> str:
        while self.number < len(self.lines):
            line = self.lines[self.number]
            self.number += 1
            if not line.startswith("#"):
                return line
        self.number = len(self.lines) + 1
        raise self.fail(f"file ends early: expected {what} (truncated file?)")

    def fields(self, what: str, count: int) -> list[str]:
        line = self.next_line(what)
        parts = line.split(" ", count - 1)
        if len(parts) != count:
            raise self.fail(f"expected {what}, got {line[:80]!r}")
        return parts

    def integer(self, text: str, what: str) -> int:
        if not re.fullmatch(r"\d+", text):
            raise self.fail(f"expected {what} (a non-negative integer), got {text[:80]!r}")
        return int(text)

    def section(self, name: str) -> int:
        keyword, count = self.fields(f"'{name} <count>'", 2)
        if keyword != name:
            raise self.fail(f"expected the '{name} <count>' section, got {keyword[:80]!r}")
        return self.integer(count, f"the number of {name}")

    def read(self, cls):
        first = self.next_line("the header") if self.lines else ""
        header = f"{FILE_MAGIC} v{FILE_VERSION}"
        if first != header:
            if first.startswith(FILE_MAGIC + " v"):
                raise self.fail(
                    f"unsupported format version {first[len(FILE_MAGIC) + 1 :]!r}; this code "
                    f"reads v{FILE_VERSION}"
                )
            raise self.fail(
                f"not a tokenizer file: expected the header {header!r}, got {first[:80]!r}"
            )
        keyword, pattern_json = self.fields("'pattern \"<regex>\"'", 2)
        if keyword != "pattern":
            raise self.fail(f"expected 'pattern \"<regex>\"', got {keyword[:80]!r}")
        try:
            pattern = json.loads(pattern_json)
            if not isinstance(pattern, str):
                raise ValueError
            pattern = resolve_pattern(pattern)
        except ValueError as err:
            detail = f": {err}" if isinstance(err, TokenizerError) else ""
            raise self.fail(f"the pattern is not a valid JSON string regex{detail}") from None

        token_bytes: dict[int, bytes] = {}
        if self.section("bytes") != 256:
            raise self.fail("a byte-level tokenizer has exactly 256 byte tokens")
        for _ in range(256):
            token_id, value = self.fields("'<id> <byte in hex>'", 2)
            token_id = self.integer(token_id, "a token id")
            if not re.fullmatch(r"[0-9a-f]{2}", value):
                raise self.fail(f"expected a byte as two hex digits, got {value[:80]!r}")
            self.add(token_bytes, token_id, bytes([int(value, 16)]))
        merges = {}
        for _ in range(self.section("merges")):
            new_id, left, right = self.fields("'<new id> <left id> <right id>'", 3)
            new_id = self.integer(new_id, "the new id")
            left = self.integer(left, "the left id")
            right = self.integer(right, "the right id")
            for part in (left, right):
                if part not in token_bytes:
                    raise self.fail(f"merge uses id {part}, which is not defined above this line")
            self.add(token_bytes, new_id, token_bytes[left] + token_bytes[right])
            merges[(left, right)] = new_id
        specials = {}
        for _ in range(self.section("specials")):
            token_id, token_json = self.fields("'<id> \"<special token>\"'", 2)
            token_id = self.integer(token_id, "a special token id")
            try:
                token = json.loads(token_json)
            except ValueError:
                token = None
            if not isinstance(token, str) or not token:
                raise self.fail(f"expected a special token as a JSON string, got {token_json!r}")
            if token_id in token_bytes or token_id in specials.values() or token in specials:
                raise self.fail(f"special token {token!r} (id {token_id}) repeats")
            specials[token] = token_id
        if self.next_line("'end'") != "end":
            raise self.fail("expected 'end' after the special tokens")
        ranks = {token: token_id for token_id, token in token_bytes.items()}
        return cls._from_ranks(ranks, pattern, specials, merges)

    def add(self, token_bytes: dict[int, bytes], token_id: int, token: bytes) -> None:
        if token_id in token_bytes:
            raise self.fail(f"id {token_id} is defined twice")
        if token in self.seen:
            raise self.fail(f"token {token!r} (id {token_id}) repeats an earlier token's bytes")
        self.seen.add(token)
        token_bytes[token_id] = token


def render_bytes(token: bytes) -> str:
    """Token bytes as readable text: UTF-8 where valid, `\\xNN` otherwise, controls escaped."""
    text = token.decode("utf-8", errors="backslashreplace")
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch)[0] == "C" and ch != "\\"
        else ch
        for ch in text
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (HF's ByteLevel alphabet, llama.cpp's
    `gpt2` vocabularies): the printable Latin-1 bytes stand for themselves, the other 68 take the
    code points from 256 up, in byte order. Files that spell byte-level tokens as text use it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    alphabet, extra = {}, 0
    for b in range(256):
        if b in printable:
            alphabet[b] = chr(b)
        else:
            alphabet[b] = chr(256 + extra)
            extra += 1
    return alphabet
