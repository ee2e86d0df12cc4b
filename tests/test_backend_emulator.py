"""The emulated aarch64 board end to end: compile for rasp4b, upload over RPC, check output.

Needs `edgevit emulator setup` (make test runs it); emulated timings are never reported."""

import pytest

from edgevit.backend.emulator import Emulator, start, status, stop

EMU = Emulator.default(tracker_port=9291, server_port=9391)
pytestmark = [pytest.mark.slow, pytest.mark.tvm,
              pytest.mark.skipif(not EMU.is_set_up(), reason="run `edgevit emulator setup` first")]


@pytest.fixture(scope="module")
def board():
    start(EMU, log=lambda _: None)
    yield EMU
    stop(EMU, log=lambda _: None)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from edgevit.data import load_data
    from edgevit.models import create_model
    from edgevit.train import TrainConfig, train

    data = load_data("digits", 32)
    return train(create_model("swin_micro", img_size=32), data, TrainConfig(epochs=1, batch_size=64),
                 tmp_path_factory.mktemp("ckpt"), show_progress=False), data


def test_rasp4b_artifact_runs_on_the_emulated_board(board, trained, tmp_path):
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.sparsity import SparsityConfig
    from edgevit.targets import load_target
    from edgevit.verify import verify

    s = status(board)
    assert s["tracker_running"] and s["server_running"] and board.key in s["keys"]
    ckpt, _ = trained
    sparsity = SparsityConfig.for_model(ckpt.build_model(), [0.5, 0.0])
    art = compile_model(ckpt, load_target("rasp4b"), tmp_path / "arm", sparsity, CompileConfig(batch=2),
                        log=lambda _: None)
    result = verify(art, rpc=board.tracker, key=board.key, timeout=120)
    assert result["ok"] and result["max_abs_error"] < 1e-4, result
    assert "rasp4b" in result["device"]


def test_efficientvit_artifact_matches_on_the_emulated_board(board, tiny_efficientvit, tmp_path):
    """Channels-last depthwise convs, 1x1 convs as matmuls and the linear attention, for NEON."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.targets import load_target
    from edgevit.verify import verify

    art = compile_model(Checkpoint.from_model(tiny_efficientvit), load_target("rasp4b"), tmp_path / "arm", None,
                        CompileConfig(batch=2), log=lambda _: None)
    result = verify(art, rpc=board.tracker, key=board.key, timeout=120)
    assert result["ok"] and result["max_abs_error"] < 1e-4, result


@pytest.mark.parametrize("target", ["rasp5", "rasp4b"])     # s8 activations into sdot / u8, LLVM-vectorised
def test_int8_artifact_matches_on_the_emulated_board(board, trained, target, tmp_path):
    """The int8 kernels for ARM, run (qemu implements the dot-product extension) against the
    fake-quantized PyTorch model they were compiled from, within the manifest's tolerance."""
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.quantize import QuantizeConfig, quantize
    from edgevit.targets import load_target
    from edgevit.verify import verify

    ckpt, data = trained
    q = quantize(ckpt, data, tmp_path / "q", None, QuantizeConfig(calib_images=64), log=lambda _: None)
    art = compile_model(q.checkpoint, load_target(target), tmp_path / "arm", None, CompileConfig(batch=2),
                        log=lambda _: None)
    assert art.manifest.encoding == "int8"
    result = verify(art, rpc=board.tracker, key=board.key, timeout=120)
    assert result["ok"] and result["max_abs_error"] < 0.05 and result["top1_agreement"] >= 99, result


def test_unknown_key_is_reported(board, tmp_path):
    from edgevit.backend.runtime import Device, DeviceError, connect

    with pytest.raises(DeviceError, match="no device with key 'jetson' .* registered keys: rasp4b"):
        connect(Device(rpc=board.tracker, key="jetson", timeout=10))


def test_profile_measures_on_the_emulated_board(board, tmp_path):
    """`profile --rpc`: every config is cross-compiled for rasp4b and timed on the board (emulated
    timings only prove the path; they are never reported)."""
    import json

    from click.testing import CliRunner

    from edgevit.cli import cli
    from edgevit.data import load_data
    from edgevit.models import create_model
    from edgevit.train import TrainConfig, train

    train(create_model("swin_micro", img_size=32), load_data("digits", 32), TrainConfig(epochs=1, batch_size=64),
          tmp_path / "ckpt", show_progress=False)
    table_path = tmp_path / "rasp4b.json"
    result = CliRunner().invoke(cli, ["profile", "--target", "rasp4b", "--checkpoint", str(tmp_path / "ckpt" / "model.pt"),
                                      "--rpc", board.tracker, "--key", board.key, "--calibrate", "1", "--validate", "1",
                                      "-o", str(table_path)])
    assert result.exit_code == 0, result.output
    table = json.loads(table_path.read_text())
    assert table["key"]["target"] == "rasp4b" and "aarch64" in table["key"]["tvm_target"]
    assert table["dense_ms"] > 0 and len(table["measurements"]) == sum(len(d) for d in table["deltas"]) + 1
    assert table["validation"]["configs"] == 1


@pytest.mark.parametrize("target, int8", [("rasp4b", False), ("rasp5", True)])
def test_user_onnx_runs_on_the_emulated_board(board, target, int8, tmp_path):
    """A user's ONNX export (fp32), and ONNX Runtime's QDQ quantization of it (int8 kernels with
    sdot on rasp5), compiled for ARM: the board matches ONNX Runtime within the manifest's tolerance."""
    from edgevit.compile import CompileConfig, compile_onnx
    from edgevit.onnx_model import OnnxModel
    from edgevit.targets import load_target
    from edgevit.verify import verify
    from test_onnx import USER_ONNX, make_qdq

    path = make_qdq(tmp_path / "qdq.onnx") if int8 else USER_ONNX
    art = compile_onnx(OnnxModel.load(path), load_target(target), tmp_path / "arm", CompileConfig(batch=2),
                       log=lambda _: None)
    assert art.manifest.encoding == ("int8" if int8 else "fp32")
    result = verify(art, rpc=board.tracker, key=board.key, timeout=120)
    assert result["ok"], result
    if not int8:
        assert result["max_abs_error"] < 1e-4


@pytest.mark.parametrize("scheme, settings", [("kmeans", {"bits": 4}), ("pq", {"subvector": 4, "centroids": 32})])
def test_codebook_artifacts_match_on_the_emulated_board(board, trained, scheme, settings, tmp_path):
    """The decode-in-kernel matmuls for ARM (NEON, 4 lanes), run on the board against the
    PyTorch model with decoded weights; the k-means one under a sparsity config (schemes compose)."""
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.quantize import QuantizeConfig, quantize
    from edgevit.sparsity import SparsityConfig
    from edgevit.targets import load_target
    from edgevit.verify import verify

    ckpt, data = trained
    q = quantize(ckpt, data, tmp_path / "q", None, QuantizeConfig(scheme=scheme, eval_images=64, **settings),
                 log=lambda _: None)
    sparsity = SparsityConfig.for_model(ckpt.build_model(), [0.5, 0.0]) if scheme == "kmeans" else None
    art = compile_model(q.checkpoint, load_target("rasp4b"), tmp_path / "arm", sparsity,
                        CompileConfig(batch=2, min_fp32_agreement=0), log=lambda _: None)
    assert art.manifest.encoding == scheme and (art.manifest.sparsity is not None) == (scheme == "kmeans")
    result = verify(art, rpc=board.tracker, key=board.key, timeout=120)
    assert result["ok"] and result["max_abs_error"] < 1e-4 and result["top1_agreement"] == 100, result
