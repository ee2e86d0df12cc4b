"""TVM compile path: artifacts, validation against PyTorch, cross builds, bundles, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgevit.artifact import CompiledArtifact
from edgevit.backend.runtime import DeviceError
from edgevit.cli import cli
from edgevit.compile import CompileConfig, compile_model
from edgevit.errors import EdgeVitError, ValidationError
from edgevit.sparsity import SparsityConfig
from edgevit.targets import load_target

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def ckpt(swin_micro_digits):
    return swin_micro_digits


@pytest.fixture(scope="module")
def host_artifact(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "host-sparse"
    cfg = SparsityConfig.for_model(ckpt.build_model(), [0.5, 0.0])
    return compile_model(ckpt, load_target("host"), out, cfg, CompileConfig(batch=2, images=32), log=lambda _: None)


def test_host_artifact_is_validated_and_hashed(host_artifact):
    m = host_artifact.manifest
    real = m.validation["digits val images"]
    assert real["max_abs_error"] < 1e-4 and real["top1_agreement"] == 100.0 and real["images"] == 32
    assert m.validation["random"]["max_abs_error"] < 1e-4
    assert m.input["shape"] == [2, 1, 32, 32] and m.sparsity["ratios"] == [0.5, 0.0]
    assert set(m.files) == {"model.so", "weights.params", "reference.npz", "validation.npz"}
    assert m.target["tvm"]["kind"] == "llvm" and m.versions["tvm"]
    assert m.tolerance.max_abs_error == 1e-3 and m.tolerance.min_top1_agreement == 99.0


def test_verify_locally_matches_reference(host_artifact):
    from edgevit.verify import verify

    result = verify(host_artifact)
    assert result["ok"] and result["max_abs_error"] < 1e-4


def test_an_artifact_made_with_the_same_settings_is_up_to_date(ckpt, host_artifact):
    """The recipe's compile stage skips an artifact made from this checkpoint, sparsity and settings
    (the manifest holds them through JSON: tuples come back as lists) and redoes any other."""
    from edgevit.compile import _artifact_up_to_date

    cfg = SparsityConfig.for_model(ckpt.build_model(), [0.5, 0.0])
    assert _artifact_up_to_date(host_artifact.path, ckpt, cfg, CompileConfig(batch=2, images=32))
    assert not _artifact_up_to_date(host_artifact.path, ckpt, cfg, CompileConfig(batch=2, images=32, extra_batches=(4,)))
    assert not _artifact_up_to_date(host_artifact.path, ckpt, None, CompileConfig(batch=2, images=32))


def test_verify_judges_by_the_tolerance_recorded_at_compile_time(host_artifact, tmp_path):
    """compile, verify and the bundle's loader share one tolerance: the manifest's."""
    import shutil

    from edgevit.verify import verify

    strict = tmp_path / "strict"
    shutil.copytree(host_artifact.path, strict)
    manifest = json.loads((strict / "manifest.json").read_text())
    manifest["tolerance"]["max_abs_error"] = 1e-30
    (strict / "manifest.json").write_text(json.dumps(manifest))
    result = verify(CompiledArtifact.load(strict))
    assert not result["ok"] and result["tolerance"]["max_abs_error"] == 1e-30
    assert verify(host_artifact)["tolerance"] == {"max_abs_error": 1e-3, "min_top1_agreement": 99.0}


def test_tampered_artifact_is_refused(host_artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(host_artifact.path, copy)
    blob = bytearray((copy / "weights.params").read_bytes())
    blob[-1] ^= 0xFF
    (copy / "weights.params").write_bytes(bytes(blob))
    with pytest.raises(EdgeVitError, match="weights.params: sha256 mismatch"):
        CompiledArtifact.load(copy)


def test_bundle_runs_with_its_own_loader(host_artifact, tmp_path):
    from edgevit.package import package

    result = package(host_artifact, tmp_path / "bundle")
    assert set(result["files"]) == {"model.so", "weights.params", "reference.npz", "manifest.json", "run_model.py"}
    done = subprocess.run([sys.executable, str(tmp_path / "bundle" / "run_model.py")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-1000:]
    report = json.loads(done.stdout)
    assert report["max_abs_error"] < 1e-4 and report["top1_agreement"] == 100.0 and report["ok"]


def test_dense_compile_equals_pytorch_dense(ckpt, tmp_path):
    """The compiled library itself, run here on the stored reference input and on fresh random
    inputs, gives the PyTorch model's logits (and so its top-1)."""
    from edgevit.backend.runtime import Device, Session

    # compile's own validation is off: this test does it, on the library it wrote
    art = compile_model(ckpt, load_target("host"), tmp_path / "dense", None, CompileConfig(images=8, validate=False),
                        log=lambda _: None)
    assert art.manifest.sparsity is None and "skipped" in art.manifest.validation
    model = ckpt.build_model().eval()
    session = Session(Device("cpu"), art.library, art.weights)
    x, stored = art.reference()
    rng = np.random.default_rng(1234)
    inputs = [x] + [rng.standard_normal(x.shape, dtype=np.float32) * scale for scale in (1.0, 1.0, 3.0)]
    for i, batch in enumerate(inputs):
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        got = session.run(batch)
        assert got.shape == expected.shape == (1, 10), i
        assert np.abs(got - expected).max() < 1e-4, (i, np.abs(got - expected).max())
        assert np.array_equal(got.argmax(1), expected.argmax(1)), i
        assert not np.allclose(expected, 0.0, atol=1e-3), i          # a real output, not a degenerate one
    assert np.abs(session.run(x) - stored).max() < 1e-4              # and the stored reference agrees


def test_rasp4b_cross_compiles_to_aarch64(ckpt, tmp_path):
    art = compile_model(ckpt, load_target("rasp4b"), tmp_path / "arm", None, CompileConfig(), log=lambda _: None)
    header = art.library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 0xB7   # EM_AARCH64
    assert "does not run on this machine" in art.manifest.validation["skipped"]
    from edgevit.verify import verify

    with pytest.raises(DeviceError, match="pass --rpc HOST:PORT"):
        verify(art)


@pytest.mark.slow
def test_sparse_cuda_sm90_artifact_builds_without_a_gpu(ckpt, tmp_path):
    """dlight's GEMV rule asserts on the window-ranking kernel; the pipeline must still build."""
    sparsity = SparsityConfig.for_model(ckpt.build_model(), [0.5, 0.0])
    art = compile_model(ckpt, load_target("cuda-sm90"), tmp_path / "cuda", sparsity, CompileConfig(),
                        log=lambda _: None)
    assert art.manifest.target["tvm"]["arch"] == "sm_90" and art.library.stat().st_size > 0
    assert "skipped" in art.manifest.validation


def test_unreachable_tracker_fails_clearly(host_artifact):
    from edgevit.verify import verify

    with pytest.raises(DeviceError, match="RPC tracker 127.0.0.1:9 unreachable"):
        verify(host_artifact, rpc="127.0.0.1:9", key="rasp4b", timeout=2)


def test_failed_validation_writes_nothing_and_keeps_the_old_artifact(ckpt, host_artifact, tmp_path, monkeypatch):
    import shutil

    import edgevit.compile as comp

    out = tmp_path / "existing"
    shutil.copytree(host_artifact.path, out)
    before = (out / "manifest.json").read_text()
    monkeypatch.setattr(comp, "compare", lambda *a, **k: {"max_abs_error": 0.5, "top1_agreement": 80.0, "images": 8})
    with pytest.raises(ValidationError, match="max abs error 0.5 .*top-1 agreement 80.0%"):
        compile_model(ckpt, load_target("host"), out, None, CompileConfig(images=8), log=lambda _: None)
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["existing"]


def test_cli_compile_that_fails_validation_exits_6_and_writes_nothing(ckpt, tmp_path, monkeypatch):
    """A compiled model that disagrees with PyTorch: exit code 6, one line on stderr, no artifact."""
    import edgevit.compile as comp

    ckpt.save(tmp_path / "m.pt")
    bad = {"max_abs_error": 0.5, "top1_agreement": 80.0, "images": 8}
    monkeypatch.setattr(comp, "compare", lambda *a, **k: dict(bad))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["compile", "--target", "host", "--checkpoint", str(tmp_path / "m.pt"),
                                      "--no-tuning", "-o", str(out)])
    assert result.exit_code == 6, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "disagrees with PyTorch" in lines[0] and "0.5" in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


class Unsupported(torch.nn.Module):
    cfg = None

    def forward(self, x):
        return torch.histc(x, bins=4)


def test_unsupported_operator_is_named():
    from edgevit.backend.frontend import to_relax

    with pytest.raises(EdgeVitError, match="does not support operator.*histc"):
        to_relax(Unsupported(), torch.randn(8))


def test_patch_convs_become_matmuls_and_keep_their_numerics():
    """stride == kernel convs (patch embeddings) are rewritten to reshape + matmul; a padded conv
    is left alone; the compiled result equals PyTorch either way."""
    import tvm
    from tvm import relax

    from edgevit.backend.build import build
    from edgevit.backend.frontend import to_relax

    class TwoConvs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = torch.nn.Conv2d(3, 8, 4, stride=4)
            self.smooth = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.smooth(self.patch(x))

    torch.manual_seed(0)
    model, x = TwoConvs().eval(), torch.randn(2, 3, 16, 12)
    mod, weights = to_relax(model, x)
    text = mod.script()
    assert text.count("R.nn.conv2d") == 1 and "R.matmul" in text
    vm = relax.VirtualMachine(build(mod, load_target("host")), tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()), *[tvm.runtime.tensor(w) for w in weights])
    np.testing.assert_allclose(out.numpy(), model(x).detach().numpy(), atol=1e-5, rtol=1e-5)


def test_builds_print_no_known_harmless_tvm_warnings(ckpt, capfd):
    """A pruned model's export and build printed dozens of TVM 'Fast mode segfaults' lines and
    torch LeafSpec deprecations (every config a profile builds): those are dropped, while any
    other line written to stderr during a build still comes through."""
    import os

    from edgevit.backend.build import build, quiet_tvm_warnings
    from edgevit.backend.frontend import to_relax

    model = ckpt.build_model().eval()
    model.set_sparsity(SparsityConfig.for_model(model, [0.5, 0.0]))
    mod, _ = to_relax(model, torch.zeros(1, 1, 32, 32))
    build(mod, load_target("host"))
    with quiet_tvm_warnings():
        os.write(2, b"[00:00:00] x.cc:1: Warning: Fast mode segfaults when there are out-of-bounds indices\n"
                    b"[00:00:00] y.cc:2: something else\n")
    err = capfd.readouterr().err
    assert "Fast mode" not in err and "LeafSpec" not in err
    assert "y.cc:2: something else" in err


def test_compile_without_tuning_records_uses_the_rules(host_artifact):
    assert host_artifact.manifest.schedules == {"source": "rules", "database": None}


def test_compile_with_an_empty_database_says_to_tune_first(ckpt, tmp_path):
    ckpt.save(tmp_path / "m.pt")
    result = CliRunner().invoke(cli, ["compile", "--target", "host", "--checkpoint", str(tmp_path / "m.pt"),
                                      "--database", str(tmp_path / "nothing"), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "no tuning records" in result.output and not (tmp_path / "out").exists()


def test_compile_never_replaces_a_folder_it_did_not_write(ckpt, host_artifact, tmp_path):
    """-o on a user's folder or file is refused before any work; an earlier artifact is replaced."""
    import shutil

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(EdgeVitError, match="not a compiled artifact edgevit wrote"):
        compile_model(ckpt, load_target("host"), mine, None, CompileConfig(images=4), log=lambda _: None)
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    afile = tmp_path / "file"
    afile.write_text("data")
    with pytest.raises(EdgeVitError, match="not a folder edgevit wrote"):
        compile_model(ckpt, load_target("host"), afile, None, CompileConfig(images=4), log=lambda _: None)
    assert afile.read_text() == "data"
    old = tmp_path / "old"
    shutil.copytree(host_artifact.path, old)
    art = compile_model(ckpt, load_target("host"), old, None, CompileConfig(images=4), log=lambda _: None)
    assert art.manifest.sparsity is None and sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine", "old"]


def test_package_refuses_to_overwrite_its_artifact_or_a_user_folder(host_artifact, tmp_path):
    from edgevit.package import package

    with pytest.raises(EdgeVitError, match="would overwrite the artifact"):
        package(host_artifact, host_artifact.path)
    CompiledArtifact.load(host_artifact.path)   # still intact
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "x").write_text("1")
    with pytest.raises(EdgeVitError, match="not a deploy bundle edgevit wrote"):
        package(host_artifact, mine)
    package(host_artifact, tmp_path / "bundle")
    package(host_artifact, tmp_path / "bundle")   # its own bundle is replaced
