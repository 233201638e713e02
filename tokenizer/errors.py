"""The exceptions the tokenizer package raises for user mistakes, and how its commands report them.

Every one is a `TokenizerError`, itself a `ValueError`, so callers can catch the whole family at
once. The package is the torch-free bottom of the dependency graph, so it has its own small
`run_command`; the training platform above it (`transformer.training.errors`) treats these errors
as user errors too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def run_command(
    main: Callable[[Sequence[str] | None], int | None], argv=None, prog: str = "command"
) -> int:
    """Run a tokenizer command's `main`: a `TokenizerError` or an unreadable file becomes one line
    on stderr and exit status 2, Ctrl-C one line and 130."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt as exc:
        print(f"{prog}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except TokenizerError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


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
