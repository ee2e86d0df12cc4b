"""Compile one checkpoint for every target, dense and (windowed models) at uniform sparsity 0.5, and report
compile time, artifact and deploy-bundle size and, where the artifact runs here (host) or on
the emulated board (rasp4b, via `edgevit emulator start`), the error against PyTorch.

    python benchmarks/compile_targets.py --checkpoint runs/fashion/adapt/model.pt [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edgevit.checkpoint import Checkpoint
from edgevit.compile import CompileConfig, compile_model
from edgevit.package import package
from edgevit.sparsity import SparsityConfig
from edgevit.targets import list_targets


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--targets", nargs="*", default=None, help="default: all")
    parser.add_argument("--rpc", default="127.0.0.1:9190", help="tracker of the emulated board")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ckpt = Checkpoint.load(args.checkpoint)
    model = ckpt.build_model()
    targets = [t for t in list_targets() if args.targets is None or t.name in args.targets]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = [("dense", None)]
        if hasattr(model, "set_sparsity"):     # windowed models; an EfficientViT has no windows
            configs.append(("uniform 0.5", SparsityConfig.uniform(model, 0.5)))
        for target in targets:
            for label, sparsity in configs:
                out = Path(tmp) / f"{target.name}-{label.replace(' ', '')}"
                art = compile_model(ckpt, target, out, sparsity, CompileConfig(images=64), log=lambda _: None)
                bundle = package(art, Path(tmp) / f"{out.name}-bundle")
                row = {"target": target.name, "config": label, "compile_s": art.manifest.compile_seconds,
                       "artifact_bytes": folder_bytes(art.path), "bundle_bytes": bundle["total_bytes"],
                       "check": _check(art, target, args.rpc)}
                rows.append(row)
                print(_format(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def _check(art, target, rpc: str) -> dict | str:
    v = art.manifest.validation
    if "skipped" not in v:
        real = next(r for k, r in v.items() if isinstance(r, dict) and k != "random")
        return {"where": "host", **real}
    if target.name == "rasp4b":
        from edgevit.errors import EdgeVitError
        from edgevit.verify import verify

        try:
            r = verify(art, rpc=rpc, key=target.rpc_key, timeout=120)
            return {"where": "emulated aarch64", "max_abs_error": r["max_abs_error"],
                    "top1_agreement": r["top1_agreement"], "images": r["images"]}
        except EdgeVitError as e:
            return f"not checked: {e}"
    return "not run here (no such device)"


def _format(row: dict) -> str:
    c = row["check"]
    check = (f"{c['where']}: max abs err {c['max_abs_error']:.1e}, top-1 agree {c['top1_agreement']:.0f}% "
             f"on {c['images']}") if isinstance(c, dict) else c
    return (f"{row['target']:17s} {row['config']:12s} compile {row['compile_s']:6.1f} s  "
            f"artifact {row['artifact_bytes'] / 1e6:5.2f} MB  bundle {row['bundle_bytes'] / 1e6:5.2f} MB  {check}")


if __name__ == "__main__":
    main()
