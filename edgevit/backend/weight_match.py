"""Which graph weights are which quantized layers (found by value: the importer renames
parameters; values pass through unchanged), and the rewrite that swaps each for its encoded
arrays and each matmul reading it for the encoding's kernel. Shared by the int8 and codebook
encodings."""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

from edgevit.errors import EdgeVitError

# lower(call, x, record, vars, kernel) -> the Relax expression replacing `call` = matmul(x, weight), where
# `vars` are the weight's encoded inputs and kernel(key, prefix, make) adds (once per key) the PrimFunc make()
Lowering = Callable[..., object]


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


def replace_weight_matmuls(mod, hits: list, arrays: list[list[np.ndarray]], suffixes: tuple[str, ...],
                           lower: Lowering, encoding: str):
    """(mod, weights): every Relax function of `mod` (`main`, one per extra batch size) with each
    matched weight's input replaced by its encoded arrays (inputs `<weight>_<suffix>`) and each
    matmul reading it lowered by `lower`; kernels are shared by key across the functions."""
    from tvm import relax

    builder, kernels = relax.BlockBuilder(mod), {}

    def kernel(key, prefix: str, make):
        if key not in kernels:
            name = f"{prefix}_{len(kernels)}"
            kernels[key] = builder.add_func(make().with_attr("global_symbol", name), name)
        return kernels[key]

    rewritten = {gv: _rewrite_function(func, hits, arrays, suffixes, lower, kernel, encoding)
                 for gv, func in mod.functions.items() if isinstance(func, relax.Function)}
    out = builder.get()
    for gv, func in rewritten.items():
        out[gv] = func
    return out, [a for per_weight in arrays for a in per_weight]


def _rewrite_function(func, hits: list, arrays: list[list[np.ndarray]], suffixes: tuple[str, ...],
                      lower: Lowering, kernel, encoding: str):
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    n_inputs = int(func.attrs["num_input"])
    new_params, replaced = list(func.params[:n_inputs]), {}
    for var, hit, per_weight in zip(func.params[n_inputs:], hits, arrays):
        if hit is None:
            new_params.append(var)
            continue
        encoded = [relax.Var(f"{var.name}_{suffix}", relax.TensorType(list(a.shape), str(a.dtype)))
                   for suffix, a in zip(suffixes, per_weight)]
        replaced[var] = (hit[1], encoded)
        new_params += encoded
    x_pat, w_pat = wildcard(), wildcard()

    def rewrite(call, matches):
        w = matches[w_pat]
        return lower(call, matches[x_pat], *replaced[w], kernel) if w in replaced else call

    body = rewrite_call(is_op("relax.matmul")(x_pat, w_pat), rewrite, func).body
    unrewritten = [v.name for v in relax.analysis.free_vars(body) if v in replaced]
    if unrewritten:
        raise EdgeVitError(f"{encoding}: weight(s) {', '.join(unrewritten[:3])} are used by something other than a "
                           "matmul; re-quantize with that layer in `edgevit quantize --keep-fp32`, or report this model")
    return relax.Function(new_params, body, func.ret_ty, func.is_pure, func.attrs)
