"""Declarative data files (recipes, targets) read into dataclasses that validate themselves.

Unknown keys are errors naming the file and the closest valid key: tvmc and efficientvit both
silently ignored misspelled keys, which turns a typo into a wrong experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from edgevit.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; pass the path of a .toml file")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: malformed TOML ({e}); fix the syntax at that place") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as a UTF-8 .toml file") from None
    except ValueError as e:   # e.g. an integer past Python's 4300-digit conversion limit
        raise ConfigError(f"{path}: a value TOML cannot hold ({str(e).splitlines()[0][:80]}); fix it") from None


def closest_key_hint(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1)
    if match:
        return f"did you mean '{match[0]}'?"
    return "valid keys: " + ", ".join(sorted(valid))


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type.

    `where` names the file and table for error messages, e.g. "recipes/a.toml [train]".
    Nested dataclass fields are built recursively from sub-tables.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}; {closest_key_hint(key, list(fields))}")
        kwargs[key] = _coerce(value, hints[key], f"{where} {key}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key '{missing[0]}'")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:   # a value holding a line break is shown escaped: one line
        raise ConfigError(f"{where}: {e}".replace("\r", "\\r").replace("\n", "\\n")) from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, f"{where} ->")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{where}: {str(value)[:20]}... is too large a number") from None
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value
