"""The exceptions the tokenizer package raises for user mistakes.

Every one is a `TokenizerError`, itself a `ValueError`, so callers can catch the whole family at
once; the commands turn them into one line on stderr and exit status 2.
"""


class TokenizerError(ValueError):
    """Base class of every error the tokenizer package raises for bad input."""


class EmptyCorpusError(TokenizerError):
    """The training text (or an input file) holds no text at all."""


class VocabSizeError(TokenizerError):
    """The requested vocabulary cannot hold the 256 byte tokens plus the special tokens."""


class UnknownPatternError(TokenizerError):
    """A split pattern name that is not built in, or a regex that does not compile."""


class SpecialTokenError(TokenizerError):
    """A special token that is malformed, duplicated, or unknown to the tokenizer."""


class DisallowedSpecialTokenError(SpecialTokenError):
    """User text contains a special-token string that `encode` was not told to allow."""


class InvalidTokenIdError(TokenizerError):
    """`decode` was given an id that is not in the vocabulary."""


class TokenizerFileError(TokenizerError):
    """A tokenizer file that is missing, damaged, or not a tokenizer file at all."""


class InputFileError(TokenizerError):
    """An input text file that is missing, unreadable, not UTF-8, or empty."""


class TokenFileError(TokenizerError):
    """A token file (`.bin` + `.json` sidecar) that is missing or does not match its sidecar."""
