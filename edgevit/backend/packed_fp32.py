"""fp32 weights packed into column panels at compile time, for CPU matmuls whose weight rows are
far apart in memory.

A [K, N] weight read by a register tile of P columns strides N floats per step of the
reduction; at N = 1024 that is 4 KiB, so every row of a tile's panel lands in the same L1 set
and the panel (K x P floats, 32 KiB at K = 256) is evicted before the next row tile reuses it:
EfficientViT-B1's 7x7 stage ran its 1x1 convs at ~14 GFLOP/s. Packed as [N/P, K, P], a panel is
contiguous. Each matmul(x, W) with W a weight input becomes one kernel

    C[..., j] = sum_k x[..., k] * Wp[j / P, k, j % P]

over x's own leading axes (no reshape, so the bias / activation / residual after it still fuse
into its write-back), scheduled by the CPU Matmul rule with its column tile equal to P.
"""

from __future__ import annotations

import numpy as np

from edgevit.backend.weight_match import replace_weight_matmuls
from edgevit.errors import EdgeVitError


def pack_weight_matmuls(mod, weights: list[np.ndarray], panel: int, row_tile: int):
    """(mod, weights) with every weight-matmul whose weight has whole panels of columns reading a
    panel-packed copy. A packed weight that something other than a matmul also reads leaves the
    whole module unpacked. (Ragged columns, a 1000-class head, stay unpacked: the Matmul rule
    pads them with pad_einsum, which cannot read the packed index, and padding the panels then
    slicing the output fused the slice into the kernel's write-back, which wrote out of bounds.)"""
    used = _matmul_weights(mod)
    hits = [("packed", w.shape[1]) if i in used and w.ndim == 2 and w.dtype == np.float32 and w.shape[1] % panel == 0
            else None for i, w in enumerate(weights)]
    if not any(hits):
        return mod, weights
    arrays = [[pack_columns(w, panel)] if hit else [w] for w, hit in zip(weights, hits)]
    try:
        return replace_weight_matmuls(mod, hits, arrays, ("panels",), _lowering(panel, row_tile), "fp32 panels")
    except EdgeVitError:
        return mod, weights      # a weight also read by another op: leave the graph as imported


def pack_columns(w: np.ndarray, panel: int) -> np.ndarray:
    """[K, N] -> [N/P, K, P] (N a multiple of P): panel j holds columns jP..jP+P-1 for every k,
    contiguously."""
    k, n = w.shape
    return np.ascontiguousarray(w.reshape(k, n // panel, panel).transpose(1, 0, 2))


def _matmul_weights(mod) -> set[int]:
    """Indices (among the weight inputs) of the weights some matmul reads as its right operand,
    in every function of the module."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    found: set[int] = set()
    x_pat, w_pat = wildcard(), wildcard()
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            index = {v: i for i, v in enumerate(func.params[int(func.attrs["num_input"]):])}
            rewrite_call(is_op("relax.matmul")(x_pat, w_pat), _noting(index, w_pat, found), func)
    return found


def _noting(index: dict, w_pat, found: set[int]):
    """A rewriter that changes nothing and notes which weight each matched matmul reads."""
    def note(call, matches):
        if matches[w_pat] in index:
            found.add(index[matches[w_pat]])
        return call

    return note


def _lowering(panel: int, row_tile: int):
    from tvm import relax

    def lower(call, x, columns, encoded, kernel):
        (packed,) = encoded
        *lead, k = [int(d) for d in x.ty.shape]
        if str(x.ty.dtype) != "float32" or int(packed.ty.shape[1]) != k:
            return call
        tile = padded_row_tile(lead, row_tile)
        func = kernel(("panels", *lead, k, columns, tile), "matmul_panels",
                      lambda: panel_matmul(lead, k, columns, panel, tile))
        return relax.call_tir(func, relax.Tuple([x, packed]), relax.TensorType([*lead, columns], "float32"))

    return lower


def padded_row_tile(lead: list[int], row_tile: int) -> int:
    """The multiple the kernel's rows are padded to: 1 (no padding) when the rule's register
    tiles divide the rows (all leading axes flattened: 8 images x 197 tokens = 1576 rows) or
    the rows span several leading axes (the padded tail could not be written back as one tile);
    else the register tile (ViT's 197 tokens at batch 1 -> 200 rows)."""
    from edgevit.backend.cpu_rules import divides_rows

    rows = int(np.prod(lead)) if lead else 1
    if divides_rows(rows, row_tile) or sum(d > 1 for d in lead) > 1:
        return 1
    return row_tile


def panel_matmul(lead: list[int], k: int, n: int, panel: int, row_tile: int = 1):
    """TIR of C[..., j] = sum_r A[..., r] * W[j // P, r, j % P] over all leading axes flattened
    into one row axis, padded up to a multiple of `row_tile`: the padding rows read the last
    real row (no select in the inner loop) and are never written out. Out-elementwise-fusable,
    so the epilogue after it fuses into it; the CPU Matmul rule writes each register tile of
    the (local) row-major result back through that epilogue."""
    from tvm import te, tirx

    def i64(*dims):   # Relax's legalized kernels use int64 shapes; FuseTIR needs them to match
        return [tirx.IntImm("int64", d) for d in dims]

    rows = int(np.prod(lead)) if lead else 1
    padded = -(-rows // row_tile) * row_tile
    a = te.placeholder(i64(*lead, k), "float32", name="A")
    w = te.placeholder(i64(n // panel, k, panel), "float32", name="W")
    r = te.reduce_axis(i64(0, k), name="k")

    def unflatten(row):
        index = []
        for d in reversed(lead):
            index.append(row % d if d > 1 else tirx.IntImm("int64", 0))
            row = row // d
        return index[::-1]

    last = tirx.IntImm("int64", rows - 1)
    flat = te.compute(i64(padded, n), lambda i, j: te.sum(
        a[(*unflatten(te.min(i, last) if padded > rows else i), r)] * w[j // panel, r, j % panel], axis=r),
        name="matmul_panels")

    def row_of(idx):
        row = tirx.IntImm("int64", 0)
        for d, v in zip(lead, idx):
            row = row * d + v
        return row

    c = te.compute(i64(*lead, n), lambda *idx: flat[row_of(idx[:-1]), idx[-1]], name="matmul_panels_rows")
    return te.create_prim_func([a, w, c]).with_attr("op_pattern", 4)
