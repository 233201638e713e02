"""User errors, and how every command reports them.

`UserError` is the base of every package's own exceptions for a user's mistake (a bad flag, a bad
file, an incompatible checkpoint). `run_command(main)` runs a command's `main` and turns such an
error into one line on stderr and exit status 2, Ctrl-C into one line and exit status 130, so a
user never sees a traceback for a mistake of theirs.

The `tokenizer` package sits below this one and stays torch-free, so its errors derive from
`ValueError` (its `TokenizerError`), not from `UserError`; they are user errors here all the same.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """A mistake in what the user asked for; commands print it as one line and exit 2."""


def user_error_types() -> tuple[type[Exception], ...]:
    """`UserError`, and the tokenizer's `TokenizerError` when the tokenizer is loaded.

    Looked up rather than imported: a command that never tokenizes (dali) never loads the BPE code,
    and then no tokenizer error can have been raised.
    """
    tokenizer_errors = sys.modules.get("tokenizer.errors")
    if tokenizer_errors is None:
        return (UserError,)
    return (UserError, tokenizer_errors.TokenizerError)


def run_command(
    main: Callable[[Sequence[str] | None], int | None], argv=None, prog: str = "command"
) -> int:
    """Run a command's `main`: user errors and unreadable files become one stderr line and exit
    status 2, Ctrl-C one line and 130. Use as `sys.exit(run_command(main, argv, "pkg.command"))`."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt as exc:
        print(f"{prog}: {str(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except user_error_types() as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"{prog}: error: {exc.strerror or one_line(exc)}{where}", file=sys.stderr)
        return 2


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the first line of a library's long explanation)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
