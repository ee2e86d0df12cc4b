"""k-means codebooks and product quantization: fitting, fine-tuning, the quantized checkpoint, and
the compiled kernels that decode codes inside the matmul (host numerics, stored bytes, CUDA build)."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgevit.checkpoint import Checkpoint
from edgevit.cli import cli
from edgevit.codebooks import LayerCodebook, codebook_layers, finetune_codebooks, fit_kmeans, fit_pq, record_problem
from edgevit.data import load_data
from edgevit.quantization import apply_quantization, quantizable_layers
from edgevit.quantize import QuantizeConfig, quantize
from edgevit.targets import load_target

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def digits32():
    return load_data("digits", 32)


@pytest.fixture(scope="module")
def kmeans4(swin_micro_digits, digits32, tmp_path_factory):
    return quantize(swin_micro_digits, digits32, tmp_path_factory.mktemp("q") / "km", None,
                    QuantizeConfig(scheme="kmeans", bits=4, eval_images=200), **QUIET)


@pytest.fixture(scope="module")
def pq8(swin_micro_digits, digits32, tmp_path_factory):
    return quantize(swin_micro_digits, digits32, tmp_path_factory.mktemp("q") / "pq", None,
                    QuantizeConfig(scheme="pq", subvector=8, centroids=64, activation_aware=True, calib_images=64,
                                   eval_images=200), **QUIET)


# ---------------------------------------------------------------------------- fitting


def test_kmeans_recovers_weights_that_take_few_values_exactly():
    values = torch.tensor([-0.5, -0.1, 0.2, 0.7])
    w = values[torch.randint(0, 4, (16, 12))]
    q = fit_kmeans(w, bits=2)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == (16, 12) and q.codebook.shape == (1, 4)
    assert torch.equal(q.decode(), w)
    assert sorted(q.codebook[0].tolist()) == pytest.approx(sorted(values.tolist()))


def test_kmeans_groups_get_their_own_codebooks():
    w = torch.cat([torch.randn(8, 10), 100 + torch.randn(8, 10)])     # two groups 100 apart
    q = fit_kmeans(w, bits=3, groups=2)
    assert q.codebook.shape == (2, 8)
    assert q.codebook[0].abs().max() < 10 and q.codebook[1].min() > 90
    assert (q.decode() - w).abs().max() < 1.5


def test_pq_recovers_layers_built_from_few_subvectors_exactly():
    atoms = torch.randn(8, 4)
    w = atoms[torch.randint(0, 8, (32, 6))].reshape(32, 24)           # 6 sub-vectors of 4 per row
    q = fit_pq(w, subvector=4, centroids=8)
    assert q.codes.shape == (32, 6) and q.codebook.shape == (8, 4)
    torch.testing.assert_close(q.decode(), w)


def test_pq_codebook_is_never_bigger_than_a_quarter_of_the_sub_vectors():
    q = fit_pq(torch.randn(8, 32), subvector=8, centroids=256)        # 32 sub-vectors
    assert q.codebook.shape == (8, 8) and int(q.codes.max()) < 8


def test_activation_aware_weighting_favours_columns_that_see_large_inputs():
    torch.manual_seed(0)
    w = torch.randn(64, 16)
    importance = torch.ones(16)
    importance[:4] = 1e4                                                # the first 4 inputs dominate
    plain, aware = fit_kmeans(w, 2), fit_kmeans(w, 2, importance=importance)
    err = lambda q: (q.decode() - w)[:, :4].pow(2).mean()               # noqa: E731
    assert err(aware) < err(plain)


def test_layers_the_kernels_cannot_tile_stay_fp32():
    layers = {"a": nn.Linear(16, 16), "head": nn.Linear(16, 10), "b": nn.Linear(20, 8), "c": nn.Linear(8, 8)}
    keep, skipped = codebook_layers(layers, "pq", 8)
    assert list(keep) == ["a"]
    assert "10 outputs" in skipped["head"] and "20 inputs" in skipped["b"] and "whole rows" in skipped["c"]
    assert "split into 3 groups" in codebook_layers({"d": nn.Linear(8, 16)}, "kmeans", 8, groups=3)[1]["d"]


def test_finetuning_moves_centroids_by_the_sum_of_their_members_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4, bias=False)
    q = fit_kmeans(layer.weight, bits=2)
    model = apply_quantization(nn.Sequential(layer), {"0": q})
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    # the expected step: SGD-equivalent direction of Adam's first step is sign(sum of member grads)
    w = q.decode().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(x @ w.t(), y).backward()
    member_sum = torch.zeros(4).index_add_(0, q.codes.long().reshape(-1), w.grad.reshape(-1))
    tuned = finetune_codebooks(model, {"0": q}, iter([(x, y)]), steps=1, lr=1e-3)["0"]
    step = tuned.codebook[0] - q.codebook[0]
    assert torch.equal(tuned.codes, q.codes)
    moved = member_sum.abs() > 1e-6
    assert torch.equal(torch.sign(step[moved]), -torch.sign(member_sum[moved]))
    torch.testing.assert_close(model[0].weight.detach(), tuned.decode())


def test_damaged_codebook_records_are_named():
    q = fit_kmeans(torch.randn(8, 8), bits=3).to_dict()
    assert record_problem("l", q) is None
    assert "codes and codebook" in record_problem("l", {**q, "shape": [8, 9]})
    assert "uint8 codes" in record_problem("l", {**q, "codes": q["codes"].float()})


# ---------------------------------------------------------------------------- the verb and the checkpoint


def test_kmeans_checkpoint_records_sizes_and_round_trips(kmeans4, swin_micro_digits):
    r = kmeans4.record
    assert r["scheme"] == "kmeans" and r["weight_bytes"]["fp32"] / r["weight_bytes"]["kmeans"] > 7.0
    assert r["top1"]["val"]["kmeans"] >= r["top1"]["val"]["fp32"] - 5
    ckpt = Checkpoint.load(kmeans4.folder / "model.pt")
    assert ckpt.scheme == "kmeans" and ckpt.digest() == r["checkpoint"]
    model, fp32 = ckpt.build_model(), ckpt.build_model(quantized=False)
    for name, d in ckpt.quantization["layers"].items():
        q = LayerCodebook.from_dict(d)
        coded, original = model.get_submodule(name).weight, fp32.get_submodule(name).weight
        assert torch.equal(coded, q.decode()) and not torch.equal(coded, original)
        assert len(torch.unique(coded)) <= 16
    assert set(r["fp32_layers"]) == {"head.fc"}                          # 10 classes: not a multiple of 4


def test_finetuned_pq_keeps_codes_and_reports_before_and_after(swin_micro_digits, digits32, tmp_path):
    plain = quantize(swin_micro_digits, digits32, tmp_path / "a", None,
                     QuantizeConfig(scheme="pq", subvector=4, centroids=16, eval_images=100), **QUIET)
    tuned = quantize(swin_micro_digits, digits32, tmp_path / "b", None,
                     QuantizeConfig(scheme="pq", subvector=4, centroids=16, eval_images=100, finetune=0.2), **QUIET)
    assert tuned.record["top1"]["val"]["before_finetune"] == plain.record["top1"]["val"]["pq"]
    a, b = plain.checkpoint.quantization["layers"], tuned.checkpoint.quantization["layers"]
    assert all(torch.equal(a[n]["codes"], b[n]["codes"]) for n in a)
    assert any(not torch.equal(a[n]["codebook"], b[n]["codebook"]) for n in a)


def test_cli_rejects_options_of_another_scheme(swin_micro_digits, tmp_path):
    path = tmp_path / "m.pt"
    swin_micro_digits.save(path)
    res = CliRunner().invoke(cli, ["quantize", "--checkpoint", str(path), "--scheme", "pq", "--bits", "4",
                                   "-o", str(tmp_path / "q")])
    assert res.exit_code == 2 and "--bits" in res.output and "pq" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["quantize", "--checkpoint", str(path), "--scheme", "kmeans", "--method", "mse",
                                   "-o", str(tmp_path / "q")])
    assert res.exit_code == 2 and "--method" in res.output


def test_cli_quantize_kmeans_writes_json(swin_micro_digits, tmp_path):
    path = tmp_path / "m.pt"
    swin_micro_digits.save(path)
    res = CliRunner().invoke(cli, ["quantize", "--checkpoint", str(path), "--scheme", "kmeans", "--bits", "3",
                                   "-o", str(tmp_path / "q"), "--json", str(tmp_path / "q.json")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "q.json").read_text())
    assert out["weight_bytes"]["fp32"] / out["weight_bytes"]["kmeans"] > 7.0     # 3-bit codes stored in 4 bits


# ---------------------------------------------------------------------------- the compiled kernels


@given(bits=st.sampled_from([2, 4, 8]), n_blocks=st.integers(1, 6), k=st.integers(1, 9), seed=st.integers(0, 99))
@settings(max_examples=40, deadline=None)
def test_packed_codes_round_trip(bits, n_blocks, k, seed):
    from edgevit.backend.codebook_kernels import Layout, pack_codes, unpack_codes

    n = n_blocks * 4
    codes = torch.from_numpy(np.random.default_rng(seed).integers(0, 1 << bits, (n, k), dtype=np.uint8))
    q = LayerCodebook("kmeans", codes, torch.zeros(1, 1 << bits), (n, k))
    layout = Layout("kmeans", k, n, 1 << bits, code_bits=bits)
    packed = pack_codes(q, layout)
    assert packed.shape == (k, n * bits // 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack_codes(packed, layout), codes.numpy())


def _layer(scheme: str, k: int, n: int, **kw) -> tuple[nn.Module, LayerCodebook]:
    layer = nn.Linear(k, n)
    q = fit_pq(layer.weight, **kw) if scheme == "pq" else fit_kmeans(layer.weight, **kw)
    return apply_quantization(nn.Sequential(layer), {"0": q}).eval(), q


@pytest.mark.tvm
@pytest.mark.parametrize("mcpu", ["native", "haswell"])              # AVX-512 (16 lanes), AVX2 (8 lanes)
@pytest.mark.parametrize("scheme,rows,k,n,kw", [
    ("kmeans", 197, 192, 48, {"bits": 4}),                          # ragged rows (ViT's 197 tokens)
    ("kmeans", 5, 64, 36, {"bits": 2, "groups": 3}),                  # 2-bit, grouped, columns % 8 == 4
    ("kmeans", 49, 32, 96, {"bits": 3}),                              # 3-bit codes in 4-bit slots
    ("kmeans", 20, 64, 64, {"bits": 2, "groups": 2}),                 # vector lookups, group per 32 columns
    ("kmeans", 1, 24, 16, {"bits": 8}),
    ("pq", 64, 128, 32, {"subvector": 8, "centroids": 32}),
    ("pq", 7, 48, 20, {"subvector": 16, "centroids": 4}),
    ("pq", 197, 192, 64, {"subvector": 4, "centroids": 256}),
])
def test_codebook_kernels_match_the_decoded_layer(scheme, rows, k, n, kw, mcpu):
    """The decode-in-kernel matmul (scheduled by CodebookMatmul, not left to the generic rules)
    equals the PyTorch layer with decoded weights, and takes codes and codebooks, not fp32 weights;
    on AVX-512 a 16-entry k-means codebook is looked up 16 weights per permute instruction."""
    import tvm
    from tvm import relax

    from edgevit.backend.codebook_kernels import Layout, codebook_matmul, layout_of, vector_decodable
    from edgevit.backend.codebook_rules import CodebookMatmul
    from edgevit.backend.frontend import to_relax
    from edgevit.backend.schedules import relax_pipeline
    from edgevit.targets import _resolve_native

    torch.manual_seed(rows + k + n)
    model, q = _layer(scheme, k, n, **kw)
    x = torch.randn(1, rows, k)
    mod, weights = to_relax(model, x)
    assert not any(w.dtype == np.float32 and w.size == k * n for w in weights)
    assert any(w.dtype == np.uint8 for w in weights)
    target = tvm.target.Target(_resolve_native({"kind": "llvm", "mcpu": mcpu}))
    layout = layout_of(q)
    assert isinstance(layout, Layout) and CodebookMatmul().apply(codebook_matmul(rows, layout), target, False)
    with tvm.transform.PassContext(opt_level=3):
        exe = relax.build(mod, target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(w) for w in weights]).numpy()
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    asm = "\n".join(m.inspect_source("s") for m in exe.mod.imports if m.kind == "llvm")
    vector = vector_decodable(layout) and mcpu == "native"
    assert bool(re.search(r"\tvperm(d|ps)\s+%zmm", asm)) == vector


@pytest.mark.tvm
@pytest.mark.slow
def test_codebook_artifacts_validate_and_store_codes(kmeans4, pq8, swin_micro_digits, tmp_path):
    import tvm

    from edgevit.compile import CompileConfig, compile_model

    host = load_target("host")
    fp32 = compile_model(swin_micro_digits, host, tmp_path / "fp32", None, CompileConfig(), **QUIET)
    fp32_bytes = (tmp_path / "fp32" / "weights.params").stat().st_size
    for q, ratio in ((kmeans4, 3.5), (pq8, 2.0)):     # a 37k-parameter model: biases and norms weigh in
        scheme = q.record["scheme"]
        art = compile_model(q.checkpoint, host, tmp_path / scheme, None,
                            CompileConfig(extra_batches=(3,), min_fp32_agreement=0), **QUIET)
        m = art.manifest
        assert m.encoding == scheme and m.tolerance.max_abs_error == 1e-3
        for suffix in ("val images", "val images, batch 3"):
            real = next(v for key, v in m.validation.items() if key.endswith(suffix))
            assert real["max_abs_error"] < 1e-4 and real["top1_agreement"] == 100.0
        params = tvm.runtime.load_param_dict((tmp_path / scheme / "weights.params").read_bytes())
        layers = [LayerCodebook.from_dict(d) for d in q.checkpoint.quantization["layers"].values()]
        coded = sum(p.numpy().nbytes for p in params.values() if p.dtype == "uint8")
        assert coded == sum(x.artifact_bytes() - x.codebook.numel() * 4 for x in layers)
        dense = {(int(np.prod(x.shape[1:])), x.shape[0]) for x in layers}          # (K, N) as the graph holds them
        assert not any(p.dtype == "float32" and tuple(p.shape) in dense for p in params.values())
        assert fp32_bytes / (tmp_path / scheme / "weights.params").stat().st_size > ratio
    assert fp32.manifest.encoding == "fp32"


@pytest.mark.tvm
def test_codebook_kernels_for_a_jetson_keep_the_codebook_in_shared_memory(kmeans4, tmp_path):
    from edgevit.compile import CompileConfig, compile_model

    art = compile_model(kmeans4.checkpoint, load_target("jetson-orin"), tmp_path / "orin", None, CompileConfig(),
                        **QUIET)
    assert art.manifest.encoding == "kmeans"
    kernels = {k["name"]: k for k in art.manifest.cuda["kernels"]} if isinstance(art.manifest.cuda["kernels"], list) \
        else art.manifest.cuda["kernels"]
    coded = [k for name, k in kernels.items() if name.startswith("codebook_matmul")]
    assert coded and all(k["shared_bytes"] == 16 * 4 and k["spill_store_bytes"] == 0 for k in coded)


def test_quantizable_layers_of_a_swin_include_its_patch_conv(swin_micro_digits):
    names = list(quantizable_layers(swin_micro_digits.build_model()))
    assert names[0] == "patch_embed.proj"


def test_report_and_latency_key_describe_codebook_checkpoints(kmeans4, pq8, swin_micro_digits):
    from edgevit.latency import table_key
    from edgevit.report import quantization_section

    section = quantization_section(json.loads(json.dumps(kmeans4.record)))     # as report reads it: JSON
    assert section.title == "Quantization (kmeans)" and "4-bit k-means" in section.blocks[0]
    assert "weight SQNR" in section.blocks[-1].items[0]
    host = load_target("host")
    keys = {table_key(c, host, 1, "rules")["encoding"] for c in (swin_micro_digits, kmeans4.checkpoint, pq8.checkpoint)}
    assert len(keys) == 3 and "fp32" in keys          # a codebook table is never another layout's


def test_a_record_of_an_unknown_scheme_is_one_line(kmeans4, tmp_path):
    from edgevit.errors import CheckpointError

    ckpt = Checkpoint.load(kmeans4.folder / "model.pt")
    torch.save({**torch.load(kmeans4.folder / "model.pt", weights_only=True),
                "quantization": {**ckpt.quantization, "scheme": "int4"}}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="unknown scheme 'int4'"):
        Checkpoint.load(tmp_path / "bad.pt")


@pytest.mark.tvm
def test_codebook_kernels_use_tbl_lookups_on_arm():
    """NEON: a 16-entry k-means codebook (64 bytes, four registers) is looked up 4 floats per `tbl`
    (the numbers: the emulated board test); PQ's 256-entry codebooks keep scalar lookups."""
    import tvm
    from tvm import relax

    from edgevit.backend.frontend import to_relax
    from edgevit.backend.schedules import relax_pipeline

    target = load_target("rasp4b")
    tvm_target = target.tvm_target()
    asm = {}
    for scheme, kw in (("kmeans", {"bits": 4}), ("pq", {"subvector": 8, "centroids": 64})):
        torch.manual_seed(0)
        model, _ = _layer(scheme, 64, 32, **kw)
        mod, _ = to_relax(model, torch.randn(1, 8, 64), target=target)
        with tvm.transform.PassContext(opt_level=3):
            exe = relax.build(mod, tvm_target, relax_pipeline=relax_pipeline(tvm_target))
        asm[scheme] = "\n".join(m.inspect_source("s") for m in exe.mod.imports if m.kind == "llvm")
    assert asm["kmeans"].count("\ttbl\t") >= 4 and "\ttbl\t" not in asm["pq"]
