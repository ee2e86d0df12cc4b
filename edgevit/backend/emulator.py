"""An emulated aarch64 board: an aarch64 CPython with TVM's runtime under qemu user-mode
emulation, serving a TVM RPC server on loopback registered with a local tracker.

It stands in for a Raspberry Pi 4 (`--target rasp4b`) so that cross-compiled artifacts are
run and checked for correctness without hardware. Emulated timings are ~8x slower than a real
core and are never reported as ARM latency.

    edgevit emulator setup     # once: Debian arm64 packages + aarch64 wheels into the cache
    edgevit emulator start     # tracker on 127.0.0.1:9190, server with key 'rasp4b'
    edgevit emulator status
    edgevit emulator stop
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgevit.errors import EdgeVitError

# arm64 .debs that make a working python3.11 (TVM_NOTES.md); libtirpc-common is arch "all"
DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11", "libc6",
        "libstdc++6", "libgcc-s1", "zlib1g", "libffi8", "libssl3", "libexpat1", "libbz2-1.0", "liblzma5",
        "libsqlite3-0", "libncursesw6", "libtinfo6", "libreadline8", "libuuid1", "libcrypt1", "libdb5.3",
        "libnsl2", "libtirpc3", "libgssapi-krb5-2", "libkrb5-3", "libk5crypto3", "libcom-err2",
        "libkrb5support0", "libkeyutils1"]
ALL_ARCH_DEBS = ["libtirpc-common"]
WHEELS = ["apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post0", "numpy", "ml_dtypes", "psutil",
          "cloudpickle", "tornado", "typing_extensions"]
HOST_TOOLS = {"qemu-aarch64": "qemu-user", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
              "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}
Log = Callable[[str], None]


@dataclass(frozen=True)
class Emulator:
    home: Path
    tracker_port: int = 9190
    server_port: int = 9090
    key: str = "rasp4b"

    @classmethod
    def default(cls, **kw) -> "Emulator":
        from edgevit.fileio import cache_home

        home = cache_home() / "arm64-emulator"
        return cls(home=home, **kw)

    @property
    def sysroot(self) -> Path:
        return self.home / "sysroot"

    @property
    def site(self) -> Path:
        return self.home / "site"

    @property
    def python(self) -> Path:
        """Wrapper that runs the aarch64 python under qemu; sys.executable points back at it."""
        return self.home / "python-aarch64"

    @property
    def tracker(self) -> str:
        return f"127.0.0.1:{self.tracker_port}"

    def state_file(self, name: str, suffix: str) -> Path:
        """pid/log files per process and tracker port, so several emulators can share a sysroot."""
        return self.home / f"{name}-{self.tracker_port}.{suffix}"

    def is_set_up(self) -> bool:
        return self.python.exists() and (self.sysroot / "usr/bin/python3.11").exists() and (self.site / "tvm").is_dir()


# ---------------------------------------------------------------------------- setup


def setup(emu: Emulator, log: Log = print) -> None:
    """Install qemu and the cross compilers if missing, then build the sysroot and site dir."""
    _ensure_host_tools(log)
    if emu.is_set_up():
        log(f"emulated aarch64 python already set up: {emu.python}")
        return
    debs = emu.home / "debs"
    try:
        debs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeVitError(f"{debs}: cannot create the emulator's folder ({e.strerror}); point EDGEVIT_HOME at a "
                           "writable folder") from None
    if "arm64" not in _run(["dpkg", "--print-foreign-architectures"]).split():
        log("adding the arm64 architecture to dpkg")
        _run(["dpkg", "--add-architecture", "arm64"])
        _run(["apt-get", "update", "-qq"])
    log(f"downloading {len(DEBS) + len(ALL_ARCH_DEBS)} arm64 packages")
    _run(["apt-get", "download", "-qq", *[f"{d}:arm64" for d in DEBS], *ALL_ARCH_DEBS], cwd=debs)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(emu.sysroot)])
    wheels = emu.home / "wheels"
    log("downloading aarch64 wheels (apache-tvm, numpy, ...)")
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
          "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux_2_17_aarch64",
          "--platform", "manylinux2014_aarch64", "--python-version", "3.11", "--implementation", "cp",
          "-d", str(wheels), *WHEELS])
    emu.site.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(emu.site)
    for big in emu.site.glob("tvm/lib*/libtvm_compiler.so"):   # the 240 MB compiler: a device needs only the runtime
        big.unlink()
    _write_wrapper(emu)
    log(f"emulated aarch64 python ready: {emu.python}")


def _write_wrapper(emu: Emulator) -> None:
    text = f"""#!/bin/sh
# aarch64 python under qemu user-mode emulation (written by `edgevit emulator setup`)
export QEMU_LD_PREFIX="{emu.sysroot}" PYTHONPATH="{emu.site}" TVM_USE_RUNTIME_LIB=1 PYTHONHOME=/usr
exec qemu-aarch64 -L "{emu.sysroot}" -0 "{emu.python}" "{emu.sysroot}/usr/bin/python3.11" "$@"
"""
    emu.python.write_text(text)
    emu.python.chmod(0o755)


def _ensure_host_tools(log: Log) -> None:
    missing = [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise EdgeVitError(f"missing {', '.join(missing)}; install them: apt-get install {' '.join(missing)}")
    log(f"installing {' '.join(missing)}")
    _run(["apt-get", "update", "-qq"])
    _run(["apt-get", "install", "-y", "-qq", *missing])


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise EdgeVitError(f"'{cmd[0]}' not found; the emulator needs a Debian machine with apt and dpkg") from None
    except subprocess.CalledProcessError as e:
        tail = (e.stderr or e.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise EdgeVitError(f"`{' '.join(cmd[:4])} ...` failed: {tail[0][:200]}") from None
    return done.stdout


# ---------------------------------------------------------------------------- processes


def start(emu: Emulator, log: Log = print, timeout: float = 180.0) -> None:
    """Start the tracker and the emulated server (both on loopback); wait until it registers."""
    if not emu.is_set_up():
        raise EdgeVitError(f"the emulator is not set up in {emu.home}; run `edgevit emulator setup`")
    if shutil.which("qemu-aarch64") is None:
        raise EdgeVitError("qemu-aarch64 not found; install it: apt-get install qemu-user")
    if _alive(emu, "tracker") and _alive(emu, "server"):
        log(f"already running: tracker {emu.tracker}, key '{emu.key}'")
        return
    stop(emu, log=lambda _: None)
    _spawn(emu, "tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                            "--port", str(emu.tracker_port), "--port-end", str(emu.tracker_port + 1)])
    _wait_for_tracker(emu, timeout=30)
    _spawn(emu, "server", [str(emu.python), "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                           "--port", str(emu.server_port), "--port-end", str(emu.server_port + 10),
                           "--tracker", emu.tracker, "--key", emu.key])
    deadline = time.time() + timeout
    while time.time() < deadline:
        if emu.key in free_keys(emu):
            log(f"emulated aarch64 device up: tracker {emu.tracker}, key '{emu.key}'")
            return
        if not _alive(emu, "server"):
            break
        time.sleep(1.0)
    server_log = emu.state_file("server", "log")
    log_tail = server_log.read_text()[-400:] if server_log.exists() else ""
    stop(emu, log=lambda _: None)
    raise EdgeVitError(f"the emulated server did not register with the tracker in {timeout:.0f} s; "
                       f"see {server_log}: {log_tail.strip().splitlines()[-1:] or ''}")


def stop(emu: Emulator, log: Log = print) -> None:
    for name in ("server", "tracker"):
        pid_file = emu.state_file(name, "pid")
        if not pid_file.exists():
            continue
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)   # the server's worker too
        except (ProcessLookupError, ValueError, PermissionError):
            pass
        pid_file.unlink(missing_ok=True)
        log(f"stopped {name}")


def free_keys(emu: Emulator) -> dict[str, int]:
    """Keys registered with the tracker and how many free servers each has; {} if unreachable."""
    from tvm import rpc

    try:
        summary = rpc.connect_tracker("127.0.0.1", emu.tracker_port).summary()
    except Exception:  # noqa: BLE001 - tracker not up (yet)
        return {}
    keys: dict[str, int] = {}
    for item in summary.get("queue_info", {}).items():
        key, info = item
        keys[key] = int(info.get("free", 0))
    return keys


def status(emu: Emulator) -> dict:
    return {"set_up": emu.is_set_up(), "tracker": emu.tracker, "tracker_running": _alive(emu, "tracker"),
            "server_running": _alive(emu, "server"), "keys": free_keys(emu) if _alive(emu, "tracker") else {}}


def _spawn(emu: Emulator, name: str, cmd: list[str]) -> None:
    log = open(emu.state_file(name, "log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    emu.state_file(name, "pid").write_text(str(proc.pid))


def _alive(emu: Emulator, name: str) -> bool:
    pid_file = emu.state_file(name, "pid")
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


def _wait_for_tracker(emu: Emulator, timeout: float) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", emu.tracker_port)) == 0:
                return
        time.sleep(0.2)
    raise EdgeVitError(f"the RPC tracker did not start on {emu.tracker}; see {emu.state_file('tracker', 'log')}")
