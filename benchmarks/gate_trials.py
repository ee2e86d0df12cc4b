"""How often `edgevit bench`'s regression gate is right, on this machine: an artifact made ~10%
slower must be flagged (p < 0.002 and median ratio > 1.10... or the factor given), an identical
rebuild must pass. Issue 17's targets: >= 19 of 20 trials each.

The slower artifact is the same ViT with one more block of the same width (depth d+1 against d:
~1/d more work in every kernel that scales with depth), compiled exactly as the baseline is; its
true slowdown is measured in the same run (the median ratio over all its trials) and printed,
so the figure is read against what the artifact really costs. Each trial measures the pair
interleaved, as `edgevit bench HEAD --against BASE` does, for `--seconds`.

    python benchmarks/gate_trials.py [--trials 20] [--seconds 1.5] [--depth 9] [--factor 1.05]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from edgevit.artifact import CompiledArtifact
from edgevit.bench import BenchConfig, GateConfig, bench_pair, gate
from edgevit.checkpoint import Checkpoint
from edgevit.compile import CompileConfig, compile_model
from edgevit.models import create_model
from edgevit.targets import load_target


def build(depth: int, folder: Path) -> CompiledArtifact:
    torch.manual_seed(0)
    ckpt = Checkpoint.from_model(create_model("vit_small_32", depth=depth))
    return compile_model(ckpt, load_target("host"), folder, None, CompileConfig(images=4), log=lambda _: None)


def trial(head: CompiledArtifact, base: CompiledArtifact, seconds: float, gate_cfg: GateConfig) -> dict:
    cfg = BenchConfig(duration_s=seconds, min_runs=64, warmup_s=0.2)
    h, b = bench_pair(head, base, cfg, log=lambda _: None)
    verdict = gate(h, b, gate_cfg)
    return {"ratio": verdict["checks"]["latency"]["ratio"], "p": verdict["checks"]["latency"]["p_value"],
            "flagged": not verdict["pass"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--depth", type=int, default=9, help="the baseline's depth; the slower artifact has one more")
    ap.add_argument("--factor", type=float, default=1.05,
                    help="the gate's factor (1.05: a 10%% slowdown must clear it with room for noise)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gate_cfg = GateConfig(factor=args.factor)
    with tempfile.TemporaryDirectory() as tmp:
        base, rebuild = build(args.depth, Path(tmp) / "base"), build(args.depth, Path(tmp) / "rebuild")
        slower = build(args.depth + 1, Path(tmp) / "slower")
        runs = {"slower": [], "rebuild": []}
        for i in range(args.trials):
            runs["slower"].append(trial(slower, base, args.seconds, gate_cfg))
            runs["rebuild"].append(trial(rebuild, base, args.seconds, gate_cfg))
            print(f"trial {i + 1}: slower x{runs['slower'][-1]['ratio']:.3f} p={runs['slower'][-1]['p']:.1e} "
                  f"{'flagged' if runs['slower'][-1]['flagged'] else 'MISSED'}; rebuild "
                  f"x{runs['rebuild'][-1]['ratio']:.3f} {'FALSE ALARM' if runs['rebuild'][-1]['flagged'] else 'pass'}",
                  flush=True)
    true_ratio = statistics.median(r["ratio"] for r in runs["slower"])
    print(f"slower artifact (depth {args.depth + 1} vs {args.depth}): median ratio x{true_ratio:.3f} over "
          f"{args.trials} trials; identical rebuild: ratios "
          f"{min(r['ratio'] for r in runs['rebuild']):.3f}..{max(r['ratio'] for r in runs['rebuild']):.3f}")
    for factor in sorted({args.factor, 1.10}):   # the same trials judged at the given and the default factor
        flagged = sum(r["ratio"] > factor and r["p"] < gate_cfg.alpha for r in runs["slower"])
        alarms = sum(r["ratio"] > factor and r["p"] < gate_cfg.alpha for r in runs["rebuild"])
        print(f"factor {factor:g}, p < {gate_cfg.alpha:g}: slower flagged {flagged}/{args.trials} "
              f"(missed {args.trials - flagged}); rebuild passed {args.trials - alarms}/{args.trials} "
              f"(false alarms {alarms})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
