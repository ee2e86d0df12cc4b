"""`package`: a deploy bundle with what a device needs and nothing more: the library, the
weights, the manifest, the reference batch and a loader that imports only the TVM runtime."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from edgevit.compile import LIBRARY, MANIFEST, REFERENCE, WEIGHTS, CompiledArtifact

LOADER = '''#!/usr/bin/env python3
"""Run this edgevit model with the TVM runtime alone (pip install apache-tvm; on a device
TVM_USE_RUNTIME_LIB=1 skips the compiler library).

    python3 run_model.py            # checks the bundled reference batch, prints latency
    python3 run_model.py x.npy      # classifies a float32 array shaped like manifest input.shape
"""
import hashlib, json, os, sys, time
from pathlib import Path

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

HERE = Path(__file__).resolve().parent


def load():
    manifest = json.loads((HERE / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        if name == "validation.npz":  # stays with the artifact, not shipped
            continue
        if hashlib.sha256((HERE / name).read_bytes()).hexdigest() != digest:
            sys.exit(f"error: {name} does not match the manifest's sha256; the bundle is damaged")
    dev = tvm.cuda(0) if manifest["target"]["device"] == "cuda" else tvm.cpu(0)
    vm = VirtualMachine(tvm.runtime.load_module(str(HERE / "model.so")), dev)
    params = tvm.runtime.load_param_dict((HERE / "weights.params").read_bytes())
    weights = [tvm.runtime.tensor(params[f"p{i}"].numpy(), device=dev) for i in range(len(params))]
    return manifest, dev, lambda x: vm["main"](tvm.runtime.tensor(x, device=dev), *weights).numpy()


def main():
    manifest, dev, run = load()
    if len(sys.argv) > 1:
        x = np.load(sys.argv[1], allow_pickle=False).astype(np.float32)
        classes = manifest["input"].get("classes") or []
        for row in run(x):
            k = int(row.argmax())
            print(classes[k] if k < len(classes) else k)
        return
    ref = np.load(HERE / "reference.npz", allow_pickle=False)
    out = run(ref["input"])
    err = float(np.abs(out - ref["output"]).max())
    times = []
    for _ in range(20):
        t = time.perf_counter(); run(ref["input"]); times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"max_abs_error": err, "top1_match": bool((out.argmax(1) == ref["output"].argmax(1)).all()),
                      "median_ms": sorted(times)[len(times) // 2], "device": str(dev)}))
    sys.exit(0 if err < 1e-3 else 1)


if __name__ == "__main__":
    main()
'''


def package(artifact: CompiledArtifact, out_dir: str | Path) -> dict:
    """Write the bundle atomically; returns {"path", "files": {name: bytes}, "total_bytes"}."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; artifacts get the usual permissions
    try:
        for name in (LIBRARY, WEIGHTS, REFERENCE, MANIFEST):
            shutil.copy2(artifact.path / name, tmp / name)
        (tmp / "run_model.py").write_text(LOADER)
        (tmp / "run_model.py").chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return {"path": str(out_dir), "files": files, "total_bytes": sum(files.values())}
