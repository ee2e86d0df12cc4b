"""`verify`: run an artifact on its device (here, or over RPC) against its PyTorch reference,
within the tolerance recorded in its manifest at compile time."""

from __future__ import annotations

import platform

import numpy as np

from edgevit.artifact import CompiledArtifact
from edgevit.backend.runtime import Device, DeviceError, Session


def check_runs_here(artifact: CompiledArtifact, device: Device) -> None:
    """An artifact for another CPU architecture needs its device: say how to reach it."""
    target = artifact.manifest.target
    if device.rpc is None and target["device"] == "cpu" and target["arch"] != platform.machine():
        raise DeviceError(f"the artifact is for {target['arch']}, this machine is {platform.machine()}; "
                          "pass --rpc HOST:PORT --key KEY of a device (e.g. `edgevit emulator start`)")


def open_session(artifact: CompiledArtifact, rpc: str | None = None, key: str | None = None,
                 timeout: float = 60.0) -> Session:
    """The artifact loaded on its device: here, or over RPC (the target's key by default)."""
    target = artifact.manifest.target
    device = Device(kind=target["device"], rpc=rpc, key=key or target.get("rpc_key"), timeout=timeout)
    check_runs_here(artifact, device)
    return Session(device, artifact.library, artifact.weights, batches=artifact.manifest.batches)


def verify(artifact: CompiledArtifact, rpc: str | None = None, key: str | None = None,
           timeout: float = 60.0) -> dict:
    target = artifact.manifest.target
    session = open_session(artifact, rpc, key, timeout)
    device = session.device
    inputs, reference = artifact.validation_set()
    batch = artifact.manifest.batch
    out = np.concatenate([session.run(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])
    figures = _figures(out, reference)
    tolerance = artifact.manifest.tolerance
    by_batch = {}
    for extra in artifact.manifest.batches[1:]:    # each extra batch's function, on the same images
        n = max(extra, len(inputs) // extra * extra)
        x, ref = np.resize(inputs, (n, *inputs.shape[1:])), np.resize(reference, (n, *reference.shape[1:]))
        got = np.concatenate([session.run(x[i:i + extra]) for i in range(0, n, extra)])
        by_batch[str(extra)] = {**_figures(got, ref), "images": n}
    ok = tolerance.accepts(figures) and all(tolerance.accepts(f) for f in by_batch.values())
    return {"device": device.label, "target": target["name"], "images": len(inputs),
            "source": artifact.manifest.reference.get("source", "?"), **figures,
            **({"batches": by_batch} if by_batch else {}), "tolerance": tolerance.__dict__, "ok": ok}


def _figures(out: np.ndarray, reference: np.ndarray) -> dict:
    return {"max_abs_error": float(np.abs(out - reference).max()),
            "top1_agreement": 100.0 * float((out.argmax(1) == reference.argmax(1)).mean())}
