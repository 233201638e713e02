"""CLIP's tokenizer (Radford et al. 2021, §2.4 and OpenAI's `simple_tokenizer.py`), the text side of
Stable Diffusion v1: lower-cased byte-level BPE whose words end in `</w>`.

Four steps, as OpenAI's code and Hugging Face's `CLIPTokenizer` do them:
1. Normalise: Unicode NFC, every run of white space becomes one space, lower-case.
2. Split into words with CLIP's pattern: the two special tokens, the contractions 's 't 're 've 'm
   'll 'd, runs of letters, single digits (each digit is its own word), runs of other non-space
   characters. White space separates words and is dropped: `</w>` marks where a word ended.
3. Each word's UTF-8 bytes become GPT-2's printable stand-in characters (`bytes_to_unicode`), the
   last one with `</w>` attached, and byte pairs merge in the order of `merges.txt` (the lowest
   rank first) until no listed pair is left (Sennrich et al. 2016, Algorithm 1 applied to a word).
4. The symbols' ids come from `vocab.json`; a symbol the vocabulary lacks is the unknown token
   (`<|endoftext|>`, as in CLIP). `encode` puts `<|startoftext|>` before and `<|endoftext|>` after.

For the text encoder, `batch(prompts)` truncates each prompt to the context (77 tokens with both
special tokens, as Stable Diffusion's pipeline does) and pads with `<|endoftext|>`.

Parity: ids equal `transformers.CLIPTokenizer` on the same `vocab.json` and `merges.txt` (tested
on varied text). OpenAI's own code also runs `ftfy.fix_text` and HTML unescaping first; Hugging
Face's tokenizer does not, and neither does this one.
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from pathlib import Path

import regex

from tokenizer.errors import TokenizerError, TokenizerFileError
from tokenizer.fileformat import bytes_to_unicode

PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
WHITESPACE = regex.compile(r"\s+")
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
END_OF_WORD = "</w>"
CONTEXT = 77  # CLIP's text context, special tokens included


class CLIPTokenizer:
    """A CLIP vocabulary (`vocab.json`, token -> id) and its merges (`merges.txt`, in rank order).

    tok = CLIPTokenizer.load("stable-diffusion-v1-5/tokenizer")
    tok.encode("a photo of a cat")     # [49406, 320, 1125, 539, 320, 2368, 49407]
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]):
        for token in (BOS, EOS):
            if token not in vocab:
                raise TokenizerFileError(f"the CLIP vocabulary has no {token} token")
        self.vocab = dict(vocab)
        self.decoder = {i: token for token, i in self.vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id, self.eos_id = self.vocab[BOS], self.vocab[EOS]
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def load(cls, directory: str | Path) -> CLIPTokenizer:
        """Read `vocab.json` and `merges.txt` (first line `#version: ...`, then one `left right`
        pair per line), as Stable Diffusion directories hold them, or else the vocabulary and
        merges inside a Hugging Face `tokenizer.json` (what recent `transformers` saves)."""
        directory = Path(directory)
        vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
        if not vocab_path.is_file() and (directory / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(directory / "tokenizer.json")
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise TokenizerFileError(
                    f"{path} not found: a CLIP tokenizer needs vocab.json and merges.txt "
                    "(or a tokenizer.json)"
                )
        vocab = _json_object(vocab_path)
        merges = []
        for number, line in enumerate(merges_path.read_text(encoding="utf-8").split("\n"), 1):
            if number == 1 and line.startswith("#version"):
                continue
            if not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerFileError(
                    f"{merges_path}:{number}: expected 'left right', got {line!r}"
                )
            merges.append((parts[0], parts[1]))
        return cls(vocab, merges)

    @classmethod
    def _from_tokenizer_json(cls, path: Path) -> CLIPTokenizer:
        model = _json_object(path).get("model") or {}
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
            raise TokenizerFileError(f"{path} is not a CLIP tokenizer (a BPE model with </w>)")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return cls(model["vocab"], merges)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- encoding ---------------------------------------------------------------------------------
    @staticmethod
    def normalize(text: str) -> str:
        """Step 1: NFC, white space runs to one space, lower case."""
        return WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)).lower()

    def bpe(self, word: str) -> list[str]:
        """Step 3 for one word (already in stand-in characters): the merged symbols."""
        if word in self._cache:
            return self._cache[word]
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            left, right = best
            merged, i = [], 0
            while i < len(symbols):  # every occurrence of the pair, left to right
                if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
                    merged.append(left + right)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`: `<|startoftext|>` ... `<|endoftext|>` unless `add_special=False`.
        The special tokens' own spellings in the text become their ids."""
        ids = []
        for piece in SPECIAL.split(text):
            if piece in (BOS, EOS):
                ids.append(self.vocab[piece])
                continue
            for word in PATTERN.findall(self.normalize(piece)):
                chars = "".join(self.byte_char[b] for b in word.encode("utf-8"))
                ids += [self.vocab.get(symbol, self.eos_id) for symbol in self.bpe(chars)]
        return [self.bos_id, *ids, self.eos_id] if add_special else ids

    def batch(self, prompts: list[str], context: int = CONTEXT) -> list[list[int]]:
        """Each prompt as exactly `context` ids: truncated to `context - 2` tokens between the
        special tokens (with a warning naming how many were dropped), padded with `<|endoftext|>`,
        as Stable Diffusion's pipeline calls the tokenizer (`padding="max_length"`,
        `truncation=True`)."""
        rows = []
        for prompt in prompts:
            ids = self.encode(prompt, add_special=False)
            if len(ids) > context - 2:
                warnings.warn(
                    f"the prompt has {len(ids)} tokens; CLIP reads {context - 2}, so the last "
                    f"{len(ids) - (context - 2)} are dropped: {prompt[:40]!r}...",
                    stacklevel=2,
                )
                ids = ids[: context - 2]
            row = [self.bos_id, *ids, self.eos_id]
            rows.append(row + [self.eos_id] * (context - len(row)))
        return rows

    def decode(self, ids: list[int]) -> str:
        """Text of token ids: word ends become spaces, special tokens are dropped."""
        tokens = []
        for i in ids:
            if i not in self.decoder:
                raise TokenizerError(
                    f"token id {i} is not in the CLIP vocabulary ({self.vocab_size})"
                )
            if i not in (self.bos_id, self.eos_id):
                tokens.append(self.decoder[i])
        data = bytes(self.char_byte[c] for c in "".join(tokens))  # "</w>" is plain ASCII here
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ").strip()


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerFileError(f"damaged {path}: {exc}") from None
    if not isinstance(data, dict):
        raise TokenizerFileError(f"damaged {path}: expected a JSON object")
    return data
