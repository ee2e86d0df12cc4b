"""Models users bring, compiled by edgevit and timed beside the runtimes they came from, in one run.

1. ONNX files a user exported (`--onnx PATH ...`; e.g. timm's vit_tiny_patch16_224 through
   torch.onnx.export, made outside edgevit: tests/fixtures/make_references.py shows how): compiled
   with `compile --onnx` for the host (and for the emulated board's rasp4b target, compile only:
   the emulator gives no timings), max abs error against ONNX Runtime, and latency against ONNX
   Runtime running the same file, batch 1 (and 8 where the batch axis is open).
2. The seeds' encoders at ViT-S/16 224 (`--encoders`; random weights, which latency does not
   depend on): compile time, artifact size, host latency against PyTorch eager and ONNX Runtime.

Each engine is timed in two interleaved rounds of `--seconds`; the lower round median is kept.
Same thread count for all (PyTorch's default here).

    python benchmarks/users_models.py --onnx /tmp/vit_tiny_timm.onnx --encoders [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgevit.timing import measure

SEEDS = ["mae", "dino", "mocov3", "beit", "clip"]


def ort_session(model: bytes | str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def interleaved(engines: dict, seconds: float, rounds: int = 2) -> dict[str, float]:
    """Median ms of each engine's call, lowest over `rounds` rounds taken in turn."""
    best = {name: float("inf") for name in engines}
    for _ in range(rounds):
        for name, call in engines.items():
            best[name] = min(best[name], measure(call, min_seconds=seconds)["median"])
    return best


def artifact_call(folder: Path, x: np.ndarray):
    from edgevit.backend.runtime import Device, Session

    session = Session(Device("cpu"), folder / "model.so", folder / "weights.params", batches=(x.shape[0],))
    session.run(x)
    return lambda: session.run(x)


def onnx_rows(paths: list[str], threads: int, seconds: float, work: Path) -> list[dict]:
    from edgevit.backend.runtime import Device, Session
    from edgevit.compile import CompileConfig, compile_onnx
    from edgevit.onnx_model import OnnxModel
    from edgevit.targets import load_target

    rows = []
    for path in paths:
        model = OnnxModel.load(path)
        batches = [1, 8] if model.input_shape[0] is None else [model.input_shape[0]]
        start = time.perf_counter()
        art = compile_onnx(model, load_target("host"), work / f"{model.name}-host",
                           CompileConfig(batch=batches[0], extra_batches=tuple(batches[1:])), log=lambda _: None)
        host_seconds = time.perf_counter() - start
        start = time.perf_counter()
        compile_onnx(model, load_target("rasp4b"), work / f"{model.name}-rasp4b", CompileConfig(batch=1),
                     log=lambda _: None)
        arm_seconds = time.perf_counter() - start
        session = ort_session(str(path), threads)
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, *model.input_shape[1:]), dtype=np.float32)
            tvm_session = Session(Device("cpu"), art.library, art.weights, batches=tuple(batches))
            error = float(np.abs(tvm_session.run(x) - session.run(None, {model.input_name: x})[0]).max())
            feed = {model.input_name: x}
            times = interleaved({"edgevit": lambda s=tvm_session, x=x: s.run(x),
                                 "onnxruntime": lambda s=session, f=feed: s.run(None, f)}, seconds)
            rows.append({"onnx": str(path), "batch": batch, "max_abs_error_vs_ort": error,
                         "edgevit_ms": times["edgevit"], "ort_ms": times["onnxruntime"],
                         "ratio_vs_ort": times["edgevit"] / times["onnxruntime"],
                         "compile_host_s": host_seconds, "compile_rasp4b_s": arm_seconds,
                         "validation": art.manifest.validation.get("random")})
            print(json.dumps(rows[-1]))
    return rows


def encoder_rows(threads: int, seconds: float, work: Path) -> list[dict]:
    from edgevit.checkpoint import Checkpoint
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.models import create_model
    from edgevit.targets import load_target

    rows = []
    for seed in SEEDS:
        name = f"{seed}_vit_small_patch16"
        torch.manual_seed(0)
        model = create_model(name).eval()
        ckpt = Checkpoint.from_model(model)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        start = time.perf_counter()
        art = compile_model(ckpt, load_target("host"), work / name, None, CompileConfig(images=4), log=lambda _: None)
        compile_seconds = time.perf_counter() - start
        buf = io.BytesIO()
        with torch.no_grad():
            torch.onnx.export(model, (x,), buf, input_names=["x"], dynamo=False)
        session = ort_session(buf.getvalue(), threads)
        feed = {"x": x.numpy()}

        def eager(model=model, x=x):
            with torch.no_grad():
                return model(x)

        times = interleaved({"edgevit": artifact_call(art.path, x.numpy()), "pytorch": eager,
                             "onnxruntime": lambda s=session, f=feed: s.run(None, f)}, seconds)
        rows.append({"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                     "output_dim": int(art.manifest.output["shape"][1]), "compile_s": compile_seconds,
                     "artifact_mb": art.bytes / 1e6, "weights_mb": art.weights.stat().st_size / 1e6,
                     "max_abs_error_vs_pytorch": art.manifest.validation["random"]["max_abs_error"],
                     "edgevit_ms": times["edgevit"], "pytorch_ms": times["pytorch"], "ort_ms": times["onnxruntime"],
                     "ratio_vs_ort": times["edgevit"] / times["onnxruntime"],
                     "ratio_vs_pytorch": times["edgevit"] / times["pytorch"]})
        print(json.dumps(rows[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--onnx", nargs="*", default=[])
    ap.add_argument("--encoders", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "onnx": onnx_rows(args.onnx, args.threads, args.seconds, Path(tmp)),
               "encoders": encoder_rows(args.threads, args.seconds, Path(tmp)) if args.encoders else []}
    print("\n| ONNX file | batch | max abs err vs ORT | edgevit ms | ORT ms | x ORT | compile host / rasp4b s |")
    print("|---|---|---|---|---|---|---|")
    for r in out["onnx"]:
        print(f"| {Path(r['onnx']).name} | {r['batch']} | {r['max_abs_error_vs_ort']:.1e} | {r['edgevit_ms']:.2f} | "
              f"{r['ort_ms']:.2f} | {r['ratio_vs_ort']:.2f}x | {r['compile_host_s']:.1f} / {r['compile_rasp4b_s']:.1f} |")
    if out["encoders"]:
        print("\n| encoder (ViT-S/16, 224) | params | out | compile s | artifact MB | edgevit ms | PyTorch ms | ORT ms "
              "| x ORT | x PyTorch |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in out["encoders"]:
            print(f"| {r['model']} | {r['params_m']:.1f}M | {r['output_dim']} | {r['compile_s']:.1f} | "
                  f"{r['artifact_mb']:.1f} | {r['edgevit_ms']:.2f} | {r['pytorch_ms']:.2f} | {r['ort_ms']:.2f} | "
                  f"{r['ratio_vs_ort']:.2f}x | {r['ratio_vs_pytorch']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
