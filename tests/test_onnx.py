"""ONNX in: a model a user exported (timm's ViT through torch's exporter: not edgevit's graph)
compiles, matches ONNX Runtime, benchmarks; ONNX Runtime's own QDQ quantizer output compiles
to int8 kernels; what cannot be imported is named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgevit.cli import cli
from edgevit.compile import CompileConfig, compile_onnx
from edgevit.errors import CheckpointError, ConfigError
from edgevit.onnx_model import OnnxModel, dequantized_graph, ort_reference, ort_session
from edgevit.targets import load_target

USER_ONNX = Path(__file__).parent / "fixtures" / "reference" / "timm_vit_small.onnx"   # (N, 3, 32, 32) -> (N, 10)
pytestmark = pytest.mark.tvm


def quiet(_):
    pass


@pytest.fixture(scope="module")
def qdq_onnx(tmp_path_factory) -> Path:
    return make_qdq(tmp_path_factory.mktemp("qdq") / "vit_qdq.onnx")


def make_qdq(out: Path) -> Path:
    """USER_ONNX through ONNX Runtime's static quantizer: per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Calibration(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{"input": rng.standard_normal((1, 3, 32, 32), dtype=np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(USER_ONNX), str(out), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                    op_types_to_quantize=["MatMul", "Gemm"], extra_options={"WeightSymmetric": True})
    return out


def test_user_onnx_compiles_and_matches_onnxruntime(tmp_path):
    model = OnnxModel.load(USER_ONNX)
    assert model.input_shape == (None, 3, 32, 32)
    art = compile_onnx(model, load_target("host"), tmp_path / "art", CompileConfig(batch=2, extra_batches=(4,)),
                       log=quiet)
    m = art.manifest
    assert m.encoding == "fp32" and m.model["stage"] == "onnx" and m.inputs["onnx"] == model.sha256
    assert m.batches == (2, 4) and m.output["shape"] == [2, 10]
    for figures in (m.validation["random"], m.validation["random, second seed"]):
        assert figures["max_abs_error"] <= 1e-4 and figures["top1_agreement"] == 100.0
    # the stored reference is ONNX Runtime's own output for the stored input
    x, y = art.reference()
    np.testing.assert_allclose(y, ort_reference(ort_session(USER_ONNX))(x), atol=1e-6)


def test_onnx_artifact_benchmarks_from_the_cli(tmp_path):
    out = tmp_path / "art"
    r = CliRunner().invoke(cli, ["compile", "--target", "host", "--onnx", str(USER_ONNX), "-o", str(out),
                                 "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "--json", str(tmp_path / "c.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c.json").read_text())["encoding"] == "fp32"
    assert json.loads((out / "manifest.json").read_text())["input"]["mean"] == [0.5, 0.5, 0.5]
    r = CliRunner().invoke(cli, ["bench", str(out), "--duration", "0.3", "-o", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b.json").read_text())["throughput_ips"] > 0


def test_onnxruntime_qdq_model_compiles_to_int8_kernels(qdq_onnx, tmp_path):
    """ORT's QDQ layers are found (8 block linears + the head), their weights stored as int8, and
    the artifact computes what ORT computes with the QDQ nodes as written."""
    import tvm

    _, layers = dequantized_graph(onnx.load(str(qdq_onnx)))
    assert len(layers) == 9
    art = compile_onnx(OnnxModel.load(qdq_onnx), load_target("host"), tmp_path / "art", CompileConfig(batch=1),
                       log=quiet)
    assert art.manifest.encoding == "int8"
    figures = art.manifest.validation["random"]
    assert figures["max_abs_error"] <= art.manifest.tolerance.max_abs_error and figures["top1_agreement"] >= 99
    params = tvm.runtime.load_param_dict((art.path / "weights.params").read_bytes())
    int8_bytes = sum(p.numpy().nbytes for p in params.values() if p.dtype == "int8")
    weight_count = sum(q.qweight.numel() for _, q in layers.values())
    assert int8_bytes >= weight_count     # every quantized weight travels as int8 (panels may pad)


def test_dequantized_graph_is_the_qdq_model_in_float(qdq_onnx, tmp_path):
    """Reading QDQ layers back loses nothing: with the weights dequantized and the activation Q/DQ
    bypassed, ORT's output moves only by the activation rounding the int8 kernels put back."""
    graph, layers = dequantized_graph(onnx.load(str(qdq_onnx)))
    path = tmp_path / "float.onnx"
    onnx.save(graph, str(path))
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32), dtype=np.float32)
    fp32 = ort_reference(ort_session(USER_ONNX))(x)
    deq = ort_reference(ort_session(path, optimize=False))(x)
    qdq = ort_reference(ort_session(qdq_onnx, optimize=False))(x)
    assert np.abs(deq - fp32).max() < np.abs(qdq - fp32).max() + 0.05
    weights = {n.input[1] for n in graph.graph.node if n.op_type in ("MatMul", "Gemm")}
    assert sum(w.endswith("_dequantized") for w in weights) == len(layers)    # fp32 initializers, no DQ
    for weight, quant in layers.values():
        np.testing.assert_allclose(weight, quant.qweight.numpy() * quant.weight_scale.numpy()[:, None], rtol=1e-6)


def test_unsupported_operator_is_named(tmp_path):
    """One line: which node, which op."""
    model = onnx.load(str(USER_ONNX))
    model.graph.node[3].op_type = "FancyNorm"
    model.graph.node[3].name = "my_fancy_node"
    path = tmp_path / "fancy.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ConfigError, match="node 'my_fancy_node' uses operator FancyNorm"):
        compile_onnx(OnnxModel.load(path), load_target("host"), tmp_path / "art", log=quiet)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("make, error, message", [
    (lambda p: p.write_text("not a model"), CheckpointError, "not a readable ONNX model"),
    (lambda p: None, CheckpointError, "no such ONNX file"),
])
def test_bad_onnx_files(tmp_path, make, error, message):
    path = tmp_path / "m.onnx"
    make(path)
    with pytest.raises(error, match=message):
        OnnxModel.load(path)


def test_open_sizes_need_an_input_shape(tmp_path):
    model = onnx.load(str(USER_ONNX))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    path = tmp_path / "open.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ConfigError, match="pass --input-shape"):
        OnnxModel.load(path)
    assert OnnxModel.load(path, (1, 3, 32, 32)).input_shape == (None, 3, 32, 32)
    with pytest.raises(ConfigError, match="fixes its input"):
        OnnxModel.load(USER_ONNX, (1, 3, 64, 64))


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "x.pt"], "drop --checkpoint"),
    (["--mean", "0.5"], "--mean has 1 values; the model takes 3 channels"),
    ([], "pass -o/--out"),
])
def test_onnx_cli_errors(args, message, tmp_path):
    out = [] if message == "pass -o/--out" else ["-o", str(tmp_path / "art")]
    r = CliRunner().invoke(cli, ["compile", "--target", "host", "--onnx", str(USER_ONNX), *out, *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("target", ["jetson-orin", "rasp4b"])
def test_user_onnx_builds_for_device_targets(target, tmp_path):
    """Every target kind builds it (CUDA source for the Jetson, aarch64 code for the Pi); the
    check runs on the device (`verify`), which the manifest says."""
    art = compile_onnx(OnnxModel.load(USER_ONNX), load_target(target), tmp_path / "art", log=quiet)
    assert "skipped" in art.manifest.validation and art.manifest.target["name"] == target
    assert art.library.stat().st_size > 0


def test_quantize_onnx_writes_qdq_that_compiles_to_int8(tmp_path):
    """edgevit's own calibration on an fp32 ONNX file: every constant-weight MatMul/Gemm as QDQ,
    reported against the fp32 file, and the result compiles to int8 kernels."""
    import torch

    from edgevit.models import create_model

    torch.manual_seed(0)
    model = create_model("vit_micro").eval()          # 1x16x16 -> 10: the bundled digits' shape
    fp32 = tmp_path / "user.onnx"
    torch.onnx.export(model, (torch.zeros(1, 1, 16, 16),), str(fp32), input_names=["pixels"], dynamo=False,
                      dynamic_axes={"pixels": {0: "n"}})
    out = tmp_path / "user_int8.onnx"
    r = CliRunner().invoke(cli, ["quantize", "--onnx", str(fp32), "--data", "digits", "--calib-images", "64",
                                 "-o", str(out), "--json", str(tmp_path / "q.json")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "q.json").read_text())
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert result["layers"] == n_linear and set(result["top1"]) == {"fp32", "int8"}
    assert result["top1_agreement_with_fp32"] >= 90
    _, layers = dequantized_graph(onnx.load(str(out)))
    assert len(layers) == n_linear
    art = compile_onnx(OnnxModel.load(out), load_target("host"), tmp_path / "art", CompileConfig(images=16),
                       data="digits", log=quiet)
    assert art.manifest.encoding == "int8" and art.manifest.reference["source"] == "digits val images"
    r = CliRunner().invoke(cli, ["quantize", "--onnx", str(fp32), "-o", str(out)])
    assert r.exit_code == 2 and "pass --data SPEC" in r.output


def _vit_micro_onnx(path: Path, opset: int, keep_initializers_as_inputs: bool = False) -> Path:
    import torch

    from edgevit.models import create_model

    torch.manual_seed(0)
    torch.onnx.export(create_model("vit_micro").eval(), (torch.zeros(1, 1, 16, 16),), str(path),
                      input_names=["pixels"], dynamo=False, opset_version=opset,
                      keep_initializers_as_inputs=keep_initializers_as_inputs)
    return path


@pytest.mark.parametrize("opset, inputs, code, message", [
    (12, False, 2, "opset 12; per-channel QDQ needs opset 13"),
    (13, True, 0, None),           # weights also listed as graph inputs: they stay optional, never required
])
def test_quantize_onnx_old_exports(opset, inputs, code, message, tmp_path):
    src = _vit_micro_onnx(tmp_path / "m.onnx", opset, inputs)
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(cli, ["quantize", "--onnx", str(src), "--data", "digits", "--calib-images", "16",
                                 "-o", str(out)])
    assert r.exit_code == code and "Traceback" not in r.output, r.output
    if message:
        assert message in r.output and not out.exists()
    else:
        session = ort_session(out)
        assert [i.name for i in session.get_inputs()] == ["pixels"]


def test_graph_onnx_runtime_refuses_is_one_line(tmp_path):
    model = onnx.load(str(USER_ONNX))
    model.graph.node[5].input[0] = "no_such_tensor"
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    r = CliRunner().invoke(cli, ["quantize", "--onnx", str(path), "--data", "digits", "-o", str(tmp_path / "q.onnx")])
    with pytest.raises(ConfigError, match="ONNX Runtime cannot load this graph"):
        ort_session(path)
    assert "Traceback" not in r.output
