"""Devices as data: targets/*.toml, each a TVM target (JSON form) plus what deployment needs.

    description = "..."            device = "cpu" | "cuda"        arch = "x86_64" | "aarch64"
    rpc_key = "rasp4b"             cross_compiler = "aarch64-linux-gnu-g++"
    cross_package = "g++-aarch64-linux-gnu"    aliases = ["arm"]    notes = "..."
    cuda = 12                      (GPU targets: the CUDA major version the device has; kernels
                                    are built with it ahead of time, backend/cuda.py)
    [tvm]  kind = "llvm", mtriple = ..., mcpu = ..., mattr = [...]   ([tvm.host] for GPUs)

`--target` takes a name, an alias, or a path to such a file.
"""

from __future__ import annotations

import difflib
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgevit.config import from_mapping, read_toml
from edgevit.errors import ConfigError, EdgeVitError

DEVICES = ("cpu", "cuda")
ARCHES = ("x86_64", "aarch64")


def targets_dir() -> Path:
    env = os.environ.get("EDGEVIT_TARGETS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "targets"


@dataclass(frozen=True)
class Target:
    description: str
    device: str
    arch: str
    tvm: dict[str, Any]
    rpc_key: str = ""
    cross_compiler: str = ""
    cross_package: str = ""
    aliases: list[str] = field(default_factory=list)
    notes: str = ""
    cuda: int = 0
    name: str = ""

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} must be one of {', '.join(DEVICES)}")
        if self.arch not in ARCHES:
            raise ValueError(f"arch {self.arch!r} must be one of {', '.join(ARCHES)}")
        kind = self.tvm.get("kind")
        if kind not in ("llvm", "cuda"):
            raise ValueError(f"[tvm] kind {kind!r} must be 'llvm' or 'cuda'")
        if (kind == "cuda") != (self.device == "cuda"):
            raise ValueError(f"[tvm] kind {kind!r} does not match device {self.device!r}")
        if self.device == "cuda":
            from edgevit.backend.cuda import check_target

            if not self.cuda:
                raise ValueError("a cuda device must declare cuda = <major version> (the CUDA the device has: "
                                 "11 for JetPack 5, 12 for JetPack 6)")
            try:
                check_target(self.cuda, self.tvm.get("arch", ""), "cuda")
            except ConfigError as e:
                raise ValueError(str(e).removeprefix("cuda: ")) from None
        elif self.cuda:
            raise ValueError("cuda is for cuda devices only")

    @property
    def runs_here(self) -> bool:
        """Whether an artifact for this target can run on this machine's CPU."""
        return self.device == "cpu" and self.arch == platform.machine()

    def tvm_target(self):
        """The tvm.target.Target, with mcpu = "native" resolved to this machine's CPU."""
        import tvm

        spec = _with_reassociation(_resolve_native(dict(self.tvm)))
        if "host" in spec:
            spec["host"] = _with_reassociation(_resolve_native(dict(spec["host"])))
        try:
            return tvm.target.Target(spec)
        except Exception as e:  # noqa: BLE001 - TVM raises its own error types
            raise ConfigError(f"target '{self.name}': TVM rejects [tvm] {spec}: {str(e).splitlines()[0][:200]}") from None

    def tvm_target_json(self) -> dict:
        """The resolved TVM target as JSON (what an artifact's manifest records)."""
        import json

        return json.loads(str(self.tvm_target()))

    def check_tools(self) -> None:
        """Everything building for this target needs is installed: the cross compiler, and for GPU
        targets the CUDA compilers of the target's version (`edgevit cuda setup`)."""
        self.check_cross_compiler()
        if self.device == "cuda":
            from edgevit.backend.cuda import require

            require(self.cuda)

    def check_cross_compiler(self) -> str | None:
        """The cross compiler command, after checking it is installed (None: host compiler)."""
        if not self.cross_compiler or self.arch == platform.machine():
            return None
        if shutil.which(self.cross_compiler) is None:
            raise EdgeVitError(f"target '{self.name}' needs the cross compiler {self.cross_compiler}; "
                               f"install it: apt-get install {self.cross_package or 'a cross toolchain'}")
        return self.cross_compiler


def _with_reassociation(spec: dict) -> dict:
    """LLVM CPU code may reassociate float sums (unless the target says "fast-math-reassoc" =
    false): without it LLVM cannot vectorise a row's sum, and LayerNorm's mean and variance
    ran as one scalar add chain (ViT-Ti's LayerNorm kernel: 0.068 -> 0.014 ms). Only the order
    of additions changes; compile still validates every artifact against PyTorch."""
    if spec.get("kind") == "llvm":
        spec.setdefault("fast-math-reassoc", True)
    return spec


def _resolve_native(spec: dict) -> dict:
    """mcpu = "native": this machine's CPU name and physical core count (MetaSchedule needs it)."""
    if spec.get("mcpu") == "native":
        import tvm

        from edgevit.backend.threads import physical_cores

        spec["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        spec.setdefault("num-cores", physical_cores())   # the threads the compiled model gets
    return spec


def _target_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(targets_dir().glob("*.toml"))}


def list_targets() -> list[Target]:
    return [load_target(str(p)) for p in _target_files().values()]


def load_target(name_or_path: str) -> Target:
    """A target by name, alias or TOML path; unknown names list the valid ones."""
    path = Path(name_or_path)
    if name_or_path.endswith(".toml") or path.is_file():
        return _load_file(path)
    files = _target_files()
    if name_or_path in files:
        return _load_file(files[name_or_path])
    owners = [p for p in files.values() if name_or_path in _aliases(p)]
    if len(owners) > 1:
        raise ConfigError(f"alias {name_or_path!r} is claimed by {', '.join(p.name for p in owners)}; "
                          "give each target its own aliases")
    if owners:
        return _load_file(owners[0])
    names = sorted(files)
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    where = f" in {targets_dir()} (EDGEVIT_TARGETS_DIR)" if os.environ.get("EDGEVIT_TARGETS_DIR") else ""
    raise ConfigError(f"unknown target {name_or_path!r}{where}; {hint}valid targets: {', '.join(names) or 'none'} "
                      "(or a path to a .toml file)")


def _aliases(path: Path) -> list:
    aliases = read_toml(path).get("aliases", [])
    return aliases if isinstance(aliases, list) else []   # a malformed list is reported when the file loads


def _load_file(path: Path) -> Target:
    raw = read_toml(path)
    if "name" in raw:
        raise ConfigError(f"{path}: unknown key 'name'; a target is named by its file name")
    target = from_mapping(Target, {**raw, "name": path.stem}, str(path))
    return target
