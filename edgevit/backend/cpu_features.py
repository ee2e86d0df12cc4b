"""What a CPU target gives the kernels: vector width, vector registers, the register tile they
allow, and when a kernel is big enough to spread over threads. Shared by the CPU rules and the
kernels edgevit writes itself (attention.py)."""

from __future__ import annotations

from tvm.target.codegen import target_has_features

ROWS_PER_TILE = 4           # MR: rows of the register tile (4 x 2 vectors = 8 accumulators)
VECTORS_PER_TILE = 2        # NR = 2 vector registers wide
# Waking TVM's thread pool costs ~10-20 us here; on the 32x32 fashion model parallelising every
# kernel made it 2.2 ms, these thresholds 1.15 ms (sweep of 2^17..2^24 MACs, 2^14..2^30 elements).
PARALLEL_MIN_ELEMENTS = 1 << 16   # below this an injective or row-reduction kernel runs on one thread
PARALLEL_MIN_MACS = 1 << 22       # below this a matmul runs on one thread


def fp32_lanes(target) -> int:
    """fp32 lanes of the widest vector register the target's CPU features give. (LLVM's own
    `llvm_get_vector_width` says 512 for AVX2-only Zen 3, which made every tile spill.)"""
    for feature, lanes in (("avx512f", 16), ("avx", 8), ("neon", 4), ("asimd", 4)):
        try:
            if target_has_features(feature, target):
                return lanes
        except Exception:  # noqa: BLE001 - unknown feature name for this architecture
            continue
    return 4


def vector_registers(target) -> int:
    """Architectural vector registers: 32 on AVX-512 and AArch64 NEON, 16 on AVX2."""
    return 16 if fp32_lanes(target) == 8 else 32


def row_tile(target) -> int:
    """MR, the rows of a full register tile: 8 with 32 vector registers (16 accumulators of
    8 x 2 vectors, the FMA latency x throughput product of 8 with room to spare), 4 with 16."""
    return 8 if vector_registers(target) >= 32 else ROWS_PER_TILE
