"""The int8 matmul rule: u8 (s8 on ARM with dot products) activations x s8 weights packed in
16 x 4 panels (encodings.py) -> int32, register-blocked, with the dequantize / bias / GELU /
residual epilogue in the write-back.

On x86 CPUs with AVX512-VNNI each 16 x 4 panel step is one `vpdpbusd`, on ARM CPUs with the
dot-product extension (Cortex-A76/A78, Jetson Orin's CPU) four `sdot` (tensorized); elsewhere
(AVX2, AVX-512 without VNNI, Cortex-A72) the same tiling is left to LLVM's vectoriser, which is
exact (no `pmaddubsw`, whose int16 sums saturate once activations reach 128: TVM_QUANT.md).
On CUDA (sm_61 and later) a second rule runs the [K/4, N, 4] layout's dot products as `__dp4a`.

TVM 0.27 ships a VNNI intrinsic that does not build under its own LLVM 22 (the instruction now
takes <64 x i8> operands): edgevit registers its own below.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features

from edgevit.backend.cpu_features import PARALLEL_MIN_MACS
from edgevit.backend.cpu_rules import _open, _vectorize_copy, single_reduction
from edgevit.backend.encodings import PANEL_COLS, PANEL_DEPTH
from edgevit.backend.encodings import TILE_ROWS as ROWS  # MR: rows of the register tile (the graph pads to it)

MAX_PANELS = 4                # NR: up to 4 panels of 16 columns -> 16 zmm accumulators of 32
VNNI_INTRIN = "edgevit_dot_16x4_u8s8_vnni"
SDOT_INTRIN = "edgevit_dot_16x4_s8s8_sdot"
DP4A_INTRIN = "edgevit_dp4a_s8s8_global"
DP4A_MIN_SM = 61               # __dp4a: Pascal (sm_61) and later; the Maxwell Jetson Nano (sm_53) has none
GPU_THREADS = 128              # outputs (one per thread) per block


def _dot_16x4_desc(a_dtype: str):
    """What one 16 x 4 panel step computes, for `a_dtype` (uint8 / int8) activations: C[i] +=
    A[0:4] . B[i, 0:4] for 16 columns i (the description the VNNI and sdot bodies replace)."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(a_i32, 16), dtype="int8x64"),   # 4 activation bytes in every lane
            B.vload([0, 0], dtype="int8x64"),                           # one 16 x 4 weight panel
            dtype="int32x16",
        )


@T.prim_func(s_tir=True)
def _dot_16x4_sdot(
    A: T.Buffer((4,), "int8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 4), dtype="int8x16")
        for g in T.unroll(4):          # lane i of sdot: C[4g + i] += A[0:4] . B[4g + i, 0:4]
            C[T.ramp(g * 4, 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([g * 4], dtype="int32x4"),
                B.vload([g * 4, 0], dtype="int8x16"),                    # 4 columns x 4 depth
                a,
                dtype="int32x4",
            )


@T.prim_func(s_tir=True)
def _dp4a_desc(
    A: T.Buffer((4,), "int8", offset_factor=4, align=4),
    B: T.Buffer((4,), "int8", offset_factor=4, align=4),
    C: T.Buffer((1,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        for k in T.serial(0, 4):
            with T.sblock("update"):
                vk = T.axis.remap("R", [k])
                C[0] = C[0] + T.cast(A[vk], "int32") * T.cast(B[vk], "int32")


@T.prim_func(s_tir=True)
def _dp4a_impl(
    A: T.Buffer((4,), "int8", offset_factor=4, align=4),
    B: T.Buffer((4,), "int8", offset_factor=4, align=4),
    C: T.Buffer((1,), "int32", offset_factor=1, scope="local"),
) -> None:
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        # TVM's own dp4a intrinsic reads shared memory; this one reads the rows where they lie
        C[0] += T.call_pure_extern("__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"), T.int32(0),
                                   dtype="int32")


def _register_intrinsics() -> None:
    """Registered on first use only (tvm.s_tir.tensor_intrin, which holds TVM's own, once took
    82 s to import here, so it is never imported)."""
    from tvm.s_tir import TensorIntrin

    if TensorIntrin.get(VNNI_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(VNNI_INTRIN, _dot_16x4_desc("uint8"), _dot_16x4_vnni)
    if TensorIntrin.get(SDOT_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(SDOT_INTRIN, _dot_16x4_desc("int8"), _dot_16x4_sdot)
    if TensorIntrin.get(DP4A_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(DP4A_INTRIN, _dp4a_desc, _dp4a_impl)


def has_vnni(target) -> bool:
    return _has_feature("avx512vnni", target)


def has_sdot(target) -> bool:
    """ARM's dot-product extension (`sdot`, s8 x s8): int8 activations are then signed."""
    return _has_feature("dotprod", target)


def _has_feature(name: str, target) -> bool:
    try:
        return bool(target_has_features(name, target))
    except Exception:  # noqa: BLE001 - a feature of another architecture
        return False


def _activation_dtype(sch, block_rv) -> str | None:
    """'uint8' or 'int8' for an int8 matmul block (int8 weights, int32 out), else None."""
    block = sch.get(block_rv)
    dtypes = sorted(str(r.source.dtype) for r in block.reads)
    if len(block.writes) != 1 or str(block.writes[0].source.dtype) != "int32" or "int8" not in dtypes:
        return None
    others = [d for d in dtypes if d != "int32"]
    return "uint8" if "uint8" in others else "int8" if others.count("int8") == 2 else None


class PackedInt8Matmul(dl.ScheduleRule):
    """Loops: parallel(row tiles x column tiles) > k panels > MR rows (unrolled) > NR panels
    (unrolled) > one 16 x 4 panel step (vpdpbusd, or LLVM-vectorised) on an int32 accumulator
    tile that the epilogue reads once, as the tile is written back."""

    def apply(self, func, target, _tunable):
        opened = _open(func, target)
        if opened is None:
            return None
        sch, infos = opened
        found = single_reduction(sch, infos, lambda info: _activation_dtype(sch, info.block_rv) is not None)
        if found is None:
            return None
        main, epilogue = found[0].block_rv, found[1]
        activations = _activation_dtype(sch, main)
        *lead, n, k = sch.get_loops(main)
        if len(lead) != 1:
            return None                    # encodings.py emits [M, K] x panels only
        m_extent, n_extent, k_extent = (get_extent(sch, lp) for lp in (lead[0], n, k))
        if not all(isinstance(e, int) for e in (m_extent, n_extent, k_extent)):
            return None
        # rows per tile divide M: a predicate inside the tile would stop tensorize (encodings.py
        # pads ragged token counts to a multiple of ROWS)
        rows = next(r for r in range(ROWS, 0, -1) if m_extent % r == 0)
        whole = n_extent % PANEL_COLS == 0 and k_extent % PANEL_DEPTH == 0
        acc = sch.cache_write(main, 0, "global")
        rest = _inline_epilogue(sch, epilogue, m_extent)
        m, n, k = sch.get_loops(main)
        mo, mi = sch.split(m, [None, rows])
        if not whole:   # ragged columns or depth (a 10-class head): tiled, left to LLVM
            no, ni = sch.split(n, [None, PANEL_COLS])
            sch.reorder(mo, no, k, mi, ni)
            tile = sch.fuse(mo, no)
            sch.reverse_compute_at(acc, tile)
            sch.decompose_reduction(main, k)
            for block in rest:
                _vectorize_copy(sch, block, PANEL_COLS)
            return sch
        panels = next(p for p in range(MAX_PANELS, 0, -1) if (n_extent // PANEL_COLS) % p == 0)
        no, ni = sch.split(n, [None, PANEL_COLS])
        nbo, nbi = sch.split(no, [None, panels])
        ko, ki = sch.split(k, [None, PANEL_DEPTH])
        sch.reorder(mo, nbo, ko, mi, nbi, ni, ki)
        tile = sch.fuse(mo, nbo)
        if m_extent * n_extent * k_extent >= PARALLEL_MIN_MACS:
            sch.parallel(tile)
        sch.reverse_compute_at(acc, tile)
        init = sch.decompose_reduction(main, ko)
        sch.vectorize(sch.get_loops(init)[-1])
        intrinsic = {"uint8": VNNI_INTRIN if has_vnni(target) else None,
                     "int8": SDOT_INTRIN if has_sdot(target) else None}[activations]
        if intrinsic:
            _register_intrinsics()
            sch.tensorize(ni, intrinsic)
        else:
            sch.reorder(ki, ni)
            sch.unroll(ki)
            sch.vectorize(ni)
        sch.unroll(mi)
        sch.unroll(nbi)
        out_loops = sch.get_loops(acc)
        sch.vectorize(sch.split(out_loops[-1], [None, PANEL_COLS])[1])
        for block in rest:
            _vectorize_copy(sch, block, PANEL_COLS)
        return sch


def _inline_epilogue(sch, epilogue: list, rows: int) -> list:
    """Inline the elementwise epilogue into the tile's write-back, up to the first block whose
    output has fewer rows than the kernel (the slice dropping padded rows: inlined, it would be
    written out of bounds). Returns the blocks left to run after the tiles."""
    for i, block in enumerate(epilogue):
        out = sch.get(block).writes[0].source
        if int(out.shape[0]) != rows:
            return epilogue[i:]
        sch.reverse_compute_inline(block)
    return []


class RowDotInt8Matmul(dl.ScheduleRule):
    """CUDA: the s8 x s8 row-dot matmul (encodings.row_dot_matmul), one output per thread, its
    K loop four bytes at a time as `__dp4a` on int32 loads of both rows, the accumulator in a
    register and the dequantize / bias / GELU epilogue applied as it is written."""

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "cuda" or _sm(target) < DP4A_MIN_SM:
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos:
            return None
        found = single_reduction(sch, infos, lambda info: _activation_dtype(sch, info.block_rv) == "int8")
        if found is None:
            return None
        main, epilogue = found[0].block_rv, found[1]
        loops = sch.get_loops(main)          # (rows, columns, depth); one row: (columns, depth)
        if len(loops) not in (2, 3) or get_extent(sch, loops[-1]) % 4:
            return None
        acc = sch.cache_write(main, 0, "local")
        for block in epilogue:             # elementwise on the (M, N) output: applied as it is written
            sch.reverse_compute_inline(block)
        *rows, j, k = sch.get_loops(main)
        n = get_extent(sch, j)
        ko, ki = sch.split(k, [None, 4])
        # a row per block (blockIdx.x: 2^31 rows), its columns across threads: affine bindings and
        # no predicate (a thread count dividing the columns), which tensorize needs
        jo, ji = sch.split(j, [None, next(t for t in range(min(GPU_THREADS, n), 0, -1) if n % t == 0)])
        sch.reorder(*rows, jo, ji, ko, ki)
        for loop, axis in zip([*rows, jo], ("blockIdx.x", "blockIdx.y")):
            sch.bind(loop, axis)
        sch.bind(ji, "threadIdx.x")
        sch.reverse_compute_at(acc, ji)
        sch.decompose_reduction(main, ko)
        _register_intrinsics()
        sch.tensorize(ki, DP4A_INTRIN)
        return sch


def _sm(target) -> int:
    arch = str(target.attrs.get("arch", ""))
    return int(arch[3:]) if arch.startswith("sm_") and arch[3:].isdigit() else -1
