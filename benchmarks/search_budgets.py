"""Latency-constrained search against its baselines, at three budgets, on this machine.

For an adapted checkpoint and its latency table (profiled on `host` if missing): three budgets
spread between the fastest reachable config and the dense model; at each, evolutionary search
(`edgevit search`), random search with the same number of accuracy evaluations, and the least
sparse uniform config that fits. Every answer is compiled and measured for real.

    python benchmarks/search_budgets.py --checkpoint runs/fashion/adapt/model.pt [--evaluations 500]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from edgevit.checkpoint import Checkpoint
from edgevit.latency import Measurer, ProfileConfig, ensure_table, keep_counts
from edgevit.search import AccuracyOracle, SearchConfig, fastest_reachable, random_search, search
from edgevit.sparsity import SparsityConfig
from edgevit.targets import load_target


def uniform_at_budget(model, table, budget: float) -> SparsityConfig | None:
    base = SparsityConfig.for_model(model)
    for r in base.levels:
        config = SparsityConfig.uniform(model, r)
        if table.predict(keep_counts(model, config)) <= budget:
            return config
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--target", default="host")
    ap.add_argument("--table", default=None, help="latency table (default: the target's, profiled if missing)")
    ap.add_argument("--evaluations", type=int, default=500)
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    ckpt, target = Checkpoint.load(args.checkpoint), load_target(args.target)
    table, path = ensure_table(ckpt, target, None, ProfileConfig(), args.table)
    measurer = Measurer(ckpt, target, None, ProfileConfig(), tuning=table.key["schedules"] != "rules")
    model = ckpt.build_model().eval()
    fastest, dense = fastest_reachable(table), table.dense_ms
    print(f"{ckpt.model_name} on {target.name}: dense {dense:.3f} ms, fastest reachable {fastest:.3f} ms ({path})")
    rows = []
    for frac in (0.25, 0.5, 0.75):
        budget = round(fastest + frac * (dense - fastest), 4)
        cfg = SearchConfig(budget_ms=budget, evaluations=args.evaluations, val_images=args.val_images, seed=args.seed)
        start = time.perf_counter()
        evo = search(ckpt, table, cfg, lambda c: measurer(c.per_stage()), None, log=lambda s: None)
        oracle = AccuracyOracle(ckpt, args.val_images, args.seed)
        rand = random_search(ckpt, table, replace(cfg, evaluations=evo.evaluations), oracle)
        rand_config = SparsityConfig(rand.ratios, SparsityConfig.for_model(model).stage_knobs)
        uni = uniform_at_budget(model, table, budget)
        row = {"budget_ms": budget, "evolution": {
            "ratios": evo.sparsity["ratios"], "val": evo.val_top1, "test": evo.test_top1,
            "predicted_ms": evo.predicted_ms, "measured_ms": evo.measured_ms, "evaluations": evo.evaluations,
            "seconds": round(time.perf_counter() - start, 1)},
            "random": {"ratios": list(rand.ratios), "val": rand.val_top1, "test": oracle.test_top1(rand_config),
                       "predicted_ms": rand.predicted_ms, "measured_ms": measurer(rand_config.per_stage())}}
        if uni is not None:
            oracle.cache.clear()
            row["uniform"] = {"ratios": list(uni.ratios), "val": oracle(uni, keep_counts(model, uni)),
                              "test": oracle.test_top1(uni), "predicted_ms": table.predict(keep_counts(model, uni)),
                              "measured_ms": measurer(uni.per_stage())}
        rows.append(row)
        for name in ("evolution", "random", "uniform"):
            r = row.get(name)
            if r:
                print(f"budget {budget:.3f} ms  {name:9s} {str(r['ratios']):22s} val {r['val']:.2f}%  "
                      f"test {r['test']:.2f}%  predicted {r['predicted_ms']:.3f}  measured {r['measured_ms']:.3f} ms")
        print(f"  evolution: {evo.evaluations} accuracy evaluations, {row['evolution']['seconds']:.0f} s wall")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
