"""The exceptions the tokenizer package raises for user mistakes, and how every command reports them.

Every one is a `TokenizerError`, itself a `ValueError`, so callers can catch the whole family at
once. `UserError` is the base of every package's own exceptions (this package is the bottom of the
dependency graph, so it lives here), and `run_command` turns them into one line on stderr and exit
status 2 in every command of every package.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A mistake in what the user asked for (bad flag, bad file, incompatible checkpoint).

    Every package's own exceptions derive from this; commands print it as one line and exit 2.
    """


def run_command(
    main: Callable[[Sequence[str] | None], int | None], argv=None, prog: str = "command"
) -> int:
    """Run a command's `main`, mapping user errors to one stderr line + exit 2, Ctrl-C to 130.

    Use as `sys.exit(run_command(main, argv, "package.command"))`.
    """
    try:
        return main(argv) or 0
    except KeyboardInterrupt as exc:
        message = str(exc) or "interrupted"
        print(f"{prog}: {message}", file=sys.stderr)
        return 130
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


class TokenizerError(UserError, ValueError):
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
