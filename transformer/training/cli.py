"""Command-line plumbing shared by every command of every package.

- Config dataclasses become flags: each field is `--field-name`, its help is the meaning given
  with `param(default, "meaning")`, and the default shown is the chosen preset's value. Flags left out keep
  the value of the named preset (`--config small`) or the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path

from .errors import UserError


class CommandParser(argparse.ArgumentParser):
    """The parser of every command: a usage mistake is one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(low: int):
    """An argparse type: an integer >= `low`."""

    def convert(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    convert.__name__ = "integer"
    return convert


def float_in(low: float = -math.inf, high: float = math.inf, low_open: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] with `low_open`)."""

    def convert(text: str) -> float:
        value = float(text)
        above = value > low if low_open else value >= low
        if not (math.isfinite(value) and above and value <= high):
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be a finite number in {bounds}, got {text}")
        return value

    convert.__name__ = "number"
    return convert


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
non_negative_float = float_in(0.0)


def _flag_type(annotation):
    """(converter, nargs, choices) for a dataclass field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        converter, nargs, choices = _flag_type(inner[0])
        return (lambda s: None if s.lower() == "none" else converter(s)), nargs, choices
    if origin is typing.Literal:
        return type(args[0]), None, list(args)
    if origin in (tuple, list):
        return args[0], "+", None
    return annotation, None, None


def add_dataclass_arguments(
    parser: argparse.ArgumentParser, cls, title: str | None = None, values=None
) -> argparse._ArgumentGroup:
    """Add one flag per field of the dataclass `cls`, in an argument group of their own (returned);
    unset flags parse to None.

    `values` (an instance: the chosen preset's) supplies the defaults that `--help` shows, so it
    shows the values a run will use; without it, the dataclass defaults.
    """
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        flag = "--" + f.name.replace("_", "-")
        if values is not None:
            default = getattr(values, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})".strip()
        if hints[f.name] is bool:
            group.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
            continue
        converter, nargs, choices = _flag_type(hints[f.name])
        group.add_argument(
            flag,
            dest=f.name,
            type=converter,
            nargs=nargs,
            choices=choices,
            default=None,
            metavar=f.name.upper() if choices is None else None,
            help=help_text,
        )
    return group


def dataclass_from_args(cls, args: argparse.Namespace, base=None):
    """Build `cls` from parsed flags: given flags override `base` (a preset) or the defaults."""
    base = cls() if base is None else base
    given = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            current = getattr(base, f.name)
            given[f.name] = tuple(value) if isinstance(current, tuple) else value
    return dataclasses.replace(base, **given)


def preset_flags(argv, **flags) -> argparse.Namespace:
    """The values of a few flags (`--config`, ...) read ahead of the full parse, so that the
    full parser can be built with the chosen preset's values as its defaults:

        early = preset_flags(argv, config="small")      # {flag name: default}
        args = build_parser(PRESETS[early.config]).parse_args(argv)
    """
    early = argparse.ArgumentParser(add_help=False)
    for name, default in flags.items():
        early.add_argument("--" + name.replace("_", "-"), dest=name, default=default)
    known, _ = early.parse_known_args(argv)
    return known


def choose_preset(presets: dict, name: str):
    """`presets[name]`, or one line naming the presets there are."""
    if name not in presets:
        raise UserError(f"unknown config {name!r}; choose one of: {', '.join(presets)}")
    return presets[name]


def add_common_arguments(parser: argparse.ArgumentParser, training: bool = True) -> None:
    """The flags every command takes: --device, --dtype, --seed, --out (and for trainers --resume,
    --overwrite, --compile)."""
    group = parser.add_argument_group("common")
    group.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where to run; auto picks cuda, then mps, then cpu (default: auto)",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute precision: bf16/fp16 run under autocast with float32 weights; auto is "
        "bfloat16 on a GPU that supports it, else float32 (default: auto)",
    )
    group.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--out", type=Path, default=None, help="output directory")
    if training:
        group.add_argument(
            "--resume",
            type=Path,
            default=None,
            help="continue exactly from a checkpoint directory (or a run directory: its latest)",
        )
        group.add_argument(
            "--overwrite",
            action="store_true",
            help="replace the run already in --out (its checkpoints and logs are deleted); "
            "without it a used --out is refused unless --resume continues it",
        )
        group.add_argument(
            "--compile", action="store_true", help="compile the model with torch.compile"
        )
