"""`quantize`: a checkpoint (+ sparsity config) -> a quantized model folder.

OUT/model.pt is a checkpoint (stage "quantize") whose weights are the equalised fp32 model and
whose quantization record holds the int8 weights and scales (quantization.py); `compile`,
`profile`, `search`, `eval` and `bench` take it like any checkpoint and run it as int8.
OUT/quantization.json says what was done and what it cost: the scheme and its settings, the
calibration, per-layer ranges and output SQNR (which layer hurts), and top-1 before and after on
the validation and test splits.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgevit.checkpoint import Checkpoint
from edgevit.errors import ConfigError, EdgeVitError
from edgevit.fileio import holds_only, publish_dir, write_json
from edgevit.quantization import METHODS, SAMPLES_PER_LAYER, SCHEMES
from edgevit.sparsity import SparsityConfig
from edgevit.stages import FINAL, StageRun

KIND, RECORD = "edgevit.quantization", "quantization.json"
FILES = (FINAL, RECORD)
Log = Callable[[str], None]


@dataclass(frozen=True)
class QuantizeConfig:
    """The recipe's [quantize] table and the `quantize` command's settings."""

    scheme: str = "int8"
    calib_images: int = 512           # training images the activation ranges are fitted on
    method: str = "mse"               # activation range: "mse" (least rounding + clipping error), "percentile", "minmax"
    percentile: float = 99.99         # for method = "percentile"
    equalize: bool = True             # fold per-channel scales of LayerNorm outputs into the LayerNorm and next linear
    alpha: float = 0.5                # migration strength of the equalisation (SmoothQuant's default)
    keep_fp32: tuple[str, ...] = ()   # layer name patterns left in fp32, e.g. "head*" (see `quantize --list-layers`)
    eval_images: int = 0              # top-1 before/after on the first N images of val and test (0: all of them)
    batch: int = 64
    seed: int = 0
    # codebook schemes (codebooks.py)
    bits: int = 4                     # kmeans: 2^bits shared values per layer (or per group)
    groups: int = 1                   # kmeans: codebooks per layer, over equal groups of output channels
    subvector: int = 8                # pq: inputs per sub-vector (D)
    centroids: int = 256              # pq: centroids per layer's codebook (K)
    activation_aware: bool = False    # weight the k-means error by the calibration inputs' mean square
    finetune: float = 0.0             # epochs (of the training split) training the centroids, codes fixed
    finetune_lr: float = 1e-4

    def __post_init__(self):
        from edgevit.codebooks import KMEANS_BITS, PQ_MAX_CENTROIDS, PQ_SUBVECTOR

        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme '{self.scheme}' is not one of {', '.join(SCHEMES)}")
        if not KMEANS_BITS[0] <= self.bits <= KMEANS_BITS[1]:
            raise ValueError(f"bits {self.bits} must be in {KMEANS_BITS[0]}..{KMEANS_BITS[1]}")
        if not PQ_SUBVECTOR[0] <= self.subvector <= PQ_SUBVECTOR[1]:
            raise ValueError(f"subvector {self.subvector} must be in {PQ_SUBVECTOR[0]}..{PQ_SUBVECTOR[1]}")
        if not 2 <= self.centroids <= PQ_MAX_CENTROIDS:
            raise ValueError(f"centroids {self.centroids} must be in 2..{PQ_MAX_CENTROIDS} (one-byte codes)")
        if self.groups < 1 or self.finetune < 0 or self.finetune_lr <= 0:
            raise ValueError("groups must be >= 1, finetune >= 0 epochs and finetune_lr > 0")
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}' is not one of {', '.join(METHODS)}")
        if self.calib_images < 1 or self.batch < 1 or self.eval_images < 0:
            raise ValueError("calib_images and batch must be >= 1, eval_images >= 0")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile {self.percentile} must be in (50, 100]")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha {self.alpha} must be in [0, 1]")
        object.__setattr__(self, "keep_fp32", tuple(self.keep_fp32))


@dataclass(frozen=True)
class QuantizedModel:
    """A quantize output folder: the checkpoint and its record."""

    folder: Path
    checkpoint: Checkpoint
    record: dict = field(repr=False)

    @classmethod
    def load(cls, folder: str | Path) -> "QuantizedModel":
        from edgevit.fileio import read_artifact

        folder = Path(folder)
        record = read_artifact(folder / RECORD, KIND, "quantize the model again with `edgevit quantize`")
        missing = [k for k in ("config", "source_checkpoint", "top1", "layers", "scheme", "weight_bytes",
                               "calibration") if k not in record]
        if missing:
            raise EdgeVitError(f"{folder / RECORD}: damaged quantization record (no '{missing[0]}'); quantize again")
        return cls(folder, Checkpoint.load(folder / FINAL), record)


def is_quantized_folder(folder: Path) -> bool:
    return (folder / RECORD).is_file() and holds_only(folder, FILES)


# ---------------------------------------------------------------------------- the verb


def quantize(ckpt: Checkpoint, data, out_dir: str | Path, sparsity: SparsityConfig | None = None,
             cfg: QuantizeConfig = QuantizeConfig(), log: Log = print) -> QuantizedModel:
    from edgevit.quantization import apply_quantization, equalize, quantizable_layers
    from edgevit.train import evaluate

    if ckpt.quantization is not None:
        raise ConfigError(f"the checkpoint is already quantized ({ckpt.scheme}); quantize its fp32 source instead")
    from edgevit.fileio import check_replaceable

    check_replaceable(Path(out_dir), is_quantized_folder, "a quantized model")   # before minutes of work
    if cfg.scheme != "int8":
        return _quantize_codebooks(ckpt, data, out_dir, sparsity, cfg, log)
    model = _prepared(ckpt, sparsity)
    layers = quantizable_layers(model, cfg.keep_fp32)
    _check_keep_patterns(model, cfg.keep_fp32)
    if not layers:
        raise ConfigError("--keep-fp32 leaves no layer to quantize; keep fewer layers in fp32")
    calib = calibration_images(data, ckpt, cfg)
    spread = equalize(model, _norm_absmax(model, calib, cfg.batch), cfg.alpha) if cfg.equalize else {}
    samples = _layer_inputs(model, layers, calib, cfg)
    quants, ranges = {}, {}
    for name, layer in layers.items():
        quants[name], ranges[name] = _layer_quant(layer, samples[name], cfg)
    sqnr = _layer_sqnr(model, quants, calib[: cfg.batch])
    log(f"quantize: {len(quants)} layers int8 (calibrated on {len(calib)} images, {cfg.method} ranges); "
        f"lowest layer SQNR {min(sqnr.values()):.1f} dB ({min(sqnr, key=sqnr.get)})" if sqnr else "quantize: no layers")
    fp32_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fp32_layers = [n for n in quantizable_layers(model) if n not in quants]    # the --keep-fp32 ones
    reference = _prepared(ckpt, sparsity)
    apply_quantization(model, quants)
    top1 = {split: {"fp32": evaluate(reference, _first(data.split(split), cfg.eval_images), *_norm(ckpt, data))["top1"],
                    cfg.scheme: evaluate(model, _first(data.split(split), cfg.eval_images), *_norm(ckpt, data))["top1"]}
            for split in ("val", "test")}
    out = Checkpoint(model_name=ckpt.model_name, model_config=ckpt.model_config, state_dict=fp32_state,
                     data=ckpt.data, stage="quantize",
                     config={**asdict(cfg), "source": ckpt.digest(), "sparsity": sparsity.to_dict() if sparsity else None},
                     metrics={s: {"top1": top1[s][cfg.scheme]} for s in top1},
                     quantization={"scheme": cfg.scheme, "layers": {n: q.to_dict() for n, q in quants.items()}})
    record = _record(cfg, ckpt, out, calib, quants, ranges, sqnr, spread, top1, sparsity, fp32_layers)
    for split, row in top1.items():
        log(f"quantize: {split} top-1 fp32 {row['fp32']:.2f}% -> {cfg.scheme} {row[cfg.scheme]:.2f}% "
            f"({row[cfg.scheme] - row['fp32']:+.2f})")
    with publish_dir(out_dir, is_quantized_folder, "a quantized model") as tmp:
        out.save(tmp / FINAL)
        write_json(tmp / RECORD, record)
    return QuantizedModel.load(out_dir)


def _quantize_codebooks(ckpt: Checkpoint, data, out_dir, sparsity: SparsityConfig | None, cfg: QuantizeConfig,
                       log: Log) -> QuantizedModel:
    """k-means or PQ codebooks for every layer the kernels can take (the rest stay fp32, said so),
    optionally activation-aware and fine-tuned; top-1 of the fp32, the fitted and the fine-tuned
    model on val and test."""
    from edgevit.codebooks import codebook_layers, fit_kmeans, fit_pq, reconstruction_sqnr
    from edgevit.quantization import apply_quantization, quantizable_layers

    model = _prepared(ckpt, sparsity)
    _check_keep_patterns(model, cfg.keep_fp32)
    layers, skipped = codebook_layers(quantizable_layers(model, cfg.keep_fp32), cfg.scheme, cfg.subvector, cfg.groups)
    if not layers:
        raise ConfigError(f"no layer can take {cfg.scheme} codebooks ({'; '.join(skipped.values())[:200]}); "
                          "keep fewer layers in fp32" + (", or pick a --subvector that divides the inputs"
                                                         if cfg.scheme == "pq" else ""))
    for name, why in skipped.items():
        log(f"quantize: {name} stays fp32 ({why})")
    calib = calibration_images(data, ckpt, cfg) if cfg.activation_aware else None
    energy = _input_energy(model, layers, calib, cfg.batch) if calib is not None else {}
    fitted = {}
    for name, layer in _progress(layers.items(), "fit codebooks", "layer"):
        if cfg.scheme == "pq":
            fitted[name] = fit_pq(layer.weight, cfg.subvector, cfg.centroids, energy.get(name), cfg.seed)
        else:
            fitted[name] = fit_kmeans(layer.weight, cfg.bits, cfg.groups, energy.get(name), cfg.seed)
    sqnr = {n: round(reconstruction_sqnr(layers[n].weight, q), 2) for n, q in fitted.items()}
    what = f"{cfg.bits}-bit k-means" if cfg.scheme == "kmeans" else f"PQ D={cfg.subvector} K={cfg.centroids}"
    log(f"quantize: {len(fitted)} layers {what}{' (activation-aware)' if calib is not None else ''}; lowest weight "
        f"SQNR {min(sqnr.values()):.1f} dB ({min(sqnr, key=sqnr.get)})")
    fp32_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    splits = {split: _first(data.split(split), cfg.eval_images) for split in ("val", "test")}
    norm = _norm(ckpt, data)
    top1 = {s: {"fp32": _top1(model, images, norm)} for s, images in splits.items()}
    apply_quantization(model, fitted)
    for s, images in splits.items():
        top1[s][cfg.scheme] = _top1(model, images, norm)
    if cfg.finetune:
        fitted = _finetune(model, fitted, data, ckpt, cfg, log)
        sqnr = {n: round(reconstruction_sqnr(fp32_state[f"{n}.weight"], q), 2) for n, q in fitted.items()}
        for s, images in splits.items():
            top1[s]["before_finetune"] = top1[s][cfg.scheme]
            top1[s][cfg.scheme] = _top1(model, images, norm)
    out = Checkpoint(model_name=ckpt.model_name, model_config=ckpt.model_config, state_dict=fp32_state,
                     data=ckpt.data, stage="quantize",
                     config={**asdict(cfg), "source": ckpt.digest(), "sparsity": sparsity.to_dict() if sparsity else None},
                     metrics={s: {"top1": top1[s][cfg.scheme]} for s in top1},
                     quantization={"scheme": cfg.scheme, "layers": {n: q.to_dict() for n, q in fitted.items()}})
    for split, row in top1.items():
        tuned = f" (before fine-tuning {row['before_finetune']:.2f}%)" if "before_finetune" in row else ""
        log(f"quantize: {split} top-1 fp32 {row['fp32']:.2f}% -> {cfg.scheme} {row[cfg.scheme]:.2f}% "
            f"({row[cfg.scheme] - row['fp32']:+.2f}){tuned}")
    record = _codebook_record(cfg, ckpt, out, model, fitted, sqnr, top1, sparsity, skipped, calib)
    with publish_dir(out_dir, is_quantized_folder, "a quantized model") as tmp:
        out.save(tmp / FINAL)
        write_json(tmp / RECORD, record)
    return QuantizedModel.load(out_dir)


def _top1(model, images, norm) -> float:
    from edgevit.train import evaluate

    return evaluate(model, images, *norm)["top1"]


def _progress(items, desc: str, unit: str):
    from tqdm import tqdm

    items = list(items)
    return tqdm(items, total=len(items), desc=desc, unit=unit, disable=None, leave=False, dynamic_ncols=True)


def _finetune(model, fitted: dict, data, ckpt: Checkpoint, cfg: QuantizeConfig, log: Log) -> dict:
    """cfg.finetune epochs of centroid training (codes fixed) on the training split."""
    from itertools import chain

    from edgevit.codebooks import finetune_codebooks
    from edgevit.data import batches
    from edgevit.train import progress_bar

    per_epoch = -(-len(data.train) // cfg.batch)
    steps = max(1, round(cfg.finetune * per_epoch))
    epochs = -(-steps // per_epoch)
    stream = chain.from_iterable(batches(data.train, *_norm(ckpt, data), cfg.batch, shuffle=True, seed=cfg.seed,
                                         epoch=e) for e in range(epochs))
    log(f"quantize: fine-tuning the centroids for {cfg.finetune:g} epoch(s) ({steps} steps of {cfg.batch}, "
        f"lr {cfg.finetune_lr:g}), codes fixed")
    with progress_bar(steps * cfg.batch, "fine-tune", True) as bar:
        tuned = finetune_codebooks(model, fitted, stream, steps, cfg.finetune_lr, bar)
    from edgevit.quantization import quantized_layers

    for name, m in quantized_layers(model).items():     # the twins carry the trained codebooks
        m.quant = tuned[name]
    return tuned


@torch.no_grad()
def _input_energy(model, layers: dict, images: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Each layer's mean square input per input column [K] (a patch conv's per unfolded column)."""
    import torch.nn.functional as F

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, layer in layers.items():
        def hook(m, inp, _out, name=name):
            x = inp[0].detach()
            if isinstance(m, torch.nn.Conv2d):                                  # (B, C, H, W) -> (B*L, C*kh*kw)
                x = F.unfold(x, m.kernel_size, stride=m.stride).transpose(1, 2)
            x = x.reshape(-1, x.shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + len(x)
        hooks.append((layer, hook))
    with _forward_hooks(hooks):
        _run(model, images, batch)
    return {n: (sums[n] / counts[n]).float() for n in sums}


def _codebook_record(cfg, ckpt, out: Checkpoint, model, fitted: dict, sqnr, top1, sparsity, skipped, calib) -> dict:
    fp32_bytes = sum(int(np.prod(q.shape)) * 4 for q in fitted.values())
    coded_bytes = sum(q.artifact_bytes() for q in fitted.values())
    total_fp32 = sum(v.numel() * 4 for v in out.state_dict.values() if v.is_floating_point())
    layers = {n: {"shape": list(q.shape), "centroids": q.centroids, "bits": q.bits, "subvector": q.subvector,
                  "weight_sqnr_db": sqnr[n], "bytes": q.artifact_bytes()} for n, q in fitted.items()}
    return {"kind": KIND, "version": 1, "scheme": cfg.scheme, "config": asdict(cfg),
            "model": ckpt.model_name, "source_checkpoint": ckpt.digest(), "checkpoint": out.digest(),
            "sparsity": sparsity.to_dict() if sparsity else None,
            "calibration": {"images": 0 if calib is None else len(calib), "split": "train",
                            "data": ckpt.data.get("spec"), "activation_aware": calib is not None},
            "top1": top1, "layers": layers, "fp32_layers": skipped,
            # the coded layers' bytes, and the whole model's (every other tensor kept fp32)
            "weight_bytes": {"fp32": fp32_bytes, cfg.scheme: coded_bytes},
            "model_bytes": {"fp32": total_fp32, cfg.scheme: total_fp32 - fp32_bytes + coded_bytes}}


def _prepared(ckpt: Checkpoint, sparsity: SparsityConfig | None) -> torch.nn.Module:
    model = ckpt.build_model().eval()
    if sparsity is not None:
        model.set_sparsity(sparsity)
    return model


def _first(images, n: int):
    from edgevit.data import _subset

    return images if not n or n >= len(images) else _subset(images, torch.arange(n).numpy())


def _norm(ckpt: Checkpoint, data) -> tuple[list[float], list[float]]:
    return ckpt.data.get("mean", data.mean), ckpt.data.get("std", data.std)


def _check_keep_patterns(model, patterns: tuple[str, ...]) -> None:
    import fnmatch

    from edgevit.quantization import quantizable_layers

    names = list(quantizable_layers(model))
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ConfigError(f"--keep-fp32 '{p}' matches no layer; layers are e.g. {', '.join(names[:4])} "
                              "(list them all with `edgevit quantize --list-layers`)")


def calibration_images(data, ckpt: Checkpoint, cfg: QuantizeConfig) -> torch.Tensor:
    """`calib_images` normalised training images, a seeded random subset."""
    from edgevit.data import batches

    x, _ = next(batches(data.train, *_norm(ckpt, data), cfg.calib_images, shuffle=True, seed=cfg.seed))
    return x


@contextmanager
def _forward_hooks(hooks: list[tuple[torch.nn.Module, Callable]]):
    """The (module, hook) pairs registered as forward hooks inside the block, removed after it."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _run(model, images: torch.Tensor, batch: int) -> None:
    for i in range(0, len(images), batch):
        model(images[i:i + batch])


@torch.no_grad()
def _norm_absmax(model, images: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """Per LayerNorm that feeds linears: each output channel's max |value| over the images."""
    from edgevit.quantization import norm_consumers

    absmax, hooks = {}, []
    for name, ln, _ in norm_consumers(model):
        def hook(_m, _inp, out, name=name):
            a = out.detach().abs().reshape(-1, out.shape[-1]).amax(0)         # (C,)
            absmax[name] = torch.maximum(absmax[name], a) if name in absmax else a
        hooks.append((ln, hook))
    with _forward_hooks(hooks):
        _run(model, images, batch)
    return absmax


@torch.no_grad()
def _layer_inputs(model, layers: dict, images: torch.Tensor, cfg: QuantizeConfig) -> dict[str, torch.Tensor]:
    """A seeded sample of each layer's input values (plus its exact min and max)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    per_batch = max(1, SAMPLES_PER_LAYER * cfg.batch // len(images))
    hooks = []
    for name, layer in layers.items():
        def hook(_m, inp, _out, name=name):
            x = inp[0].detach().reshape(-1)
            pick = torch.randint(len(x), (min(per_batch, len(x)),), generator=gen)
            parts[name] += [x[pick], x.min()[None], x.max()[None]]
        hooks.append((layer, hook))
    with _forward_hooks(hooks):
        _run(model, images, cfg.batch)
    return {n: torch.cat(p) for n, p in parts.items()}


def _layer_quant(layer, values: torch.Tensor, cfg: QuantizeConfig):
    from edgevit.quantization import LayerQuant, activation_params, fit_range, weight_int8

    lo, hi = fit_range(values, cfg.method, cfg.percentile)
    scale, zero_point = activation_params(lo, hi)
    qweight, weight_scale = weight_int8(layer.weight)
    full = (float(values.min()), float(values.max()))
    return LayerQuant(qweight, weight_scale, scale, zero_point), {"range": [lo, hi], "observed": list(full)}


@torch.no_grad()
def _layer_sqnr(model, quants: dict, images: torch.Tensor) -> dict[str, float]:
    """Each layer's output SQNR (dB) on its own fp32 inputs: the error its quantization alone adds."""
    from edgevit.quantization import QuantLinear, QuantPatchConv, sqnr_db

    modules, pairs, hooks = dict(model.named_modules()), {}, []
    for name in quants:
        def hook(_m, inp, out, name=name):
            pairs[name] = (inp[0].detach(), out.detach())
        hooks.append((modules[name], hook))
    with _forward_hooks(hooks):
        model(images)
    out = {}
    for name, q in quants.items():
        layer = modules[name]
        twin = QuantLinear(layer, q) if isinstance(layer, torch.nn.Linear) else QuantPatchConv(layer, q)
        x, y = pairs[name]
        out[name] = round(sqnr_db(y, twin(x)), 2)
    return out


def _record(cfg, ckpt, out: Checkpoint, calib, quants, ranges, sqnr, spread, top1, sparsity, fp32_layers) -> dict:
    fp32_bytes = sum(q.qweight.numel() * 4 for q in quants.values())
    int8_bytes = sum(q.qweight.numel() + q.weight_scale.numel() * 4 for q in quants.values())
    layers = {n: {"input_scale": q.input_scale, "input_zero_point": q.input_zero_point, **ranges[n],
                  "weight_scale": [float(q.weight_scale.min()), float(q.weight_scale.max())], "sqnr_db": sqnr[n],
                  "shape": list(q.qweight.shape)} for n, q in quants.items()}
    return {"kind": KIND, "version": 1, "scheme": cfg.scheme, "config": asdict(cfg),
            "model": ckpt.model_name, "source_checkpoint": ckpt.digest(), "checkpoint": out.digest(),
            "sparsity": sparsity.to_dict() if sparsity else None,
            "calibration": {"images": len(calib), "split": "train", "data": ckpt.data.get("spec"),
                            "method": cfg.method, "equalized": spread},
            "top1": top1, "layers": layers, "fp32_layers": fp32_layers,
            "weight_bytes": {"fp32": fp32_bytes, cfg.scheme: int8_bytes}}


# ---------------------------------------------------------------------------- the recipe stage


def run_stage(run: StageRun) -> dict:
    """The `quantize` recipe stage: OUT/quantize/ from the deployed (adapted, else trained) model,
    skipped when it was made from that checkpoint with these settings."""
    cfg = run.config("quantize")
    ckpt = run.deployed_checkpoint(quantized=False)
    folder = run.dir("quantize")
    try:
        done = QuantizedModel.load(folder)
        same = done.record["config"] == json.loads(json.dumps(asdict(cfg)))     # as JSON: tuples read back as lists
        if not run.force and same and done.record["source_checkpoint"] == ckpt.digest():
            run.log(f"quantize: up to date ({folder})")
            return {"top1": done.record["top1"], "folder": str(folder)}
    except EdgeVitError:
        pass  # absent or damaged: quantize again
    run.log(f"quantize: {ckpt.model_name} {cfg.scheme} -> {folder}")
    result = quantize(ckpt, run.data, folder, None, cfg, log=run.log)
    return {"top1": result.record["top1"], "folder": str(folder)}


# ---------------------------------------------------------------------------- ONNX models


def quantize_onnx(model, data: str, out: str | Path, cfg: QuantizeConfig = QuantizeConfig(),
                  mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                  log: Log = print) -> dict:
    """A user's fp32 ONNX model (onnx_model.OnnxModel) as a QDQ ONNX file: each MatMul/Gemm with a
    constant weight int8 (per-channel weights, input ranges calibrated on `data`'s train images,
    as `quantize` does for checkpoints, without the LayerNorm equalisation it cannot see in a
    graph). Top-1 agreement with the fp32 file (and top-1 against labels, where the output is
    the data set's classes) on its val images, both run by ONNX Runtime, is reported. The file
    compiles to int8 kernels with `compile --onnx`."""
    import onnx

    from edgevit.export import PRODUCER, check_onnx_output
    from edgevit.fileio import atomic_path
    from edgevit.onnx_model import calibrate_onnx, dataset_images, insert_qdq, ort_reference, ort_session

    out = check_onnx_output(out, "-o")
    opset = next((o.version for o in model.proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ConfigError(f"{model.path}: opset {opset}; per-channel QDQ needs opset 13 or newer: export the "
                          "model again with opset_version=13 or higher")
    shape = model.shape(1)
    calib, _, _ = dataset_images(data, "train", shape, cfg.calib_images, mean, std)
    batch = model.input_shape[0] or min(cfg.batch, 8)      # a file with a fixed batch axis takes only that
    layers = calibrate_onnx(model, calib, cfg.method, cfg.percentile, cfg.keep_fp32, batch=batch)
    graph = onnx.ModelProto()
    graph.CopyFrom(model.proto)
    count = insert_qdq(graph, layers)
    graph.producer_name = PRODUCER
    n_eval = (cfg.eval_images or 512) // batch * batch
    x, labels, classes = dataset_images(data, "val", shape, n_eval, mean, std)
    x, labels = x[: len(x) // batch * batch], labels[: len(x) // batch * batch]
    with atomic_path(out) as tmp:
        onnx.save(graph, str(tmp))
        fp32 = _in_batches(ort_reference(model.session()), x, batch)
        int8 = _in_batches(ort_reference(ort_session(tmp, optimize=False)), x, batch)
    agreement = 100.0 * float((fp32.argmax(1) == int8.argmax(1)).mean())
    result = {"onnx": str(out), "layers": count, "calib_images": len(calib), "method": cfg.method,
              "val_images": len(x), "top1_agreement_with_fp32": agreement,
              "max_abs_error_vs_fp32": float(np.abs(fp32 - int8).max())}
    if fp32.shape[1] == classes:     # a classifier of this data set: top-1 against its labels too
        result["top1"] = {"fp32": 100.0 * float((fp32.argmax(1) == labels).mean()),
                          "int8": 100.0 * float((int8.argmax(1) == labels).mean())}
    log(f"quantize: {count} layers int8 (calibrated on {len(calib)} {data} train images, {cfg.method} ranges); "
        f"top-1 agreement with the fp32 model {agreement:.1f}% on {len(x)} val images")
    return result


def _in_batches(run, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([run(x[i:i + batch]) for i in range(0, len(x), batch)])
