"""edgevit's default CPU schedules: they apply to the ViT kernels, keep the numerics, and vectorise."""

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvm import te  # noqa: E402

from edgevit.backend.cpu_features import PARALLEL_MIN_MACS, fp32_lanes  # noqa: E402
from edgevit.backend.cpu_rules import Injective, Matmul, RowReduction, cpu_rules  # noqa: E402
from edgevit.targets import load_target  # noqa: E402

pytestmark = pytest.mark.tvm


def host():
    return load_target("host").tvm_target()


def matmul_bias_gelu(batch: int, m: int, k: int, n: int):
    """(batch, m, k) @ (batch, k, n) + bias, then tanh-free GELU-like epilogue (x * sigmoid(x))."""
    a = te.placeholder((batch, m, k), name="A")
    b = te.placeholder((batch, k, n), name="B")
    bias = te.placeholder((n,), name="bias")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((batch, m, n), lambda z, i, j: te.sum(a[z, i, r] * b[z, r, j], axis=r), name="matmul")
    d = te.compute((batch, m, n), lambda z, i, j: c[z, i, j] + bias[j], name="T_add")
    e = te.compute((batch, m, n), lambda z, i, j: d[z, i, j] * te.sigmoid(d[z, i, j]), name="act")
    return te.create_prim_func([a, b, bias, e])


def run(func, *arrays, out_shape):
    lib = tvm.compile(func, target=host()).mod
    args = [tvm.runtime.tensor(x) for x in arrays] + [tvm.runtime.tensor(np.zeros(out_shape, "float32"))]
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("shape", [(1, 65, 192, 576), (3, 65, 64, 65), (192, 49, 32, 49), (1, 1, 192, 10)])
def test_matmul_rule_matches_numpy_on_ragged_vit_shapes(shape):
    batch, m, k, n = shape
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((batch, m, k), dtype=np.float32), rng.standard_normal((batch, k, n), dtype=np.float32)
    bias = rng.standard_normal(n, dtype=np.float32)
    sch = Matmul().apply(matmul_bias_gelu(batch, m, k, n), host(), False)
    assert sch is not None
    script = sch.mod["main"].script()
    assert "T.vectorized" in script
    assert ("T.parallel" in script) == (batch * m * n * k >= PARALLEL_MIN_MACS)  # small ones stay on one thread
    got = run(sch.mod["main"], a, b, bias, out_shape=(batch, m, n))
    ref = a @ b + bias
    ref = ref / (1 + np.exp(-ref))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_matmul_rule_declines_what_is_not_one_reduction():
    x = te.placeholder((64, 64), name="x")
    y = te.compute((64, 64), lambda i, j: x[j, i] * 2.0, name="t")
    assert Matmul().apply(te.create_prim_func([x, y]), host(), False) is None


@pytest.mark.parametrize("channels, threaded", [(192, True), (8, False)])
def test_injective_rule_transposes_correctly_and_threads_large_kernels(channels, threaded):
    x = te.placeholder((3, 196, channels), name="x")
    y = te.compute((3, channels, 196), lambda b, i, j: x[b, j, i] + 1.0, name="t")
    sch = Injective().apply(te.create_prim_func([x, y]), host(), False)
    assert ("T.parallel" in sch.mod["main"].script()) == threaded
    data = np.random.default_rng(1).standard_normal((3, 196, channels), dtype=np.float32)
    np.testing.assert_array_equal(run(sch.mod["main"], data, out_shape=(3, channels, 196)), data.transpose(0, 2, 1) + 1)


def softmax_func(heads: int, tokens: int):
    """Softmax over the last axis as TVM legalizes it: max, exp of the difference, sum, divide."""
    from tvm import topi

    x = te.placeholder((1, heads, tokens, tokens), name="x")
    return te.create_prim_func([x, topi.nn.softmax(x, axis=-1)])


def layer_norm_func(tokens: int, channels: int):
    from tvm import topi

    x = te.placeholder((1, tokens, channels), name="x")
    g, b = te.placeholder((channels,), name="g"), te.placeholder((channels,), name="b")
    return te.create_prim_func([x, g, b, topi.nn.layer_norm(x, g, b, axis=[-1], epsilon=1e-5)])


@pytest.mark.parametrize("heads, tokens, threaded", [(3, 197, True), (2, 49, False)])
def test_row_rule_computes_softmax_row_by_row_on_ragged_rows(heads, tokens, threaded):
    sch = RowReduction().apply(softmax_func(heads, tokens), host(), False)
    assert sch is not None and ("T.parallel" in sch.mod["main"].script()) == threaded
    x = np.random.default_rng(2).standard_normal((1, heads, tokens, tokens), dtype=np.float32) * 4
    ref = np.exp(x - x.max(-1, keepdims=True))
    np.testing.assert_allclose(run(sch.mod["main"], x, out_shape=x.shape), ref / ref.sum(-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)


def test_row_rule_computes_layer_norm_and_declines_other_reductions():
    sch = RowReduction().apply(layer_norm_func(197, 192), host(), False)
    assert sch is not None
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 197, 192), dtype=np.float32) * 3 + 1
    g, b = rng.standard_normal(192, dtype=np.float32), rng.standard_normal(192, dtype=np.float32)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * g + b
    np.testing.assert_allclose(run(sch.mod["main"], x, g, b, out_shape=x.shape), ref, rtol=1e-4, atol=1e-4)
    assert RowReduction().apply(matmul_bias_gelu(1, 8, 8, 8), host(), False) is None      # reduces a middle axis
    x = te.placeholder((64, 64), name="x")
    y = te.compute((64, 64), lambda i, j: x[j, i] * 2.0, name="t")
    assert RowReduction().apply(te.create_prim_func([x, y]), host(), False) is None      # no reduction


def test_vector_width_follows_the_target_cpu():
    assert fp32_lanes(load_target("rasp4b").tvm_target()) == 4
    assert fp32_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) == 16
    assert fp32_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) == 8


def test_rules_are_tried_in_order_and_all_decline_non_llvm():
    cuda = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    func = matmul_bias_gelu(1, 8, 8, 8)
    assert all(rule.apply(func, cuda, False) is None for rule in cpu_rules())


@pytest.mark.parametrize("lead,row_tile", [((1, 197), 8), ((2, 197), 1), ((1, 7, 7), 1), ((1, 13), 8)])
def test_packed_weight_matmuls_pad_ragged_rows_to_whole_tiles_and_keep_the_numerics(lead, row_tile):
    """A linear + GELU compiled as `compile` does: its weight packed into panels, ViT's 197
    tokens at batch 1 padded to 200 rows (the padding rows read the last real row and are never
    written), 2 x 197 rows spanning two leading axes left unpadded; the GELU fused into the
    matmul's kernel although torch's export puts reshapes around it."""
    import torch

    from edgevit.backend.build import build
    from edgevit.backend.frontend import to_relax
    from edgevit.backend.packed_fp32 import padded_row_tile

    assert padded_row_tile(list(lead), 8) == row_tile
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 64), torch.nn.GELU()).eval()
    x = torch.randn(*lead, 96)
    target = load_target("host")
    mod, weights = to_relax(model, x, target=target)
    assert any("matmul_panels" in gv.name_hint for gv in mod.functions)
    from edgevit.backend.schedules import fused_module

    fused = [gv.name_hint for gv in fused_module(mod, target.tvm_target()).functions]
    assert any("matmul_panels" in n and "gelu" in n for n in fused), fused   # the GELU in the matmul's kernel
    vm = tvm.relax.VirtualMachine(build(mod, target, None), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(w) for w in weights]).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_full_register_tile_is_8_rows_with_32_vector_registers_and_4_with_16():
    from edgevit.backend.cpu_features import row_tile, vector_registers

    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert [vector_registers(t) for t in (avx512, avx2, arm)] == [32, 16, 32]
    assert [row_tile(t) for t in (avx512, avx2, arm)] == [8, 4, 8]


def test_cpu_targets_let_llvm_reassociate_float_sums_unless_they_say_not_to():
    assert bool(host().attrs["fast-math-reassoc"])
    from edgevit.targets import _with_reassociation

    assert _with_reassociation({"kind": "llvm", "fast-math-reassoc": False})["fast-math-reassoc"] is False
    assert "fast-math-reassoc" not in _with_reassociation({"kind": "cuda"})


def test_tvm_gets_one_thread_per_physical_core_unless_the_user_says(monkeypatch, tmp_path):
    from edgevit.backend import threads

    siblings = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}          # 2 cores with 2 hyper-threads each
    real_path = threads.Path
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(threads, "Path", lambda p: _FakeSysfs(siblings, p) if "topology" in str(p) else real_path(p))
    assert threads.physical_cores() == 2
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads.use_physical_cores()
    assert threads.os.environ["TVM_NUM_THREADS"] == "2"
    monkeypatch.setenv("TVM_NUM_THREADS", "5")
    threads.use_physical_cores()
    assert threads.os.environ["TVM_NUM_THREADS"] == "5"


class _FakeSysfs:
    def __init__(self, siblings: dict, path):
        self.text = siblings[int(str(path).split("/cpu/cpu")[1].split("/")[0])]

    def read_text(self) -> str:
        return self.text + "\n"
