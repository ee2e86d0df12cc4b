"""The model registry: families register themselves with `register_model` (timm style).

Each registered name is a family class plus its default config; overrides replace config
fields (e.g. img_size, num_classes), and unknown fields are errors naming the closest one.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable

from edgevit.config import _coerce, closest_key_hint
from edgevit.errors import ConfigError

_REGISTRY: dict[str, Callable[[], tuple[type, Any]]] = {}


def register_model(fn: Callable[[], tuple[type, Any]]) -> Callable[[], tuple[type, Any]]:
    """Register a function returning (model class, default config) under its own name."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def resolve_model(name: str, **overrides: Any) -> tuple[type, Any]:
    """The (class, config) `create_model(name, **overrides)` would build, validated."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model '{name}'; {closest_key_hint(name, list(_REGISTRY))} "
                          f"(see `edgevit models`)")
    cls, cfg = _REGISTRY[name]()
    fields = {f.name for f in dataclasses.fields(cfg)}
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"model '{name}' has no setting '{key}'; {closest_key_hint(key, list(fields))}")
    hints = typing.get_type_hints(type(cfg))
    typed = {k: _coerce(v, hints[k], f"model '{name}' setting '{k}'") for k, v in overrides.items()}
    try:
        return cls, dataclasses.replace(cfg, **typed)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ConfigError(f"model '{name}': {e}") from None


def complete_saved_config(name: str, config: dict) -> dict:
    """A model config saved by an older edgevit, with each setting added since given the value
    that version computed with (a family's LEGACY_SETTINGS), not today's default."""
    if name not in _REGISTRY or not isinstance(config, dict):
        return config
    _, cfg = _REGISTRY[name]()
    legacy = getattr(type(cfg), "LEGACY_SETTINGS", {})
    return {**{k: v for k, v in legacy.items() if k not in config}, **config}


def create_model(name: str, **overrides: Any):
    cls, cfg = resolve_model(name, **overrides)
    model = cls(cfg)
    model.model_name = name
    return model


def check_positive(cfg, *names: str) -> None:
    """Sizes and counts a model config holds must be positive integers (a zero patch or window
    size would otherwise surface as a division error deep inside the model)."""
    for n in names:
        value = getattr(cfg, n)
        values = value if isinstance(value, tuple) else (value,)
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{n} {value!r} must be {'positive integers' if isinstance(value, tuple) else 'a positive integer'}")


def check_fraction(cfg, name: str) -> None:
    value = getattr(cfg, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} {value!r} must be in [0, 1)")
