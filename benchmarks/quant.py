"""int8 against fp32 and against the int8 users have elsewhere, on this CPU, in one run.

For each model: quantize it with `edgevit quantize`'s defaults (calibration on training
images), compile fp32 and int8 artifacts for the host, then time at each batch, all with the
same thread count: PyTorch fp32 eager, ONNX Runtime fp32, ONNX Runtime int8 (`quantize_static`,
QDQ, per-channel S8S8, the same calibration images; and `quantize_dynamic`), edgevit fp32 and
edgevit int8. Prints top-1 fp32 vs int8 (models trained here), per-layer SQNR, weight bytes.

Targets (issue 15): top-1 within 0.5 points; int8 >= 2.0x faster than edgevit fp32 on ViT-Ti and
Swin-T at batch 1 and <= 0.8x ONNX Runtime int8; weights >= 3.9x smaller.

    python benchmarks/quant.py [--models swin_fashion vit_fashion vit_tiny swin_t] [--batches 1 8]
                               [--seconds 2] [--json out.json]

Models: swin_fashion / vit_fashion are checkpoints trained here on Fashion-MNIST (paths below,
or --swin / --vit); vit_tiny and swin_t (224x224) have random weights (no weights can be
downloaded here) and are calibrated on Fashion-MNIST images resized to 224 and repeated to 3
channels: their latency and SQNR are meaningful, their top-1 is not reported.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import tempfile
from pathlib import Path

import torch

from edgevit.checkpoint import Checkpoint
from edgevit.compile import CompileConfig, compile_model
from edgevit.data import DataBundle, ImageSet, load_data
from edgevit.models import create_model
from edgevit.quantize import QuantizeConfig, quantize
from edgevit.targets import load_target
from edgevit.timing import measure

TRAINED = {"swin_fashion": "runs/q/swin_fashion/model.pt", "vit_fashion": "runs/q/vit_fashion/model.pt"}


def fashion_at(size: int, channels: int, n_train: int = 512, n_eval: int = 64) -> DataBundle:
    """Fashion-MNIST subsets resized to `size`, repeated to `channels` (calibration images for
    random-weight models; only the subsets are resized, the whole set at 224 would be 3.5 GB)."""
    import torch.nn.functional as F

    d = load_data("fashion-mnist", 28)

    def take(s: ImageSet, n: int) -> ImageSet:
        x = F.interpolate(s.images[:n].float(), size=(size, size), mode="bilinear", align_corners=False)
        return ImageSet(x.round().clamp(0, 255).to(torch.uint8).repeat(1, channels, 1, 1), s.labels[:n], s.classes)

    return DataBundle(d.spec, take(d.train, n_train), take(d.val, n_eval), take(d.test, n_eval),
                      d.mean * channels, d.std * channels)


def load_case(name: str, paths: dict) -> tuple[Checkpoint, DataBundle, bool]:
    if name in paths:
        ckpt = Checkpoint.load(paths[name])
        d = ckpt.data
        return ckpt, load_data(d["spec"], ckpt.model_config["img_size"], d.get("seed", 0),
                               d.get("val_fraction", 0.1)), True
    torch.manual_seed(0)
    model = create_model(name)
    data = fashion_at(model.cfg.img_size, model.cfg.in_chans)
    ckpt = Checkpoint.from_model(model, data={"spec": "fashion-mnist", "mean": data.mean, "std": data.std})
    return ckpt, data, False


def onnx_bytes(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(model, (x,), buf, input_names=["x"], opset_version=17, dynamo=False)
    return buf.getvalue()


def ort_models(fp32: torch.nn.Module, x: torch.Tensor, calib: torch.Tensor, tmp: Path) -> dict[str, str]:
    """fp32, static QDQ per-channel int8 (calibrated on `calib`) and dynamic int8 ONNX files."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.ERROR)   # "Axis 1 is out-of-range for weight norm1.weight", per layer

    raw, pre = tmp / "fp32.onnx", tmp / "pre.onnx"
    raw.write_bytes(onnx_bytes(fp32, x))
    quant_pre_process(str(raw), str(pre), skip_symbolic_shape=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": calib[i:i + len(x)].numpy()} for i in range(0, len(calib) - len(x) + 1, len(x))])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(pre), str(tmp / "static.onnx"), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    quantize_dynamic(str(pre), str(tmp / "dynamic.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    return {"ort fp32": str(raw), "ort int8 static": str(tmp / "static.onnx"), "ort int8 dynamic": str(tmp / "dynamic.onnx")}


def ort_runner(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def edgevit_runner(folder: Path):
    from edgevit.backend.runtime import Device, Session

    session = Session(Device("cpu"), folder / "model.so", folder / "weights.params")
    return session.run


def run_model(name: str, paths: dict, batches: list[int], seconds: float, threads: int, tmp: Path) -> dict:
    ckpt, data, trained = load_case(name, paths)
    qcfg = QuantizeConfig(eval_images=0 if trained else 16, calib_images=512 if trained else 128)
    q = quantize(ckpt, data, tmp / f"{name}-int8", None, qcfg, log=lambda s: print(f"  {s}"))
    rec = q.record
    sqnr = sorted((v["sqnr_db"], n) for n, v in rec["layers"].items())
    out = {"trained": trained, "top1": rec["top1"] if trained else None, "weight_bytes_layers": rec["weight_bytes"],
           "sqnr_db": {"min": sqnr[0][0], "median": sqnr[len(sqnr) // 2][0], "worst": sqnr[:3]}, "batches": {}}
    fp32_model = ckpt.build_model().eval()
    c = fp32_model.cfg
    for batch in batches:
        x = torch.randn(batch, c.in_chans, c.img_size, c.img_size, generator=torch.Generator().manual_seed(0))
        runners, sizes = {}, {}
        for tag, source in (("edgevit fp32", ckpt), ("edgevit int8", q.checkpoint)):
            folder = tmp / f"{name}-{tag.split()[1]}-b{batch}"
            # random weights leave logits nearly tied: one rounding step flips a noise image's top-1, so
            # only the max abs error (0.1 on logits) holds those models to their fake-quantized twin
            compile_model(source, load_target("host"), folder, None,
                          CompileConfig(batch=batch, images=8, min_top1_agreement=99.0 if trained else 90.0),
                          log=lambda s: None)
            runners[tag], sizes[tag] = edgevit_runner(folder), (folder / "weights.params").stat().st_size
        calib = next(iter(torch.utils.data.DataLoader(data.train.images[:64].float() / 255, batch_size=64)))
        calib = (calib - torch.tensor(data.mean)[:, None, None]) / torch.tensor(data.std)[:, None, None]
        for tag, path in ort_models(fp32_model, x, calib, tmp).items():
            runners[tag], sizes[tag] = ort_runner(path, threads), Path(path).stat().st_size
        with torch.no_grad():
            runners["pytorch fp32"] = lambda a: fp32_model(torch.from_numpy(a))
        xs = x.numpy()
        ms = {tag: measure(lambda r=run, a=xs: r(a), min_seconds=seconds)["median"] for tag, run in runners.items()}
        out["batches"][batch] = {"median_ms": ms, "bytes": sizes}
        print_batch(name, batch, ms, sizes)
    return out


def print_batch(name: str, batch: int, ms: dict, sizes: dict) -> None:
    e8, e32, o8 = ms["edgevit int8"], ms["edgevit fp32"], ms["ort int8 static"]
    print(f"{name} b{batch}: " + "  ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    print(f"{name} b{batch}: edgevit int8 is {e32 / e8:.2f}x faster than edgevit fp32, {e8 / o8:.2f}x ORT int8 static "
          f"latency, {e8 / ms['ort int8 dynamic']:.2f}x ORT int8 dynamic; weights.params {sizes['edgevit fp32'] / 1e6:.2f} "
          f"-> {sizes['edgevit int8'] / 1e6:.2f} MB ({sizes['edgevit fp32'] / sizes['edgevit int8']:.2f}x)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["swin_fashion", "vit_fashion", "vit_tiny", "swin_t"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--swin", default=TRAINED["swin_fashion"])
    p.add_argument("--vit", default=TRAINED["vit_fashion"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    paths = {k: v for k, v in (("swin_fashion", args.swin), ("vit_fashion", args.vit)) if Path(v).is_file()}
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgevit-quant-") as tmp:
        for name in args.models:
            if name in TRAINED and name not in paths:
                print(f"{name}: no checkpoint at {TRAINED[name]}; skipped (train it, see the docstring)")
                continue
            print(f"== {name}")
            results[name] = run_model(name, paths, args.batches, args.seconds, args.threads, Path(tmp))
            r = results[name]
            if r["top1"]:
                print(f"{name}: top-1 " + "  ".join(f"{s} fp32 {t['fp32']:.2f} -> int8 {t['int8']:.2f} "
                                                     f"({t['int8'] - t['fp32']:+.2f})" for s, t in r["top1"].items()))
            b = r["weight_bytes_layers"]
            print(f"{name}: quantized layers' weights {b['fp32'] / b['int8']:.2f}x smaller; SQNR min "
                  f"{r['sqnr_db']['min']:.1f} dB, median {r['sqnr_db']['median']:.1f} dB, worst {r['sqnr_db']['worst']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
