"""Configs check themselves: each config dataclass calls `check_config` in its `__post_init__`, so a
notebook and a command get the same one-line error, before any work starts.

    @dataclass(frozen=True)
    class TrainConfig:
        steps: int = param(1000, "optimizer steps")
        lr: float = param(1e-3, "peak learning rate")
        dropout: float = param(0.0, "dropout on residual branches")

        def __post_init__(self):
            check_config(self, positive=("steps", "lr"), probability=("dropout",))

Fields are declared with `param(default, "meaning")`, so `--help` has their meaning without
reading the source.

Every field is checked against its annotation (an `int` field refuses "3", 2.5 and True; a `float`
field refuses NaN and ±inf; a `Literal` field names its choices; `X | None` also takes None), so a
damaged or hand-edited `config.json` is refused as clearly as a bad flag. Ranges are named per
field; rules between fields stay in the config's own `__post_init__`, raising `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing

from .errors import UserError


def param(default=dataclasses.MISSING, help: str = "", *, factory=dataclasses.MISSING, added=False):
    """A config field with its one-line meaning, which `--help` shows beside the flag:
    `steps: int = param(1000, "optimizer steps")`; `factory=` for a list default. `added=True`
    marks a field added after checkpoints were written without it: reading such a checkpoint's
    config gives it its default, which must be the behaviour from before the field existed."""
    metadata = {"help": help, "added": added}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


class ConfigError(UserError, ValueError):
    """A config value of the wrong type, not finite, out of its range, or inconsistent."""


@functools.cache
def _field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _describe(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if annotation is type(None):
        return "None"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        return f"a list, each item {_describe(args[0])}"
    if annotation is float:
        return "a finite number"
    return f"{getattr(annotation, '__name__', annotation)}"


def _matches(value, annotation) -> bool:
    """Whether `value` fits the type annotation (types not listed here are not checked)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list)) and all(_matches(v, args[0]) for v in value)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if annotation is str:
        return isinstance(value, str)
    return True


def _numbers(value) -> list:
    """The numbers in a field's value (itself, or the items of a list), None left out."""
    items = value if isinstance(value, (tuple, list)) else [value]
    return [v for v in items if v is not None]


def check_config(
    config,
    *,
    positive: typing.Iterable[str] = (),
    non_negative: typing.Iterable[str] = (),
    probability: typing.Iterable[str] = (),
    below_one: typing.Iterable[str] = (),
) -> None:
    """Refuse a config whose fields do not fit their types or ranges, naming the first that fails.

    `positive`: > 0; `non_negative`: ≥ 0; `probability`: in [0, 1]; `below_one`: in [0, 1) (a
    dropout or a smoothing that must leave something). A list-valued field is checked item by item;
    None passes every range (it means "unset").
    """
    name = type(config).__name__
    hints = _field_types(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not _matches(value, hints[field.name]):
            raise ConfigError(
                f"{name}.{field.name} must be {_describe(hints[field.name])}, got {value!r}"
            )
    rules = [
        (positive, lambda v: v > 0, "> 0"),
        (non_negative, lambda v: v >= 0, ">= 0"),
        (probability, lambda v: 0 <= v <= 1, "in [0, 1]"),
        (below_one, lambda v: 0 <= v < 1, "in [0, 1)"),
    ]
    for fields, ok, what in rules:
        for field in fields:
            value = getattr(config, field)
            if not all(ok(v) for v in _numbers(value)):
                raise ConfigError(f"{name}.{field} must be {what}, got {value!r}")


def config_from_dict(cls, data, where: str):
    """`cls(**data)` for a config read from JSON (`where` names the file and key), refusing
    anything but an object with exactly the config's fields (those marked `added` may be
    absent), before the fields are checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a JSON object of {cls.__name__} fields, got {data!r}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    added_later = {f.name for f in dataclasses.fields(cls) if f.metadata.get("added")}
    unknown, missing = sorted(set(data) - names), sorted(names - set(data) - added_later)
    if unknown or missing:
        parts = [f"unknown {', '.join(unknown)}"] * bool(unknown)
        parts += [f"missing {', '.join(missing)}"] * bool(missing)
        raise ConfigError(f"{where} is not a {cls.__name__}: {'; '.join(parts)}")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
