"""Running compiled artifacts on a device: this machine, or a board behind a TVM RPC tracker.

Only the TVM runtime is used here (tvm.runtime.vm), so the same code serves a deploy bundle
on a device that has no compiler.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevit.errors import ConfigError, DeviceError

__all__ = ["Device", "DeviceError", "Session", "connect"]


@dataclass(frozen=True)
class Device:
    """Where an artifact runs: kind "cpu" or "cuda", locally (rpc None) or via a tracker."""

    kind: str = "cpu"
    rpc: str | None = None          # "HOST:PORT" of a TVM RPC tracker
    key: str | None = None          # the tracker key of the device kind
    timeout: float = 60.0

    @property
    def label(self) -> str:
        return f"{self.kind} via {self.rpc} key '{self.key}'" if self.rpc else f"local {self.kind}"


def entry_name(batch: int, primary: int) -> str:
    """The library function that runs a batch of `batch` images: `main` for the batch the
    artifact was compiled for, `main_b8` for an extra batch size of 8 (compile --batch 1,8)."""
    return "main" if batch == primary else f"main_b{batch}"


class Session:
    """A loaded artifact on a device: `run(x)` returns the output as numpy."""

    def __init__(self, device: Device, library: Path, weights: Path, remote=None, batches: tuple[int, ...] = ()):
        """`remote`: an open RPC session to load into (several artifacts loaded at once on one
        board share it: the board serves one session at a time); by default a new one.
        `batches`: the batch sizes the library has functions for, its own batch first (empty:
        one function, `main`, whatever batch it takes)."""
        import tvm

        self.device = device
        self.batches = tuple(batches)
        if device.rpc is None:
            self.remote = None
            self.dev = tvm.cuda(0) if device.kind == "cuda" else tvm.cpu(0)
            if not self.dev.exist:
                raise DeviceError(f"no {device.kind} device on this machine; run the artifact on its device "
                                  "(--rpc HOST:PORT --key KEY)")
            lib = tvm.runtime.load_module(str(library))
        else:
            self.remote = remote or connect(device)
            self.remote.upload(str(library))
            lib = self.remote.load_module(library.name)
            self.dev = self.remote.cuda(0) if device.kind == "cuda" else self.remote.cpu(0)
        params = tvm.runtime.load_param_dict(Path(weights).read_bytes())
        self.params = [tvm.runtime.tensor(params[f"p{i}"].numpy(), device=self.dev) for i in range(len(params))]
        self.vm = tvm.runtime.vm.VirtualMachine(lib, self.dev)

    def entry(self, x: np.ndarray) -> str:
        """The function for x's batch; a batch the library was not compiled for, named."""
        if not self.batches:
            return "main"
        if len(x) not in self.batches:
            raise ConfigError(f"the artifact runs batches of {', '.join(map(str, self.batches))}, not {len(x)}; "
                              f"recompile with --batch {','.join(map(str, (*self.batches, len(x))))}")
        return entry_name(len(x), self.batches[0])

    def run(self, x: np.ndarray) -> np.ndarray:
        import tvm

        out = self.vm[self.entry(x)](tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), device=self.dev),
                                     *self.params)
        return out.numpy()

    def time_ms(self, x: np.ndarray, number: int = 1, repeat: int = 10) -> list[float]:
        """Per-call latencies measured on the device itself (TVM's time_evaluator)."""
        import tvm

        arg = tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), device=self.dev)
        timer = self.vm.time_evaluator(self.entry(x), self.dev, number=number, repeat=repeat)
        return [r * 1e3 for r in timer(arg, *self.params).results]


def connect(device: Device, session_timeout: int | None = None):
    """Request a session for `device.key` from the tracker, failing clearly when unreachable;
    the session expires after `session_timeout` seconds (default 10x the device timeout; 0: never)."""
    from tvm import rpc

    host, _, port = (device.rpc or "").rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rpc '{device.rpc}' is not HOST:PORT (e.g. 127.0.0.1:9190)")
    try:
        with socket.create_connection((host, int(port)), timeout=min(device.timeout, 10.0)):
            pass
    except OSError as e:
        raise DeviceError(f"RPC tracker {device.rpc} unreachable ({e.strerror or e}); start it "
                          "(`edgevit emulator start` for the emulated board) or check --rpc") from None
    try:
        tracker = rpc.connect_tracker(host, int(port))
        keys = tracker.summary().get("queue_info", {})
        if device.key not in keys:
            raise DeviceError(f"no device with key '{device.key}' at tracker {device.rpc}; "
                              f"registered keys: {', '.join(sorted(keys)) or 'none'}")
        timeout = int(device.timeout * 10) if session_timeout is None else session_timeout
        return tracker.request(device.key, priority=1, session_timeout=timeout)
    except DeviceError:
        raise
    except Exception as e:  # noqa: BLE001 - TVM's RPC raises plain TVMError/RuntimeError
        raise DeviceError(f"RPC session for key '{device.key}' at {device.rpc} failed: "
                          f"{str(e).strip().splitlines()[-1][:200]}") from None
