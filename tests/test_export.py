"""ONNX out: a checkpoint under a sparsity config, and its int8 scheme as QDQ, run by ONNX Runtime
as PyTorch runs it; the QDQ file compiles back to int8 kernels; users' files are never replaced."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edgevit.checkpoint import Checkpoint
from edgevit.cli import cli
from edgevit.errors import OutputError
from edgevit.export import ExportConfig, export_onnx
from edgevit.models import create_model
from edgevit.quantization import LayerQuant, activation_params, apply_quantization, quantizable_layers, weight_int8
from edgevit.sparsity import SparsityConfig


def quiet(_):
    pass


def random_checkpoint(name: str, **settings) -> Checkpoint:
    torch.manual_seed(0)
    return Checkpoint.from_model(create_model(name, **settings))


def int8_checkpoint(name: str) -> Checkpoint:
    """Every linear int8 with a fixed activation range (what `quantize` would calibrate)."""
    ckpt = random_checkpoint(name)
    model = ckpt.build_model()
    layers = {}
    for layer_name, layer in quantizable_layers(model).items():
        q, scale = weight_int8(layer.weight)
        s, z = activation_params(-3.0, 3.0)
        layers[layer_name] = LayerQuant(q, scale, s, z)
    apply_quantization(model, layers)
    record = {"scheme": "int8", "layers": {n: q.to_dict() for n, q in layers.items()}}
    from dataclasses import replace

    return replace(ckpt, quantization=record)


def test_sparse_swin_exports_and_matches(tmp_path):
    ckpt = random_checkpoint("swin_micro")
    sparsity = SparsityConfig.uniform(ckpt.build_model(), 0.5)
    result = export_onnx(ckpt, tmp_path / "m.onnx", sparsity, ExportConfig(batch=2, images=8), log=quiet)
    assert result["check"]["max_abs_error"] <= 1e-4 and result["sparsity"] == sparsity.to_dict()
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert proto.producer_name == "edgevit"
    assert {"GatherElements", "ScatterElements"} <= {n.op_type for n in proto.graph.node}   # windows kept, in the graph
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == [2, 1, 16, 16]
    # a second export replaces edgevit's own file
    export_onnx(ckpt, tmp_path / "m.onnx", None, ExportConfig(images=4), log=quiet)


def test_int8_exports_as_qdq_and_compiles_back_to_int8(tmp_path):
    from edgevit.compile import CompileConfig, compile_onnx
    from edgevit.onnx_model import OnnxModel, dequantized_graph
    from edgevit.targets import load_target

    ckpt = int8_checkpoint("vit_micro")
    result = export_onnx(ckpt, tmp_path / "q.onnx", None, ExportConfig(images=8), log=quiet)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in create_model("vit_micro").modules())
    assert result["qdq_layers"] == n_linear                 # every linear; the patch conv stays fp32
    assert result["check"]["max_abs_error"] <= 0.1 and result["check"]["top1_agreement"] >= 87.5
    proto = onnx.load(str(tmp_path / "q.onnx"))
    int8_weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8_weights) == n_linear
    # the QDQ layers read back are the checkpoint's own records
    _, layers = dequantized_graph(proto)
    records = [LayerQuant.from_dict(d) for d in ckpt.quantization["layers"].values()]
    assert len(layers) == n_linear
    for _, q in layers.values():
        match = [r for r in records if r.qweight.shape == q.qweight.shape and torch.equal(r.qweight, q.qweight)]
        assert match and torch.allclose(match[0].weight_scale, q.weight_scale)
        assert (match[0].input_scale, match[0].input_zero_point) == pytest.approx((q.input_scale, q.input_zero_point))
    art = compile_onnx(OnnxModel.load(tmp_path / "q.onnx"), load_target("host"), tmp_path / "art",
                       CompileConfig(images=8), log=quiet)
    assert art.manifest.encoding == "int8"


def test_export_never_replaces_a_users_file(tmp_path):
    theirs = tmp_path / "theirs.onnx"
    theirs.write_bytes(b"their own model")
    path = tmp_path / "ckpt.pt"
    random_checkpoint("vit_micro").save(path)
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(path), "--onnx", str(theirs)])
    assert r.exit_code == OutputError.exit_code and "not an ONNX file edgevit wrote" in r.output
    assert theirs.read_bytes() == b"their own model"


def test_export_cli_writes_json(tmp_path):
    path = tmp_path / "ckpt.pt"
    random_checkpoint("swin_micro").save(path)
    r = CliRunner().invoke(cli, ["export", "--checkpoint", str(path), "--onnx", str(tmp_path / "m.onnx"),
                                 "--sparsity", "0.5", "--images", "4", "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    import json

    data = json.loads((tmp_path / "e.json").read_text())
    assert data["scheme"] == "fp32" and data["check"]["against"] == "pytorch"
    x = np.zeros((1, 1, 16, 16), np.float32)
    from edgevit.onnx_model import ort_reference, ort_session

    assert ort_reference(ort_session(tmp_path / "m.onnx"))(x).shape == (1, 10)


@pytest.mark.parametrize("name", ["clip_vit_small_patch16", "beit_vit_small_patch16"])
def test_seed_encoders_export(name, tmp_path):
    ckpt = random_checkpoint(name, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    result = export_onnx(ckpt, tmp_path / "e.onnx", None, ExportConfig(images=2), log=quiet)
    assert result["check"]["max_abs_error"] <= 1e-4
