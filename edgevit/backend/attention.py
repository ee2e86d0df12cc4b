"""Attention as one CPU kernel: q kᵀ, the additive terms (relative position bias, shift mask),
softmax and the product with v, per (image x head) and tile of query rows, without writing the
score matrix to memory.

The importer gives attention as separate operators (a batched matmul, reshapes, adds, softmax,
reshapes, a batched matmul): three kernels and four trips of the T x T scores through memory,
plus copies for the reshapes between them. `fuse_attention_pass` finds

    matmul(softmax(chain(matmul(Q, Kᵀ)), axis=-1), V)

where `chain` is any sequence of reshapes (keeping the last two axes T x T), broadcasts to the
same shape, scalar multiplies and additions of tensors that broadcast against the scores, and
replaces it with one call to `attention_kernel`. Each addend keeps its own shape (a window
mask is not expanded per head or image): the kernel indexes it through the reshapes.

The kernel's rows (queries) and score columns (keys) are padded up to whole register tiles,
so the inner loops carry no predicate: padded rows read the last real query; the keys are
padded with zeros in the graph (kᵀ, and addends along the key axis: weight-only ones such as a
position bias once, at compile time) and left out of the max and the sums, so softmax and the
product with v cover only the real keys. The padded output rows are sliced off in the graph,
where the slice fuses into the next copy (heads back to tokens).
"""

from __future__ import annotations

import numpy as np
from tvm.s_tir import dlight as dl

ATTR = "edgevit.attention"           # PrimFunc attribute marking the fused kernel: its row tile


def attention_kernel(groups: int, tokens: int, dim: int, dim_v: int, chain: list, rows_tile: int, keys: int):
    """TE PrimFunc out[g, i, c] (i < padded rows) = softmax_j(chain(q[g, i] . k[g, :, j])) @ v[g, :, c].

    q: [G, T, d], k: [G, d, T'] (transposed, as the importer gives it, and zero-padded to T'
    keys, a multiple of `keys`), v: [G, T, dv], then one input per ("add", stage_shape,
    addend_shape) of `chain` (its key axis padded to T' where it has one); ("mul", scalar) scales."""
    from tvm import te, tirx, topi

    rows = -(-tokens // rows_tile) * rows_tile
    cols = -(-tokens // keys) * keys
    q = te.placeholder((groups, tokens, dim), "float32", name="q")
    k = te.placeholder((groups, dim, cols), "float32", name="k")
    v = te.placeholder((groups, tokens, dim_v), "float32", name="v")
    addends = [te.placeholder(padded_addend_shape(step[2], tokens, cols), "float32", name=f"addend{n}")
               for n, step in enumerate(s for s in chain if s[0] == "add")]
    last = tokens - 1
    row = (lambda i: te.min(i, last)) if rows > tokens else (lambda i: i)
    col = (lambda j: te.min(j, last)) if cols > tokens else (lambda j: j)

    c = te.reduce_axis((0, dim), name="c")
    qk = te.compute((groups, rows, cols), lambda g, i, j: te.sum(q[g, row(i), c] * k[g, c, j], axis=c),
                    name="attention_qk")

    def chained(g, i, j):
        value, n = qk[g, i, j], 0
        for step in chain:
            if step[0] == "mul":
                value = value * tirx.const(step[1], "float32")
            else:
                value = value + addends[n][tuple(_addend_index(g, row(i), j, step[1], step[2]))]
                n += 1
        return value

    scores = te.compute((groups, rows, cols), chained, name="attention_scores")
    # over the padded key columns too (whole vectors): they are left out of the max, and their
    # weight is 0, so the sum and the product with v are those over the real keys
    # (a select of constants, not of loads: a select around a load becomes a masked load or gather)
    zero, far = tirx.const(0.0, "float32"), tirx.const(-1.0e30, "float32")
    below = (lambda jj: te.if_then_else(jj < tokens, zero, far)) if cols > tokens else (lambda jj: zero)
    keep = (lambda jj: te.if_then_else(jj < tokens, tirx.const(1.0, "float32"), zero)) if cols > tokens \
        else (lambda jj: tirx.const(1.0, "float32"))
    j = te.reduce_axis((0, cols), name="j")
    top = te.compute((groups, rows), lambda g, i: te.max(scores[g, i, j] + below(j), axis=j), name="attention_max")
    shifted = te.compute((groups, rows, cols), lambda g, i, jj: scores[g, i, jj] - top[g, i], name="attention_shift")
    exp = topi.fast_exp(shifted)
    weights = te.compute((groups, rows, cols), lambda g, i, jj: exp[g, i, jj] * keep(jj), name="attention_weights")
    j2 = te.reduce_axis((0, cols), name="j")
    total = te.compute((groups, rows), lambda g, i: te.sum(weights[g, i, j2], axis=j2), name="attention_sum")
    j3 = te.reduce_axis((0, cols), name="j")
    mixed = te.compute((groups, rows, dim_v), lambda g, i, cc: te.sum(weights[g, i, j3] * v[g, col(j3), cc], axis=j3),
                       name="attention_pv")
    out = te.compute((groups, rows, dim_v), lambda g, i, cc: mixed[g, i, cc] / total[g, i], name="attention_out")
    func = te.create_prim_func([q, k, v, *addends, out])
    return func.with_attrs({ATTR: rows_tile, "op_pattern": 8}).without_attr("global_symbol")   # 8: opaque, never fused


def padded_addend_shape(shape: tuple, tokens: int, cols: int) -> tuple:
    """An addend's shape with its key axis padded to the kernel's whole vectors (the graph pads
    it: weight-only addends such as a relative position bias are padded once, at compile time)."""
    return (*shape[:-1], cols) if shape and shape[-1] == tokens else tuple(shape)


def _addend_index(g, i, j, stage: tuple, shape: tuple) -> list:
    """The addend's element for score (g, i, j) when it is added at a stage where the scores
    are shaped `stage` (..., T, T): g unravelled over stage[:-2], broadcast dims read at 0."""
    coords, rest = [], g
    for extent in reversed(stage[:-2]):
        coords.append(rest % extent if extent > 1 else 0)
        rest = rest // extent
    coords = coords[::-1] + [i, j]
    offset = len(stage) - len(shape)
    return [0 if shape[n] == 1 else coords[offset + n] for n in range(len(shape))]


def schedule_attention(sch, rows_tile: int, lanes: int, parallel: bool) -> None:
    """Per (group, row tile), in parallel: the q kᵀ tile in registers (rows x `keys_tile` keys,
    over d), max / exp / sum along the real keys (vectorised by LLVM), the product with v
    as rows x two vectors of v's columns, normalised in the write-back. Every intermediate is
    local to the tile (rows x T floats, L1-resident)."""
    out = sch.get_sblock("attention_out")
    g, i, c = sch.get_loops(out)
    io, ii = sch.split(i, [None, rows_tile])
    tile = sch.fuse(g, io)
    if parallel:
        sch.parallel(tile)
    for name in ("attention_scores", "attention_shift", "T_fast_exp"):
        sch.compute_inline(sch.get_sblock(name))
    for name in ("attention_pv", "attention_sum", "attention_weights", "attention_max", "attention_qk"):
        block = sch.get_sblock(name)
        sch.compute_at(block, tile, preserve_unit_loops=True)
        sch.set_scope(block, 0, "local")
    weights = sch.get_sblock("attention_weights")
    sch.vectorize(sch.split(sch.get_loops(weights)[-1], [None, lanes])[1])

    qk = sch.get_sblock("attention_qk")
    *_, qi, qj, qc = sch.get_loops(qk)
    jo, ji = sch.split(qj, [None, keys_tile(lanes)])
    sch.reorder(jo, qc, qi, ji)
    sch.unroll(qi)
    sch.vectorize(ji)
    sch.decompose_reduction(qk, qc)

    pv = sch.get_sblock("attention_pv")
    *_, pi, pc, pj = sch.get_loops(pv)
    width = _vector_cols(sch.get(pv), lanes)
    co, ci = sch.split(pc, [None, width])
    sch.reorder(co, pj, pi, ci)
    sch.unroll(pi)
    sch.vectorize(ci)
    sch.decompose_reduction(pv, pj)

    *_, oc = sch.get_loops(out)
    if int(sch.get(oc).extent) % lanes == 0:
        sch.vectorize(sch.split(oc, [None, lanes])[1])


def keys_tile(lanes: int) -> int:
    """Keys per q kᵀ register tile, a multiple the keys are padded to: one AVX-512 vector (8
    rows x 1 = 8 accumulators), two narrower ones (NEON: 8 x 2 = 16 accumulators of 4 lanes)."""
    return lanes if lanes >= 16 else 2 * lanes


def _vector_cols(block, lanes: int) -> int:
    """Columns of v per register tile: two vectors when dv allows (8 rows x 2 = 16 accumulators)."""
    dim_v = int(block.writes[0].source.shape[-1])
    for width in (2 * lanes, lanes):
        if dim_v % width == 0:
            return width
    return dim_v


def tile_rows_for(tokens: int, full: int) -> int:
    """The row tile: `full` (8 with 32 vector registers), or a smaller one that divides the
    tokens (Swin's 49-token windows: 7), so no row is padded."""
    return next((r for r in (full, 7, 6, 5) if r <= full and tokens % r == 0), full)


class FusedAttention(dl.ScheduleRule):
    """The CPU rule for the kernels `attention_kernel` made, and only those."""

    def apply(self, func, target, _tunable):
        from tvm import s_tir, tirx

        from edgevit.backend.cpu_features import PARALLEL_MIN_MACS, fp32_lanes

        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm" or func.attrs is None \
                or ATTR not in func.attrs or func.attrs.get("tirx.is_scheduled", False):
            return None
        q, k = func.params[0].ty.shape, func.params[1].ty.shape
        macs = int(q[0]) * int(q[1]) * int(q[1]) * int(q[2]) * 2
        sch = s_tir.Schedule(func)
        lanes = fp32_lanes(target)
        if int(k[2]) % keys_tile(lanes):
            return None      # made for another vector width (a database kernel read on another target)
        schedule_attention(sch, int(func.attrs[ATTR]), lanes, parallel=macs >= PARALLEL_MIN_MACS)
        return sch


def fuse_attention_pass(target):
    """The Relax pass replacing every matmul(softmax(chain(matmul(Q, Kᵀ))), V) (module docstring)
    with one `attention_kernel` call, for a CPU `target`; the replaced operators are removed."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from edgevit.backend.cpu_features import fp32_lanes, row_tile
    from edgevit.backend.rewrites import function_pass

    lanes, full = fp32_lanes(target), row_tile(target)

    @mutator
    class Fuse(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.kernels = {}

        def visit_call_(self, call):
            call = super().visit_call_(call)
            found = _match_attention(call, self.lookup_binding)
            return call if found is None else self.emit_attention(call, *found)

        def emit_attention(self, call, q, k, v, chain):
            lead = list(_shape(call)[:-2])
            (tokens, dim), dim_v = _shape(q)[-2:], _shape(v)[-1]
            groups = int(np.prod(lead))
            rows_tile = tile_rows_for(tokens, full)
            keys = keys_tile(lanes)
            rows, cols = -(-tokens // rows_tile) * rows_tile, -(-tokens // keys) * keys
            emit = self.builder_.emit
            q3 = emit(relax.op.reshape(q, (groups, tokens, dim)))
            k3 = emit(relax.op.reshape(k, (groups, dim, tokens)))
            v3 = emit(relax.op.reshape(v, (groups, tokens, dim_v)))
            if cols > tokens:
                k3 = emit(relax.op.nn.pad(k3, [0, 0, 0, 0, 0, cols - tokens]))
            addends = []
            for step in chain:
                if step[0] == "add":
                    addend = step[2]
                    shape = tuple(int(d) for d in addend.ty.shape)
                    if padded_addend_shape(shape, tokens, cols) != shape:
                        addend = emit(relax.op.nn.pad(addend, [0, 0] * (len(shape) - 1) + [0, cols - tokens]))
                    addends.append(addend)
            spec = [(st[0], st[1]) if st[0] == "mul" else ("add", st[1], tuple(int(d) for d in st[2].ty.shape))
                    for st in chain]
            key = (groups, tokens, dim, dim_v, repr(spec), rows_tile, keys)
            if key not in self.kernels:
                self.kernels[key] = self.builder_.add_func(
                    attention_kernel(groups, tokens, dim, dim_v, spec, rows_tile, keys), "fused_attention")
            out = emit(relax.call_tir(self.kernels[key], [q3, k3, v3, *addends],
                                      relax.TensorType((groups, rows, dim_v), "float32")))
            if rows > tokens:
                out = emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[tokens]))
            return relax.op.reshape(out, [*lead, tokens, dim_v])

    return function_pass(Fuse, "EdgeVitFuseAttention", dead_code=True)


def _op(expr, lookup):
    """(op name, call) of the call bound to `expr`, or (None, None)."""
    from tvm import relax

    bound = lookup(expr) if isinstance(expr, relax.Var) else None
    if isinstance(bound, relax.Call) and hasattr(bound.op, "name"):
        return bound.op.name, bound
    return None, None


def _shape(expr) -> tuple | None:
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def _through_views(expr, lookup):
    """`expr` with reshapes and same-shape broadcasts looked through."""
    while True:
        name, call = _op(expr, lookup)
        if name == "relax.reshape" or (name == "relax.broadcast_to" and _shape(call.args[0]) == _shape(expr)):
            expr = call.args[0]
        else:
            return expr


def _match_attention(call, lookup):
    """(q, kᵀ, v, chain) when `call` is matmul(softmax(chain(matmul(q, kᵀ))), v) in fp32 with
    q [..., T, d], kᵀ [..., d, T], v [..., T, dv] over the same leading axes; else None."""

    if getattr(call.op, "name", None) != "relax.matmul" or str(getattr(call.ty, "dtype", "")) != "float32":
        return None
    probs, v = call.args
    name, softmax = _op(_through_views(probs, lookup), lookup)
    if name != "relax.nn.softmax" or int(softmax.attrs.axis) not in (-1, len(softmax.ty.shape) - 1):
        return None
    found = _score_chain(softmax.args[0], lookup, depth=0)
    if found is None:
        return None
    scores, chain = found
    q, k = scores.args
    sq, sk, sv, so = _shape(q), _shape(k), _shape(v), _shape(call)
    if None in (sq, sk, sv, so) or len(sq) < 3 or not (sq[:-2] == sk[:-2] == sv[:-2] == so[:-2]):
        return None
    tokens = sq[-2]
    if sk[-2:] != (sq[-1], tokens) or sv[-2] != tokens or str(q.ty.dtype) != "float32":
        return None
    groups = int(np.prod(sq[:-2]))
    for step in chain:
        if step[0] == "add":
            stage, addend = step[1], _shape(step[2])
            if addend is None or len(addend) > len(stage) or stage[-2:] != (tokens, tokens) or \
                    int(np.prod(stage[:-2])) != groups or str(step[2].ty.dtype) != "float32" or \
                    any(a not in (1, b) for a, b in zip(addend[::-1], stage[::-1])):
                return None
    return q, k, v, chain


def _score_chain(expr, lookup, depth: int):
    """(the q kᵀ matmul, [steps from it to `expr`]) where each step is ("mul", scalar) or
    ("add", the scores' shape there, the addend); None when `expr` is not such a chain."""
    from tvm import relax

    if depth > 16:
        return None
    name, call = _op(expr, lookup)
    if name == "relax.matmul":
        return call, []
    if name == "relax.reshape" or (name == "relax.broadcast_to" and _shape(call.args[0]) == _shape(expr)):
        return _score_chain(call.args[0], lookup, depth + 1)
    if name == "relax.multiply":
        for x, scale in (call.args, call.args[::-1]):
            if isinstance(scale, relax.Constant) and scale.data.numpy().size == 1:
                found = _score_chain(x, lookup, depth + 1)
                if found:
                    return found[0], [*found[1], ("mul", float(scale.data.numpy().reshape(())))]
        return None
    if name == "relax.add" and _shape(expr) is not None:
        for x, addend in (call.args, call.args[::-1]):
            if _shape(x) == _shape(expr):
                found = _score_chain(x, lookup, depth + 1)
                if found:
                    return found[0], [*found[1], ("add", _shape(expr), addend)]
    return None
