"""WordPiece, BERT's tokenizer (Devlin et al. 2019, §3; Wu et al. 2016, §4.1; Schuster and
Nakajima 2012).

Three steps, as in BERT's released `tokenization.py` and Hugging Face's `BertTokenizer`:
0. (Hugging Face's, not BERT's code) the special tokens written in the text, exactly as in the
   vocabulary (`[MASK]`, not `[mask]`), are cut out first and become their ids, so a fill-in prompt
   "Paris is the [MASK] of France." holds one [MASK]; the text around them goes through 1 and 2.
1. `basic_tokenize`: clean the text (drop NUL, U+FFFD and control characters, map white space to
   spaces), put spaces around CJK ideographs, lower-case and strip accents (NFD, drop the
   combining marks), then split on white space and on every punctuation character.
2. `WordPieceTokenizer.encode`: each word becomes the longest vocabulary entry that starts it,
   then the longest `##`-prefixed entry that continues it, and so on (greedy longest match
   first); a word with a piece the vocabulary lacks, or longer than 100 characters, is `[UNK]`.
3. `encode_pair`: BERT's input, `[CLS] A [SEP] B [SEP]` with segment ids 0 for A and 1 for B.

`train_wordpiece` learns a vocabulary: words start as characters (`##` on all but the first),
and the pair with the highest likelihood gain, count(ab) / (count(a) · count(b)) (the language
model likelihood criterion of Schuster and Nakajima, as Hugging Face's course describes it), is
merged until the vocabulary is full. The vocabulary file is BERT's `vocab.txt`: one token per
line, the id is the line number.

Parity: ids equal `transformers.BertTokenizer` (the `tokenizers` backend) on the same vocabulary,
tested on varied and random text. Where they differ is Unicode's version, not the algorithm:
character categories here come from Python's `unicodedata`, and `tokenizers`' tables are older,
so characters added in recent Unicode versions (e.g. U+2E43, a Po since Unicode 10) and code
points Python's database calls unassigned are classified differently; `tokenizers` also starts
its CJK extension-E range at U+2B920 where BERT's code (and this module) says U+2B820.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from tokenizer.errors import InvalidTokenIdError, TokenizerError, TokenizerFileError, VocabSizeError

FILE_NAME = "vocab.txt"
PREFIX = "##"  # marks a piece that continues a word
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's, in the order we give them ids
MAX_WORD_CHARS = 100  # longer words are [UNK], as in BERT
# What Hugging Face's WordPiece decoder (`cleanup=True`) replaces, in its order.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))  # fmt: skip

# CJK Unified Ideographs and their extensions/compatibility blocks (BERT's _is_chinese_char).
_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)


class WordPieceError(TokenizerError):
    """A WordPiece vocabulary that cannot be used (no [UNK], duplicates, an empty file)."""


def _is_whitespace(char: str) -> bool:
    return char in " \t\n\r" or char.isspace()


def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char: str) -> bool:
    """ASCII non-alphanumerics ($, +, <, ^, ` ... included) and Unicode's P* categories."""
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(char: str) -> bool:
    cp = ord(char)
    return any(low <= cp <= high for low, high in _CJK)


def _strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def basic_tokenize(
    text: str, lower_case: bool = True, strip_accents: bool | None = None
) -> list[str]:
    """BERT's basic tokenizer: clean, split CJK, lower-case and strip accents, split on white space
    and punctuation. `strip_accents=None` strips them exactly when lower-casing (BERT's default)."""
    cleaned = []
    for char in text:
        if char in "\x00\ufffd" or _is_control(char):
            continue
        if _is_whitespace(char):
            cleaned.append(" ")
        elif _is_cjk(char):
            cleaned.append(f" {char} ")
        else:
            cleaned.append(char)
    text = "".join(cleaned)
    if strip_accents or (strip_accents is None and lower_case):
        text = _strip_accents(text)
    if lower_case:
        text = text.lower()
    words = []
    for chunk in text.split():
        word = ""
        for char in chunk:
            if _is_punctuation(char):
                if word:
                    words.append(word)
                words.append(char)
                word = ""
            else:
                word += char
        if word:
            words.append(word)
    return words


class WordPieceTokenizer:
    """A WordPiece vocabulary and BERT's encoding with it.

    tok = WordPieceTokenizer.train(text, vocab_size=8000)   # or .load("vocab.txt")
    ids, segments = tok.encode_pair("a sentence", "another one")
    """

    def __init__(self, vocab: Iterable[str], lower_case: bool = True):
        self.vocab = list(vocab)
        self.lower_case = lower_case
        self.token_to_id = {}
        for i, token in enumerate(self.vocab):
            if token in self.token_to_id:
                raise WordPieceError(f"token {token!r} appears twice in the vocabulary")
            self.token_to_id[token] = i
        if "[UNK]" not in self.token_to_id:
            raise WordPieceError("the vocabulary has no [UNK] token, which WordPiece needs")
        self.unk_id = self.token_to_id["[UNK]"]
        self.pad_id = self.token_to_id.get("[PAD]")
        self.cls_id = self.token_to_id.get("[CLS]")
        self.sep_id = self.token_to_id.get("[SEP]")
        self.mask_id = self.token_to_id.get("[MASK]")
        self._special_ids = {t: self.token_to_id[t] for t in SPECIALS if t in self.token_to_id}
        self._special_split = re.compile(f"({'|'.join(map(re.escape, self._special_ids))})")

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def word_pieces(self, word: str) -> list[int]:
        """Greedy longest-match-first (Wu et al. 2016): the longest known prefix, then the longest
        known `##` continuation, ...; the whole word is [UNK] if some part matches nothing."""
        if len(word) > MAX_WORD_CHARS:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else PREFIX + word[start:end]
                if piece in self.token_to_id:
                    ids.append(self.token_to_id[piece])
                    start = end
                    break
            else:
                return [self.unk_id]
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of the text, without [CLS]/[SEP]; special tokens in it are their own ids."""
        ids = []
        for piece in self._special_split.split(text):
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            else:
                words = basic_tokenize(piece, self.lower_case)
                ids += [i for word in words for i in self.word_pieces(word)]
        return ids

    def encode_pair(self, first: str, second: str | None = None) -> tuple[list[int], list[int]]:
        """BERT's input (§3, Figure 2): [CLS] A [SEP] (B [SEP]); (ids, segment ids)."""
        if self.cls_id is None or self.sep_id is None:
            raise WordPieceError("the vocabulary has no [CLS] or [SEP] token")
        a = [self.cls_id, *self.encode(first), self.sep_id]
        b = [] if second is None else [*self.encode(second), self.sep_id]
        return a + b, [0] * len(a) + [1] * len(b)

    def decode(self, ids: Iterable[int], clean_up: bool = True) -> str:
        """Pieces joined by spaces, `##` continuations glued to their word (lower-cased, without
        accents: WordPiece does not keep the original text). `clean_up` removes the space before
        punctuation and contractions as Hugging Face's WordPiece decoder does ("world !" ->
        "world!", "don 't" stays)."""
        tokens = []
        for i in ids:
            if not 0 <= i < len(self.vocab):
                raise InvalidTokenIdError(
                    f"token id {i} is outside the vocabulary (0..{len(self.vocab) - 1})"
                )
            tokens.append(self.vocab[i])
        text = " ".join(tokens).replace(" " + PREFIX, "").strip()
        if clean_up:
            for spaced, joined in CLEAN_UP:
                text = text.replace(spaced, joined)
        return text

    # --- files -------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write BERT's vocab.txt (a directory gets vocab.txt inside)."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        path.write_text("".join(token + "\n" for token in self.vocab), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path, lower_case: bool = True) -> WordPieceTokenizer:
        """Read a vocab.txt (or a directory holding one), e.g. a Hugging Face BERT directory's."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        try:
            # one token per "\n"-ended line, as BERT reads it (not str.splitlines, which would
            # also end a line at U+2028 or U+0085)
            lines = path.read_text(encoding="utf-8").split("\n")
            lines = [line.removesuffix("\r") for line in lines]
            if lines and lines[-1] == "":
                lines.pop()
        except UnicodeDecodeError as exc:
            raise TokenizerFileError(
                f"{path}: not a UTF-8 vocabulary file ({exc.reason})"
            ) from None
        if not any(lines):
            raise WordPieceError(f"{path}: the vocabulary file is empty")
        try:
            return cls(lines, lower_case)
        except WordPieceError as exc:
            raise WordPieceError(f"{path}: {exc}") from None

    # --- training ----------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text: str | Iterable[str],
        vocab_size: int,
        lower_case: bool = True,
        progress: bool = False,
    ) -> WordPieceTokenizer:
        return cls(train_wordpiece(text, vocab_size, lower_case, progress), lower_case)


def train_wordpiece(
    text: str | Iterable[str], vocab_size: int, lower_case: bool = True, progress: bool = False
) -> list[str]:
    """The WordPiece vocabulary of `vocab_size` tokens for the text: the specials, every character
    (as a word start and as a `##` continuation), then merges in order of
    score(a, b) = count(ab) / (count(a) · count(b)); ties go to the more frequent pair, then to
    the pair that sorts first. `progress` shows a bar over the merges."""
    from tqdm import tqdm

    documents = [text] if isinstance(text, str) else list(text)
    word_counts = Counter(w for doc in documents for w in basic_tokenize(doc, lower_case))
    if not word_counts:
        raise TokenizerError("the training text has no words")
    words = [[w[0]] + [PREFIX + c for c in w[1:]] for w in word_counts]
    counts = list(word_counts.values())
    alphabet = sorted({symbol for word in words for symbol in word})
    vocab = [*SPECIALS, *alphabet]
    if vocab_size < len(vocab):
        raise VocabSizeError(
            f"vocab_size {vocab_size} is below the {len(SPECIALS)} special tokens plus the "
            f"{len(alphabet)} characters of the text ({len(vocab)})"
        )
    symbol_counts: Counter = Counter()
    pair_counts: Counter = Counter()
    where = defaultdict(set)  # pair -> indices of the words that contain it
    for index, (word, count) in enumerate(zip(words, counts)):
        _count(word, count, index, symbol_counts, pair_counts, where, +1)
    bar = tqdm(total=vocab_size - len(vocab), desc="merges", unit="merge", disable=not progress)
    while len(vocab) < vocab_size and pair_counts:
        a, b = max(
            pair_counts,
            key=lambda p: (
                pair_counts[p] / (symbol_counts[p[0]] * symbol_counts[p[1]]),
                pair_counts[p],
                _reverse(p),
            ),
        )
        merged = a + b.removeprefix(PREFIX)
        for index in list(where[(a, b)]):
            word, count = words[index], counts[index]
            _count(word, count, index, symbol_counts, pair_counts, where, -1)
            words[index] = word = _merge(word, a, b, merged)
            _count(word, count, index, symbol_counts, pair_counts, where, +1)
        if merged not in vocab:
            vocab.append(merged)
            bar.update()
    bar.close()
    return vocab


def _reverse(pair: tuple[str, str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A key under which max() picks the pair that sorts first."""
    return tuple(-ord(c) for c in pair[0]), tuple(-ord(c) for c in pair[1])


def _count(word, count, index, symbol_counts, pair_counts, where, sign) -> None:
    """Add (sign +1) or remove (-1) one word's symbols and adjacent pairs from the counts."""
    for symbol in word:
        symbol_counts[symbol] += sign * count
    for pair in zip(word, word[1:]):
        pair_counts[pair] += sign * count
        if sign > 0:
            where[pair].add(index)
        elif pair_counts[pair] == 0:
            del pair_counts[pair]
            del where[pair]


def _merge(word: list[str], a: str, b: str, merged: str) -> list[str]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out
