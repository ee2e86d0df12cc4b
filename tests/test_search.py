"""Latency tables, the predictor and the evolutionary search: arithmetic, determinism,
feasibility, resume, infeasible budgets, and the CLI end to end on a small Swin."""

import json

import pytest
import torch
from click.testing import CliRunner

from edgevit.checkpoint import Checkpoint
from edgevit.cli import cli
from edgevit.data import load_data
from edgevit.errors import ConfigError, EdgeVitError
from edgevit.latency import LatencyTable
from edgevit.models import create_model
from edgevit.search import (
    InfeasibleBudget,
    SearchConfig,
    SearchResult,
    fastest_reachable,
    pareto_front,
    parse_budget,
    search,
)
from edgevit.sparsity import SparsityConfig, distinct_units, keep_counts, knob_windows
from edgevit.train import TrainConfig, train


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    """swin_micro at 32x32 on digits (16 windows in stage 1, 4 in stage 2), briefly trained."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("search")
    train(create_model("swin_micro", img_size=32), load_data("digits", 32), TrainConfig(epochs=2, batch_size=64, lr=3e-3),
          out, show_progress=False)
    return out / "model.pt"


def synthetic_table(model) -> LatencyTable:
    """Dense 10 ms; each knob saves time in proportion to the windows it skips."""
    windows = knob_windows(model)
    weights = [3.0, 1.0, 0.5, 0.2][: len(windows)]
    deltas = [{} for _ in windows]
    for knob, k, _ratio in distinct_units(windows, SparsityConfig.for_model(model).levels):
        deltas[knob][k] = -weights[knob] * (windows[knob] - k) / windows[knob]
    return LatencyTable({"target": "host", "model": model.model_name, "schedules": "rules"}, 10.0, deltas, windows,
                        overhead_ms=0.1)


def test_fit_recovers_deltas_and_overhead_from_noisy_rows(ckpt_path):
    """Single-unit rows plus random multi-knob rows, each timed while the machine ran up to
    ~40% slow or fast (config and dense alike): least squares recovers the table the timings
    came from, and averages noise that a one-measurement-per-unit table would keep."""
    import numpy as np

    from edgevit.latency import fit_table

    model = Checkpoint.load(ckpt_path).build_model()
    truth = synthetic_table(model)
    rng = np.random.default_rng(0)
    units = [(knob, k) for knob, d in enumerate(truth.deltas) for k in d]
    keeps = []
    for knob, k in units:
        keep = list(truth.windows)
        keep[knob] = k
        keeps.append(tuple(keep))
    keeps += [tuple(int(rng.choice(list(d))) for d in truth.deltas) for _ in range(60)]

    def rows(noise):
        slowdown = rng.uniform(0.7, 1.4, len(keeps))          # the machine's speed while the row was timed
        return [{"keep": list(keep), "dense_ms": 10.0 * s, "measured_ms": truth.predict(keep) * s + e}
                for keep, s, e in zip(keeps, slowdown, rng.normal(0, noise, len(keeps)))]

    exact = fit_table(truth.key, truth.windows, 10.0, rows(0.0))
    assert exact.overhead_ms == pytest.approx(0.1, abs=1e-9)
    for fitted, true in zip(exact.deltas, truth.deltas):
        assert fitted.keys() == true.keys()
        assert all(fitted[k] == pytest.approx(true[k], abs=1e-9) for k in true)
    noisy = fit_table(truth.key, truth.windows, 10.0, rows(0.05))
    errors = [abs(noisy.predict(keep) - truth.predict(keep)) for keep in keeps]
    assert max(errors) < 0.1 and np.mean(errors) < 0.04     # noise sd 0.05 ms per timing
    only_units = fit_table(truth.key, truth.windows, 10.0, rows(0.0)[: len(units)])
    assert only_units.overhead_ms == 0.0                     # not identifiable from single-knob rows


def test_single_knob_probes_in_a_multi_knob_stage():
    """Swin-T's third stage has three knobs: probing its first knob alone leaves the later ones
    dense, an unsorted config no SparsityConfig accepts but one the profile must time."""
    from edgevit.sparsity import keep_of, single_knob_ratios

    ratios = single_knob_ratios((1, 1, 3, 1), 2, 0.5)
    assert ratios == [[0.0], [0.0], [0.5, 0.0, 0.0], [0.0]]
    assert keep_of([64, 16, 4, 4, 4, 1], ratios) == [64, 16, 2, 4, 4, 1]


def test_killed_profile_resumes_without_remeasuring(ckpt_path, tmp_path, monkeypatch):
    """Rows are checkpointed after each config: a profile killed midway measures only the rest
    when rerun, and fits the same table as an uninterrupted run."""
    from edgevit.latency import Measurer, ProfileConfig, profile
    from edgevit.targets import load_target

    calls = []

    def fake_versus_dense(self, block_ratios):
        calls.append(block_ratios)
        if len(calls) == 5 and fail["now"]:
            raise KeyboardInterrupt
        pruned = sum(r for stage in block_ratios for r in stage)
        return 2.0 - pruned, 2.0

    monkeypatch.setattr(Measurer, "versus_dense", fake_versus_dense)
    ckpt, target, cfg = Checkpoint.load(ckpt_path), load_target("host"), ProfileConfig(calibrate=3, tuning=False)
    fail = {"now": True}
    partial = tmp_path / "t.json.partial"
    with pytest.raises(KeyboardInterrupt):
        profile(ckpt, target, None, cfg, log=lambda _: None, checkpoint=partial)
    assert len(json.loads(partial.read_text())["rows"]) == 4
    fail["now"] = False
    calls.clear()
    resumed = profile(ckpt, target, None, cfg, log=lambda _: None, checkpoint=partial)
    total = len(resumed.measurements)
    assert len(calls) == total - 4 and partial.exists()   # kept until the caller has saved the table
    calls.clear()
    fresh = profile(ckpt, target, None, cfg, log=lambda _: None)
    assert len(calls) == total and fresh == resumed


def test_parse_budget_units_and_errors():
    assert parse_budget("20ms") == 20.0
    assert parse_budget("500us") == pytest.approx(0.5)
    assert parse_budget("0.02s") == pytest.approx(20.0)
    assert parse_budget("7") == 7.0
    for bad in ("fast", "-3ms", "0ms"):
        with pytest.raises(ConfigError, match="budget"):
            parse_budget(bad)


def test_table_predicts_product_of_units_and_round_trips(tmp_path, ckpt_path):
    model = Checkpoint.load(ckpt_path).build_model()
    table = synthetic_table(model)
    assert knob_windows(model) == [16, 4]
    dense = SparsityConfig.for_model(model)
    assert table.predict(keep_counts(model, dense)) == 10.0          # no overhead without pruning
    half = SparsityConfig.uniform(model, 0.5)
    assert keep_counts(model, half) == (8, 2)
    assert table.predict((8, 2)) == pytest.approx(10.0 * 1.01 * (1 - 0.3 * 8 / 16) * (1 - 0.1 * 2 / 4))
    table.save(tmp_path / "t.json")
    assert LatencyTable.load(tmp_path / "t.json") == table
    with pytest.raises(ConfigError, match="knobs"):
        table.predict((8,))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(EdgeVitError, match="malformed"):
        LatencyTable.load(tmp_path / "bad.json")


def best_fitting_uniform(ckpt, table, cfg: SearchConfig) -> tuple[float, float]:
    """(ratio, val top-1) of the most accurate uniform config (one ratio on every knob, from the
    config's levels) whose predicted latency fits the budget, scored as the search scores: an
    AccuracyOracle on the same validation subset (val_images, seed)."""
    from edgevit.search import AccuracyOracle

    oracle = AccuracyOracle(ckpt, cfg.val_images, cfg.seed)
    model = oracle.model
    scored = []
    for ratio in SparsityConfig.for_model(model).levels:
        uniform = SparsityConfig.uniform(model, ratio)
        assert set(uniform.ratios) == {ratio}
        keep = keep_counts(model, uniform)
        if table.predict(keep) <= cfg.budget_ms:
            scored.append((oracle(uniform, keep), ratio))
    assert scored, "no uniform config fits the budget: the comparison would be empty"
    top1, ratio = max(scored)
    return ratio, top1


def test_search_is_feasible_deterministic_and_beats_uniform(ckpt_path, tmp_path):
    ckpt = Checkpoint.load(ckpt_path)
    model = ckpt.build_model()
    table = synthetic_table(model)
    budget = 8.0
    cfg = SearchConfig(budget=budget, population=20, parents=5, evaluations=25, val_images=300, seed=3)
    measure = lambda c: table.predict(keep_counts(model, c))  # noqa: E731 - the predictor stands in for a device
    a = search(ckpt, table, cfg, measure, None, log=lambda _: None)
    b = search(ckpt, table, cfg, measure, None, log=lambda _: None)
    assert a.sparsity == b.sparsity and a.val_top1 == b.val_top1
    ratio, uniform_top1 = best_fitting_uniform(ckpt, table, cfg)
    assert a.val_top1 >= uniform_top1, f"search {a.val_top1}% < uniform {ratio}: {uniform_top1}%"
    a.save(tmp_path / "result.json")
    assert SearchResult.load(tmp_path / "result.json") == a
    assert SparsityConfig.load(tmp_path / "result.json") == a.config
    assert a.measured_ms <= budget and a.predicted_ms <= budget
    assert all(p["predicted_ms"] <= budget for p in a.pareto)
    ratios = a.sparsity["ratios"]
    assert ratios == sorted(ratios[:1]) + sorted(ratios[1:])
    front = a.pareto
    assert all(x["val_top1"] < y["val_top1"] and x["predicted_ms"] <= y["predicted_ms"] for x, y in zip(front, front[1:]))


def test_search_finetune_writes_the_finetuned_figure_and_checkpoint(ckpt_path, tmp_path, monkeypatch):
    """`search --finetune 1` (CLI, a precomputed synthetic table, the device timing stubbed):
    the result carries finetuned_test_top1, and the fine-tuned checkpoint beside it is a trained
    copy of the model whose test top-1 under the chosen config is that figure."""
    from edgevit.latency import Measurer, table_key
    from edgevit.targets import load_target
    from edgevit.train import evaluate

    ckpt = Checkpoint.load(ckpt_path)
    synthetic = synthetic_table(ckpt.build_model())
    table = LatencyTable(table_key(ckpt, load_target("host"), 1, "rules"), synthetic.dense_ms, synthetic.deltas,
                         synthetic.windows, synthetic.overhead_ms)
    table.save(tmp_path / "table.json")
    measured = []
    monkeypatch.setattr(Measurer, "__call__", lambda self, block_ratios: measured.append(block_ratios) or 1.0)
    out = tmp_path / "result.json"
    r = CliRunner().invoke(cli, ["search", "--budget", "8ms", "--target", "host", "--checkpoint", str(ckpt_path),
                                 "--table", str(tmp_path / "table.json"), "--no-tuning", "--evaluations", "6",
                                 "--population", "6", "--val-images", "100", "--finetune", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "profiling" not in r.output and len(measured) == 1      # the table was used, one candidate timed
    saved = json.loads(out.read_text())
    top1 = saved["finetuned_test_top1"]
    assert isinstance(top1, float) and 0.0 <= top1 <= 100.0
    assert f"({top1:.2f}% after fine-tuning)" in r.output
    result = SearchResult.load(out)
    assert result.finetuned_test_top1 == top1 and result.measured_ms == 1.0
    assert not (tmp_path / "result.json.state.json").exists()

    tuned = Checkpoint.load(tmp_path / "result-finetune" / "model.pt")
    assert tuned.stage == "finetune" and tuned.model_name == ckpt.model_name
    assert any(not torch.equal(v, tuned.state_dict[k]) for k, v in ckpt.state_dict.items())   # it was trained
    model = tuned.build_model().eval()
    model.set_sparsity(SparsityConfig.load(out))
    data = load_data(ckpt.data["spec"], 32, ckpt.data.get("seed", 0), ckpt.data.get("val_fraction", 0.1))
    assert evaluate(model, data.test, ckpt.data["mean"], ckpt.data["std"])["top1"] == top1


def test_small_population_still_reaches_every_feasible_network(ckpt_path):
    """A population too small for mutation and crossover to keep finding new configs takes
    random feasible newcomers instead of stopping: evolution scores every network under the
    budget, as random sampling would, and its answer is the best of them."""
    ckpt = Checkpoint.load(ckpt_path)
    model = ckpt.build_model()
    table = synthetic_table(model)
    budget = 9.0
    per_knob = [[n] + [k for knob, k, _ in distinct_units(table.windows, SparsityConfig.for_model(model).levels)
                       if knob == i] for i, n in enumerate(table.windows)]
    feasible = [(a, b) for a in per_knob[0] for b in per_knob[1] if table.predict((a, b)) <= budget]
    cfg = SearchConfig(budget=budget, population=4, parents=2, evaluations=500, val_images=300, seed=1)
    result = search(ckpt, table, cfg, lambda c: table.predict(keep_counts(model, c)), None, log=lambda _: None)
    assert result.evaluations == len(feasible) > 4
    assert result.val_top1 == max(p["val_top1"] for p in result.pareto)


def test_search_resumes_from_its_state_file(ckpt_path, tmp_path):
    ckpt = Checkpoint.load(ckpt_path)
    model = ckpt.build_model()
    table = synthetic_table(model)
    cfg = SearchConfig(budget=8.5, population=12, parents=4, evaluations=15, val_images=200, seed=1)
    measure = lambda c: table.predict(keep_counts(model, c))  # noqa: E731
    state = tmp_path / "state.json"
    first = search(ckpt, table, cfg, measure, state, log=lambda _: None)
    assert state.is_file()
    logs: list[str] = []
    second = search(ckpt, table, cfg, measure, state, log=logs.append)
    assert any("resuming" in line for line in logs)
    assert second.sparsity == first.sparsity and second.evaluations == first.evaluations


def test_infeasible_budget_names_the_fastest_latency(ckpt_path):
    ckpt = Checkpoint.load(ckpt_path)
    table = synthetic_table(ckpt.build_model())
    with pytest.raises(InfeasibleBudget, match=r"fastest reachable is 7\.07 ms") as e:
        search(ckpt, table, SearchConfig(budget=2.0), lambda c: 0.0, None, log=lambda _: None)
    assert "smaller model" in str(e.value) and e.value.exit_code == 7
    assert fastest_reachable(table) == pytest.approx(10.0 * 1.01 * (1 - 0.3 * 13 / 16) * (1 - 0.1 * 3 / 4))


def test_over_budget_measurements_are_never_returned(ckpt_path):
    ckpt = Checkpoint.load(ckpt_path)
    table = synthetic_table(ckpt.build_model())
    cfg = SearchConfig(budget=8.0, population=8, parents=2, evaluations=6, val_images=100, measure_top=2)
    with pytest.raises(InfeasibleBudget, match="measured within"):
        search(ckpt, table, cfg, lambda c: 99.0, None, log=lambda _: None)


def test_pareto_front_keeps_only_undominated():
    from edgevit.search import Candidate

    cands = [Candidate((0.1,), (1,), 5.0, 80.0), Candidate((0.2,), (1,), 4.0, 85.0), Candidate((0.3,), (1,), 6.0, 84.0),
             Candidate((0.4,), (1,), 7.0, 90.0)]
    assert [p["val_top1"] for p in pareto_front(cands)] == [85.0, 90.0]


@pytest.mark.tvm
@pytest.mark.slow
def test_profile_search_and_compile_end_to_end(ckpt_path, tmp_path):
    runner = CliRunner()
    table_path = tmp_path / "table.json"
    r = runner.invoke(cli, ["profile", "--target", "host", "--checkpoint", str(ckpt_path), "-o", str(table_path),
                            "--validate", "3", "--calibrate", "2"])
    assert r.exit_code == 0, r.output
    table = LatencyTable.load(table_path)
    assert table.dense_ms > 0 and table.validation["configs"] == 3
    assert set(table.deltas[0]) == {14, 12, 11, 9, 8, 6, 4, 3}
    assert table.validation["mape"] < 50  # a sanity bound; the real figure is measured in benchmarks
    # generous: the run checks the mechanics; a tight budget fails on this machine's timing noise
    budget = 2 * table.dense_ms
    out = tmp_path / "result.json"
    r = runner.invoke(cli, ["search", "--budget", f"{budget:.4f}ms", "--target", "host", "--checkpoint",
                            str(ckpt_path), "--table", str(table_path), "--evaluations", "12", "--population", "12",
                            "--val-images", "200", "-o", str(out)])
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["kind"] == "edgevit.search_result" and result["measured_ms"] <= budget
    assert SearchResult.load(out).to_dict() == result
    assert not (tmp_path / "result.json.state.json").exists()
    chosen = SparsityConfig.load(out)
    r = runner.invoke(cli, ["compile", "--target", "host", "--checkpoint", str(ckpt_path), "--sparsity", str(out),
                            "-o", str(tmp_path / "art")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["sparsity"]["ratios"] == list(chosen.ratios)

    r = runner.invoke(cli, ["search", "--budget", "1us", "--target", "host", "--checkpoint", str(ckpt_path),
                            "--table", str(table_path), "-o", str(tmp_path / "none.json")])
    assert r.exit_code == 7 and "fastest reachable" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "none.json").exists()


def test_profile_refuses_models_without_windows(tmp_path):
    path = tmp_path / "vit.pt"
    Checkpoint.from_model(create_model("vit_micro")).save(path)
    r = CliRunner().invoke(cli, ["profile", "--target", "host", "--checkpoint", str(path)])
    assert r.exit_code == 2 and "no windows to prune" in r.output


def test_accuracy_oracle_reuses_stage_outputs_without_changing_a_logit(ckpt_path):
    """Configs sharing their first stage start from its stored output; every logit equals the
    model's own forward under the config, with reuse or without it (no room to store)."""
    from edgevit.search import AccuracyOracle
    from edgevit.sparsity import sample_config

    ckpt = Checkpoint.load(ckpt_path)
    reusing, plain = AccuracyOracle(ckpt, 300, 0), AccuracyOracle(ckpt, 300, 0, reuse_bytes=0)
    base = SparsityConfig.for_model(reusing.model)
    rng = torch.Generator().manual_seed(0)
    configs = [sample_config(base.stage_knobs, rng, base.levels) for _ in range(4)]
    configs += [SparsityConfig([configs[0].ratios[0], r], base.stage_knobs, base.levels) for r in (0.0, 0.3, 0.6)]
    for config in configs:
        for oracle in (reusing, plain):
            oracle.model.set_sparsity(config)
            with torch.inference_mode():
                for i, (x, _) in enumerate(oracle.batches):
                    assert torch.equal(oracle._logits(i, x), oracle.model(x))
    assert reusing.reusable_stages == 1 and reusing.reuse.hits >= 3 * len(reusing.batches)
    assert plain.reuse.hits == 0 and plain.reuse.bytes == 0
    assert reusing(configs[-1], keep_counts(reusing.model, configs[-1])) == plain(configs[-1], keep_counts(plain.model, configs[-1]))


def test_pruned_units_combine_as_a_product_and_old_tables_still_add(ckpt_path, tmp_path):
    """Two units saving 20% and 10% alone leave 0.8 x 0.9 of dense together (not 0.7); a table
    written before the product fit (no "combine") still adds its deltas."""
    table = LatencyTable({"target": "host"}, 10.0, [{2: -2.0}, {1: -1.0}], [4, 4])
    assert table.predict((2, 4)) == pytest.approx(8.0) and table.predict((2, 1)) == pytest.approx(7.2)
    legacy = table.to_dict()
    del legacy["combine"]
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    assert LatencyTable.load(tmp_path / "old.json").predict((2, 1)) == pytest.approx(7.0)
