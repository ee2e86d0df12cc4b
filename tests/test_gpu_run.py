"""benchmarks/gpu_run.py, the script a lent GPU runs, exercised on host artifacts with CPU peers:
the same loading, checking, exporting and timing steps, only the device differs."""

import sys
from pathlib import Path

import pytest

from edgevit.compile import CompileConfig, compile_model
from edgevit.data import load_data
from edgevit.models import create_model
from edgevit.sparsity import SparsityConfig
from edgevit.targets import load_target
from edgevit.train import TrainConfig, train

pytestmark = [pytest.mark.tvm, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_gpu_run_checks_the_artifact_and_times_it_beside_its_peers(tmp_path):
    import gpu_run

    ckpt = train(create_model("swin_micro", img_size=32), load_data("digits", 32), TrainConfig(epochs=1, batch_size=64),
                 tmp_path / "ckpt", show_progress=False)
    ckpt.save(tmp_path / "model.pt")
    sparsity = SparsityConfig.for_model(ckpt.build_model(), [0.5, 0.0])
    compile_model(ckpt, load_target("host"), tmp_path / "host", sparsity, CompileConfig(batch=2, images=32),
                  log=lambda _: None)
    rows = gpu_run.main(["--artifact", str(tmp_path / "host"), "--checkpoint", str(tmp_path / "model.pt"),
                         "--device", "cpu", "--seconds", "0.2", "--rounds", "1", "--markdown", str(tmp_path / "t.md")])
    (row,) = rows
    assert row["check"]["ok"] and row["check"]["max_abs_error"] < 1e-4 and row["check"]["images"] == 32
    assert row["batch"] == 2 and {"edgevit", "pytorch eager", "onnxruntime"} <= set(row["median_ms"])
    assert all(v > 0 for v in row["median_ms"].values())
    assert row["x_peer"]["onnxruntime"] == pytest.approx(row["median_ms"]["edgevit"] / row["median_ms"]["onnxruntime"],
                                                         rel=1e-2)
    assert "| host | fp32 | 2 |" in (tmp_path / "t.md").read_text()
    with pytest.raises(SystemExit, match="compiled from a checkpoint; pass it with --checkpoint"):
        gpu_run.run_pair(str(tmp_path / "host"), "none", "cpu", 0.1, 1)


def test_gpu_run_pairs_each_artifact_with_a_checkpoint(capsys):
    import gpu_run

    with pytest.raises(SystemExit):
        gpu_run.main(["--artifact", "a", "--artifact", "b", "--checkpoint", "c"])
    assert "give one --checkpoint per --artifact" in capsys.readouterr().err


def test_gpu_run_times_an_onnx_artifact_against_onnxruntime_on_its_own_file(tmp_path):
    import gpu_run
    from edgevit.compile import compile_onnx
    from edgevit.onnx_model import OnnxModel

    user_onnx = Path(__file__).parent / "fixtures" / "reference" / "timm_vit_small.onnx"
    compile_onnx(OnnxModel.load(user_onnx), load_target("host"), tmp_path / "art", CompileConfig(batch=1),
                 log=lambda _: None)
    (row,) = gpu_run.main(["--artifact", str(tmp_path / "art"), "--checkpoint", "none", "--device", "cpu",
                           "--seconds", "0.2", "--rounds", "1"])
    assert row["check"]["ok"] and set(row["median_ms"]) == {"edgevit", "onnxruntime"}
