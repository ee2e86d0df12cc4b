"""The build step: a Relax module compiled with the target's pipeline, exported as a library
a device loads (cross-compiled for ARM targets), and weights in TVM's param format."""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

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


def export_library(executable, target: Target, path: Path) -> None:
    import tvm.support.cc as cc

    cross = target.check_cross_compiler()
    with quiet_tvm_warnings():
        if cross:
            executable.export_library(str(path), fcompile=cc.cross_compiler(cross))
        else:
            executable.export_library(str(path))


def save_weights(weights: list[np.ndarray], path: Path) -> None:
    import tvm

    blob = tvm.runtime.save_param_dict({f"p{i}": tvm.runtime.tensor(w) for i, w in enumerate(weights)})
    path.write_bytes(blob)


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
