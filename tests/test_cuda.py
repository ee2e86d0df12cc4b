"""CUDA artifacts without a GPU: kernels built ahead of time (cubin + PTX in a fatbin) with the
target's CUDA version, their resource report and limits, fp16 validated on the host, the device
runtime loading them with no compiler, and the bundle's check of the device's GPU."""

import hashlib
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgevit.backend import cuda
from edgevit.cli import cli
from edgevit.compile import CompileConfig, compile_model
from edgevit.errors import ConfigError, EdgeVitError
from edgevit.models import create_model
from edgevit.targets import load_target

pytestmark = pytest.mark.tvm

# CUDA major version -> PTX ISA major version its NVRTC writes (PTX ISA release notes: 7.x with CUDA
# 11, 8.x with 12, 9.x with 13)
PTX_ISA_MAJOR = {11: 7, 12: 8, 13: 9}
EM_CUDA = 190


@pytest.fixture(scope="module")
def ckpt(swin_micro_digits):
    return swin_micro_digits


@pytest.fixture(scope="module")
def artifacts(ckpt, tmp_path_factory):
    """One fp32 artifact per CUDA version the targets declare (Orin: 12, Xavier: 11), and Orin fp16."""
    out = tmp_path_factory.mktemp("cuda")
    built = {}
    for name, precision in [("jetson-orin", "fp32"), ("jetson-xavier", "fp32"), ("jetson-orin", "fp16")]:
        built[name, precision] = compile_model(ckpt, load_target(name), out / f"{name}-{precision}", None,
                                               CompileConfig(precision=precision, images=32), log=lambda _: None)
    return built


@pytest.mark.parametrize("name", ["jetson-orin", "jetson-xavier"])
def test_artifact_carries_a_cubin_for_its_arch_built_by_its_cuda_version(artifacts, name):
    target = load_target(name)
    art = artifacts[name, "fp32"]
    record = art.manifest.cuda
    sm = cuda.arch_number(target.tvm["arch"])
    assert record["cuda_major"] == target.cuda and record["cuda_version"].startswith(f"{target.cuda}.")
    assert record["architectures"] == [f"sm_{sm}"] and record["format"] == "fatbin"
    fatbin = cuda.library_fatbin(art.library)
    assert hashlib.sha256(fatbin).hexdigest() == record["fatbin_sha256"]
    entries = cuda.fatbin_entries(fatbin)
    assert sorted((e["kind"], e["arch"]) for e in entries) == [("cubin", f"sm_{sm}"), ("ptx", f"sm_{sm}")]
    cubin = next(e["data"] for e in entries if e["kind"] == "cubin")
    # the ELF itself says CUDA machine code for sm_XX (ELF ABI 7, CUDA 11/12: the arch in e_flags' low byte)
    assert cubin[:4] == b"\x7fELF" and struct.unpack_from("<H", cubin, 18)[0] == EM_CUDA
    assert cubin[8] == 7 and struct.unpack_from("<I", cubin, 48)[0] & 0xFF == sm
    ptx = next(e["data"] for e in entries if e["kind"] == "ptx").decode(errors="replace")
    isa = ptx[ptx.index(".version"):].split()[1]
    assert isa == record["ptx_isa"] and int(isa.split(".")[0]) == PTX_ISA_MAJOR[target.cuda]
    assert f".target sm_{sm}" in ptx
    # no CUDA source travels: the device has nothing to compile
    assert b'extern "C" __global__' not in art.library.read_bytes()


@pytest.mark.parametrize("name", ["jetson-orin", "jetson-xavier"])
def test_every_kernel_is_reported_and_within_the_targets_limits(artifacts, name):
    target = load_target(name)
    kernels = artifacts[name, "fp32"].manifest.cuda["kernels"]
    assert len(kernels) > 10 and len({k["name"] for k in kernels}) == len(kernels)
    for k in kernels:
        assert 0 < k["registers"] <= cuda.MAX_REGISTERS_PER_THREAD
        assert k["threads"] and k["threads"] <= target.tvm["max_num_threads"]
        assert k["registers"] * k["threads"] <= target.tvm["registers_per_block"]
        assert k["shared_bytes"] <= target.tvm["max_shared_memory_per_block"]
    assert any(k["shared_bytes"] > 0 for k in kernels)          # the tiled matmuls stage through shared memory
    runtime = artifacts[name, "fp32"].manifest.cuda["runtime"]
    assert runtime["tvm"] == artifacts[name, "fp32"].manifest.versions["tvm"]
    assert "-DUSE_CUDA=ON" in runtime["build"]["cmake"] and runtime["build"]["revision"].startswith("v0.")


def test_fp16_halves_the_matmul_weights_and_is_validated_on_the_host(artifacts, ckpt):
    import tvm

    fp32, fp16 = artifacts["jetson-orin", "fp32"], artifacts["jetson-orin", "fp16"]
    m = fp16.manifest
    assert m.encoding == "fp16" and m.tolerance.max_abs_error == 5e-2
    params = tvm.runtime.load_param_dict(fp16.weights.read_bytes())
    arrays = [params[k].numpy() for k in params]
    big = [a for a in arrays if a.size >= 1024]
    assert big and all(a.dtype == np.float16 for a in big)          # every matmul weight
    assert fp16.weights.stat().st_size < 0.6 * fp32.weights.stat().st_size
    check = m.validation["digits val images"]
    assert "host" in m.validation["device"] and check["images"] == 32
    assert 0 < check["max_abs_error"] < 1e-2 and check["top1_agreement"] == 100.0
    assert any("half" in k["name"] or "cast" in k["name"] for k in m.cuda["kernels"])


def test_fp16_is_refused_for_a_cpu_target_and_an_int8_model(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="--precision fp16 is for CUDA targets.*'host' is a CPU"):
        compile_model(ckpt, load_target("host"), tmp_path / "a", None, CompileConfig(precision="fp16"),
                      log=lambda _: None)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="precision 'fp8' must be one of fp32, fp16"):
        CompileConfig(precision="fp8")


def test_the_device_runtime_loads_the_kernels_without_any_compiler(artifacts, tmp_path):
    """TVM's own CUDA runtime (the apache-tvm wheel's libtvm_runtime_cuda.so, what a CUDA 13 device
    runs) deserialises the library here: a stand-in libcuda.so.1 satisfies the loader (no call
    reaches it before a kernel launches), and the compile callback is replaced by one that fails,
    so loading proves nothing is compiled on the device."""
    cudart = cuda.Toolchain.of(13).cudart
    assert cudart is not None, "run `edgevit cuda setup` (CUDA 13's runtime wheel gives libcudart.so.13)"
    stub = tmp_path / "cuda_stub.c"
    stub.write_text("".join(f"int {f}(void) {{ return 999; }}\n" for f in (
        "cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString", "cuLaunchKernelEx",
        "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload", "cuTensorMapEncodeTiled")))
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp_path / "libcuda.so.1"),
                    str(stub)], check=True)
    os.symlink(cudart, tmp_path / cudart.name)
    art = artifacts["jetson-orin", "fp32"]
    host_lib = tmp_path / "x86.so"      # the same kernels in an x86-64 library this process can load
    from edgevit.backend.build import build, export_library
    from edgevit.backend.frontend import to_relax

    target = load_target("cuda-sm90")
    model = create_model("swin_micro", img_size=32).eval()
    import torch

    mod, _ = to_relax(model, torch.zeros(1, 1, 32, 32), (), target)
    record = export_library(build(mod, target), target, host_lib)
    from edgevit.package import LOADER_SOURCE

    loader = tmp_path / "run_model.py"
    loader.write_text(LOADER_SOURCE)
    script = f"""
import runpy, tvm, tvm_ffi
runpy.run_path({str(loader)!r}, run_name="bundle")["cuda_runtime"]()      # the bundle loader's step
assert tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is not None, "no CUDA runtime"
@tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
def refuse(code):
    raise RuntimeError("the device was asked to compile CUDA source")
lib = tvm.runtime.load_module({str(host_lib)!r})
stack, found = [lib], []
while stack:
    m = stack.pop(); stack.extend(m.imports)
    if m.kind == "cuda":
        try:
            m.inspect_source("fatbin")
        except UnicodeDecodeError as e:       # binary code: handed back as bytes in the error
            found.append(e.object)
import hashlib, json
print(json.dumps([hashlib.sha256(b).hexdigest() for b in found]))
"""
    for runtime_only in ("0", "1"):    # TVM_USE_RUNTIME_LIB=1: TVM skips its CUDA runtime, the loader loads it
        env = {**os.environ, "LD_LIBRARY_PATH": f"{tmp_path}:{os.environ.get('LD_LIBRARY_PATH', '')}",
               "TVM_USE_RUNTIME_LIB": runtime_only}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-1500:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == [record["fatbin_sha256"]]
    assert art.manifest.cuda["fatbin_sha256"] != record["fatbin_sha256"]     # sm_87 and sm_90 kernels differ


PTXAS_REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'softmax_kernel' for 'sm_87'
ptxas info    : Function properties for softmax_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 1 barriers, 324 bytes smem, 368 bytes cmem[0], 16 bytes cmem[2]
ptxas info    : Compiling entry function 'fused_matmul_kernel' for 'sm_87'
ptxas info    : Function properties for fused_matmul_kernel
    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 6912 bytes smem, 384 bytes cmem[0]
"""
SOURCE = """extern "C" __global__ void __launch_bounds__(256) softmax_kernel(float* a) {
  extern __shared__ float buf_dyn_shmem[];
}
extern "C" __global__ void __launch_bounds__(512) fused_matmul_kernel(float* a) {
}
"""


def test_ptxas_report_is_read_per_kernel_with_spills_and_block_sizes():
    softmax, matmul = cuda.parse_ptxas_report(PTXAS_REPORT, SOURCE)
    assert softmax == cuda.KernelResources("softmax_kernel", 18, 256, 324, 0, 0, 0, dynamic_shared=True)
    assert matmul == cuda.KernelResources("fused_matmul_kernel", 255, 512, 6912, 48, 40, 36)
    line = cuda.summary({"cuda_version": "12.9", "architectures": ["sm_87"],
                         "kernels": [vars(softmax), vars(matmul)]})
    assert "max 255 registers (fused_matmul_kernel, 512 threads)" in line and "max 512 threads per block" in line
    assert "1 with dynamic shared memory" in line and "register spills in 1: fused_matmul_kernel" in line


def test_a_kernel_over_the_targets_limits_is_refused_by_name():
    limits = load_target("jetson-orin").tvm
    too_big = cuda.KernelResources("fused_matmul_kernel", 255, 512, 6912, 0, 0, 0)      # 130560 registers/block
    with pytest.raises(ConfigError, match=r"kernel fused_matmul_kernel exceeds target 'jetson-orin': 255 x 512 = "
                                          r"130560 registers per block \(limit 65536\)"):
        cuda.check_limits([too_big], limits, "jetson-orin")
    smem = cuda.KernelResources("attention_kernel", 32, 128, 65536, 0, 0, 0)
    with pytest.raises(ConfigError, match=r"attention_kernel .*65536 bytes of shared memory \(limit 49152\)"):
        cuda.check_limits([smem], limits, "jetson-orin")
    cuda.check_limits([cuda.KernelResources("ok_kernel", 64, 1024, 49152, 0, 0, 0)], limits, "jetson-orin")


def test_swapping_the_cuda_code_rewrites_every_length():
    def u64(n):
        return struct.pack("<Q", n)

    def s(b):
        return u64(len(b)) + b

    source, table = b"__global__ void k() {}", b"\x01\x00FUNCTION-TABLE"
    module = s(b"cuda") + table + s(source)
    body = u64(2) + s(b"relax.VMExecutable") + s(b"vm-bytes") + s(b"cuda") + s(module) + b"tail"
    blob = u64(len(body)) + body
    out = cuda.swap_cuda_code(blob, source, b"\x50\xed\x55\xba-fatbin")
    new_module = s(b"fatbin") + table + s(b"\x50\xed\x55\xba-fatbin")
    assert out == u64(len(body) - len(module) + len(new_module)) + u64(2) + s(b"relax.VMExecutable") \
        + s(b"vm-bytes") + s(b"cuda") + s(new_module) + b"tail"
    with pytest.raises(EdgeVitError, match="found 0 CUDA modules"):
        cuda.swap_cuda_code(blob, b"other source", b"x")


def test_missing_compilers_are_one_line_with_the_fix(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVIT_HOME", str(tmp_path / "empty"))
    ckpt_path = tmp_path / "model.pt"
    ckpt.save(ckpt_path)
    result = CliRunner().invoke(cli, ["compile", "--target", "jetson-xavier", "--checkpoint", str(ckpt_path),
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "needs the CUDA 11 and 13 compilers" in result.output and "edgevit cuda setup --cuda 11" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("toml, message", [
    ('cuda = 13\n[tvm]\nkind = "cuda"\narch = "sm_72"\n', "CUDA 13 does not build for sm_72 .*set cuda to 11 or 12"),
    ('cuda = 10\n[tvm]\nkind = "cuda"\narch = "sm_87"\n', "cuda = 10 is not a CUDA major version"),
    ('[tvm]\nkind = "cuda"\narch = "sm_87"\n', "must declare cuda = <major version>"),
    ('cuda = 12\n[tvm]\nkind = "cuda"\narch = "87"\n', "must look like 'sm_87'"),
])
def test_a_gpu_target_declares_a_cuda_version_that_builds_its_arch(tmp_path, toml, message):
    path = tmp_path / "mine.toml"
    path.write_text('description = "x"\ndevice = "cuda"\narch = "aarch64"\n' + toml)
    with pytest.raises(ConfigError, match=message):
        load_target(str(path))


def test_targets_lists_each_gpu_targets_cuda_version(tmp_path):
    result = CliRunner().invoke(cli, ["targets", "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0 and "jetson-xavier      cuda aarch64 CUDA 11 NVIDIA" in result.output
    rows = {t["name"]: t for t in json.loads((tmp_path / "t.json").read_text())}
    assert rows["jetson-orin"]["cuda"] == 12 and rows["jetson-xavier"]["cuda"] == 11 and rows["host"]["cuda"] is None


def test_setup_leaves_a_folder_it_did_not_write_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEVIT_HOME", str(tmp_path))
    mine = tmp_path / "cuda" / "12"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's")
    with pytest.raises(EdgeVitError, match="cuda/12 exists and was not written by `edgevit cuda setup`"):
        cuda.setup(12, log=lambda _: None)
    assert (mine / "notes.txt").read_text() == "the user's"


def _loader_namespace():
    from edgevit.package import LOADER_SOURCE

    namespace = {"__name__": "bundle_loader", "__file__": "/bundle/run_model.py"}
    exec(compile(LOADER_SOURCE, "run_model.py", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("device_sm, driver, problem", [
    (87, (12, 2), None),                                    # Orin on JetPack 6: the cubin, by minor-version compatibility
    (86, (12, 4), "are for sm_87 .*this GPU is 8.6: compile it for a target with compute capability 8.6"),
    (72, (11, 4), "built with CUDA 12.9 and this driver supports CUDA 11.4: update the driver \\(or compile for a "
                  "target declaring cuda = 11\\)"),
    (87, (10, 2), "this driver supports CUDA 10.2: update the driver \\(edgevit builds with CUDA 11 or newer\\)"),
    (90, (12, 9), None),                                    # a newer GPU JIT-compiles the PTX
    (90, (12, 2), "needs the PTX, which its CUDA 12.2 driver cannot compile"),
])
def test_the_bundle_checks_the_gpu_before_loading(device_sm, driver, problem):
    kernels = {"architectures": ["sm_87"], "cuda_version": "12.9", "cuda_major": 12}
    found = _loader_namespace()["cuda_mismatch"](kernels, device_sm, driver)
    if problem is None:
        assert found is None
    else:
        assert found is not None and __import__("re").search(problem, found), found


@pytest.mark.skipif(__import__("ctypes.util").util.find_library("cuda") is not None,
                    reason="this machine has an NVIDIA driver: the no-driver message cannot show")
def test_a_cuda_bundle_says_in_one_line_that_it_needs_a_gpu(artifacts, tmp_path):
    from edgevit.package import package

    package(artifacts["jetson-orin", "fp32"], tmp_path / "bundle")
    done = subprocess.run([sys.executable, str(tmp_path / "bundle" / "run_model.py")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == "error: no NVIDIA driver here (libcuda.so.1 not found); this bundle runs on a CUDA GPU"


def test_a_users_onnx_file_compiles_fp16_for_a_jetson_checked_against_onnxruntime(tmp_path):
    from edgevit.compile import compile_onnx
    from edgevit.onnx_model import OnnxModel

    user_onnx = __import__("pathlib").Path(__file__).parent / "fixtures" / "reference" / "timm_vit_small.onnx"
    art = compile_onnx(OnnxModel.load(user_onnx), load_target("jetson-orin-nano"), tmp_path / "art",
                       CompileConfig(batch=1, precision="fp16"), log=lambda _: None)
    m = art.manifest
    assert m.encoding == "fp16" and m.cuda["architectures"] == ["sm_87"] and m.cuda["cuda_major"] == 12
    assert m.validation["device"].startswith("local cpu: the same fp16 graph")
    assert 0 < m.validation["random"]["max_abs_error"] < m.tolerance.max_abs_error


def test_fp16_for_a_cpu_target_is_one_line_exit_2(ckpt, tmp_path):
    ckpt.save(tmp_path / "model.pt")
    result = CliRunner().invoke(cli, ["compile", "--target", "rasp4b", "--checkpoint", str(tmp_path / "model.pt"),
                                      "--precision", "fp16", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "--precision fp16 is for CUDA targets" in result.output


MMA_SOURCE = """
#ifdef __CUDACC_RTC__
  #include <cuda/std/cstdint>
#endif
#include <cuda_fp16.h>
#include <mma.h>
using namespace nvcuda;
extern "C" __global__ void __launch_bounds__(32) tile_kernel(half* __restrict__ a, half* __restrict__ b,
                                                             float* __restrict__ c) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.0f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
}
"""


@pytest.mark.parametrize("major, arch", [(11, "sm_72"), (12, "sm_87"), (13, "sm_90")])
def test_each_cuda_version_builds_fp16_tensor_core_kernels(major, arch):
    """The headers fp16 and tensor-core kernels include (cuda_fp16.h, mma.h and its crt/mma.h) are
    in every installed toolchain: a wmma tile compiles to a cubin and PTX of the right ISA."""
    import locale

    encoding = locale.getpreferredencoding(False)
    toolchain, fatbinary = cuda.require(major)
    kernels = cuda.compile_kernels(MMA_SOURCE, arch, toolchain, fatbinary)
    assert locale.getpreferredencoding(False) == encoding     # NVRTC 11 changed the thread's locale
    assert kernels.cuda_version.startswith(f"{major}.") and int(kernels.ptx_isa.split(".")[0]) == PTX_ISA_MAJOR[major]
    (tile,) = kernels.kernels
    assert tile.name == "tile_kernel" and tile.threads == 32 and tile.registers > 0
    entries = cuda.fatbin_entries(kernels.fatbin)
    assert sorted((e["kind"], e["arch"]) for e in entries) == [("cubin", arch), ("ptx", arch)]
    assert b"wmma.mma.sync" in next(e["data"] for e in entries if e["kind"] == "ptx")   # tensor cores


def test_fp16_keeps_softmax_and_layernorm_in_fp32_and_accumulates_matmuls_in_fp32():
    """A bias-free matmul feeding LayerNorm and softmax (the case where nothing else keeps fp32)."""
    import tvm
    from tvm.script import relax as R

    from edgevit.backend.encodings import get_encoding

    @tvm.script.ir_module
    class Block:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 8), "float32"), g: R.Tensor((8,), "float32"),
                 b: R.Tensor((8,), "float32")):
            with R.dataflow():
                y = R.matmul(x, w)
                z = R.nn.layer_norm(y, g, b, axes=[-1])
                s = R.nn.softmax(R.matmul(z, w), axis=-1)
                R.output(s)
            return s

    weights = [np.ones((8, 8), np.float32), np.ones(8, np.float32), np.zeros(8, np.float32)]
    mod, _ = get_encoding("fp16")(Block, weights)
    calls = {}
    for binding in mod["main"].body.blocks[0].bindings:
        op = getattr(binding.value, "op", None)
        if getattr(op, "name", None) in ("relax.matmul", "relax.nn.layer_norm", "relax.nn.softmax"):
            calls.setdefault(op.name, []).append(binding.value)
    assert all(str(a.ty.dtype) == "float16" for c in calls["relax.matmul"] for a in c.args)   # fp16 operands
    assert all(str(c.ty.dtype) == "float32" for c in calls["relax.matmul"])                    # fp32 sums
    for name in ("relax.nn.layer_norm", "relax.nn.softmax"):
        (call,) = calls[name]
        assert str(call.args[0].ty.dtype) == "float32" and str(call.ty.dtype) == "float32"


def test_max_abs_error_option_sets_the_tolerance_and_is_checked(ckpt, tmp_path):
    ckpt.save(tmp_path / "model.pt")
    result = CliRunner().invoke(cli, ["compile", "--target", "jetson-orin", "--checkpoint", str(tmp_path / "model.pt"),
                                      "--max-abs-error", "0", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "max_abs_error must be > 0" in result.output
    assert CompileConfig(max_abs_error=0.5, precision="fp16").tolerance("fp16").max_abs_error == 0.5


def test_efficientvit_builds_for_jetson_within_its_limits(tiny_efficientvit, tmp_path):
    """Depthwise and grouped convs, the linear attention and the folded norms as CUDA kernels."""
    from edgevit.checkpoint import Checkpoint

    target = load_target("jetson-orin")
    art = compile_model(Checkpoint.from_model(tiny_efficientvit), target, tmp_path / "orin", None, CompileConfig(images=8),
                        log=lambda _: None)
    kernels = art.manifest.cuda["kernels"]
    assert art.manifest.cuda["architectures"] == ["sm_87"] and len(kernels) > 10
    for k in kernels:
        assert k["registers"] * k["threads"] <= target.tvm["registers_per_block"]
        assert k["spill_store_bytes"] == k["spill_load_bytes"] == 0, k["name"]
