"""`bench`: per-call samples, percentiles only where enough samples support them, the compiled
artifact's own top-1, JSON/Markdown outputs and the output rule."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgevit.bench import BenchConfig, BenchResult, bench, summarize
from edgevit.cli import cli

pytestmark = pytest.mark.tvm


def test_summary_claims_percentiles_only_with_enough_samples():
    rng = np.random.default_rng(0)
    few = rng.gamma(4.0, 0.5, 63).tolist()
    stats, validity = summarize(few)
    assert stats["p90"] is None and not validity["p90"]["valid"] and validity["p90"]["samples_needed"] == 64
    assert stats["median"] == pytest.approx(np.median(few)) and stats["std"] == pytest.approx(np.std(few, ddof=1))
    assert stats["cov"] == pytest.approx(np.std(few, ddof=1) / np.mean(few))
    enough = rng.gamma(4.0, 0.5, 662).tolist()
    stats, validity = summarize(enough)
    assert validity["p99"]["valid"] and stats["p99"] == pytest.approx(np.percentile(enough, 99))
    assert stats["min"] <= stats["median"] <= stats["p90"] <= stats["p95"] <= stats["p99"] <= stats["max"]
    stats, validity = summarize(enough[:661])
    assert stats["p99"] is None and stats["p95"] is not None


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.data import load_data
    from edgevit.models import create_model
    from edgevit.targets import load_target
    from edgevit.train import TrainConfig, train

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bench")
    ckpt = train(create_model("vit_micro", img_size=16), load_data("digits", 16), TrainConfig(epochs=2, lr=3e-3),
                 root / "ckpt", show_progress=False)
    return compile_model(ckpt, load_target("host"), root / "art", None, CompileConfig(batch=4, images=16),
                         log=lambda _: None), ckpt


def test_bench_samples_every_call_and_runs_the_artifact_over_the_test_split(artifact, tmp_path):
    art, ckpt = artifact
    result = bench(art, BenchConfig(duration_s=0.0, min_runs=70, warmup_s=0.0, data="digits"), log=lambda _: None)
    lat = result.latency_ms
    assert lat["n"] >= 70 and lat["p90"] is not None and lat["p99"] is None
    assert any("p99 not reported" in w for w in result.warnings)
    assert result.throughput_ips == pytest.approx(4 * 1e3 / lat["mean"]) and result.batch == 4
    assert result.artifact_bytes == art.bytes and result.environment["manifest_sha256"]
    assert result.environment["cpu"] and result.environment["logical_cores"] >= 1
    # the compiled artifact's own top-1 equals PyTorch's on the same whole batches
    from edgevit.data import batches, load_data

    data = load_data("digits", 16)
    whole = (len(data.test) // 4) * 4
    model = ckpt.build_model().eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches(data.test, data.mean, data.std, 4)
                   if len(x) == 4)
    assert result.accuracy["images"] == whole
    assert abs(result.accuracy["top1"] - 100.0 * hits / whole) <= 100.0 / whole   # at most one image differs
    result.save(tmp_path / "b.json")
    assert BenchResult.load(tmp_path / "b.json") == result
    assert "| p90 |" in result.markdown() and "n/a (too few samples)" in result.markdown()


def test_bench_cli_writes_beside_the_artifact_and_refuses_a_foreign_file(artifact, tmp_path):
    art, _ = artifact
    args = ["bench", str(art.path), "--duration", "0", "--min-runs", "8", "--warmup", "0"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    written = art.path.with_name(art.path.name + ".bench.json")
    assert json.loads(written.read_text())["kind"] == "edgevit.bench_result" and "median" in r.output
    r = CliRunner().invoke(cli, [*args, "--markdown", "-o", str(tmp_path / "m.json")])
    assert r.exit_code == 0 and r.stdout.startswith("**") and "| median |" in r.stdout
    (tmp_path / "notes.json").write_text("not json")
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "notes.json")])
    assert r.exit_code == 1 and "not a bench result edgevit wrote" in r.stderr
    assert (tmp_path / "notes.json").read_text() == "not json"
