"""edgevit's default CPU schedules (dlight rules), applied to every kernel no tuning record covers.

A ViT on CPU is matmuls (qkv, proj, MLP, attention), softmax, layer norm and injective glue
(reshapes, window partition / gather / scatter, GELU, residual adds). TVM 0.27 schedules none
of them for CPU by default. These rules give each a sensible untuned schedule:

- `Matmul`: one reduction block `C[..., i, j] = sum_k ...` (dense, batched matmul, patch conv).
  Register tile of MR rows x NR columns (NR = two vector registers) accumulated in a local
  buffer, the reduction outside the tile, tiles spread over threads, the elementwise epilogue
  (bias, GELU, residual add) computed in the write-back so the output is written once.
- dlight's `cpu.GEMV` (batch-1 classifier head) and `cpu.Reduction` (softmax, layer norm).
- `Injective`: everything inlined into the last block, flattened, split into vectors, and
  split across threads only when there is enough work to pay for waking them.
"""

from __future__ import annotations

import numpy as np
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent

from edgevit.backend.cpu_features import (
    PARALLEL_MIN_ELEMENTS,
    PARALLEL_MIN_MACS,
    ROWS_PER_TILE,
    VECTORS_PER_TILE,
    fp32_lanes,
    vector_registers,
)


def _is_scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def _open(func, target):
    """(schedule, block infos) of an unscheduled CPU kernel, or None when a rule must decline."""
    if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm" or _is_scheduled(func):
        return None
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    return (sch, infos) if infos else None


class Matmul(dl.ScheduleRule):
    """Register-tiled matmul / batched matmul with a fused elementwise epilogue."""

    def apply(self, func, target, _tunable):
        opened = _open(func, target)
        if opened is None:
            return None
        sch, infos = opened
        found = single_reduction(sch, infos, lambda info: _spatial_then_reduce(info.dom_kind()))
        if found is None:
            return None
        main, epilogue = found
        lanes = fp32_lanes(target)
        dom_kind = main.dom_kind()
        rows, cols = self._tile_shape(sch, main.block_rv, dom_kind, lanes, vector_registers(target))
        if epilogue and _writes_padded_rows(sch, main.block_rv, epilogue):
            # the panel kernel's rows padded to whole tiles (packed_fp32): each tile is kept
            # local and written back through the epilogue, whose rows past the real ones are not written
            sch.set_scope(main.block_rv, 0, "local")
            for intermediate in epilogue[:-1]:
                sch.compute_inline(intermediate)
            self._tile(sch, main.block_rv, epilogue[-1], dom_kind, rows, cols, lanes)
            return sch
        unpad = self._pad_ragged(sch, main.block_rv, dom_kind, rows, cols)
        write_back = sch.cache_write(main.block_rv, 0, "local")
        # the epilogue as one expression first: reverse-inlining block by block leaves a dangling
        # buffer when an early result is read again later (GELU as ONNX writes it: x * (1 + erf(x / sqrt 2)) * 0.5)
        for intermediate in epilogue[:-1]:
            sch.compute_inline(intermediate)
        if epilogue:
            sch.reverse_compute_inline(epilogue[-1])
        self._tile(sch, main.block_rv, write_back, dom_kind, rows, cols, lanes)
        for copy in unpad:
            _vectorize_copy(sch, copy, lanes)
        return sch

    @staticmethod
    def _tile_shape(sch, block, dom_kind: str, lanes: int, registers: int) -> tuple[int, int]:
        """(MR, NR): NR is two vector registers, or one when that divides the columns evenly."""
        loops = sch.get_loops(block)
        n_spatial = dom_kind.index("R")
        j_extent = get_extent(sch, loops[n_spatial - 1])
        cols = lanes * VECTORS_PER_TILE
        if isinstance(j_extent, int) and j_extent % cols and (j_extent % lanes == 0 or j_extent < cols):
            cols = lanes
        if n_spatial < 2:
            return 1, cols
        return _rows_dividing(get_extent(sch, loops[n_spatial - 2]), registers), cols

    @staticmethod
    def _pad_ragged(sch, block, dom_kind: str, rows: int, cols: int) -> list:
        """Pad ragged columns (65 tokens, 49-token windows, 10 classes) up to whole vectors: a
        predicated vector loop is scalarised. Returns the copy blocks pad_einsum adds."""
        loops = sch.get_loops(block)
        n_spatial = dom_kind.index("R")
        extents = [get_extent(sch, lp) for lp in loops]
        padding = [1] * len(loops)
        padding[n_spatial - 1] = cols    # ragged rows: see _rows_dividing
        if all(not isinstance(e, int) or e % p == 0 for e, p in zip(extents, padding)):
            return []
        before = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
        sch.pad_einsum(block, padding)
        return [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                if sch.get(b).name_hint not in before]

    @staticmethod
    def _tile(sch, block, write_back, dom_kind: str, rows: int, cols: int, lanes: int) -> None:
        """Loops: parallel(batch, column tiles, row tiles) > reduction > MR rows (unrolled) >
        NR columns (vectorised); the local accumulator tile is written back once per tile."""
        loops = sch.get_loops(block)
        macs = 1
        for lp in loops:
            extent = get_extent(sch, lp)
            macs *= extent if isinstance(extent, int) else 1 << 10
        n_spatial = dom_kind.index("R")
        spatial, reduce = loops[:n_spatial], loops[n_spatial:]
        *batch, j = spatial
        i = batch.pop() if batch else None
        jo, ji = sch.split(j, [None, cols])
        if i is not None:
            io, ii = sch.split(i, [None, rows])
            outer, inner = [*batch, jo, io], [ii, ji]
        else:
            outer, inner = [*batch, jo], [ji]
        sch.reorder(*outer, *reduce, *inner)
        tile = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        if macs >= PARALLEL_MIN_MACS:
            sch.parallel(tile)   # waking the thread pool costs more than a small matmul
        sch.reverse_compute_at(write_back, tile)
        sch.vectorize(ji)
        if i is not None:
            sch.unroll(inner[0])
        sch.decompose_reduction(block, reduce[0])
        _vectorize_copy(sch, write_back, lanes, parallel=False)


def _rows_dividing(extent, registers: int) -> int:
    """MR for `extent` rows: the full tile when it divides them, else with 32 registers a tile
    of 7, 6, 5 or 4 rows that does (a channels-last conv's 7- and 14-pixel rows, Swin's 49-token
    windows), else 4 rows with the last tile part empty behind a predicate. That predicate
    costs: LLVM keeps the rows it guards in memory instead of registers (ViT's 197 tokens:
    140-170 GFLOP/s against 300-330 for 192 rows), so packed_fp32 pads such rows to whole
    tiles; on the attention's unpadded 197-row matmuls 4 rows measured faster than 8
    (0.104 / 0.061 ms against 0.138 / 0.086)."""
    full = 8 if registers >= 32 else ROWS_PER_TILE
    if not isinstance(extent, int):
        return ROWS_PER_TILE
    choices = (full, 7, 6, 5, ROWS_PER_TILE) if registers >= 32 else (full,)
    return next((r for r in choices if extent % r == 0), ROWS_PER_TILE)


def divides_rows(rows: int, full: int) -> bool:
    """Whether the Matmul rule finds a register tile dividing `rows` when its full tile is `full`."""
    return rows % _rows_dividing(rows, 32 if full >= 8 else 16) == 0


def _writes_padded_rows(sch, main, epilogue) -> bool:
    """Whether the reduction block writes more rows than the kernel's output has (packed_fp32's
    padded row tiles) into a buffer of the kernel's own."""
    own = list(sch.get(sch.get_sblock("root")).alloc_buffers)
    produced = sch.get(main).writes[0].source
    out = sch.get(epilogue[-1]).writes[0].source
    rows = lambda buf: int(np.prod([int(d) for d in buf.shape[:-1]]))   # noqa: E731
    return any(produced.same_as(b) for b in own) and rows(produced) > rows(out)


def _vectorize_copy(sch, block, lanes: int, parallel: bool = True) -> None:
    """Vectorise a copy block's innermost loop (whole vectors only) and thread its outer loop."""
    loops = sch.get_loops(block)
    extents = [get_extent(sch, lp) for lp in loops]
    elements = 1
    for e in extents:
        elements *= e if isinstance(e, int) else 1 << 10
    inner = loops[-1]
    if isinstance(extents[-1], int) and extents[-1] % lanes == 0:
        sch.vectorize(sch.split(inner, [None, lanes])[1])
    if parallel and len(loops) > 1 and elements >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(loops[0])


def single_reduction(sch, infos, accept):
    """(the kernel's one reduction block's info, the epilogue blocks after it) with the producers
    before it inlined, or None when the kernel has several reductions or `accept(info)` is false."""
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) != 1 or not accept(reductions[0]):
        return None
    main = reductions[0]
    position = [b.block_rv for b in infos].index(main.block_rv)
    for producer in reversed(infos[:position]):
        sch.compute_inline(producer.block_rv)       # raises if not inlinable: the rule declines
    return main, [b.block_rv for b in infos[position + 1:]]


def _spatial_then_reduce(dom_kind: str) -> bool:
    s = dom_kind.rstrip("R")
    return "R" in dom_kind and len(s) >= 1 and set(s) == {"S"}


class Injective(dl.ScheduleRule):
    """Reshapes, transposes, window gather/scatter, elementwise: one parallel vector loop."""

    def apply(self, func, target, _tunable):
        opened = _open(func, target)
        if opened is None or not all(b.is_injective() for b in opened[1]):
            return None
        sch, infos = opened
        for producer in reversed(infos[:-1]):
            try:
                sch.compute_inline(producer.block_rv)
            except s_tir.ScheduleError:
                pass   # an output itself (a split's several outputs): its own loop below
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        if any(not sch.get_loops(b) for b in blocks):
            return None
        lanes = fp32_lanes(target)
        for block in blocks:
            _flat_vector_loop(sch, block, lanes)
        return sch


def _flat_vector_loop(sch, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    extent = get_extent(sch, flat)
    if not isinstance(extent, int) or extent < lanes:
        return
    outer, vector = sch.split(flat, [None, lanes])
    sch.vectorize(vector)
    if extent >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)


class RowReduction(dl.ScheduleRule):
    """Softmax and LayerNorm: reductions over the last axis and the elementwise steps between
    them, all computed row by row inside one loop over rows (parallel when the kernel is big
    enough), the row's steps left to LLVM's vectoriser, which handles ragged rows (197 tokens)
    with a scalar tail. dlight's CPU Reduction splits each row into 16-lane chunks with a bounds
    predicate, which TVM scalarises: ViT-Ti's softmax ran 2x slower that way (0.27 vs 0.13 ms)."""

    def apply(self, func, target, _tunable):
        opened = _open(func, target)
        if opened is None:
            return None
        sch, infos = opened
        out = infos[-1]
        rank = len(out.dom_kind())
        if rank == 1 and out.is_injective() and not all(b.is_injective() for b in infos) \
                and all(b.dom_kind() in ("S", "R", "SR", "") for b in infos):
            return sch     # one row (a batch-1 classifier's LayerNorm): its loops as they are, serial and
            # O(n); dlight's Reduction rule inlined the mean into every element (O(n^2): 4.8 ms for 1600)
        if not out.is_injective() or rank < 2:
            return None
        if not all(_over_last_axis(b.dom_kind(), rank) for b in infos):
            return None
        if all(b.is_injective() for b in infos):
            return None                    # no reduction: the injective rule's
        loops = sch.get_loops(out.block_rv)
        rows = sch.fuse(*loops[:-1])
        if _output_elements(func) >= PARALLEL_MIN_ELEMENTS:
            sch.parallel(rows)
        for info in reversed(infos[:-1]):
            sch.compute_at(info.block_rv, rows)
        return sch


def _over_last_axis(dom_kind: str, rank: int) -> bool:
    """A block over the output's rows: elementwise, one value per row (a mean), or spatial rows
    then one reduced last axis."""
    return dom_kind in ("S" * rank, "S" * (rank - 1), "S" * (rank - 1) + "R")


class SerialWhenSmall(dl.ScheduleRule):
    """Another rule's schedule, with its parallel loops made serial when the kernel's output is
    too small to pay for waking threads (dlight's CPU Reduction always parallelises rows)."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        if not isinstance(func, tirx.PrimFunc) or _output_elements(func) >= PARALLEL_MIN_ELEMENTS:
            return self.rule.apply(func, target, tunable)
        # dlight has no knob for it: its `sch.parallel(...)` calls become no-ops for this kernel
        # (parallel only annotates a loop, so skipping it leaves a valid serial schedule)
        parallel = s_tir.Schedule.parallel
        s_tir.Schedule.parallel = lambda self, loop: None
        try:
            return self.rule.apply(func, target, tunable)
        finally:
            s_tir.Schedule.parallel = parallel

    def __repr__(self) -> str:
        return f"SerialWhenSmall({type(self.rule).__name__})"


def _output_elements(func) -> int:
    """Elements of the last buffer parameter (the output); dynamic dims count as large."""
    shape = getattr(getattr(func.params[-1], "ty", None), "shape", None) if func.params else None
    if shape is None:
        return 1 << 30
    size = 1
    for d in shape:
        size *= int(d) if isinstance(d, (int, tirx.IntImm)) else 1 << 10
    return size


def cpu_rules() -> list:
    """In the order they are tried; each declines (returns None) what it does not fit."""
    from edgevit.backend.attention import FusedAttention

    return [FusedAttention(), Matmul(), SerialWhenSmall(dl.cpu.GEMV()), RowReduction(), SerialWhenSmall(dl.cpu.Reduction()),
            Injective()]
