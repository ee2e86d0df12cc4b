"""Schedules of the codebook kernels (codebook_kernels.py): the weights decoded inside the matmul.

CPU: loops parallel(column tiles) > [decode the tile's K x NR weights into a small buffer] >
row tiles > k > MR rows (unrolled) > NR columns (vectorised), the accumulator tile in registers
and the epilogue applied as it is written back. Each weight is decoded once per call (not once
per row: decoding in the innermost loop kept lookups scalar and ran 20x slower, TVM_QUANT.md),
and the tile buffer (K x NR floats) stays in cache while every row tile streams past it.

CUDA: one block per (row tile, column tile), a thread per output column computing ROWS rows; the
codebook is staged in shared memory by the block's threads, and each thread decodes the weight
it multiplies (one code load per k, shared by its rows) straight into registers.
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent

from edgevit.backend.codebook_kernels import DECODE_BLOCK
from edgevit.backend.cpu_rules import PARALLEL_MIN_MACS, ROWS_PER_TILE, _open, _vectorize_copy, fp32_lanes

GPU_COLUMNS = 64        # threads per block: one output column each
GPU_ROWS = 4            # rows per thread (the decoded weight is reused by each)


def _split_blocks(sch, infos):
    """(decode block, matmul block, epilogue blocks) of a codebook kernel with its other producers
    inlined, or None when `infos` is not one."""
    names = [sch.get(b.block_rv).name_hint for b in infos]
    decode = [b for b, name in zip(infos, names) if name.startswith(DECODE_BLOCK)]
    reductions = [b for b in infos if not b.is_injective()]
    if len(decode) != 1 or len(reductions) != 1:
        return None
    main = reductions[0]
    position = [b.block_rv for b in infos].index(main.block_rv)
    if [b.block_rv for b in infos].index(decode[0].block_rv) > position:
        return None
    for producer in reversed(infos[:position]):
        if producer is not decode[0]:
            sch.compute_inline(producer.block_rv)
    return decode[0].block_rv, main.block_rv, [b.block_rv for b in infos[position + 1:]]


def _inline_epilogue(sch, epilogue: list) -> None:
    for intermediate in epilogue[:-1]:
        sch.compute_inline(intermediate)
    if epilogue:
        sch.reverse_compute_inline(epilogue[-1])


class CodebookMatmul(dl.ScheduleRule):
    """CPU: decode a tile of output columns once, then the register-blocked fp32 kernel over it."""

    def apply(self, func, target, _tunable):
        opened = _open(func, target)
        if opened is None:
            return None
        sch, infos = opened
        found = _split_blocks(sch, infos)
        if found is None:
            return None
        decode, main, epilogue = found
        loops = sch.get_loops(main)
        if len(loops) not in (2, 3):       # (rows, columns, depth); one row: (columns, depth)
            return None
        extents = [get_extent(sch, lp) for lp in loops]
        n, macs = extents[-2], int(np.prod(extents))
        lanes = fp32_lanes(target)
        cols = next((c for c in (2 * lanes, lanes, 8, 4) if n % c == 0), None)
        if cols is None:
            return None
        write_back = sch.cache_write(main, 0, "local")
        _inline_epilogue(sch, epilogue)
        *rows, j, r = sch.get_loops(main)
        jo, ji = sch.split(j, [None, cols])
        if rows:
            io, ii = sch.split(rows[0], [None, ROWS_PER_TILE])
            sch.reorder(jo, io, r, ii, ji)
        else:
            sch.reorder(jo, r, ji)
        if macs >= PARALLEL_MIN_MACS:
            sch.parallel(jo)
        sch.compute_at(decode, jo)
        dj = sch.get_loops(decode)[-1]
        sch.vectorize(sch.split(dj, [None, min(cols, lanes)])[1])
        sch.reverse_compute_at(write_back, io if rows else jo)
        sch.vectorize(ji)
        if rows:
            sch.unroll(ii)
        sch.decompose_reduction(main, r)
        _vectorize_copy(sch, write_back, lanes, parallel=False)
        return sch


class CodebookMatmulGPU(dl.ScheduleRule):
    """CUDA: shared-memory codebook, weights decoded into registers by the thread that uses them."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda":
            return None
        from tvm import s_tir

        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        found = _split_blocks(sch, infos) if infos else None
        if found is None:
            return None
        decode, main, epilogue = found
        if len(sch.get_loops(main)) not in (2, 3):
            return None
        sch.compute_inline(decode)
        book = next(i for i, region in enumerate(sch.get(main).reads) if "codebook" in region.source.name)
        acc = sch.cache_write(main, 0, "local")
        _inline_epilogue(sch, epilogue)
        *rows, j, r = sch.get_loops(main)
        n = get_extent(sch, j)
        threads = next(t for t in range(min(GPU_COLUMNS, n), 0, -1) if n % t == 0)
        jo, ji = sch.split(j, [None, threads])
        io, ii = sch.split(rows[0] if rows else sch.add_unit_loop(main), [None, GPU_ROWS])
        sch.reorder(io, jo, ji, r, ii)
        sch.bind(io, "blockIdx.y")
        sch.bind(jo, "blockIdx.x")
        sch.bind(ji, "threadIdx.x")
        shared = sch.cache_read(main, book, "shared")
        sch.compute_at(shared, jo)                       # once per block, all its threads fetching
        flat = sch.fuse(*sch.get_loops(shared)[2:])
        _, tx = sch.split(flat, [None, threads])
        sch.bind(tx, "threadIdx.x")
        sch.reverse_compute_at(acc, ji)
        sch.decompose_reduction(main, r)
        sch.unroll(ii)
        return sch
