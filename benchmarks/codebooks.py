"""k-means codebooks and product quantization against fp32 and int8, on this CPU, in one run.

For each model trained here: quantize it with k-means at 8/6/4/3/2 bits and PQ with sub-vectors
of 4/8/16 (256 centroids at most), each fitted and then fine-tuned (centroids only, codes fixed);
int8 with `quantize`'s defaults beside them. Every variant is compiled for the host (batch 1 and
8 in one library, validated against its PyTorch model) and timed in this process with the same
thread count. Prints top-1 (fp32, fitted, fine-tuned) on the first N val / test images, the
weights.params bytes and ratio to fp32, and latency relative to the fp32 artifact; then an
accuracy-vs-size table with the published anchors (ANCHORS.md) beside ours.

Targets (issue 16): k-means 4-bit >= 7x smaller than fp32, top-1 within 0.5 points after
fine-tuning, latency <= 1.15x fp32; PQ >= 14x smaller at <= 1.5 points, latency <= 1.3x fp32.

    python benchmarks/codebooks.py [--swin runs/fashion4/model.pt] [--vit runs/vit_fashion/model.pt]
        [--bits 8 6 4 3 2] [--subvectors 4 8 16] [--finetune 0.1] [--eval-images 2000] [--json out.json]

The checkpoints: `edgevit train --data fashion-mnist --model swin_fashion --epochs 4 --out runs/fashion4`
and `edgevit train --data fashion-mnist --model vit_small_32 --set in_chans=1 --epochs 4 --out runs/vit_fashion`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from edgevit.checkpoint import Checkpoint
from edgevit.compile import CompileConfig, compile_model
from edgevit.data import load_data
from edgevit.quantize import QuantizeConfig, quantize
from edgevit.targets import load_target
from edgevit.timing import measure

ANCHORS = [   # published: (work, model, scheme, compression vs fp32, top-1 change in points)
    ("Deep Compression", "AlexNet", "k-means conv 8 bit / FC 5 bit", "~5-6x (no Huffman)", "0.0"),
    ("Deep Compression", "AlexNet", "k-means 4 bit conv / 2 bit FC", "~10x", "~-2"),
    ("MIT 6.5940 lab", "VGG, CIFAR-10", "k-means 4 bit, 1 epoch fine-tuning", "8x", "-0.5"),
    ("Stock et al. 2020", "ResNet-50", "PQ, 256 centroids, activation-aware + fine-tuning", "19x", "-2.36"),
]


def variants(bits: list[int], subvectors: list[int], finetune: float, eval_images: int) -> dict[str, QuantizeConfig]:
    out = {"int8": QuantizeConfig(eval_images=eval_images)}
    for b in bits:
        out[f"kmeans {b}-bit"] = QuantizeConfig(scheme="kmeans", bits=b, finetune=finetune, eval_images=eval_images)
    for d in subvectors:
        out[f"pq D={d}"] = QuantizeConfig(scheme="pq", subvector=d, centroids=256, activation_aware=True,
                                          calib_images=256, finetune=finetune, eval_images=eval_images)
    return out


def runner(folder: Path):
    from edgevit.backend.runtime import Device, Session

    return Session(Device("cpu"), folder / "model.so", folder / "weights.params", batches=(1, 8)).run


def run_model(name: str, path: str, cfgs: dict, batches: list[int], seconds: float, tmp: Path) -> dict:
    ckpt = Checkpoint.load(path)
    data = load_data(ckpt.data["spec"], ckpt.data["image_size"], ckpt.data.get("seed", 0), 0.1)
    host = load_target("host")
    compile_cfg = CompileConfig(batch=batches[0], extra_batches=tuple(batches[1:]), min_fp32_agreement=0)
    rows = {"fp32": {"top1": None, "folder": tmp / f"{name}-fp32"}}
    compile_model(ckpt, host, rows["fp32"]["folder"], None, compile_cfg, log=lambda s: None)
    for tag, cfg in cfgs.items():
        print(f"  {name} {tag}: quantize", flush=True)
        q = quantize(ckpt, data, tmp / f"{name}-{tag}", None, cfg, log=lambda s: print(f"    {s}", flush=True))
        folder = tmp / f"{name}-{tag}-artifact"
        art = compile_model(q.checkpoint, host, folder, None, compile_cfg, log=lambda s: None)
        real = next(v for k, v in art.manifest.validation.items() if k.endswith("val images"))
        rows[tag] = {"top1": q.record["top1"], "folder": folder, "layer_bytes": q.record["weight_bytes"],
                     "max_abs_error_vs_own_model": real["max_abs_error"]}
    x = {b: _input(ckpt, b) for b in batches}
    runs = {tag: runner(r["folder"]) for tag, r in rows.items()}
    fp32_bytes = (rows["fp32"]["folder"] / "weights.params").stat().st_size
    for r in rows.values():
        r["weights_bytes"] = (r.pop("folder") / "weights.params").stat().st_size
        r["smaller"] = fp32_bytes / r["weights_bytes"]
    for b in batches:     # interleaved rounds so drift hits every variant alike
        medians = {tag: [] for tag in runs}
        for _ in range(3):
            for tag, run in runs.items():
                medians[tag].append(measure(lambda r=run, a=x[b]: r(a), min_seconds=seconds / 3)["median"])
        for tag in runs:
            rows[tag][f"ms_b{b}"] = float(np.median(medians[tag]))
    for r in rows.values():
        for b in batches:
            r[f"x_fp32_b{b}"] = r[f"ms_b{b}"] / rows["fp32"][f"ms_b{b}"]
    return rows


def _input(ckpt: Checkpoint, batch: int) -> np.ndarray:
    c = ckpt.model_config
    return torch.randn(batch, c["in_chans"], c["img_size"], c["img_size"],
                       generator=torch.Generator().manual_seed(0)).numpy()


def table(name: str, rows: dict, batches: list[int]) -> str:
    head = ("| variant | weights.params | x smaller | test top-1 fp32 | fitted | fine-tuned | change | "
            + " | ".join(f"b{b} ms (x fp32)" for b in batches) + " |")
    lines = [f"### {name}", "", head, "|" + "---|" * (7 + len(batches))]
    for tag, r in rows.items():
        t = (r["top1"] or {}).get("test")
        scheme = tag.split()[0]
        if t:
            fitted = t.get("before_finetune", t[scheme])
            top = f"{t['fp32']:.2f} | {fitted:.2f} | {t[scheme]:.2f} | {t[scheme] - t['fp32']:+.2f}"
        else:
            top = "- | - | - | -"
        lat = " | ".join(f"{r[f'ms_b{b}']:.3f} ({r[f'x_fp32_b{b}']:.2f}x)" for b in batches)
        lines.append(f"| {tag} | {r['weights_bytes'] / 1e3:.1f} kB | {r['smaller']:.2f}x | {top} | {lat} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--swin", default="runs/fashion4/model.pt")
    p.add_argument("--vit", default="runs/vit_fashion/model.pt")
    p.add_argument("--bits", nargs="*", type=int, default=[8, 6, 4, 3, 2])
    p.add_argument("--subvectors", nargs="*", type=int, default=[4, 8, 16])
    p.add_argument("--finetune", type=float, default=0.1, help="epochs of centroid fine-tuning per variant")
    p.add_argument("--eval-images", type=int, default=2000, help="top-1 on the first N val and test images")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--seconds", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfgs = variants(args.bits, args.subvectors, args.finetune, args.eval_images)
    results, tables = {}, []
    with tempfile.TemporaryDirectory(prefix="edgevit-codebooks-") as tmp:
        for name, path in (("swin_fashion", args.swin), ("vit_fashion", args.vit)):
            if not Path(path).is_file():
                print(f"{name}: no checkpoint at {path}; skipped (train it, see the docstring)")
                continue
            print(f"== {name} ({path})", flush=True)
            results[name] = run_model(name, path, cfgs, args.batches, args.seconds, Path(tmp))
            tables.append(table(name, results[name], args.batches))
            print(tables[-1], flush=True)
    print("\n### Published anchors\n\n| work | model | scheme | compression | top-1 change |\n|---|---|---|---|---|")
    for row in ANCHORS:
        print("| " + " | ".join(row) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "anchors": ANCHORS, "settings": vars(args)},
                                              indent=1, default=str))


if __name__ == "__main__":
    main()
