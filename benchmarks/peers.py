"""edgevit's compiled models against the runtimes users already have, on this CPU, in one run.

For each model (quickstart and fashion Swins, ViT-Ti, Swin-T and EfficientViT-B1 at 224x224, the
fashion EfficientViT), dense and at
uniform window sparsity 0.5 (Swins), batch 1 and 8: PyTorch eager, ONNX Runtime (CPU provider),
TVM with edgevit's default schedules ("untuned") and TVM with the tuning database ("tuned"),
all with the same thread count. Prints latency ratios against ONNX Runtime and achieved
GFLOP/s against this machine's fp32 matmul peak, measured in the same run (PyTorch sgemm).

Targets (issue 5): tuned <= 0.8x ORT at batch 1; untuned <= 2x ORT; compiled Swin-T at 0.5
>= 1.6x faster than compiled dense Swin-T.

    python benchmarks/peers.py [--models fashion swin_t ...] [--batches 1 8] [--trials 16]
                               [--database DIR] [--seconds 2] [--json out.json]

--trials 0 skips tuning (the tuned column then uses whatever the database already holds).
Trained checkpoints are used where they exist (runs/), random weights otherwise: latency does
not depend on the weights (window selection keeps a fixed count per stage).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgevit.checkpoint import Checkpoint
from edgevit.flops import count_flops
from edgevit.models import create_model
from edgevit.sparsity import SparsityConfig
from edgevit.timing import measure

MODELS = {  # name: (registry model, checkpoint if present)
    "quickstart": ("swin_quickstart", "runs/quickstart/train/model.pt"),
    "fashion": ("swin_fashion", "runs/fashion/adapt/model.pt"),
    "vit_tiny": ("vit_tiny", None),
    "swin_t": ("swin_t", None),
    "efficientvit_fashion": ("efficientvit_fashion", "runs/efficientvit/train/model.pt"),   # the recipe's
    "efficientvit_b1": ("efficientvit_b1", None),
}


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    ckpt: Checkpoint
    sparsity: SparsityConfig | None
    batch: int

    @property
    def label(self) -> str:
        return f"{self.name} {'s0.5' if self.sparsity else 'dense'} b{self.batch}"

    def input(self) -> torch.Tensor:
        c = self.model.cfg
        return torch.randn(self.batch, c.in_chans, c.img_size, c.img_size, generator=torch.Generator().manual_seed(0))


def load_case_model(name: str) -> tuple[torch.nn.Module, Checkpoint]:
    model_name, path = MODELS[name]
    if path and Path(path).is_file():
        ckpt = Checkpoint.load(path)
    else:
        torch.manual_seed(0)
        ckpt = Checkpoint.from_model(create_model(model_name))
    return ckpt.build_model().eval(), ckpt


def matmul_peak_gflops(threads: int, seconds: float) -> float:
    """fp32 peak as PyTorch's sgemm reaches it on 1024^3 (the practical ceiling here)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    stats = measure(lambda: torch.mm(a, b), min_seconds=seconds)
    return 2 * 1024 ** 3 / (stats["median"] * 1e-3) / 1e9


def time_torch(case: Case, seconds: float) -> float:
    x = case.input()
    with torch.no_grad():
        return measure(lambda: case.model(x), min_seconds=seconds)["median"]


def time_ort(case: Case, threads: int, seconds: float) -> float:
    import onnxruntime as ort

    x = case.input()
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(case.model, (x,), buf, input_names=["x"], dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return measure(lambda: session.run(None, feed), min_seconds=seconds)["median"]


def time_tvm(case: Case, target, database: str | None, seconds: float) -> tuple[float, float]:
    """(median ms, build seconds) of the model compiled as `edgevit compile` does."""
    import tvm
    from tvm import relax

    from edgevit.backend.build import build
    from edgevit.backend.frontend import to_relax

    x = case.input()
    start = time.perf_counter()
    mod, weights = to_relax(case.model, x, target=target)
    vm = relax.VirtualMachine(build(mod, target, database), tvm.cpu())
    built = time.perf_counter() - start
    args = [tvm.runtime.tensor(x.numpy())] + [tvm.runtime.tensor(w) for w in weights]
    with torch.no_grad():
        ref = case.model(x).numpy()
    err = float(np.abs(vm["main"](*args).numpy() - ref).max())
    if err > 1e-3:
        raise SystemExit(f"{case.label}: TVM output differs from PyTorch by {err:.2e}")
    timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=max(5, int(seconds * 20)), min_repeat_ms=50)
    return float(np.median(timer(*args).results)) * 1e3, built


def cases(names: list[str], batches: list[int]) -> list[Case]:
    out = []
    for name in names:
        model, ckpt = load_case_model(name)
        configs = [None]
        if hasattr(model, "set_sparsity"):
            configs.append(SparsityConfig.uniform(model, 0.5))
        for sparsity in configs:
            m, _ = load_case_model(name)
            if sparsity is not None:
                m.set_sparsity(sparsity)
            for batch in batches:
                out.append(Case(name, m, ckpt, sparsity, batch))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per kernel (0: no tuning)")
    ap.add_argument("--database", default=None, help="tuning database (default: the host target's)")
    ap.add_argument("--cover", type=float, default=0.9, help="tune the slowest kernels making up this share")
    ap.add_argument("--tune-batches", nargs="+", type=int, default=[1], help="batch sizes to tune for")
    ap.add_argument("--tune-models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from edgevit.backend.database import database_dir
    from edgevit.targets import load_target
    from edgevit.tune import TuneConfig, tune_model

    torch.set_num_threads(args.threads)
    target = load_target("host")
    database = args.database or str(database_dir(target))
    peak = matmul_peak_gflops(args.threads, args.seconds)
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads; "
          f"fp32 matmul peak (PyTorch sgemm 1024^3): {peak:.1f} GFLOP/s")
    rows = []
    for case in cases(args.models, args.batches):
        if args.trials and case.batch in args.tune_batches and case.name in args.tune_models:
            t0 = time.perf_counter()
            cfg = TuneConfig(trials_per_kernel=args.trials, cover=args.cover, database=database, batch=case.batch)
            report = tune_model(case.ckpt, target, case.sparsity, cfg, log=lambda s: None)
            print(f"{case.label:24s} tuned {sum(k.trials > 1 for k in report.kernels)} kernels in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        flops = count_flops(case.model, case.batch)["total"]
        row = {"case": case.label, "gflop": flops / 1e9,
               "torch_ms": time_torch(case, args.seconds), "ort_ms": time_ort(case, args.threads, args.seconds)}
        row["tvm_untuned_ms"], row["build_s"] = time_tvm(case, target, None, args.seconds)
        row["tvm_tuned_ms"], _ = time_tvm(case, target, database, args.seconds)
        for k in ("torch", "tvm_untuned", "tvm_tuned"):
            row[f"{k}_vs_ort"] = row[f"{k}_ms"] / row["ort_ms"]
        row["tuned_gflops"] = flops / (row["tvm_tuned_ms"] * 1e-3) / 1e9
        row["tuned_pct_peak"] = 100 * row["tuned_gflops"] / peak
        rows.append(row)
        print(f"{row['case']:24s} torch {row['torch_ms']:8.2f} ms ({row['torch_vs_ort']:.2f}x ORT) | "
              f"ORT {row['ort_ms']:8.2f} | TVM untuned {row['tvm_untuned_ms']:8.2f} ({row['tvm_untuned_vs_ort']:.2f}x) | "
              f"tuned {row['tvm_tuned_ms']:8.2f} ({row['tvm_tuned_vs_ort']:.2f}x) | "
              f"{row['tuned_gflops']:.1f} GFLOP/s = {row['tuned_pct_peak']:.0f}% of peak", flush=True)
    by_case = {r["case"]: r for r in rows}
    for b in args.batches:
        dense, sparse = by_case.get(f"swin_t dense b{b}"), by_case.get(f"swin_t s0.5 b{b}")
        if dense and sparse:
            print(f"compiled Swin-T b{b}: uniform 0.5 is {dense['tvm_tuned_ms'] / sparse['tvm_tuned_ms']:.2f}x "
                  f"faster than dense (tuned), {dense['tvm_untuned_ms'] / sparse['tvm_untuned_ms']:.2f}x (untuned)")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_gflops": peak, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
