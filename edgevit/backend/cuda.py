"""CUDA kernels built ahead of time, so that a device loads machine code and needs no compiler.

TVM's CUDA codegen, on a machine without a GPU driver, keeps the kernels as CUDA C source that
the device would compile (NVRTC) when the library loads: a Jetson on JetPack 5/6 has CUDA 11/12,
often no NVRTC, and a kernel over the GPU's limits would fail only there. Here the source is
compiled at `compile` time with the CUDA version the target declares:

    CUDA C --NVRTC--> PTX (compute_XX) --ptxas--> cubin (sm_XX) + resource report
    cubin + PTX --fatbinary--> fatbin    (the driver loads the cubin; the PTX is JIT-compiled on a
                                          newer GPU than sm_XX, forward compatibility)

and the fatbin replaces the source inside the exported library (`pack_imports`). The compilers
come from NVIDIA's PyPI wheels, one folder per CUDA major version (`edgevit cuda setup`):
nvidia-cuda-nvrtc (NVRTC, called through ctypes), nvidia-cuda-nvcc (ptxas; CUDA 13's also has
fatbinary, which packages any version's cubins), nvidia-cuda-cccl and nvidia-cuda-runtime (the
headers TVM's source includes: cuda/std/*, cuda_fp16.h, and mma.h's crt/mma.h for tensor-core
kernels; CUDA 13 ships crt in nvidia-cuda-crt).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from edgevit.errors import ConfigError, EdgeVitError

Log = Callable[[str], None]

# What `edgevit cuda setup` installs per CUDA major version (pinned: what was tested here).
TOOLCHAIN_WHEELS = {
    11: ["nvidia-cuda-nvrtc-cu11==11.8.89", "nvidia-cuda-nvcc-cu11==11.8.89", "nvidia-cuda-cccl-cu11==11.8.89.post1",
         "nvidia-cuda-runtime-cu11==11.8.89"],
    12: ["nvidia-cuda-nvrtc-cu12==12.9.86", "nvidia-cuda-nvcc-cu12==12.9.86", "nvidia-cuda-cccl-cu12==12.9.27",
         "nvidia-cuda-runtime-cu12==12.9.79"],
    # CUDA 13's runtime wheel also gives libcudart.so.13, which the apache-tvm wheel's CUDA runtime
    # links: with it that runtime loads here, so a test reads an artifact back through the loader a device uses
    13: ["nvidia-cuda-nvrtc==13.5.37", "nvidia-cuda-nvcc==13.5.37", "nvidia-cuda-cccl==13.3.5.0.6",
         "nvidia-cuda-runtime==13.5.37", "nvidia-cuda-crt==13.5.37"],
}
FATBINARY_MAJOR = 13        # only CUDA 13's nvcc wheel carries fatbinary
# The GPU architectures each major version's compilers build for (CUDA 12 dropped Kepler, 13 dropped
# Maxwell/Pascal/Volta: sm_72 Xavier needs CUDA <= 12).
ARCH_RANGE = {11: (35, 90), 12: (50, 121), 13: (75, 121)}
MAX_REGISTERS_PER_THREAD = 255   # every CUDA GPU since sm_35 (CUDA C Programming Guide, compute capabilities)
FATBIN_MAGIC = 0xBA55ED50
FATBIN_KIND = {1: "ptx", 2: "cubin"}


def check_target(major: int, arch: str, where: str) -> None:
    """A CUDA target's declared version builds its architecture (raised as ConfigError)."""
    if major not in TOOLCHAIN_WHEELS:
        raise ConfigError(f"{where}: cuda = {major} is not a CUDA major version edgevit builds with; "
                          f"use one of {', '.join(map(str, TOOLCHAIN_WHEELS))}")
    sm = arch_number(arch)
    low, high = ARCH_RANGE[major]
    if not low <= sm <= high:
        fits = [m for m, (lo, hi) in ARCH_RANGE.items() if lo <= sm <= hi]
        raise ConfigError(f"{where}: CUDA {major} does not build for {arch} (it covers sm_{low}..sm_{high}); "
                          f"set cuda to {' or '.join(map(str, fits)) or 'a version that supports it'}")


def arch_number(arch: str) -> int:
    m = re.fullmatch(r"sm_(\d+)[a-z]?", str(arch))
    if not m:
        raise ConfigError(f"CUDA arch {arch!r} must look like 'sm_87'")
    return int(m.group(1))


# ---------------------------------------------------------------------------- toolchains


def home() -> Path:
    from edgevit.fileio import cache_home

    return cache_home() / "cuda"


@dataclass(frozen=True)
class Toolchain:
    """One CUDA major version's NVRTC, ptxas and headers, installed from NVIDIA's wheels."""

    major: int
    root: Path

    @classmethod
    def of(cls, major: int) -> "Toolchain":
        return cls(major, home() / str(major))

    def _find(self, pattern: str) -> Path | None:
        hits = sorted(p for p in self.root.glob(pattern) if ".alt." not in p.name and "builtins" not in p.name)
        return hits[0] if hits else None

    @property
    def nvrtc(self) -> Path | None:
        return self._find("nvidia/*/lib/libnvrtc.so*")

    @property
    def ptxas(self) -> Path | None:
        return self._find("nvidia/*/bin/ptxas")

    @property
    def fatbinary(self) -> Path | None:
        return self._find("nvidia/*/bin/fatbinary")

    @property
    def cudart(self) -> Path | None:
        return self._find("nvidia/*/lib/libcudart.so.*")

    @property
    def include_dirs(self) -> list[Path]:
        return [p for p in (self.root / "nvidia/cuda_cccl/include", self.root / "nvidia/cu13/include/cccl",
                            self.root / "nvidia/cuda_runtime/include", self.root / "nvidia/cuda_nvcc/include",
                            self.root / "nvidia/cu13/include") if p.is_dir()]

    def installed(self) -> bool:
        return self.root.is_dir() and self.nvrtc is not None and self.ptxas is not None and \
            any((d / "cuda_fp16.h").is_file() for d in self.include_dirs) and \
            any((d / "cuda/std/cstdint").is_file() for d in self.include_dirs) and \
            any((d / "crt/mma.h").is_file() for d in self.include_dirs)

    def version(self) -> str:
        """NVRTC's version, e.g. "12.9"."""
        lib = ctypes.CDLL(str(self.nvrtc))
        major, minor = ctypes.c_int(), ctypes.c_int()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        return f"{major.value}.{minor.value}"


def require(major: int) -> tuple[Toolchain, Path]:
    """The toolchain for `major` and a fatbinary, or one line saying how to install them."""
    missing = [m for m in sorted({major, FATBINARY_MAJOR}) if not Toolchain.of(m).installed()]
    if missing:
        raise EdgeVitError(f"building CUDA {major} kernels ahead of time needs the CUDA "
                           f"{' and '.join(map(str, missing))} compilers (NVRTC, ptxas, fatbinary from NVIDIA's "
                           f"wheels); install them: edgevit cuda setup --cuda {major}")
    return Toolchain.of(major), Toolchain.of(FATBINARY_MAJOR).fatbinary


MARKER = ".edgevit-toolchain"     # in every toolchain folder `setup` wrote: the only ones it replaces


def setup(major: int, log: Log = print) -> Toolchain:
    """pip-install one major version's compiler wheels into their own folder, atomically (a
    half-finished install is never taken for a toolchain); a folder there that edgevit did not
    write is left alone."""
    tc = Toolchain.of(major)
    if tc.installed():
        log(f"CUDA {major} compilers already set up: {tc.root}")
        return tc
    if tc.root.exists() and not (tc.root / MARKER).is_file():
        raise EdgeVitError(f"{tc.root} exists and was not written by `edgevit cuda setup`; move it away or point "
                           "EDGEVIT_HOME at another folder")
    log(f"installing the CUDA {major} compilers ({', '.join(TOOLCHAIN_WHEELS[major])})")
    try:
        tc.root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{major}-", dir=tc.root.parent))
        tmp.chmod(0o755)
    except OSError as e:
        raise EdgeVitError(f"{tc.root.parent}: cannot write the toolchain folder ({e.strerror}); point "
                           "EDGEVIT_HOME at a writable folder") from None
    try:
        _pip_install(TOOLCHAIN_WHEELS[major], tmp, major)
        (tmp / MARKER).write_text(" ".join(TOOLCHAIN_WHEELS[major]) + "\n")
        if not Toolchain(major, tmp).installed():
            raise EdgeVitError(f"the CUDA {major} wheels installed without NVRTC, ptxas or the headers edgevit needs; "
                               "report this with `pip --version`")
        if tc.root.exists():
            shutil.rmtree(tc.root)      # an older install by `setup` itself (its marker checked above)
        os.replace(tmp, tc.root)
    except OSError as e:
        raise EdgeVitError(f"{tc.root}: cannot install the CUDA {major} compilers ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"CUDA {major} compilers ready: {tc.root} (NVRTC {tc.version()})")
    return tc


def _pip_install(wheels: list[str], folder: Path, major: int) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder), *wheels]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EdgeVitError(f"installing the CUDA {major} compilers failed: {tail[0][:200]}")


# ---------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one kernel, plus its block size from __launch_bounds__."""

    name: str
    registers: int
    threads: int | None
    shared_bytes: int            # static shared memory
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    dynamic_shared: bool = False  # also uses dynamic shared memory (sized at launch)


@dataclass(frozen=True)
class CudaKernels:
    fatbin: bytes
    arch: str                    # sm_XX of the cubin
    cuda_version: str            # NVRTC/ptxas version that built it
    kernels: tuple[KernelResources, ...]
    ptx_isa: str                 # the PTX's .version (the oldest driver that can JIT it)

    def record(self) -> dict:
        """The manifest's account of the kernels."""
        return {"format": "fatbin", "cuda_version": self.cuda_version, "cuda_major": int(self.cuda_version.split(".")[0]),
                "architectures": [self.arch], "ptx": f"compute_{arch_number(self.arch)}", "ptx_isa": self.ptx_isa,
                "fatbin_bytes": len(self.fatbin), "fatbin_sha256": hashlib.sha256(self.fatbin).hexdigest(), "kernels": [asdict(k) for k in self.kernels]}


def compile_kernels(source: str, arch: str, toolchain: Toolchain, fatbinary: Path) -> CudaKernels:
    """CUDA C -> PTX (NVRTC) -> cubin (ptxas, with its resource report) -> fatbin (cubin + PTX)."""
    sm = arch_number(arch)
    ptx = nvrtc_ptx(source, f"compute_{sm}", toolchain)
    with tempfile.TemporaryDirectory(prefix="edgevit-cuda-") as tmp:
        ptx_path, cubin, fatbin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin"), Path(tmp, "k.fatbin")
        ptx_path.write_bytes(ptx)
        report = _run([str(toolchain.ptxas), "-v", f"-arch=sm_{sm}", "-o", str(cubin), str(ptx_path)], "ptxas")
        _run([str(fatbinary), f"--create={fatbin}", "-64", "--compress=false",
              f"--image3=kind=elf,sm={sm},file={cubin}", f"--image3=kind=ptx,sm={sm},file={ptx_path}"], "fatbinary")
        blob = fatbin.read_bytes()
    isa = re.search(rb"^\.version\s+(\S+)", ptx, re.M)
    return CudaKernels(blob, f"sm_{sm}", toolchain.version(), tuple(parse_ptxas_report(report, source)),
                       isa.group(1).decode() if isa else "")


def nvrtc_ptx(source: str, compute: str, toolchain: Toolchain) -> bytes:
    with _thread_locale_kept():
        return _nvrtc_ptx(source, compute, toolchain)


@contextmanager
def _thread_locale_kept():
    """NVRTC 11 switches the calling thread to the C locale (uselocale) and leaves it there, which
    turns Python's default text encoding into ASCII for the rest of the process (seen: reading a
    UTF-8 source file failed after a Xavier compile); the thread's locale is put back."""
    libc = ctypes.CDLL(None)
    libc.uselocale.restype, libc.uselocale.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    saved = libc.uselocale(None)
    try:
        yield
    finally:
        libc.uselocale(saved)


def _nvrtc_ptx(source: str, compute: str, toolchain: Toolchain) -> bytes:
    lib = ctypes.CDLL(str(toolchain.nvrtc))
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    prog = ctypes.c_void_p()
    _nvrtc(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None, None), "create")
    try:
        opts = [f"--gpu-architecture={compute}", "-default-device", "--std=c++17",
                *[f"-I{d}" for d in toolchain.include_dirs]]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        result = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if result != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            first = next((ln for ln in log.value.decode(errors="replace").splitlines() if "error" in ln), "")
            raise EdgeVitError(f"NVRTC {toolchain.version()} failed on the generated kernels for {compute}: {first[:200]}")
        size = ctypes.c_size_t()
        _nvrtc(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "PTX size")
        ptx = ctypes.create_string_buffer(size.value)
        _nvrtc(lib, lib.nvrtcGetPTX(prog, ptx), "PTX")
        return ptx.value
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _nvrtc(lib, result: int, what: str) -> None:
    if result != 0:
        raise EdgeVitError(f"NVRTC {what}: {lib.nvrtcGetErrorString(result).decode()}")


def _run(cmd: list[str], tool: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EdgeVitError(f"{tool} failed on the generated kernels: {tail[0][:200]}")
    return done.stdout + done.stderr


def parse_ptxas_report(report: str, source: str) -> list[KernelResources]:
    """`ptxas -v` per kernel: registers, static shared memory, stack and spill bytes."""
    bounds = {m.group(2): int(m.group(1)) for m in re.finditer(r"__launch_bounds__\((\d+)\)\s+(\w+)\(", source)}
    dynamic = _dynamic_shared_kernels(source)
    kernels = []
    for chunk in re.split(r"Compiling entry function '", report)[1:]:
        name = chunk.split("'", 1)[0]
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", chunk)
        regs = re.search(r"Used (\d+) registers", chunk)
        smem = re.search(r"(\d+) bytes smem", chunk)
        if not regs:
            raise EdgeVitError(f"ptxas reported no register count for kernel {name}; its report format changed")
        stack, stores, loads = (int(v) for v in frame.groups()) if frame else (0, 0, 0)
        kernels.append(KernelResources(name, int(regs.group(1)), bounds.get(name), int(smem.group(1)) if smem else 0,
                                       stack, stores, loads, name in dynamic))
    return kernels


def _dynamic_shared_kernels(source: str) -> set[str]:
    names, current = set(), None
    for line in source.splitlines():
        head = re.search(r"__global__\s+void\s+(?:__launch_bounds__\(\d+\)\s+)?(\w+)\(", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
        if current and "extern __shared__" in line:
            names.add(current)
    return names


def check_limits(kernels, limits: dict, target_name: str) -> None:
    """Refuse a kernel the target's GPU cannot launch, naming the kernel and the limit. Static shared
    memory only: dynamic shared memory (some of TVM's GPU matmul schedules) is sized at launch and TVM's
    runtime opts the kernel in above 48 KB; ptxas does not see it, so it is flagged, not checked."""
    threads_max = int(limits.get("max_num_threads", 1024))
    smem_max = int(limits.get("max_shared_memory_per_block", 49152))
    regs_block = int(limits.get("registers_per_block", 65536))
    for k in kernels:
        problems = []
        if k.registers > MAX_REGISTERS_PER_THREAD:
            problems.append(f"{k.registers} registers per thread (limit {MAX_REGISTERS_PER_THREAD})")
        if k.threads and k.threads > threads_max:
            problems.append(f"{k.threads} threads per block (limit {threads_max})")
        if k.shared_bytes > smem_max:
            problems.append(f"{k.shared_bytes} bytes of shared memory (limit {smem_max})")
        if k.threads and k.registers * k.threads > regs_block:
            problems.append(f"{k.registers} x {k.threads} = {k.registers * k.threads} registers per block (limit {regs_block})")
        if problems:
            raise ConfigError(f"kernel {k.name} exceeds target '{target_name}': {'; '.join(problems)}; "
                              "the artifact was not written (tune it for this target or lower the batch)")


def summary(record: dict) -> str:
    """One line for compile's log: what was built and the heaviest kernel."""
    ks = record["kernels"]
    if not ks:
        return f"CUDA {record['cuda_version']}: no kernels"
    top = max(ks, key=lambda k: k["registers"])
    spills = [k["name"] for k in ks if k["spill_store_bytes"] or k["spill_load_bytes"]]
    smem = max(k["shared_bytes"] for k in ks)
    dynamic = sum(k["dynamic_shared"] for k in ks)
    return (f"{len(ks)} CUDA kernels built ahead of time for {', '.join(record['architectures'])} (+PTX) with CUDA "
            f"{record['cuda_version']}: max {top['registers']} registers ({top['name']}, {top['threads']} threads), "
            f"max {smem} B static shared, max {max(k['threads'] or 0 for k in ks)} threads per block"
            + (f", {dynamic} with dynamic shared memory (sized at launch)" if dynamic else "") + ", "
            + (f"register spills in {len(spills)}: {', '.join(spills[:3])}" if spills else "no register spills"))


# ---------------------------------------------------------------------------- fatbins


def fatbin_entries(blob: bytes) -> list[dict]:
    """The images inside a fatbin: [{"kind": "cubin"|"ptx", "arch": "sm_87", "bytes": n}, ...]."""
    if len(blob) < 16:
        raise ValueError("not a fatbin: too short")
    magic, _version, header, size = struct.unpack_from("<IHHQ", blob, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError(f"not a fatbin: magic {magic:#x}")
    entries, offset = [], header
    while offset < header + size:
        kind, _flags, entry_header, payload = struct.unpack_from("<HHIQ", blob, offset)
        arch = struct.unpack_from("<I", blob, offset + 28)[0]
        entries.append({"kind": FATBIN_KIND.get(kind, str(kind)), "arch": f"sm_{arch}", "bytes": payload,
                        "data": blob[offset + entry_header: offset + entry_header + payload]})
        offset += entry_header + payload
    return entries


def library_fatbin(path: Path) -> bytes:
    """The one fatbin inside a compiled library, found by its magic number and sized by its header."""
    blob = Path(path).read_bytes()
    magic = struct.pack("<I", FATBIN_MAGIC)
    start = blob.find(magic)
    if start < 0 or blob.find(magic, start + 1) != -1:
        raise ValueError(f"{path}: expected one fatbin, found {0 if start < 0 else 'several'}")
    header, size = struct.unpack_from("<HQ", blob, start + 6)
    return blob[start:start + header + size]


# ---------------------------------------------------------------------------- the library


def cuda_modules(module) -> list:
    """The CUDA device modules in an executable's import tree."""
    found, stack = [], [module]
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            found.append(m)
        stack.extend(m.imports)
    return found


def pack_imports(source: str, fatbin: bytes):
    """An `export_library(fpack_imports=...)` that packs the import tree as TVM does (its C
    packer), with the one CUDA module's source replaced by the fatbin. The module's bytes are
    [fmt][function table][code] (TVM's CUDAModuleNode::SaveToBytes); fmt "fatbin" makes the
    device runtime load the code with cuModuleLoadData instead of compiling it."""
    from tvm.runtime import _ffi_api

    def fpack(mod, is_system_lib, prefix, workspace_dir):
        c_source = _ffi_api.ModulePackImportsToC(mod, is_system_lib, prefix)
        head, body, tail = _split_c_array(c_source)
        blob = swap_cuda_code(bytes.fromhex(re.sub(r"0x|[,\s]", "", body)), source.encode(), fatbin)
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        with open(path, "w") as f:
            f.write(_c_array(head, blob, tail))
        return path

    return fpack


def _split_c_array(c_source: str) -> tuple[str, str, str]:
    m = re.search(r"(const unsigned char \w+)\[\d+\] = \{(.*?)\};", c_source, re.S)
    if not m:
        raise EdgeVitError("TVM's import packer wrote an unexpected C layout; the CUDA kernels cannot be packed")
    return c_source[:m.start()] + m.group(1), m.group(2), c_source[m.end():]


def _c_array(head: str, blob: bytes, tail: str) -> str:
    rows = (",".join(f"0x{b:02x}" for b in blob[i:i + 20]) for i in range(0, len(blob), 20))
    return f"{head}[{len(blob)}] = {{\n  " + ",\n  ".join(rows) + f"\n}};{tail}"


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def swap_cuda_code(blob: bytes, source: bytes, code: bytes, fmt: bytes = b"fatbin") -> bytes:
    """The packed import tree with the CUDA module's source replaced by `code` (format `fmt`).
    The blob starts with its own length; the module is written as kind "cuda", then its bytes'
    length, then [fmt "cuda"][function table][source]: all three lengths are rewritten."""
    marker = _u64(4) + b"cuda"
    start, hits = blob.find(marker), []
    while start != -1:
        size_at = start + len(marker)
        if blob[size_at + 8: size_at + 8 + len(marker)] == marker:      # kind "cuda", size, fmt "cuda"
            size = struct.unpack_from("<Q", blob, size_at)[0]
            payload = blob[size_at + 8: size_at + 8 + size]
            if payload.endswith(_u64(len(source)) + source):
                hits.append((size_at, payload))
        start = blob.find(marker, start + 1)
    if len(hits) != 1:
        raise EdgeVitError(f"found {len(hits)} CUDA modules holding the generated source in the library, expected 1; "
                           "the kernels cannot be packed")
    size_at, payload = hits[0]
    table = payload[len(marker): len(payload) - 8 - len(source)]
    new_payload = _u64(len(fmt)) + fmt + table + _u64(len(code)) + code
    out = blob[:size_at] + _u64(len(new_payload)) + new_payload + blob[size_at + 8 + len(payload):]
    return _u64(len(out) - 8) + out[8:]
