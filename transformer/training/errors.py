"""User errors, and how every command reports them.

`UserError` is the base of every package's own exceptions for a user's mistake (a bad flag, a bad
file, an incompatible checkpoint). `run_command(main)` runs a command's `main` and turns such an
error into one line on stderr and exit status 2, Ctrl-C into one line and exit status 130, so a
user never sees a traceback for a mistake of theirs.

Ctrl-C while a command is still starting (torch takes a second or two to import, before
`run_command` is reached) would print Python's 30-line traceback; importing this module, which every
torch package does first, makes it one line and exit status 130 too, for a process started as one of
this project's commands (`python -m xllama.train`, `xllama-train`) and for no other.

The `tokenizer` package sits below this one and stays torch-free, so its errors derive from
`ValueError` (its `TokenizerError`), not from `UserError`; they are user errors here all the same.
"""

from __future__ import annotations

import os
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


PACKAGES = ("tokenizer", "transformer", "xllama", "dali", "instructgpt")


def command_name() -> str | None:
    """`xllama.train` if this process was started as `python -m xllama.train` or `xllama-train`
    (one of this project's commands), else None."""
    argv = getattr(sys, "orig_argv", [])
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1]
        return module if module.split(".")[0] in PACKAGES else None
    script = os.path.basename(sys.argv[0]) if sys.argv else ""
    return script.replace("-", ".", 1) if script.split("-")[0] in PACKAGES else None


def _quiet_interrupt_while_starting() -> None:
    """In a command's process, an uncaught Ctrl-C prints one line and exits 130 (see above)."""
    name = command_name()
    if name is None:
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, traceback)
        print(f"{name}: interrupted while starting", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)

    sys.excepthook = hook


_quiet_interrupt_while_starting()
