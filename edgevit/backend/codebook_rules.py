"""Schedules of the codebook kernels (codebook_kernels.py): the weights decoded inside the matmul.

CPU: loops parallel(column tiles) > [decode the tile's K x NR weights into a small buffer] >
row tiles > k > MR rows (unrolled) > NR columns (vectorised), the accumulator tile in registers
and the epilogue applied as it is written back. Each weight is decoded once per call (not once
per row: decoding in the innermost loop kept lookups scalar and ran 20x slower, TVM_QUANT.md),
and the tile buffer (K x NR floats) stays in cache while every row tile streams past it. A
k-means codebook of up to 16 values is looked up 16 weights at a time: one `vpermps` on AVX-512,
four `tbl` on ARM NEON (vector_decode_pass); larger codebooks (PQ, 5-8 bits) and AVX2 use
scalar lookups.

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

from edgevit.backend.codebook_kernels import DECODE_BLOCK, VECTOR
from edgevit.backend.cpu_features import PARALLEL_MIN_MACS, ROWS_PER_TILE, fp32_lanes
from edgevit.backend.cpu_rules import _open, _vectorize_copy

VPERMPS = "llvm.x86.avx512.permvar.sf.512"    # 16 fp32 table entries looked up by 16 int32 lanes
VECTOR_DECODE = "edgevit_vector_decode"       # block annotation: bits per code of a 16-lane decode tile
VECTOR_ISA = "edgevit_vector_decode_isa"      # ... and the lookup instructions: "avx512" or "neon"
NEON_TBL4 = "llvm.aarch64.neon.tbl4.v16i8"    # 16 bytes looked up in a 64-byte table (4 registers)
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
        isa = _lookup_isa(target, lanes)
        tiled = _has_lane_tiles(sch, decode)
        # vector lookups decode whole 16-column tiles: on NEON (4 lanes) the column tile is 4 vectors
        cols = VECTOR if (tiled and isa == "neon") else next((c for c in (2 * lanes, lanes, 8, 4) if n % c == 0), None)
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
        bits = _vector_decode_bits(sch, decode)
        if bits and isa:
            # 16 weights by vector lookups (vpermps; four NEON tbl): the tile's block, rewritten after
            # scheduling (vector_decode_pass; tensorize cannot match a lookup whose index is a load)
            tile = sch.blockize(dj)
            sch.annotate(tile, VECTOR_DECODE, bits)
            sch.annotate(tile, VECTOR_ISA, isa)
        else:
            sch.vectorize(sch.split(dj, [None, min(get_extent(sch, dj), lanes)])[1])
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


# ---------------------------------------------------------------------------- vector decode (AVX-512)


def _lookup_isa(target, lanes: int) -> str | None:
    """'avx512' (vpermps on a 16-entry table in one register), 'neon' (tbl over a 64-byte table in
    four registers), or None (scalar lookups: AVX2's vpermps holds only 8 entries)."""
    from tvm.target.codegen import target_has_features

    for feature, isa in (("avx512f", "avx512"), ("neon", "neon")):
        try:
            if target_has_features(feature, target) and (isa != "avx512" or lanes == VECTOR):
                return isa
        except Exception:  # noqa: BLE001 - a feature of another architecture
            continue
    return None


def _has_lane_tiles(sch, decode) -> bool:
    """A decode block laid out in 16-lane tiles (codebook_kernels.vector_decodable)."""
    return len(sch.get(decode).iter_vars) == 3


def _vector_decode_bits(sch, decode) -> int | None:
    """Bits per code (2 or 4) of a decode block laid out in 16-lane tiles (codebook_kernels:
    decode_tile_lane), whose innermost loop is one tile; else None."""
    block = sch.get(decode)
    loops = sch.get_loops(decode)
    if len(block.iter_vars) != 3 or get_extent(sch, loops[-1]) != VECTOR:
        return None
    codes = next((r.source for r in block.reads if str(r.source.dtype) == "uint8"), None)
    book = next((r.source for r in block.reads if str(r.source.dtype) == "float32"), None)
    if codes is None or book is None or int(book.shape[-1]) != VECTOR:
        return None
    per = int(block.iter_vars[1].dom.extent) * VECTOR // int(codes.shape[-1])                 # codes per byte
    return {2: 4, 4: 2}.get(per)


def vector_decode_pass():
    """A module pass run after the schedules: each tile block CodebookMatmul marked (16 weights of
    one row of the decoded tile) becomes one vector statement,

        W[r, t, 0:16] = vpermps(codebook[g, 0:16], (i32(codes[r, t*16/per : +16/per] spread per lane) >> shift) & mask)

    the bytes spread to their lanes by a shuffle; r, t, g and the code bytes' offset are read off
    the block's read and write regions (the statement replaces the block's 16-lane loop)."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="edgevit.VectorDecode")
    def apply(mod, _ctx):
        changed = {}
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc):
                body = _rebuild(func.body)
                if not body.same_as(func.body):
                    changed[gv] = func.with_body(body)
        if not changed:
            return mod
        return tvm.IRModule({**dict(mod.functions.items()), **changed}, attrs=mod.attrs,
                            global_infos=mod.global_infos)

    return apply


def _rebuild(stmt):
    """`stmt` with every marked tile block vectorised (the same object where nothing changed). Walks
    the statements a scheduled kernel is made of; anything else is left as it is."""
    from tvm import s_tir, tirx

    if isinstance(stmt, s_tir.SBlock):
        if VECTOR_DECODE in stmt.annotations:
            bits, isa = int(stmt.annotations[VECTOR_DECODE]), str(stmt.annotations.get(VECTOR_ISA, "avx512"))
            return (_neon_tile if isa == "neon" else _vector_tile)(stmt, bits)
        body = _rebuild(stmt.body)
        return stmt if body.same_as(stmt.body) else s_tir.SBlock(
            stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body, stmt.init, stmt.alloc_buffers,
            stmt.match_buffers, stmt.annotations)
    if isinstance(stmt, s_tir.SBlockRealize):
        block = _rebuild(stmt.block)
        return stmt if block.same_as(stmt.block) else s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, block)
    if isinstance(stmt, tirx.For):
        body = _rebuild(stmt.body)
        return stmt if body.same_as(stmt.body) else tirx.For(
            stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding, stmt.annotations)
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_rebuild(s) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    return stmt


def _vector_tile(block, bits: int):
    from tvm import s_tir, tirx

    per, mask = 8 // bits, (1 << bits) - 1
    nbytes = VECTOR // per
    codes = next(r for r in block.reads if str(r.source.dtype) == "uint8")       # codes[r, t*nbytes : +nbytes]
    book = next(r for r in block.reads if str(r.source.dtype) == "float32")      # codebook[g, 0:16]
    out = block.writes[0]                                                         # W[r, t, 0:16]
    first = [rng.min for rng in codes.region]
    raw = tirx.BufferLoad(codes.source, [*first[:-1], tirx.Ramp(first[-1], 1, nbytes)])   # (nbytes,) u8
    spread = tirx.Shuffle([raw] * per, [i // per for i in range(VECTOR)])                   # (16,) u8
    idx = tirx.bitwise_and(tirx.shift_right(tirx.Cast("int32x16", spread),
                                            _const([(i % per) * bits for i in range(VECTOR)])),
                           tirx.Broadcast(tirx.IntImm("int32", mask), VECTOR))              # (16,) i32
    row = [rng.min for rng in book.region]
    table = tirx.BufferLoad(book.source, [*row[:-1], tirx.Ramp(row[-1], 1, VECTOR)])       # (16,) f32
    value = tirx.call_llvm_pure_intrin("float32x16", VPERMPS, table, idx)
    at = [rng.min for rng in out.region]
    store = tirx.BufferStore(out.source, value, [*at[:-1], tirx.Ramp(at[-1], 1, VECTOR)])
    return s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, store, block.init,
                        block.alloc_buffers, block.match_buffers, {})


def _neon_tile(block, bits: int):
    """The tile's 16 weights as four `tbl` lookups of 4 floats each: the codebook's 64 bytes are the
    table, and float lane q of code c reads bytes 4c .. 4c + 3."""
    from tvm import s_tir, tirx

    per, mask = 8 // bits, (1 << bits) - 1
    nbytes = VECTOR // per
    codes = next(r for r in block.reads if str(r.source.dtype) == "uint8")
    book = next(r for r in block.reads if str(r.source.dtype) == "float32")
    out = block.writes[0]
    first = [rng.min for rng in codes.region]
    raw = tirx.BufferLoad(codes.source, [*first[:-1], tirx.Ramp(first[-1], 1, nbytes)])            # (nbytes,) u8
    row = [rng.min for rng in book.region]
    table = [tirx.reinterpret("int8x16", tirx.BufferLoad(book.source, [*row[:-1], tirx.Ramp(
        row[-1] + 4 * q, 1, 4)])) for q in range(4)]                                               # 4 x (16,) i8
    at = [rng.min for rng in out.region]
    stores = []
    for quad in range(VECTOR // 4):                  # weights 4*quad .. 4*quad + 3, 4 bytes each
        weight = [4 * quad + b // 4 for b in range(16)]
        spread = tirx.Shuffle([raw] * per, [w // per for w in weight])                              # (16,) u8
        shifts = tirx.Shuffle([tirx.IntImm("uint8", (w % per) * bits) for w in weight], list(range(16)))
        code = tirx.bitwise_and(tirx.shift_right(spread, shifts), tirx.Broadcast(tirx.IntImm("uint8", mask), 16))
        byte = tirx.Shuffle([tirx.IntImm("uint8", b % 4) for b in range(16)], list(range(16)))
        idx = tirx.reinterpret("int8x16", code * tirx.Broadcast(tirx.IntImm("uint8", 4), 16) + byte)
        value = tirx.reinterpret("float32x4", tirx.call_llvm_pure_intrin("int8x16", NEON_TBL4, *table, idx))
        stores.append(tirx.BufferStore(out.source, value, [*at[:-1], tirx.Ramp(at[-1] + 4 * quad, 1, 4)]))
    return s_tir.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, tirx.SeqStmt(stores),
                        block.init, block.alloc_buffers, block.match_buffers, {})


def _const(values: list[int]):
    """An int32x16 constant vector."""
    from tvm import tirx

    return tirx.Shuffle([tirx.IntImm("int32", v) for v in values], list(range(len(values))))
