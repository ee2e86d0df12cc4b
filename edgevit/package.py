"""`package`: a deploy bundle with what a device needs and nothing more: the library, the
weights, the manifest, the reference batch and a loader that imports only the TVM runtime."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgevit.artifact import LIBRARY, LOADER, MANIFEST, REFERENCE, WEIGHTS, CompiledArtifact, manifest_kind
from edgevit.errors import EdgeVitError
from edgevit.fileio import holds_only, publish_dir

LOADER_SOURCE = '''#!/usr/bin/env python3
"""Run this edgevit model with the TVM runtime alone (pip install apache-tvm; on a device
TVM_USE_RUNTIME_LIB=1 skips the compiler library; this loader then loads TVM's CUDA runtime itself).

    python3 run_model.py            # checks the bundled reference batch, prints latency
    python3 run_model.py x.npy      # classifies a float32 array shaped like manifest input.shape
"""
import hashlib, json, os, sys, time
from pathlib import Path

if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
    # TVM halves the core count on x86 for hyper-threads, present or not: one thread per core
    cores = set()
    for cpu in os.sched_getaffinity(0):
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text())
        except OSError:
            cores.add(cpu)
    os.environ["TVM_NUM_THREADS"] = str(max(1, len(cores)))

import numpy as np
import tvm
from tvm.runtime.vm import VirtualMachine

HERE = Path(__file__).resolve().parent


# CUDA driver API attributes (cuda.h): CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
CC_MAJOR, CC_MINOR = 75, 76


def gpu_here():
    """(compute capability as 87, driver's CUDA version as (12, 2)) of GPU 0, from the driver itself."""
    import ctypes
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        sys.exit("error: no NVIDIA driver here (libcuda.so.1 not found); this bundle runs on a CUDA GPU")
    if cuda.cuInit(0) != 0:
        sys.exit("error: the NVIDIA driver found no usable GPU (cuInit failed)")
    version, dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    cuda.cuDriverGetVersion(ctypes.byref(version))
    cuda.cuDeviceGet(ctypes.byref(dev), 0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), CC_MAJOR, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), CC_MINOR, dev)
    return major.value * 10 + minor.value, (version.value // 1000, version.value % 1000 // 10)


def cuda_mismatch(kernels, device_sm, driver):
    """Why this GPU cannot run the bundle's kernels (None: it can). A cubin for sm_XY runs on
    compute capability X.Z with Z >= Y; a newer GPU JIT-compiles the bundled PTX, which needs a
    driver at least as new as the CUDA that wrote it."""
    built_sm = int(kernels["architectures"][0].split("_")[1])
    built = tuple(int(v) for v in kernels["cuda_version"].split(".")[:2])
    target = f"compile it for a target with compute capability {device_sm // 10}.{device_sm % 10}"
    if driver[0] < built[0]:
        fix = f"or compile for a target declaring cuda = {driver[0]}" if driver[0] >= 11 else \
            "edgevit builds with CUDA 11 or newer"
        return (f"the kernels were built with CUDA {kernels['cuda_version']} and this driver supports CUDA "
                f"{driver[0]}.{driver[1]}: update the driver ({fix})")
    if device_sm // 10 == built_sm // 10 and device_sm >= built_sm:
        return None
    if device_sm > built_sm and driver >= built:
        return None
    if device_sm > built_sm:
        return (f"the kernels are sm_{built_sm} cubins plus PTX from CUDA {kernels['cuda_version']}; this GPU "
                f"({device_sm // 10}.{device_sm % 10}) needs the PTX, which its CUDA {driver[0]}.{driver[1]} "
                f"driver cannot compile: {target}")
    return (f"the kernels are for sm_{built_sm} (compute capability {built_sm // 10}.{built_sm % 10}) and this "
            f"GPU is {device_sm // 10}.{device_sm % 10}: {target}")


def cuda_runtime():
    """TVM's CUDA runtime (libtvm_runtime_cuda.so beside libtvm_runtime.so), loaded: TVM 0.27 skips it
    in runtime-only mode (TVM_USE_RUNTIME_LIB=1) and when its libcudart is missing, silently."""
    import ctypes
    import tvm_ffi
    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None:
        return
    from tvm import libinfo
    lib = Path(libinfo.find_libtvm_runtime()).parent / "libtvm_runtime_cuda.so"
    if not lib.is_file():
        sys.exit(f"error: this TVM runtime ({tvm.__version__}) has no CUDA support ({lib.name} not beside "
                 f"{libinfo.find_libtvm_runtime()}); install one built with CUDA (edgevit's README: the TVM "
                 "runtime on the device)")
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        sys.exit(f"error: TVM's CUDA runtime does not load ({str(e).splitlines()[0]}); put the CUDA runtime "
                 "library it names on LD_LIBRARY_PATH")


def load():
    manifest = json.loads((HERE / "manifest.json").read_text())
    if manifest.get("cuda"):    # before the library loads: a mismatch is one line, not a driver error
        problem = cuda_mismatch(manifest["cuda"], *gpu_here())
        if problem:
            sys.exit(f"error: {problem}")
        cuda_runtime()
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
    agreement = 100.0 * float((out.argmax(1) == ref["output"].argmax(1)).mean())
    # the tolerance compile chose for this artifact (older manifests: its compile config)
    tol = manifest.get("tolerance") or manifest.get("config") or {}
    ok = err <= tol.get("max_abs_error", 1e-3) and agreement >= tol.get("min_top1_agreement", 99.0)
    times = []
    for _ in range(20):
        t = time.perf_counter(); run(ref["input"]); times.append((time.perf_counter() - t) * 1e3)
    print(json.dumps({"max_abs_error": err, "top1_agreement": agreement, "ok": ok,
                      "median_ms": sorted(times)[len(times) // 2], "device": str(dev)}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
'''


def package(artifact: CompiledArtifact, out_dir: str | Path) -> dict:
    """Write the bundle atomically; returns {"path", "files": {name: bytes}, "total_bytes"}."""
    out_dir = Path(out_dir)
    if out_dir.resolve() == artifact.path.resolve():
        raise EdgeVitError(f"{out_dir}: the bundle would overwrite the artifact it is made from; pass another -o")
    with publish_dir(out_dir, is_bundle, "a deploy bundle") as tmp:
        for name in (LIBRARY, WEIGHTS, REFERENCE, MANIFEST):
            shutil.copy2(artifact.path / name, tmp / name)
        (tmp / LOADER).write_text(LOADER_SOURCE)
        (tmp / LOADER).chmod(0o755)
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return {"path": str(out_dir), "files": files, "total_bytes": sum(files.values())}


def is_bundle(folder: Path) -> bool:
    """Whether `folder` is a deploy bundle `package` wrote (the only folders it replaces)."""
    return (folder / LOADER).is_file() and manifest_kind(folder) is not None and holds_only(
        folder, {LIBRARY, WEIGHTS, REFERENCE, MANIFEST, LOADER})
