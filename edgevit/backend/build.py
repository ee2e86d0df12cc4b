"""The build step: a Relax module compiled with the target's pipeline, exported as a library
a device loads (cross-compiled for ARM targets), and weights in TVM's param format."""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgevit.errors import EdgeVitError
from edgevit.targets import Target

# Printed by TVM's C++ logger for every build, dozens of lines each, and harmless here: every
# `take` index edgevit's graphs hold (window ranks, relative positions) is in range by
# construction; the pragma is a schedule annotation LLVM codegen has no use for.
BENIGN_TVM_WARNINGS = ("Fast mode segfaults when there are out-of-bounds indices", "Unknown pragma pragma_scope")


def build(mod, target: Target, database: str | Path | None = None):
    """Compile a Relax module for the target with its pipeline (see schedules.py); kernels the
    tuning `database` holds come from it, the rest from edgevit's default rules."""
    import tvm
    from tvm import relax

    from edgevit.backend.schedules import relax_pipeline

    tvm_target = target.tvm_target()
    with tvm.transform.PassContext(opt_level=3), quiet_tvm_warnings():
        # "compiled": the VM's own instructions become native code too; on the fashion model the
        # bytecode interpreter's per-kernel dispatch was a quarter of the latency (2.46 -> 1.85 ms)
        return relax.build(mod, tvm_target, relax_pipeline=relax_pipeline(tvm_target, str(database) if database else None),
                           exec_mode="compiled")


def export_library(executable, target: Target, path: Path) -> dict | None:
    """Write the library (cross-compiled for ARM hosts). For CUDA targets the kernels are built
    ahead of time with the target's CUDA version (cuda.py) and checked against its limits; returns
    their record for the manifest (None for CPU targets)."""
    import tvm.support.cc as cc

    kwargs, record = {}, None
    if target.device == "cuda":
        kwargs["fpack_imports"], record = _cuda_packer(executable, target)
    cross = target.check_cross_compiler()
    with quiet_tvm_warnings():
        if cross:
            kwargs["fcompile"] = cc.cross_compiler(cross)
        executable.export_library(str(path), **kwargs)
    return record


def _cuda_packer(executable, target: Target):
    from edgevit.backend import cuda

    modules = cuda.cuda_modules(executable.mod)
    if len(modules) != 1:
        raise EdgeVitError(f"the build for '{target.name}' holds {len(modules)} CUDA modules, edgevit packs exactly "
                           "one; report this model")
    source = modules[0].inspect_source("")
    toolchain, fatbinary = cuda.require(target.cuda)
    kernels = cuda.compile_kernels(source, target.tvm["arch"], toolchain, fatbinary)
    cuda.check_limits(kernels.kernels, target.tvm, target.name)
    return cuda.pack_imports(source, kernels.fatbin), kernels.record()


def save_weights(weights: list[np.ndarray], path: Path) -> None:
    import tvm

    blob = tvm.runtime.save_param_dict({f"p{i}": tvm.runtime.tensor(w) for i, w in enumerate(weights)})
    path.write_bytes(blob)


# How to get a CUDA-enabled TVM runtime of the right revision onto a device (README, "Deploying to a GPU").
RUNTIME_BUILD = {
    "source": "https://github.com/apache/tvm",
    "cmake": ["-DUSE_CUDA=ON", "-DUSE_LLVM=OFF", "-DCMAKE_BUILD_TYPE=Release"],
    "targets": ["tvm_runtime", "tvm_runtime_cuda"],
}


def runtime_requirements(cuda_major: int, cuda_version: str) -> dict:
    """What a device needs to run a CUDA artifact: the TVM runtime this compiler matches, built
    with CUDA, and a driver for the CUDA version the kernels were built with. No NVRTC: the
    library holds a fatbin, loaded with cuModuleLoadData."""
    version = tvm_version()
    release = version.split(".post")[0]
    return {"tvm": version, "loads": "fatbin via cuModuleLoadData (no NVRTC or nvcc on the device)",
            "cuda_driver": f"CUDA {cuda_major}.x or newer for the cubin; {cuda_version} or newer where a newer GPU "
                           "than the target's runs the PTX",
            "wheel": f"apache-tvm=={version}: its CUDA runtime links libcudart.so.13, so only CUDA 13 drivers",
            "build": {**RUNTIME_BUILD, "revision": f"v{release}"}}


def tvm_version() -> str:
    import tvm

    return tvm.__version__


@contextmanager
def quiet_tvm_warnings(benign: tuple[str, ...] = BENIGN_TVM_WARNINGS):
    """Drop the known-harmless lines TVM's C++ logger writes to stderr (fd 2) inside the block;
    every other line, errors included, is written on once the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(b in line for b in benign)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
