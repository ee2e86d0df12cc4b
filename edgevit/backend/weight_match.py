"""Which graph weights are which quantized layers: found by value (the importer renames
parameters; values pass through unchanged). Shared by the int8 and codebook encodings."""

from __future__ import annotations

import hashlib

import numpy as np

from edgevit.errors import EdgeVitError


def match_weights(weights: list[np.ndarray], layers: dict, encoding: str) -> list[tuple[str, object] | None]:
    """Per graph weight ([K, N] after the weight transforms), the (name, record) of the quantized
    layer it is, or None. Layers are found by their weight's value (the importer renames
    parameters; the values pass through unchanged); every layer must be found."""
    by_value: dict[str, tuple[str, object]] = {}
    for name, (weight, quant) in layers.items():
        key = _digest(_as_matrix(weight))
        if key in by_value and by_value[key][1] is not quant:
            raise EdgeVitError(f"{encoding}: layers {by_value[key][0]} and {name} have identical weights, so the "
                               "compiled graph cannot tell them apart; re-quantize with one of them in --keep-fp32")
        by_value[key] = (name, quant)
    hits = [by_value.get(_digest(np.ascontiguousarray(w.T))) if w.ndim == 2 else None for w in weights]
    missing = sorted(set(n for n, _ in by_value.values()) - {hit[0] for hit in hits if hit})
    if missing:
        raise EdgeVitError(f"{encoding}: quantized layer(s) {', '.join(missing[:3])} not found in the imported graph; "
                           "re-quantize with them in `edgevit quantize --keep-fp32`, or report this model")
    return hits


def _as_matrix(weight) -> np.ndarray:
    """A linear's [N, K] weight (a torch tensor or an array), or a patch conv's [O, C, kh, kw]
    flattened to [O, C*kh*kw]."""
    w = np.asarray(weight.detach().cpu().numpy() if hasattr(weight, "detach") else weight, dtype=np.float32)
    return np.ascontiguousarray(w.reshape(w.shape[0], -1))


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()
