"""Weight encodings: how weights travel through the compile path.

An encoding rewrites the imported Relax module and its weight list (e.g. int8 with scales,
k-means or product-quantization codebooks decoded inside TVM). `fp32` passes them through.
New encodings register here; `compile` needs no change.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgevit.config import closest_key_hint
from edgevit.errors import ConfigError

Encoder = Callable[[object, list[np.ndarray]], tuple[object, list[np.ndarray]]]
_ENCODINGS: dict[str, Encoder] = {}


def register_encoding(name: str):
    def wrap(fn: Encoder) -> Encoder:
        _ENCODINGS[name] = fn
        return fn
    return wrap


def get_encoding(name: str) -> Encoder:
    if name not in _ENCODINGS:
        raise ConfigError(f"unknown weight encoding '{name}'; {closest_key_hint(name, list(_ENCODINGS))}")
    return _ENCODINGS[name]


def list_encodings() -> list[str]:
    return sorted(_ENCODINGS)


@register_encoding("fp32")
def fp32(mod, weights: list[np.ndarray]):
    """Weights stay float32 tensors bound as function inputs."""
    return mod, [np.ascontiguousarray(w, dtype=np.float32) for w in weights]
