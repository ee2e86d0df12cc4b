"""The innermost loop of edgevit's two hottest CPU kernels, instruction by instruction, per target.

The emulated aarch64 board runs the code but cannot time it (qemu), so for ARM the generated
code is what can be checked: how many fused multiply-adds each load feeds. Builds, for each
target, ViT-Ti's MLP matmul (197 tokens x 192 -> 768, panel-packed weight, padded row tiles)
and its fused attention kernel (3 heads x 197 tokens x 64) exactly as `compile` schedules them,
reads LLVM's assembly, and prints its loops with the most FMAs (8 or more): FMAs, loads (a broadcast folded
into an x86 FMA counts as one), stores, FMAs per load, and the loop's instructions.

    python benchmarks/kernel_asm.py [--targets host rasp4b jetson-orin] [--show]
"""

from __future__ import annotations

import argparse
import re

FMA = re.compile(r"^\s*(vfn?madd\w*|vfn?msub\w*|fmla|fmadd)\b")
LOAD_X86 = re.compile(r"^\s*(vmov\w*|vbroadcast\w*|vpbroadcast\w*|vfn?madd\w*|vfn?msub\w*)\s+[^,]*\(")
STORE_X86 = re.compile(r"^\s*vmov\w*\s+%\w+,\s*[-\w]*\(")
LOAD_ARM = re.compile(r"^\s*(ldr|ldp|ldur|ld1|ld1r|ld2|ld4)\w*\s")
STORE_ARM = re.compile(r"^\s*(str|stp|stur|st1)\w*\s")
LABEL = re.compile(r"^(\.?L\w+):")
BRANCH = re.compile(r"^\s*(j\w+|b\.\w+|b|cbnz|cbz|tbnz|tbz)\s+.*?(\.?L\w+)\s*$")


def kernels(target):
    """(name, scheduled PrimFunc) of the two kernels for a tvm Target."""
    from edgevit.backend.attention import FusedAttention, attention_kernel, keys_tile, tile_rows_for
    from edgevit.backend.cpu_features import fp32_lanes, row_tile
    from edgevit.backend.cpu_rules import Matmul
    from edgevit.backend.packed_fp32 import padded_row_tile, panel_matmul

    lanes, full = fp32_lanes(target), row_tile(target)
    lead = [1, 197]
    mlp = panel_matmul(lead, 192, 768, 2 * lanes, padded_row_tile(lead, full))
    tile = tile_rows_for(197, full)
    attention = attention_kernel(3, 197, 64, 64, [], tile, keys_tile(lanes))
    return [("ViT-Ti MLP matmul 197x192x768", Matmul().apply(mlp, target, False)),
            ("ViT-Ti attention 3x197x197x64", FusedAttention().apply(attention, target, False))]


def assembly(sch, target) -> str:
    import tvm

    func = sch.mod["main"].with_attr("global_symbol", "kernel")
    with target:
        lib = tvm.tirx.build(tvm.IRModule({"kernel": func}), target=target)
    return lib.inspect_source("asm")


def hot_loops(asm: str, most: int = 3) -> list[list[str]]:
    """The instructions of the innermost loops (a backward branch's body without another
    backward branch inside) with 8 FMAs or more, most FMAs first."""
    lines = [ln for ln in asm.splitlines() if ln.strip() and not ln.strip().startswith(("//", "#", ".p2align"))]
    labels = {m.group(1): n for n, ln in enumerate(lines) if (m := LABEL.match(ln))}
    loops = []
    for n, ln in enumerate(lines):
        m = BRANCH.match(ln)
        if m and m.group(2) in labels and labels[m.group(2)] < n:
            loops.append((labels[m.group(2)], n))
    innermost = [(a, b) for a, b in loops if not any(a < c and d < b for c, d in loops if (c, d) != (a, b))]
    bodies = [lines[a:b + 1] for a, b in innermost]
    bodies = sorted((x for x in bodies if sum(bool(FMA.match(y)) for y in x) >= 8),
                    key=lambda x: -sum(bool(FMA.match(y)) for y in x))
    return bodies[:most]


def counts(loop: list[str], arm: bool) -> dict:
    fma = sum(bool(FMA.match(x)) for x in loop)
    loads = sum(bool((LOAD_ARM if arm else LOAD_X86).match(x)) for x in loop)
    stores = sum(bool((STORE_ARM if arm else STORE_X86).match(x)) for x in loop)
    body = sum(not LABEL.match(x) for x in loop)
    return {"fma": fma, "loads": loads, "stores": stores, "instructions": body,
            "fma_per_load": round(fma / loads, 2) if loads else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=["host", "rasp4b", "jetson-orin"])
    ap.add_argument("--show", action="store_true", help="print the loops' instructions")
    args = ap.parse_args()
    from edgevit.errors import EdgeVitError
    from edgevit.targets import load_target

    try:
        specs = [load_target(name) for name in args.targets]
    except EdgeVitError as e:
        raise SystemExit(f"error: {e}") from None
    for name, spec in zip(args.targets, specs):
        target = spec.tvm_target()
        if target.kind.name != "llvm":   # a GPU target's CPU side is not where its kernels run
            print(f"{name}: not a CPU target, skipped")
            continue
        arm = spec.arch == "aarch64"
        for kernel, sch in kernels(target):
            for loop in hot_loops(assembly(sch, target)):
                c = counts(loop, arm)
                print(f"{name:12s} {kernel:32s} FMA {c['fma']:3d}  loads {c['loads']:3d}  stores {c['stores']:2d}  "
                      f"FMA/load {c['fma_per_load']}  ({c['instructions']} instructions in the loop)")
                if args.show:
                    print("\n".join("    " + x.strip() for x in loop))


if __name__ == "__main__":
    main()
