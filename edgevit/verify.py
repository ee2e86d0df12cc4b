"""`verify`: run an artifact on its device (here, or over RPC) against its PyTorch reference."""

from __future__ import annotations

import numpy as np

from edgevit.compile import CompiledArtifact
from edgevit.runtime import Device, DeviceError, Session

TOLERANCE = 1e-3


def verify(artifact: CompiledArtifact, rpc: str | None = None, key: str | None = None,
           timeout: float = 60.0) -> dict:
    target = artifact.manifest["target"]
    device = Device(kind=target["device"], rpc=rpc, key=key or target.get("rpc_key"), timeout=timeout)
    if rpc is None and target["device"] == "cpu":
        import platform

        if target["arch"] != platform.machine():
            raise DeviceError(f"the artifact is for {target['arch']}, this machine is {platform.machine()}; "
                              "pass --rpc HOST:PORT --key KEY of a device (e.g. `edgevit emulator start`)")
    inputs, reference = artifact.validation_set()
    batch = artifact.input_shape[0]
    session = Session(device, artifact.library, artifact.weights)
    out = np.concatenate([session.run(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])
    err = float(np.abs(out - reference).max())
    agreement = 100.0 * float((out.argmax(1) == reference.argmax(1)).mean())
    return {"device": device.label, "target": target["name"], "images": len(inputs),
            "source": artifact.manifest["reference"]["source"], "max_abs_error": err,
            "top1_agreement": agreement, "ok": err <= TOLERANCE and agreement == 100.0}
