"""Byte-level BPE (Sennrich et al. 2016; GPT-2, Radford et al. 2019) that trains fast and
matches tiktoken exactly, SentencePiece BPE models behind the same interface, and BERT's
WordPiece (`WordPieceTokenizer`, ids equal to Hugging Face's BertTokenizer) and CLIP's lower-cased
BPE with `</w>` word ends (`CLIPTokenizer`, ids equal to Hugging Face's CLIPTokenizer).

    from tokenizer import BPETokenizer
    tok = BPETokenizer.train(text, vocab_size=4096)            # GPT-4 split pattern
    ids = tok.encode("hello world")
    gpt4 = BPETokenizer.from_tiktoken("cl100k_base", ranks_file="cl100k_base.tiktoken")

Commands: ``python -m tokenizer.train`` and ``python -m tokenizer.encode``.
"""

from tokenizer.clip import CLIPTokenizer
from tokenizer.data import embedded_corpus, read_text_file, read_tokens, write_tokens
from tokenizer.errors import (
    DisallowedSpecialTokenError,
    EmptyCorpusError,
    InputFileError,
    InvalidTokenIdError,
    SpecialTokenError,
    TokenFileError,
    TokenizerError,
    TokenizerFileError,
    UnknownPatternError,
    VocabSizeError,
)
from tokenizer.fileformat import bytes_to_unicode
from tokenizer.model import BPETokenizer
from tokenizer.pretokenize import PATTERNS
from tokenizer.spm import SentencePieceTokenizer, train_sentencepiece
from tokenizer.wordpiece import WordPieceError, WordPieceTokenizer, train_wordpiece

__all__ = [
    "BPETokenizer",
    "CLIPTokenizer",
    "SentencePieceTokenizer",
    "train_sentencepiece",
    "WordPieceTokenizer",
    "train_wordpiece",
    "WordPieceError",
    "PATTERNS",
    "bytes_to_unicode",
    "embedded_corpus",
    "read_text_file",
    "read_tokens",
    "write_tokens",
    "TokenizerError",
    "EmptyCorpusError",
    "VocabSizeError",
    "UnknownPatternError",
    "SpecialTokenError",
    "DisallowedSpecialTokenError",
    "InvalidTokenIdError",
    "TokenizerFileError",
    "InputFileError",
    "TokenFileError",
]
