"""Run compiled artifacts on the GPU they were built for, check them, and time them beside the
runtimes a user would otherwise ship: PyTorch eager, torch.compile and ONNX Runtime's CUDA
provider, same batch, same process, interleaved rounds.

For each `--artifact DIR --checkpoint CKPT` pair: the artifact's stored validation inputs run on
the device and are compared with the outputs compile saved from PyTorch or ONNX Runtime (the
artifact's own tolerance); the checkpoint rebuilds the PyTorch model (with the artifact's
sparsity config) for the peers. An artifact compiled from an ONNX file takes `--checkpoint none`:
its peer is ONNX Runtime on that file. An fp16 artifact's PyTorch peers run under fp16 autocast;
ONNX Runtime runs the fp32 export (say so when comparing). An artifact built for another GPU
architecture than the one here is skipped, said so. `--device cpu` runs the same steps on host
artifacts with CPU peers, which is how this script is tested on a machine without a GPU
(tests/test_gpu_run.py).

    python benchmarks/gpu_run.py --artifact out/cuda --checkpoint runs/fashion4/model.pt \
        [--artifact ... --checkpoint ...] [--seconds 2] [--json gpu.json] [--markdown gpu.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgevit.timing import measure  # noqa: E402


def artifact_session(art, device: str):
    from edgevit.backend.runtime import Device, Session

    return Session(Device(device), art.library, art.weights, batches=art.manifest.batches)


def check(session, art) -> dict:
    """The artifact on its stored validation inputs against the PyTorch outputs compile saved."""
    inputs, outputs = art.validation_set()
    batch = art.manifest.batch
    errors, agree = [], 0
    for i in range(0, len(inputs) - batch + 1, batch):
        got = session.run(inputs[i:i + batch])
        errors.append(float(np.abs(got - outputs[i:i + batch]).max()))
        agree += int((got.argmax(1) == outputs[i:i + batch].argmax(1)).sum())
    n = (len(inputs) // batch) * batch
    tol = art.manifest.tolerance
    figures = {"max_abs_error": max(errors), "top1_agreement": 100.0 * agree / n, "images": n}
    figures["ok"] = figures["max_abs_error"] <= tol.max_abs_error and figures["top1_agreement"] >= tol.min_top1_agreement
    return figures


def torch_peers(ckpt, art, device: str, x: np.ndarray) -> dict:
    """PyTorch eager and torch.compile on `device`, in the artifact's precision."""
    from edgevit.sparsity import SparsityConfig

    model = ckpt.build_model().eval().to(device)
    if art.manifest.sparsity is not None:
        model.set_sparsity(SparsityConfig.from_dict(art.manifest.sparsity))
    xt = torch.from_numpy(x).to(device)
    half = art.manifest.encoding == "fp16"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def runner(m):
        def call():
            with torch.no_grad(), torch.autocast(device, dtype=torch.float16 if device == "cuda" else torch.bfloat16,
                                                 enabled=half):
                m(xt)
            sync()
        return call

    peers = {"pytorch eager": runner(model)}
    try:
        compiled = torch.compile(model)
        runner(compiled)()                 # compile outside the timed rounds
        peers["torch.compile"] = runner(compiled)
    except Exception as e:  # noqa: BLE001 - inductor fails in many ways; report, keep the others
        print(f"torch.compile unavailable: {str(e).splitlines()[0][:160]}", file=sys.stderr)
    return peers


def ort_peer(ckpt, art, device: str, x: np.ndarray, folder: Path):
    """ONNX Runtime on the same model (the artifact's own ONNX file, or edgevit's export of the
    checkpoint, checked against PyTorch), CUDA provider on a GPU; None (said so) when that provider
    is not installed."""
    import onnxruntime as ort

    from edgevit.export import ExportConfig, export_onnx
    from edgevit.sparsity import SparsityConfig

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        print(f"ONNX Runtime has no {provider} here (pip install onnxruntime-gpu); skipped", file=sys.stderr)
        return None
    if ckpt is None:
        path = art.manifest.model["config"]["onnx"]
    else:
        sparsity = SparsityConfig.from_dict(art.manifest.sparsity) if art.manifest.sparsity else None
        path = folder / "model.onnx"
        export_onnx(ckpt, path, sparsity, ExportConfig(batch=art.manifest.batch, images=0), log=lambda _: None)
    session = ort.InferenceSession(str(path), providers=[provider])
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def arch_problem(art, device: str) -> str | None:
    """Why this GPU is not the one the artifact's cubin is for (None: it is, or a CPU run)."""
    if device != "cuda":
        return None
    import tvm

    here = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    built = art.manifest.cuda["architectures"][0] if art.manifest.cuda else art.manifest.target["tvm"].get("arch")
    return None if here == built else f"built for {built}, this GPU is {here}"


def run_pair(artifact: str, checkpoint: str, device: str, seconds: float, rounds: int) -> dict | None:
    from edgevit.artifact import CompiledArtifact
    from edgevit.checkpoint import Checkpoint

    art = CompiledArtifact.load(artifact)
    ckpt = None if checkpoint == "none" else Checkpoint.load(checkpoint)
    if ckpt is None and art.manifest.model.get("stage") != "onnx":
        raise SystemExit(f"{artifact}: compiled from a checkpoint; pass it with --checkpoint")
    problem = arch_problem(art, device)
    if problem:
        print(f"{artifact}: skipped ({problem})", file=sys.stderr)
        return None
    session = artifact_session(art, device)
    row = {"artifact": artifact, "target": art.manifest.target["name"], "encoding": art.manifest.encoding,
           "batch": art.manifest.batch, "device": device, "check": check(session, art)}
    x = art.reference()[0]
    with tempfile.TemporaryDirectory(prefix="edgevit-gpu-run-") as tmp:
        engines = {"edgevit": lambda: session.run(x), **(torch_peers(ckpt, art, device, x) if ckpt else {})}
        ort_call = ort_peer(ckpt, art, device, x, Path(tmp))
        if ort_call is not None:
            engines["onnxruntime"] = ort_call
        best = {name: float("inf") for name in engines}
        for _ in range(rounds):
            for name, call in engines.items():
                best[name] = min(best[name], measure(call, min_seconds=seconds)["median"])
    row["median_ms"] = {k: round(v, 4) for k, v in best.items()}
    row["x_peer"] = {k: round(best["edgevit"] / v, 3) for k, v in best.items() if k != "edgevit"}
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| artifact | target | encoding | batch | check | edgevit ms | PyTorch | torch.compile | ORT | x ORT |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, c = r["median_ms"], r["check"]
        cell = "{:.3f}".format
        lines.append(f"| {r['artifact']} | {r['target']} | {r['encoding']} | {r['batch']} | "
                     f"{c['max_abs_error']:.1e}, {c['top1_agreement']:.1f}% {'ok' if c['ok'] else 'FAIL'} | "
                     f"{cell(m['edgevit'])} | {cell(m['pytorch eager']) if 'pytorch eager' in m else '-'} | "
                     f"{cell(m['torch.compile']) if 'torch.compile' in m else '-'} | "
                     f"{cell(m['onnxruntime']) if 'onnxruntime' in m else '-'} | "
                     f"{r['x_peer'].get('onnxruntime', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", action="append", required=True)
    ap.add_argument("--checkpoint", action="append", required=True,
                    help="one per --artifact, in order ('none' for an artifact compiled from an ONNX file)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    args = ap.parse_args(argv)
    if len(args.artifact) != len(args.checkpoint):
        ap.error("give one --checkpoint per --artifact")
    rows = []
    for artifact, checkpoint in zip(args.artifact, args.checkpoint):
        row = run_pair(artifact, checkpoint, args.device, args.seconds, args.rounds)
        if row is not None:
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table)
    return rows


if __name__ == "__main__":
    main()
