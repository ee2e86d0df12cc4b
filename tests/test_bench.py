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
    return compile_model(ckpt, load_target("host"), root / "art", None,
                         CompileConfig(batch=4, extra_batches=(1, 8), images=16), log=lambda _: None), ckpt


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


def test_one_artifact_serves_each_batch_it_was_compiled_for(artifact):
    """compile --batch 4,1,8: one library function per batch size over one copy of the weights,
    each checked against PyTorch at compile time and here; bench measures any of them."""
    from edgevit.backend.runtime import Device, Session
    from edgevit.errors import ConfigError

    art, ckpt = artifact
    assert art.manifest.batches == (4, 1, 8) and art.manifest.batch == 4
    checked = {k for k, v in art.manifest.validation.items() if isinstance(v, dict) and "max_abs_error" in v}
    assert {"digits val images, batch 1", "digits val images, batch 8"} <= checked
    session = Session(Device("cpu"), art.library, art.weights, batches=art.manifest.batches)
    x = np.random.default_rng(0).standard_normal((8, 1, 16, 16), dtype=np.float32)
    model = ckpt.build_model().eval()
    with torch.no_grad():
        for n in (8, 1, 4):
            assert np.abs(session.run(x[:n]) - model(torch.from_numpy(x[:n])).numpy()).max() < 1e-3
    with pytest.raises(ConfigError, match="not 3; recompile with --batch 4,1,8,3"):
        session.run(x[:3])
    result = bench(art, BenchConfig(duration_s=0.0, min_runs=8, warmup_s=0.0, batches=(8, 1)), log=lambda _: None)
    assert result.batch == 8 and [r["batch"] for r in result.by_batch] == [8, 1]
    assert result.latency_ms == result.by_batch[0]["latency_ms"]
    assert result.throughput_ips == pytest.approx(8e3 / result.latency_ms["mean"])
    assert result.by_batch[1]["throughput_ips"] == pytest.approx(1e3 / result.by_batch[1]["latency_ms"]["mean"])
    assert "| 8 |" in result.markdown() and "| 1 |" in result.markdown()
    with pytest.raises(ConfigError, match="runs batch 4, 1, 8, not 2; compile it with --batch 4,1,8,2"):
        bench(art, BenchConfig(batches=(2,)), log=lambda _: None)
    from edgevit.verify import verify

    checked = verify(art)          # every batch function against the stored PyTorch outputs
    assert checked["ok"] and set(checked["batches"]) == {"1", "8"}
    assert all(f["max_abs_error"] < 1e-3 and f["top1_agreement"] == 100.0 for f in checked["batches"].values())


def test_bench_cli_batches(artifact, tmp_path):
    art, _ = artifact
    args = ["bench", str(art.path), "--duration", "0", "--min-runs", "8", "--warmup", "0"]
    r = CliRunner().invoke(cli, [*args, "--batch", "1,8"])
    assert r.exit_code == 0, r.output
    assert "at batch 1" in r.output and "  batch 8:" in r.output
    for bad in ("0", "1,x", ""):
        r = CliRunner().invoke(cli, [*args, "--batch", bad])
        assert r.exit_code == 2 and "is not a batch size" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, [*args, "--batch", "1,1"])
    assert r.exit_code == 2 and "must be distinct" in r.stderr
    r = CliRunner().invoke(cli, [*args, "--batch", "1", "-o", str(tmp_path / "b1.json")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, [*args, "--baseline", str(tmp_path / "b1.json"), "--duration", "60"])
    assert r.exit_code == 2 and "measured at batch 1, this run would measure batch 4" in r.stderr   # before measuring


def test_gate_refuses_results_of_two_batch_sizes():
    from dataclasses import replace

    from edgevit.bench import GateConfig, gate
    from edgevit.errors import ConfigError

    base = fake_result([1.0, 1.1, 1.2] * 30)
    with pytest.raises(ConfigError, match="baseline was measured at batch 1, this artifact at batch 8"):
        gate(replace(base, batch=8), base, GateConfig())


def fake_result(samples, top1=None) -> BenchResult:
    from edgevit.bench import summarize

    stats, validity = summarize(samples)
    accuracy = {"top1": top1, "images": 100, "data": "digits", "split": "test"} if top1 is not None else None
    return BenchResult("art", stats, validity, 1e3 / stats["mean"], 1, 1, None, {}, [], accuracy, None,
                       list(samples))


def test_gate_flags_a_slower_artifact_and_passes_a_same_one():
    from edgevit.bench import GateConfig, gate

    rng = np.random.default_rng(0)
    base = fake_result(rng.lognormal(np.log(2.0), 0.03, 300).tolist(), top1=90.0)
    same = fake_result(rng.lognormal(np.log(2.0), 0.03, 300).tolist(), top1=89.8)
    slower = fake_result(rng.lognormal(np.log(2.3), 0.03, 300).tolist(), top1=88.0)
    verdict = gate(same, base, GateConfig())
    assert verdict["pass"] and verdict["checks"]["latency"]["ratio"] == pytest.approx(1.0, abs=0.02)
    verdict = gate(slower, base, GateConfig())
    assert verdict["failures"] == ["latency", "accuracy"]
    assert verdict["checks"]["latency"]["p_value"] < 1e-6 and verdict["checks"]["accuracy"]["drop"] == 2.0
    # significant but under the factor: no regression (asv's rule needs both)
    assert gate(slower, base, GateConfig(factor=1.2, max_accuracy_drop=5))["pass"]


def test_gate_budget_needs_enough_samples_to_claim_the_statistic():
    from edgevit.bench import GateConfig, gate, parse_latency_budget
    from edgevit.errors import ConfigError

    assert parse_latency_budget("p90<=20ms") == ("p90", 20.0) and parse_latency_budget("median < 500us")[1] == 0.5
    with pytest.raises(ConfigError, match="STAT<=LATENCY"):
        parse_latency_budget("p42<=1ms")
    fast = fake_result([1.0] * 100)
    assert gate(fast, None, GateConfig(budget="p90<=2ms"))["pass"]
    miss = gate(fast, None, GateConfig(budget="p99<=2ms"))     # 100 samples cannot claim a p99
    assert miss["failures"] == ["budget"] and miss["checks"]["budget"]["value_ms"] is None


def test_bench_gate_exit_codes(artifact, tmp_path):
    art, _ = artifact
    args = ["bench", str(art.path), "--duration", "0", "--min-runs", "64", "--warmup", "0"]
    r = CliRunner().invoke(cli, [*args, "--against", str(art.path), "-o", str(tmp_path / "ab.json")])
    assert r.exit_code == 0, r.output
    gate = json.loads((tmp_path / "ab.json").read_text())["gate"]
    assert gate["pass"] and 0.7 < gate["checks"]["latency"]["ratio"] < 1.3
    r = CliRunner().invoke(cli, [*args, "--budget", "median<=1us", "-o", str(tmp_path / "b.json")])
    assert r.exit_code == 12 and r.stderr.startswith("error: gate failed (budget)")
    assert json.loads((tmp_path / "b.json").read_text())["gate"]["failures"] == ["budget"]
    # a stored baseline three times faster than anything this artifact can do: a latency regression
    base = json.loads((tmp_path / "ab.json").read_text())
    base["samples_ms"] = [v / 3 for v in base["samples_ms"]]
    base["latency_ms"]["median"] /= 3
    (tmp_path / "fast.json").write_text(json.dumps(base))
    r = CliRunner().invoke(cli, [*args, "--baseline", str(tmp_path / "fast.json"), "-o", str(tmp_path / "c.json")])
    assert r.exit_code == 10 and "gate failed (latency)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
