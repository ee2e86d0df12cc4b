"""Window sparsity speedup of Swin-T in eager PyTorch on this CPU, batch 1, random weights.

Measures dense and uniform sparsity 0 / 0.3 / 0.5 / 0.7 at 224x224 and 448x448 in one run and
prints latency speedups beside FLOP reductions. Target (issue 3): >= 1.5x at 0.5 on 448x448.

    python benchmarks/sparsity_speedup.py [--json out.json] [--sizes 224 448] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

from edgevit.flops import count_flops
from edgevit.models import create_model
from edgevit.sparsity import SparsityConfig
from edgevit.timing import measure

RATIOS = (0.0, 0.3, 0.5, 0.7)


def bench_size(img_size: int, seconds: float) -> list[dict]:
    torch.manual_seed(0)
    model = create_model("swin_t", img_size=img_size).eval()
    x = torch.randn(1, 3, img_size, img_size)
    rows = []
    for label, ratio in [("dense", None)] + [(f"uniform {r:.1f}", r) for r in RATIOS]:
        model.set_sparsity(None if ratio is None else SparsityConfig.uniform(model, ratio))
        flops = count_flops(model)["total"]
        with torch.inference_mode():
            stats = measure(lambda: model(x), warmup=3, min_runs=10, min_seconds=seconds)
        rows.append({"img_size": img_size, "config": label, "ratio": ratio, "flops": flops, **stats})
    dense = rows[0]
    for row in rows:
        row["speedup"] = dense["median"] / row["median"]
        row["flop_reduction"] = dense["flops"] / row["flops"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per config")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = [row for size in args.sizes for row in bench_size(size, args.seconds)]
    print(f"Swin-T, batch 1, eager PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print(f"{'size':>5} {'config':12} {'GFLOPs':>7} {'median ms':>10} {'p90 ms':>8} {'cv':>5} "
          f"{'speedup':>8} {'FLOPs ratio':>11}")
    for r in rows:
        print(f"{r['img_size']:>5} {r['config']:12} {r['flops'] / 1e9:7.2f} {r['median']:10.1f} {r['p90']:8.1f} "
              f"{r['cv']:5.2f} {r['speedup']:7.2f}x {r['flop_reduction']:10.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
