"""Latency-constrained search against its baselines, at three budgets, on this machine.

For an adapted checkpoint and its latency table (profiled on `host` if missing): three budgets
spread between the fastest reachable config and the dense model; at each, evolutionary search
(`edgevit search`, SparseViT's settings), random search with the same number of accuracy
evaluations, and the least sparse uniform config that fits. Every answer is compiled and
measured for real. Then, because a small model's space can be smaller than one population
(the fashion model has 36 distinct networks, which both searches enumerate), the same
comparison with a scaled-down population and evaluation budget over several seeds, scored
under the predictor; and the cost of `--evaluations` uncached accuracy evaluations, the part
of a search's wall time that grows with the space.

    python benchmarks/search_budgets.py --checkpoint runs/fashion/adapt/model.pt --table T.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from edgevit.checkpoint import Checkpoint
from edgevit.latency import Measurer, ProfileConfig, ensure_table
from edgevit.search import AccuracyOracle, SearchConfig, fastest_reachable, random_search, search
from edgevit.sparsity import SparsityConfig, keep_counts, sample_config
from edgevit.targets import load_target


def uniform_at_budget(model, table, budget: float) -> SparsityConfig | None:
    base = SparsityConfig.for_model(model)
    for r in base.levels:
        config = SparsityConfig.uniform(model, r)
        if table.predict(keep_counts(model, config)) <= budget:
            return config
    return None


def distinct_networks(model) -> int:
    """Configs keeping the same windows per knob are one network; count those the levels reach."""
    base = SparsityConfig.for_model(model)
    keeps = set()
    for ratios in itertools.product(base.levels, repeat=len(base.ratios)):
        config = SparsityConfig(ratios, base.stage_knobs, base.levels)
        keeps.add(keep_counts(model, config))
    return len(keeps)


def at_budget(ckpt, table, measurer, model, budget, args) -> dict:
    cfg = SearchConfig(budget=budget, evaluations=args.evaluations, val_images=args.val_images, seed=args.seed)
    start = time.perf_counter()
    evo = search(ckpt, table, cfg, lambda c: measurer(c.per_stage()), None, log=lambda s: None)
    seconds = time.perf_counter() - start
    oracle = AccuracyOracle(ckpt, args.val_images, args.seed)
    rand = random_search(ckpt, table, replace(cfg, evaluations=evo.evaluations), oracle)
    rand_config = SparsityConfig(rand.ratios, SparsityConfig.for_model(model).stage_knobs)
    row = {"budget_ms": budget, "evolution": {
        "ratios": evo.sparsity["ratios"], "val": evo.val_top1, "test": evo.test_top1, "predicted_ms": evo.predicted_ms,
        "measured_ms": evo.measured_ms, "evaluations": evo.evaluations, "generations": evo.generations,
        "seconds": round(seconds, 1)},
        "random": {"ratios": list(rand.ratios), "val": rand.val_top1, "test": oracle.test_top1(rand_config),
                   "predicted_ms": rand.predicted_ms, "measured_ms": measurer(rand_config.per_stage())}}
    uni = uniform_at_budget(model, table, budget)
    if uni is not None:
        keep = keep_counts(model, uni)
        row["uniform"] = {"ratios": list(uni.ratios), "val": oracle(uni, keep), "test": oracle.test_top1(uni),
                          "predicted_ms": table.predict(keep), "measured_ms": measurer(uni.per_stage())}
    return row


def small_population(ckpt, table, model, budget, args) -> dict:
    """Evolution vs random under the predictor with `--small` evaluations, over `--seeds` seeds."""
    evo_val, rand_val = [], []
    for seed in range(args.seeds):
        cfg = SearchConfig(budget=budget, population=args.small_population,
                           evaluations=args.small, val_images=args.val_images, seed=seed, measure_top=1)
        evo = search(ckpt, table, cfg, lambda c: table.predict(keep_counts(model, c)), None, log=lambda s: None)
        rand = random_search(ckpt, table, replace(cfg, evaluations=evo.evaluations))
        evo_val.append(evo.val_top1)
        rand_val.append(rand.val_top1)
    return {"budget_ms": budget, "evaluations": args.small, "population": args.small_population, "seeds": args.seeds,
            "evolution_val_mean": statistics.fmean(evo_val), "random_val_mean": statistics.fmean(rand_val),
            "evolution_wins": sum(e > r for e, r in zip(evo_val, rand_val)),
            "ties": sum(e == r for e, r in zip(evo_val, rand_val))}


def evaluation_cost(ckpt, n: int, val_images: int, reuse: bool = True) -> dict:
    """Wall time of `n` accuracy evaluations of random configs, none served from the network
    cache (as if each were a network not scored yet). Stored stage outputs are reused as in a
    search, except the last prunable stage's, so a repeat costs what a network differing only in
    its last prunable stage would; `reuse=False` computes every stage."""
    oracle = AccuracyOracle(ckpt, val_images, 0, **({} if reuse else {"reuse_bytes": 0}))
    base = SparsityConfig.for_model(oracle.model)
    import torch

    rng = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(n):
        config = sample_config(base.stage_knobs, rng, base.levels)
        oracle.cache.clear()
        oracle(config, keep_counts(oracle.model, config))
    seconds = time.perf_counter() - start
    return {"evaluations": n, "val_images": val_images, "seconds": round(seconds, 1),
            "seconds_each": round(seconds / n, 3), "stage_reuse": reuse,
            "batches_from_stored_stages": oracle.reuse.hits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--target", default="host")
    ap.add_argument("--table", default=None, help="latency table (default: the target's, profiled if missing)")
    ap.add_argument("--evaluations", type=int, default=500)
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", type=int, default=12, help="evaluations in the scaled-down comparison (0: skip)")
    ap.add_argument("--small-population", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--parts", nargs="+", default=["budgets", "small", "cost"], choices=["budgets", "small", "cost"],
                    help="which comparisons to run")
    ap.add_argument("--no-reuse", action="store_true", help="cost: compute every stage of every evaluation")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    ckpt, target = Checkpoint.load(args.checkpoint), load_target(args.target)
    table, path = ensure_table(ckpt, target, None, ProfileConfig(), args.table)
    measurer = Measurer(ckpt, target, None, ProfileConfig(tuning=table.key["schedules"] != "rules"))
    model = ckpt.build_model().eval()
    fastest, dense = fastest_reachable(table), table.dense_ms
    print(f"{ckpt.model_name} on {target.name}: dense {dense:.3f} ms, fastest reachable {fastest:.3f} ms ({path}); "
          f"{distinct_networks(model)} distinct networks")
    report = {"table": str(path), "dense_ms": dense, "fastest_ms": fastest, "budgets": [], "small": []}
    budgets = [round(fastest + frac * (dense - fastest), 4) for frac in (0.25, 0.5, 0.75)]
    for budget in budgets if "budgets" in args.parts else []:
        row = at_budget(ckpt, table, measurer, model, budget, args)
        report["budgets"].append(row)
        for name in ("evolution", "random", "uniform"):
            r = row.get(name)
            if r:
                r["fits"] = r["measured_ms"] <= budget   # the baselines are not re-measured or gated
                print(f"budget {budget:.3f} ms  {name:9s} {str(r['ratios']):22s} val {r['val']:.2f}%  "
                      f"test {r['test']:.2f}%  predicted {r['predicted_ms']:.3f}  measured {r['measured_ms']:.3f} ms"
                      f"{'' if r['fits'] else '  (over budget)'}")
        e = row["evolution"]
        print(f"  evolution: {e['evaluations']} accuracy evaluations, {e['generations']} generations, "
              f"{e['seconds']:.0f} s wall (search + measuring the top candidates)")
    for budget in budgets if args.small and "small" in args.parts else []:
        s = small_population(ckpt, table, model, budget, args)
        report["small"].append(s)
        print(f"budget {budget:.3f} ms, {s['evaluations']} evaluations, population {s['population']}, "
              f"{s['seeds']} seeds: evolution val {s['evolution_val_mean']:.2f}% vs random {s['random_val_mean']:.2f}% "
              f"(evolution better {s['evolution_wins']}, tied {s['ties']})")
    if "cost" in args.parts:
        cost = evaluation_cost(ckpt, args.evaluations, args.val_images, not args.no_reuse)
        report["evaluation_cost"] = cost
        print(f"{cost['evaluations']} uncached accuracy evaluations ({cost['val_images']} val images each, stage "
              f"outputs {'reused' if cost['stage_reuse'] else 'not reused'}: {cost['batches_from_stored_stages']} "
              f"batches started from one): {cost['seconds']:.0f} s ({cost['seconds_each']:.2f} s each)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
