"""`edgevit bench` of a compiled artifact beside ONNX Runtime running the same model, measured the
same way in one run: warm-up excluded, one sample per call, the same statistics.

ONNX Runtime gets the model exported from PyTorch (under the same sparsity config, as static
window gather/scatter) and this machine's threads; edgevit's figures are `bench`'s own. The
two are measured in alternating chunks, so drift hits both alike.

    python benchmarks/bench_vs_ort.py [--model swin_fashion] [--checkpoint CKPT] [--sparsity 0.5]
                                      [--seconds 10] [--json out.json]

Without --checkpoint the model has random weights: latency does not depend on them (window
selection keeps a fixed count per stage), and top-1 is not reported.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgevit.backend.runtime import Device, Session
from edgevit.bench import summarize
from edgevit.checkpoint import Checkpoint
from edgevit.compile import CompileConfig, compile_model
from edgevit.models import create_model
from edgevit.sparsity import SparsityConfig
from edgevit.targets import load_target


def ort_session(model: torch.nn.Module, x: torch.Tensor, threads: int):
    import onnxruntime as ort

    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), buf, input_names=["x"], dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="swin_fashion")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--sparsity", default=None, help="a uniform ratio, e.g. 0.5")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    ckpt = Checkpoint.load(args.checkpoint) if args.checkpoint else Checkpoint.from_model(create_model(args.model))
    model = ckpt.build_model().eval()
    sparsity = SparsityConfig.uniform(model, float(args.sparsity)) if args.sparsity else None
    if sparsity is not None:
        model.set_sparsity(sparsity)
    with tempfile.TemporaryDirectory() as tmp:
        art = compile_model(ckpt, load_target("host"), Path(tmp) / "art", sparsity, CompileConfig(images=16),
                            log=lambda _: None)
        x, _ = art.reference()
        tvm_session = Session(Device("cpu"), art.library, art.weights)
        ort = ort_session(model, torch.from_numpy(x), args.threads)
        feed = {"x": x}
        np.testing.assert_allclose(ort.run(None, feed)[0], tvm_session.run(x), atol=1e-3, rtol=1e-3)
        samples = {"edgevit": [], "onnxruntime": []}
        for _ in range(20):                                   # warm-up, not kept
            tvm_session.time_ms(x, number=1, repeat=1)
            ort.run(None, feed)
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end or len(samples["edgevit"]) < 662:
            samples["edgevit"].extend(tvm_session.time_ms(x, number=1, repeat=32))
            for _ in range(32):
                t0 = time.perf_counter()
                ort.run(None, feed)
                samples["onnxruntime"].append((time.perf_counter() - t0) * 1e3)
    rows = {name: summarize(s)[0] for name, s in samples.items()}
    label = f"{args.model} {'s' + args.sparsity if args.sparsity else 'dense'} b1, {args.threads} threads"
    print(f"{label}: per-call latency (ms)")
    print(f"{'runtime':12s} {'n':>6s} {'min':>8s} {'median':>8s} {'mean':>8s} {'p90':>8s} {'p99':>8s} {'CoV':>6s}")
    for name, r in rows.items():
        print(f"{name:12s} {r['n']:6d} {r['min']:8.3f} {r['median']:8.3f} {r['mean']:8.3f} {r['p90']:8.3f} "
              f"{r['p99']:8.3f} {r['cov']:6.1%}")
    print(f"edgevit / ONNX Runtime (median): {rows['edgevit']['median'] / rows['onnxruntime']['median']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"case": label, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
