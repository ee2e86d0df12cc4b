"""int8 quantization: the integer math, equalisation, calibration, the quantized checkpoint, and
the compiled int8 artifact (packed panels, VNNI and plain kernels) against the fake-quantized model."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgevit.checkpoint import Checkpoint
from edgevit.cli import cli
from edgevit.data import load_data
from edgevit.errors import ConfigError
from edgevit.models import create_model
from edgevit.quantization import (
    LayerQuant,
    activation_params,
    apply_quantization,
    equalize,
    fit_range,
    float_view,
    quantizable_layers,
    quantize_u8,
    sqnr_db,
    weight_int8,
)
from edgevit.quantize import QuantizeConfig, QuantizedModel, quantize
from edgevit.targets import load_target
from edgevit.train import TrainConfig, train


@pytest.fixture(scope="module")
def data():
    return load_data("digits", 16)


@pytest.fixture(scope="module")
def fp32_ckpt(data, tmp_path_factory):
    """swin_quickstart trained briefly on digits (16x16)."""
    model = create_model("swin_quickstart")
    return train(model, data, TrainConfig(epochs=2, batch_size=64, lr=3e-3), tmp_path_factory.mktemp("ckpt"),
                 show_progress=False)


@pytest.fixture(scope="module")
def quantized(fp32_ckpt, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    return quantize(fp32_ckpt, data, out, None, QuantizeConfig(calib_images=128), log=lambda _: None)


# ---------------------------------------------------------------------------- integer math


def test_weights_round_trip_within_half_a_step_per_channel():
    w = torch.randn(24, 40) * torch.logspace(-2, 1, 24)[:, None]       # channels 1000x apart in range
    q, scale = weight_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * scale[:, None] - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-7)


def test_activation_range_always_holds_zero_exactly():
    for lo, hi in ((0.3, 5.0), (-4.0, -0.5), (-1.7, 3.2)):
        scale, z = activation_params(lo, hi)
        assert 0 <= z <= 255
        assert float(quantize_u8(torch.zeros(1), 1 / scale, z)) == z    # 0 -> code z -> exactly 0 again


def test_range_fits_clip_outliers_and_mse_has_the_least_error():
    torch.manual_seed(0)
    values = torch.distributions.StudentT(2.0).sample((30000,))          # heavy-tailed, as ViT activations

    def error(lo_hi):
        scale, z = activation_params(*lo_hi)
        return float(((quantize_u8(values, 1 / scale, z) - z) * scale - values).pow(2).mean())

    minmax, pct, mse = (fit_range(values, m, 99.9) for m in ("minmax", "percentile", "mse"))
    assert minmax == (float(values.min()), float(values.max()))
    assert pct[1] < minmax[1] and mse[1] < minmax[1]
    assert error(mse) <= min(error(pct), error(minmax))


def test_quantized_linear_computes_the_exact_integer_sum():
    layer = nn.Linear(48, 20)
    q, ws = weight_int8(layer.weight)
    quant = LayerQuant(q, ws, 0.05, 117)
    twin = apply_quantization(nn.Sequential(layer), {"0": quant})[0]
    x = torch.randn(3, 48) * 3
    codes = quantize_u8(x, quant.inv_input_scale, 117).long() - 117
    acc = codes @ q.long().t()                                          # int64 reference
    expected = acc.float() * quant.output_scale() + layer.bias
    assert torch.equal(twin(x), expected)
    with float_view(nn.Sequential(twin)):
        assert torch.allclose(twin(x), layer(x))


@pytest.mark.parametrize("name", ["vit_micro", "swin_micro", "deit_micro_distilled"])
def test_equalisation_leaves_the_fp32_function_unchanged(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    for m in model.modules():                       # uneven LayerNorm channels, as trained ViTs have
        if isinstance(m, nn.LayerNorm):
            m.weight.data = torch.logspace(-1, 1, m.weight.numel())[torch.randperm(m.weight.numel())]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        before = model(x)
        absmax = {}
        hooks = [ln.register_forward_hook(lambda _m, _i, o, n=n: absmax.__setitem__(n, o.abs().reshape(-1, o.shape[-1]).amax(0)))
                 for n, ln in model.named_modules() if isinstance(ln, nn.LayerNorm)]
        model(x)
        for h in hooks:
            h.remove()
        spread = equalize(model, absmax)
        after = model(x)
    assert spread, "no LayerNorm -> linear pair was found"
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-4)
    assert all(new < old for old, new in spread.values())


def test_sqnr_of_an_exact_copy_is_infinite_and_falls_with_noise():
    y = torch.randn(1000)
    assert sqnr_db(y, y) == float("inf")
    assert 18 < sqnr_db(y, y + 0.1 * torch.randn(1000)) < 22


def test_keep_fp32_patterns_select_layers():
    model = create_model("vit_micro")
    assert "head" in quantizable_layers(model) and "patch_embed.proj" in quantizable_layers(model)
    kept = quantizable_layers(model, ("head", "*.mlp.*"))
    assert "head" not in kept and not any(".mlp." in n for n in kept) and "blocks.0.attn.qkv" in kept


# ---------------------------------------------------------------------------- the verb and its artifact


def test_quantize_records_what_it_did_and_keeps_accuracy(quantized, fp32_ckpt):
    r = quantized.record
    names = set(quantizable_layers(fp32_ckpt.build_model()))
    assert set(r["layers"]) == names and r["scheme"] == "int8"
    assert all(v["sqnr_db"] > 25 for v in r["layers"].values())
    for split in ("val", "test"):
        assert abs(r["top1"][split]["int8"] - r["top1"][split]["fp32"]) <= 3.0
    assert r["weight_bytes"]["fp32"] / r["weight_bytes"]["int8"] > 3.5
    assert r["source_checkpoint"] == fp32_ckpt.digest() and r["checkpoint"] == quantized.checkpoint.digest()


def test_quantized_checkpoint_round_trips_and_runs_as_int8(quantized, fp32_ckpt):
    ckpt = Checkpoint.load(quantized.folder / "model.pt")
    assert ckpt.scheme == "int8" and fp32_ckpt.scheme == "fp32" and ckpt.digest() != fp32_ckpt.digest()
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        int8, fp32, source = ckpt.build_model().eval()(x), ckpt.build_model(quantized=False).eval()(x), \
            fp32_ckpt.build_model().eval()(x)
    assert torch.allclose(fp32, source, atol=1e-4)        # equalised fp32 weights: the same function
    assert not torch.equal(int8, fp32) and (int8.argmax(1) == fp32.argmax(1)).float().mean() >= 0.75


def test_quantizing_twice_is_refused(quantized, data, tmp_path):
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(quantized.checkpoint, data, tmp_path / "again", None, QuantizeConfig(calib_images=8))


def test_quantize_never_replaces_a_folder_it_did_not_write(fp32_ckpt, data, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(Exception, match="does not replace"):
        quantize(fp32_ckpt, data, tmp_path / "mine", None, QuantizeConfig(calib_images=8))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cli_quantize_lists_layers_and_names_bad_patterns(fp32_ckpt, tmp_path):
    path = fp32_ckpt.save(tmp_path / "fp32.pt")
    runner = CliRunner()
    listed = runner.invoke(cli, ["quantize", "--checkpoint", str(path), "--list-layers"])
    assert listed.exit_code == 0 and "layers.0.blocks.0.attn.qkv" in listed.output
    bad = runner.invoke(cli, ["quantize", "--checkpoint", str(path), "--keep-fp32", "hed*", "-o", str(tmp_path / "q")])
    assert bad.exit_code == 2 and "matches no layer" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()


def test_cli_quantize_writes_json(fp32_ckpt, tmp_path):
    path = fp32_ckpt.save(tmp_path / "fp32.pt")
    result = CliRunner().invoke(cli, ["quantize", "--checkpoint", str(path), "--calib-images", "64", "--method",
                                      "percentile", "--keep-fp32", "head.fc", "-o", str(tmp_path / "q"),
                                      "--json", str(tmp_path / "q.json")])
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "q.json").read_text())
    assert "head.fc" not in out["layers"] and "test" in out["top1"]
    assert QuantizedModel.load(tmp_path / "q").record["fp32_layers"] == ["head.fc"]


# ---------------------------------------------------------------------------- compiled int8


@pytest.mark.tvm
def test_int8_artifact_matches_the_fake_quantized_model_and_stores_int8(quantized, fp32_ckpt, tmp_path):
    import tvm

    from edgevit.compile import CompileConfig, compile_model
    from edgevit.targets import load_target

    fp32 = compile_model(fp32_ckpt, load_target("host"), tmp_path / "fp32", None, CompileConfig(), log=lambda _: None)
    art = compile_model(quantized.checkpoint, load_target("host"), tmp_path / "int8", None,
                        CompileConfig(extra_batches=(3,)), log=lambda _: None)
    m = art.manifest
    assert m.encoding == "int8" and m.tolerance.max_abs_error == 0.1 and m.batches == (1, 3)
    for suffix in ("val images", "val images, batch 3"):     # the batch-3 function shares the int8 weights
        real = next(v for k, v in m.validation.items() if k.endswith(suffix))
        assert real["max_abs_error"] < 0.05 and real["top1_agreement"] == 100.0
    assert m.validation["fp32_model"]["top1_agreement"] >= 95.0
    params = tvm.runtime.load_param_dict((tmp_path / "int8" / "weights.params").read_bytes())
    int8_bytes = sum(p.numpy().nbytes for p in params.values() if p.dtype == "int8")
    assert int8_bytes >= sum(q.qweight.numel() for q in
                             map(LayerQuant.from_dict, quantized.checkpoint.quantization["layers"].values()))
    assert (tmp_path / "int8" / "weights.params").stat().st_size < 0.5 * (tmp_path / "fp32" / "weights.params").stat().st_size
    assert fp32.manifest.encoding == "fp32"


@pytest.mark.tvm
def test_int8_artifact_for_a_jetson_carries_int8_weights(quantized, tmp_path):
    import tvm

    from edgevit.compile import CompileConfig, compile_model

    art = compile_model(quantized.checkpoint, load_target("jetson-orin"), tmp_path / "jetson", None, CompileConfig(),
                        log=lambda _: None)
    assert art.manifest.encoding == "int8" and "skipped" in art.manifest.validation
    params = tvm.runtime.load_param_dict((tmp_path / "jetson" / "weights.params").read_bytes())
    int8 = [p.numpy() for p in params.values() if p.dtype == "int8"]
    layers = [LayerQuant.from_dict(d) for d in quantized.checkpoint.quantization["layers"].values()]
    assert len(int8) == len(layers) and all(w.ndim == 3 and w.shape[2] == 4 for w in int8)   # (K'/4, N, 4)
    assert sum(w.size for w in int8) >= sum(q.qweight.numel() for q in layers)


@pytest.mark.tvm
@pytest.mark.parametrize("mcpu,encoded_for", [
    ("native", None),       # VNNI here (tensorized), u8 activations
    ("haswell", None),      # AVX2: LLVM-vectorised
    ("native", "rasp5"),    # the s8 activations ARM's sdot takes (the kernel itself: test_int8_kernels_use_sdot...)
    ("native", "jetson-orin"),  # the GPU layout (K/4, N, 4), s8 (the dp4a kernel: test_int8_kernels_use_dp4a...)
])
@pytest.mark.parametrize("rows,k,n", [(5, 64, 32), (197, 192, 48), (1, 12, 10), (3, 4, 16), (7, 27, 32)])
def test_int8_kernels_are_exact_on_ragged_shapes(rows, k, n, mcpu, encoded_for):
    """Integer sums are exact, so the compiled layer equals the fake-quantized one up to the last
    float multiply; ragged rows (197 tokens), columns (10 classes) and depth (K % 4) included."""
    import tvm
    from tvm import relax

    from edgevit.backend.frontend import to_relax
    from edgevit.backend.schedules import relax_pipeline
    from edgevit.targets import _resolve_native

    torch.manual_seed(rows + k + n)
    layer = nn.Linear(k, n)
    q, ws = weight_int8(layer.weight)
    model = apply_quantization(nn.Sequential(layer), {"0": LayerQuant(q, ws, 0.03, 100)}).eval()
    x = torch.randn(1, rows, k)
    mod, weights = to_relax(model, x, target=load_target(encoded_for) if encoded_for else None)
    target = tvm.target.Target(_resolve_native({"kind": "llvm", "mcpu": mcpu}))
    with tvm.transform.PassContext(opt_level=3):
        exe = relax.build(mod, target, relax_pipeline=relax_pipeline(target))
    vm = relax.VirtualMachine(exe, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(w) for w in weights]).numpy()
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.tvm
def test_int8_kernels_use_sdot_on_arm_with_dot_products():
    """Cortex-A76 (+dotprod): each 16 x 4 panel step is four `sdot` on s8 activations; the A72 has
    no sdot and gets LLVM's widening multiply-accumulates (the numbers: the emulated board test)."""
    import tvm
    from tvm import relax

    from edgevit.backend.frontend import to_relax
    from edgevit.backend.schedules import relax_pipeline

    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    q, ws = weight_int8(layer.weight)
    model = apply_quantization(nn.Sequential(layer), {"0": LayerQuant(q, ws, 0.03, 100)}).eval()
    asm = {}
    for name in ("rasp5", "rasp4b"):
        target = load_target(name)
        mod, _ = to_relax(model, torch.randn(1, 8, 64), target=target)
        tvm_target = target.tvm_target()
        with tvm.transform.PassContext(opt_level=3):
            exe = relax.build(mod, tvm_target, relax_pipeline=relax_pipeline(tvm_target))
        asm[name] = "\n".join(m.inspect_source("s") for m in exe.mod.imports if m.kind == "llvm")
    kernel = lambda text: text[text.index("matmul_s8s8" if "matmul_s8s8" in text else "matmul_u8s8"):]  # noqa: E731
    assert kernel(asm["rasp5"]).count("sdot\t") >= 4
    assert "sdot" not in asm["rasp4b"] and "matmul_u8s8" in asm["rasp4b"]


@pytest.mark.tvm
@pytest.mark.parametrize("target_name", ["jetson-orin", "jetson-xavier", "cuda-sm80"])
@pytest.mark.parametrize("rows,k,n", [(197, 190, 256), (1, 12, 10)])
def test_int8_kernels_use_dp4a_on_cuda_targets(target_name, rows, k, n):
    """CUDA int8 layers are one kernel each: s8 x s8 dot products 4 bytes at a time (`__dp4a`),
    the dequantize applied as each output is written; no GPU here, so the CUDA source is checked
    (the numbers of the same graph on the CPU: test_int8_kernels_are_exact...)."""
    import tvm
    from tvm import relax

    from edgevit.backend.frontend import to_relax
    from edgevit.backend.schedules import relax_pipeline

    torch.manual_seed(0)
    layer = nn.Linear(k, n)
    q, ws = weight_int8(layer.weight)
    model = apply_quantization(nn.Sequential(layer, nn.GELU()), {"0": LayerQuant(q, ws, 0.03, 100)}).eval()
    target = load_target(target_name)
    mod, weights = to_relax(model, torch.randn(1, rows, k), target=target)
    assert any(w.dtype == np.int8 and w.shape == (-(-k // 4), n, 4) for w in weights)
    tvm_target = target.tvm_target()
    with tvm.transform.PassContext(opt_level=3):
        exe = relax.build(mod, tvm_target, relax_pipeline=relax_pipeline(tvm_target))

    def modules(m):
        return [m, *[x for i in m.imports for x in modules(i)]]

    source = "\n".join(m.inspect_source("") for m in modules(exe.mod) if m.kind == "cuda")
    definition = re.search(r"fused_matmul_s8s8_rows\w*_kernel\([^)]*\)\s*\{", source)
    kernel = source[definition.start():source.index("\n}\n", definition.start())]
    assert "__dp4a(" in kernel and "wmma" not in source
    assert "_scale_ptr[" in kernel and "_comp_ptr[" in kernel    # dequantized as it is written


@pytest.mark.tvm
def test_search_result_for_int8_is_not_compiled_with_the_fp32_checkpoint(fp32_ckpt, tmp_path):
    path = fp32_ckpt.save(tmp_path / "fp32.pt")
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"kind": "edgevit.search_result", "version": 1, "pareto": [],
                                  "sparsity": {"ratios": [0.0, 0.0]}, "inputs": {"scheme": "int8"}}))
    out = CliRunner().invoke(cli, ["compile", "--target", "host", "--checkpoint", str(path), "--sparsity",
                                   str(result), "-o", str(tmp_path / "art")])
    assert out.exit_code == 2 and "searched for the int8 model" in out.output


def test_a_damaged_quantization_record_is_one_line(quantized, tmp_path):
    payload = torch.load(quantized.folder / "model.pt", weights_only=True)
    layer = next(iter(payload["quantization"]["layers"].values()))
    layer["qweight"] = layer["qweight"].float()
    torch.save(payload, tmp_path / "bad.pt")
    from edgevit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="damaged quantization record .*int8 weights"):
        Checkpoint.load(tmp_path / "bad.pt")


def test_training_a_quantized_model_is_refused(quantized, data, tmp_path):
    with pytest.raises(ConfigError, match="quantize the result"):
        train(quantized.checkpoint.build_model(), data, TrainConfig(epochs=1), tmp_path / "t", show_progress=False)


def test_keeping_every_layer_in_fp32_is_refused(fp32_ckpt, data, tmp_path):
    with pytest.raises(ConfigError, match="no layer to quantize"):
        quantize(fp32_ckpt, data, tmp_path / "q", None, QuantizeConfig(calib_images=8, keep_fp32=("*",)))
