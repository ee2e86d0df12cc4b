"""CUDA and Jetson artifacts built on a machine without a GPU: what each target's kernels use.

For each model (the Fashion-MNIST Swin from a checkpoint, `--checkpoint`, else random weights;
Swin-T at 224, random weights: registers and shared memory do not depend on weight values) and
each CUDA target: the CUDA version that built the kernels, the kernel count, the heaviest kernels
by registers, register spills, shared memory and threads per block against the target's limits
(ptxas -v, in the manifest), fatbin and artifact bytes. With `--fp16`: the same model compiled
with `--precision fp16`, its weight bytes beside fp32's and its max abs error against the fp32
PyTorch model on the host-compiled fp16 graph (compile's own validation).

    python benchmarks/cuda_kernels.py --checkpoint runs/fashion4/model.pt --fp16 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import struct
import tempfile
import time
from pathlib import Path

CUDA_TARGETS = ["jetson-orin", "jetson-orin-nano", "jetson-xavier", "cuda-sm80", "cuda-sm86", "cuda-sm89", "cuda-sm90"]


def checkpoint_for(name: str, path: str | None):
    from edgevit.checkpoint import Checkpoint
    from edgevit.models import create_model

    return Checkpoint.load(path) if path else Checkpoint.from_model(create_model(name))


def resources(art, target) -> dict:
    from edgevit.backend.cuda import KernelResources, check_limits
    from edgevit.errors import ConfigError

    record = art.manifest.cuda
    kernels = record["kernels"]
    over = []
    for k in kernels:          # compile refuses these; counted again from the manifest as the table's check
        try:
            check_limits([KernelResources(**k)], target.tvm, target.name)
        except ConfigError:
            over.append(k["name"])
    top = sorted(kernels, key=lambda k: -k["registers"])[:3]
    return {"cuda": record["cuda_version"], "arch": record["architectures"][0], "ptx_isa": record["ptx_isa"],
            "in_library": library_images(art.library),
            "kernels": len(kernels), "over_limits": over,
            "spills": [k["name"] for k in kernels if k["spill_store_bytes"] or k["spill_load_bytes"]],
            "dynamic_shared": [k["name"] for k in kernels if k["dynamic_shared"]],
            "max_registers": [(k["name"], k["registers"], k["threads"]) for k in top],
            "max_shared_bytes": max((k["shared_bytes"] for k in kernels), default=0),
            "max_threads": max((k["threads"] or 0 for k in kernels), default=0),
            "fatbin_bytes": record["fatbin_bytes"], "artifact_bytes": art.bytes}


def library_images(library: Path) -> list[str]:
    """What the library itself carries, read from its bytes: each fatbin image's kind and the
    architecture its own header names (cubin: the ELF's e_flags; PTX: its .target and .version)."""
    from edgevit.backend.cuda import fatbin_entries, library_fatbin

    found = []
    for entry in fatbin_entries(library_fatbin(library)):
        data = entry["data"]
        if entry["kind"] == "cubin":
            flags = struct.unpack_from("<I", data, 48)[0]
            sm = flags & 0xFF if data[8] == 7 else (flags >> 8) & 0xFF     # ELF ABI 7 (CUDA 11/12) or 8 (13)
            found.append(f"cubin sm_{sm}")
        else:
            text = data.decode(errors="replace")
            found.append(f"ptx {re.search(r'[.]target (sm_[0-9]+)', text).group(1)} "
                         f"isa {re.search(r'[.]version ([0-9.]+)', text).group(1)}")
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="the Fashion-MNIST Swin (default: random swin_fashion)")
    ap.add_argument("--models", nargs="+", default=["fashion", "swin_t"])
    ap.add_argument("--targets", nargs="+", default=CUDA_TARGETS)
    ap.add_argument("--fp16", action="store_true", help="also compile with --precision fp16 (the first target of "
                    "each CUDA version)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from edgevit.compile import CompileConfig, compile_model
    from edgevit.targets import load_target

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgevit-cuda-bench-") as tmp:
        folder = Path(tmp)
        for model in args.models:
            ckpt = checkpoint_for("swin_fashion" if model == "fashion" else model,
                                  args.checkpoint if model == "fashion" else None)
            for name in args.targets:
                target = load_target(name)
                start = time.perf_counter()
                art = compile_model(ckpt, target, folder / f"{model}-{name}", None, CompileConfig(images=64),
                                    log=lambda _: None)
                row = {"model": model, "target": name, "compile_s": round(time.perf_counter() - start, 1),
                       **resources(art, target)}
                print(json.dumps(row), flush=True)
                rows.append(row)
            if args.fp16:
                rows.extend(fp16_rows(ckpt, model, folder, args.targets))
    for row in rows:
        if "precision" not in row:
            top = row["max_registers"][0]
            print(f"| {row['model']} | {row['target']} | CUDA {row['cuda']} {row['arch']} | {row['kernels']} | "
                  f"{top[1]} ({top[0]}, {top[2]} threads) | {len(row['spills'])} | {row['max_shared_bytes']} | "
                  f"{row['max_threads']} | {len(row['dynamic_shared'])} | {len(row['over_limits'])} | "
                  f"{row['compile_s']} s |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def fp16_rows(ckpt, model: str, folder: Path, targets: list[str]) -> list[dict]:
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.targets import load_target

    rows, versions = [], set()
    for name in targets:
        target = load_target(name)
        if target.cuda in versions:
            continue
        versions.add(target.cuda)
        fp32 = folder / f"{model}-{name}"
        art = compile_model(ckpt, target, folder / f"{model}-{name}-fp16", None,
                            CompileConfig(images=64, precision="fp16"), log=lambda _: None)
        checks = {k: v for k, v in art.manifest.validation.items() if isinstance(v, dict)}
        row = {"model": model, "target": name, "precision": "fp16",
               "weights_bytes_fp32": (fp32 / "weights.params").stat().st_size,
               "weights_bytes_fp16": art.weights.stat().st_size,
               "validation": checks, **resources(art, target)}
        row["weights_ratio"] = round(row["weights_bytes_fp16"] / row["weights_bytes_fp32"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
