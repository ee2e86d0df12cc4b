"""`compile`: checkpoint (+ sparsity config) -> torch.export -> Relax -> the target's TVM
pipeline -> an artifact folder (artifact.py), validated against PyTorch wherever it can run.

The TVM steps live in edgevit.backend (frontend, encodings, build, database); this module
decides what to build, checks it and publishes it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgevit.artifact import (
    LIBRARY,
    REFERENCE,
    VALIDATION,
    WEIGHTS,
    CompiledArtifact,
    Manifest,
    Tolerance,
    is_compiled_artifact,
)
from edgevit.checkpoint import Checkpoint, library_versions
from edgevit.errors import ConfigError, DataError, EdgeVitError, ValidationError
from edgevit.fileio import file_sha256, publish_dir
from edgevit.sparsity import SparsityConfig
from edgevit.stages import StageRun
from edgevit.targets import Target

VALIDATION_BYTES = 16 << 20        # validation.npz holds as many whole batches as fit
Log = Callable[[str], None]


@dataclass(frozen=True)
class CompileConfig:
    batch: int = 1
    extra_batches: tuple[int, ...] = ()   # more batch sizes the library serves (`--batch 1,8`), weights shared
    validate: bool = True
    max_abs_error: float | None = None  # fail past this on logits (the artifact's Tolerance); default per encoding
    min_top1_agreement: float = 99.0  # % of images whose top-1 class matches PyTorch's
    min_fp32_agreement: float = 95.0  # quantized artifacts: % of validation images whose top-1 matches the fp32 model's
    images: int = 64                 # real validation images (from the checkpoint's data set)
    tuning: bool = True              # use the target's tuning database (`edgevit tune`) if it has records
    database: str | None = None      # a tuning database folder other than the target's default
    precision: str = "fp32"          # "fp16" (CUDA targets): fp16 matmul operands and weights, fp32 accumulation

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision '{self.precision}' must be one of {', '.join(PRECISIONS)}")
        if self.batch < 1 or any(b < 1 for b in self.extra_batches):
            raise ValueError("batch must be >= 1")
        if len({self.batch, *self.extra_batches}) != 1 + len(self.extra_batches):
            raise ValueError(f"batch sizes {[self.batch, *self.extra_batches]} repeat one; name each once")
        if self.images < 0:
            raise ValueError("images must be >= 0")
        if not 0 <= self.min_fp32_agreement <= 100:
            raise ValueError("min_fp32_agreement must be in [0, 100]")
        self.tolerance("fp32")  # noqa: B018 - validates the limits

    def tolerance(self, encoding: str) -> Tolerance:
        """Against the PyTorch model the artifact computes like (a quantized one: its fake-quantized
        twin, whose integer sums match exactly; a rounding flip of one activation code moves a
        logit by ~1e-2, hence the wider default)."""
        default = DEFAULT_MAX_ABS_ERROR.get(encoding, DEFAULT_MAX_ABS_ERROR["fp32"])
        return Tolerance(default if self.max_abs_error is None else self.max_abs_error, self.min_top1_agreement)


PRECISIONS = ("fp32", "fp16")
# fp16: operands rounded to 11 significant bits (relative 2^-11 ~ 4.9e-4 each), summed in fp32
DEFAULT_MAX_ABS_ERROR = {"fp32": 1e-3, "int8": 0.1, "fp16": 5e-2, "kmeans": 1e-3, "pq": 1e-3}   # codebooks: fp32 sums
MIN_AGREEMENT_IMAGES = 32   # fewer real images (or noise only): the fp32 agreement is reported, not enforced


# ---------------------------------------------------------------------------- steps


def validation_inputs(ckpt: Checkpoint, shape: tuple[int, ...], images: int, log: Log = print
                      ) -> tuple[np.ndarray, str]:
    """Real normalised images from the checkpoint's validation split, or seeded noise (said so)."""
    from edgevit.data import batches, load_data, load_split

    batch = shape[0]
    count = max(batch, (images // batch) * batch)
    spec = ckpt.data.get("spec")
    why = "the checkpoint names no data set"
    if spec:
        try:
            seed, fraction = ckpt.data.get("seed", 0), ckpt.data.get("val_fraction", 0.1)
            mean, std = ckpt.data.get("mean"), ckpt.data.get("std")
            if mean is None or std is None:      # a checkpoint without them: the train split's, as training used
                bundle = load_data(spec, shape[-1], seed, fraction)
                mean, std = mean or bundle.mean, std or bundle.std
            x, _ = next(batches(load_split(spec, "val", shape[-1], count, seed, fraction), mean, std, count))
            if x.shape[1] != shape[1]:
                why = f"{spec} has {x.shape[1]}-channel images and the model takes {shape[1]}"
            elif len(x) >= batch:
                return x[: (len(x) // batch) * batch].numpy(), f"{spec} val images"
            else:
                why = f"{spec} has fewer validation images than one batch of {batch}"
        except (DataError, ConfigError) as e:
            why = f"its data set could not be loaded: {e}"
    return noise_inputs(count, shape, why, log)


Reference = Callable[[np.ndarray], np.ndarray]   # what the artifact must compute: PyTorch's model, or ORT


def torch_reference(model: torch.nn.Module) -> Reference:
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()
    return run


def noise_inputs(count: int, shape: tuple[int, ...], why: str, log: Log) -> tuple[np.ndarray, str]:
    """Seeded normal noise in place of images, said so with the reason."""
    log(f"validation inputs: random noise ({why}); the artifact is checked on noise only")
    rng = np.random.default_rng(0)
    return rng.standard_normal((count, *shape[1:]), dtype=np.float32), "random"


def save_references(reference: Reference, inputs: np.ndarray, batch: int, folder: Path) -> np.ndarray:
    """reference.npz: the first batch; validation.npz: as many whole batches as fit 16 MB."""
    per_batch = inputs[:batch].nbytes
    keep = max(1, min(len(inputs) // batch, VALIDATION_BYTES // max(per_batch, 1))) * batch
    outputs = np.concatenate([reference(inputs[i:i + batch]) for i in range(0, keep, batch)])
    np.savez(folder / REFERENCE, input=inputs[:batch], output=outputs[:batch])
    np.savez(folder / VALIDATION, input=inputs[:keep], output=outputs)
    return outputs[:batch]


def compare(run: Reference, reference: Reference, inputs: np.ndarray, batch: int) -> dict:
    """Max abs error and top-1 agreement of `run` against `reference` over `inputs`, batch by batch."""
    errors, agree, n = [], 0, 0
    for i in range(0, len(inputs) - batch + 1, batch):
        x = inputs[i:i + batch]
        ref = reference(x)
        got = run(x)
        errors.append(float(np.abs(got - ref).max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        n += batch
    return {"max_abs_error": max(errors), "top1_agreement": 100.0 * agree / n, "images": n}


# ---------------------------------------------------------------------------- the verb


def compile_model(ckpt: Checkpoint, target: Target, out_dir: str | Path, sparsity: SparsityConfig | None = None,
                  cfg: CompileConfig = CompileConfig(), log: Log = print) -> CompiledArtifact:
    from edgevit.backend.frontend import to_relax

    encoding = check_precision(cfg, target, ckpt.scheme)
    target.check_tools()
    model = ckpt.build_model().eval()
    if sparsity is not None:
        model.set_sparsity(sparsity)
    shape = (cfg.batch, *model_input_shape(model))
    with publish_dir(out_dir, is_compiled_artifact, "a compiled artifact") as tmp:
        start = time.perf_counter()
        mod, weights = to_relax(model, torch.zeros(shape), cfg.extra_batches, target, cfg.precision)
        schedules, kernels = _write_library(tmp, mod, weights, target, cfg, log)
        compile_seconds = time.perf_counter() - start
        inputs, source = validation_inputs(ckpt, shape, cfg.images, log)
        reference = save_references(torch_reference(model), inputs, cfg.batch, tmp)
        against = f" against the {ckpt.scheme} PyTorch model" if ckpt.quantization else \
            " against the fp32 PyTorch model" if encoding == "fp16" else ""
        validation = _check_artifact(tmp, target, mod, weights, torch_reference(model), inputs, source, cfg, log,
                                     encoding, against)
        if ckpt.quantization and "skipped" not in validation:
            validation["fp32_model"] = _fp32_agreement(_session(tmp, cfg).run, ckpt, model, inputs, source, cfg, log)
        manifest = _manifest(ckpt, target, model, sparsity, cfg, reference, source, compile_seconds, tmp, encoding)
        replace(manifest, validation=validation, schedules=schedules, cuda=kernels).save(tmp)
    return CompiledArtifact.load(out_dir)


def compile_onnx(onnx_model, target: Target, out_dir: str | Path, cfg: CompileConfig = CompileConfig(),
                 data: str | None = None, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 log: Log = print) -> CompiledArtifact:
    """An ONNX model (onnx_model.OnnxModel) through the same pipeline: TVM's ONNX frontend, the
    target's build, validated against ONNX Runtime on the same inputs (images from `data`,
    normalised with `mean`/`std`, or seeded noise). QDQ int8 layers compile to int8 kernels."""
    from edgevit.backend.build import tvm_version
    from edgevit.backend.frontend import cpu_kernels, encode, import_onnx
    from edgevit.backend.runtime import entry_name
    from edgevit.onnx_model import dequantized_graph, ort_reference

    onnx_model.check_operators()
    shape = onnx_model.shape(cfg.batch)
    for b in cfg.extra_batches:
        onnx_model.shape(b)
    graph, layers = dequantized_graph(onnx_model.proto)
    encoding = check_precision(cfg, target, "int8" if layers else "fp32")
    target.check_tools()
    if layers:
        log(f"{len(layers)} int8 layers (QDQ MatMul/Gemm) compile to int8 kernels")
    reference = ort_reference(onnx_model.session(optimize=not layers))
    with publish_dir(out_dir, is_compiled_artifact, "a compiled artifact") as tmp:
        start = time.perf_counter()
        shapes = {entry_name(b, cfg.batch): (b, *shape[1:]) for b in (cfg.batch, *cfg.extra_batches)}
        mod, weights = encode(*import_onnx(graph, onnx_model.input_name, shapes), layers, target, cfg.precision)
        mod, weights = cpu_kernels(mod, weights, target, cfg.precision, packed=not layers)
        schedules, kernels = _write_library(tmp, mod, weights, target, cfg, log)
        compile_seconds = time.perf_counter() - start
        inputs, source = _onnx_validation_inputs(shape, cfg.images, data, mean, std, log)
        ref_out = save_references(reference, inputs, cfg.batch, tmp)
        validation = _check_artifact(tmp, target, mod, weights, reference, inputs, source, cfg, log, encoding,
                                     " against ONNX Runtime")
        manifest = Manifest(
            target=_target_record(target),
            model={"name": onnx_model.name, "config": {"onnx": str(onnx_model.path)}, "stage": "onnx"},
            input={"shape": list(shape), "batches": [cfg.batch, *cfg.extra_batches], "dtype": "float32",
                   "layout": "NCHW", "mean": list(mean) if mean else None, "std": list(std) if std else None,
                   "classes": None},
            output={"shape": list(ref_out.shape), "dtype": "float32"}, encoding=encoding,
            tolerance=cfg.tolerance(encoding),
            reference={"source": source, "against": "onnxruntime",
                       "output_sha256": hashlib.sha256(ref_out.tobytes()).hexdigest()},
            files={name: file_sha256(tmp / name) for name in (LIBRARY, WEIGHTS, REFERENCE, VALIDATION)},
            compile_seconds=round(compile_seconds, 2), config=asdict(cfg), inputs={"onnx": onnx_model.sha256},
            versions={**library_versions(), "tvm": tvm_version(), "onnxruntime": _ort_version()},
            validation=validation, schedules=schedules, cuda=kernels)
        manifest.save(tmp)
    return CompiledArtifact.load(out_dir)


def _write_library(tmp: Path, mod, weights, target: Target, cfg: CompileConfig, log: Log) -> tuple[dict, dict | None]:
    """Build `mod` with the target's schedules (its tuning database where it has records), write
    model.so and weights.params into `tmp`; returns the manifest's schedules record and, for GPU
    targets, its CUDA record (kernels built ahead of time, their resources, the runtime needed)."""
    from edgevit.backend.build import build, export_library, runtime_requirements, save_weights
    from edgevit.backend.cuda import summary
    from edgevit.backend.database import schedule_source

    schedules, database = schedule_source(target, cfg.tuning, cfg.database)
    executable = build(mod, target, database)
    log(f"schedules: {schedules}" + (f" ({database})" if database else " (edgevit's default rules)"))
    kernels = export_library(executable, target, tmp / LIBRARY)
    if kernels is not None:
        log(summary(kernels))
        kernels = {**kernels, "runtime": runtime_requirements(kernels["cuda_major"], kernels["cuda_version"])}
    save_weights(weights, tmp / WEIGHTS)
    return {"source": schedules, "database": str(database) if database else None}, kernels


def _target_record(target: Target) -> dict:
    return {"name": target.name, "device": target.device, "arch": target.arch, "rpc_key": target.rpc_key,
            "tvm": target.tvm_target_json()}


def _onnx_validation_inputs(shape, images: int, data, mean, std, log: Log) -> tuple[np.ndarray, str]:
    """Images of `data` (a data set spec) at the model's size, normalised with the model's
    mean/std (given, else the data set's); else seeded noise, said so."""
    from edgevit.onnx_model import dataset_images

    batch, count = shape[0], max(shape[0], (images // shape[0]) * shape[0])
    why = "no --data given"
    if data:
        x, _, _ = dataset_images(data, "val", shape, count, mean, std)
        if len(x) >= batch:
            return x[: (len(x) // batch) * batch], f"{data} val images"
        why = f"{data} has fewer validation images than one batch of {batch}"
    return noise_inputs(count, shape, why, log)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _session(folder: Path, cfg: CompileConfig):
    from edgevit.backend.runtime import Device, Session

    return Session(Device("cpu"), folder / LIBRARY, folder / WEIGHTS, batches=(cfg.batch, *cfg.extra_batches))


def _validate(tmp: Path, target: Target, reference: Reference, inputs, source, cfg: CompileConfig, log: Log,
              tolerance: Tolerance, against: str = "", noise_agreement: bool = True) -> dict:
    """The built library against `reference` on the validation inputs, on noise, and at every
    extra batch size; a miss past `tolerance` is a ValidationError (nothing is written)."""
    if not cfg.validate:
        return {"skipped": "disabled (--no-validate)"}
    if not target.runs_here:
        return {"skipped": f"{target.device}/{target.arch} does not run on this machine; "
                           "check on the device with `edgevit verify`"}
    session = _session(tmp, cfg)
    result = {"device": "local cpu", source: compare(session.run, reference, inputs, cfg.batch)}
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((cfg.batch * 4, *inputs.shape[1:]), dtype=np.float32)
    result["random" if source != "random" else "random, second seed"] = compare(session.run, reference, noise, cfg.batch)
    for batch in cfg.extra_batches:      # each extra batch's function: real images where there are enough
        data = (source, inputs) if len(inputs) >= batch else ("random", np.resize(noise, (batch, *noise.shape[1:])))
        result[f"{data[0]}, batch {batch}"] = compare(session.run, reference, data[1], batch)
    check_validation(result, tolerance, noise_agreement)
    real = result[source]
    log(f"validated on {real['images']} {source}: max abs error {real['max_abs_error']:.2e}, "
        f"top-1 agreement {real['top1_agreement']:.1f}%{against}")
    return result


def check_precision(cfg: CompileConfig, target: Target, encoding: str) -> str:
    """The encoding the artifact gets: the model's own, or fp16 where --precision asks for it."""
    if cfg.precision == "fp32":
        return encoding
    if target.device != "cuda":
        raise ConfigError(f"--precision {cfg.precision} is for CUDA targets (fp16 matmuls on the GPU); "
                          f"'{target.name}' is a CPU: compile it fp32, or quantize it (int8, kmeans, pq)")
    if encoding != "fp32":
        raise ConfigError(f"--precision {cfg.precision} takes an fp32 model; this one is {encoding}: compile it "
                          "without --precision, or compile its fp32 checkpoint")
    return cfg.precision


def _check_artifact(tmp: Path, target: Target, mod, weights, reference: Reference, inputs, source,
                    cfg: CompileConfig, log: Log, encoding: str, against: str) -> dict:
    """The artifact in `tmp` against `reference`: run here where it can run; a reduced-precision
    GPU artifact through the same graph (`mod`, `weights`) compiled for this CPU."""
    if encoding == "fp16":
        return _validate_on_host(mod, weights, reference, inputs, source, cfg, log, against)
    return _validate(tmp, target, reference, inputs, source, cfg, log, cfg.tolerance(encoding), against)


def _validate_on_host(mod, weights, reference: Reference, inputs, source, cfg: CompileConfig, log: Log,
                      against: str) -> dict:
    """A GPU artifact cannot run here: the same reduced-precision graph is compiled for this
    machine's CPU and checked against `reference` instead (the tolerance is the artifact's)."""
    import tempfile

    from edgevit.targets import load_target

    if not cfg.validate:
        return {"skipped": "disabled (--no-validate)"}
    host = load_target("host")
    with tempfile.TemporaryDirectory(prefix="edgevit-host-") as folder:
        _write_library(Path(folder), mod, weights, host, cfg, lambda _: None)
        try:
            result = _validate(Path(folder), host, reference, inputs, source, cfg, log, cfg.tolerance(cfg.precision),
                               f"{against} (the {cfg.precision} graph compiled for this CPU)", noise_agreement=False)
        except ValidationError as e:     # the usual cause, and the way to accept it
            raise ValidationError(f"{e} ({cfg.precision} rounding can also change which windows a sparsity config keeps "
                                  "where scores nearly tie; if top-1 agreement is acceptable, pass --max-abs-error)") from None
    return {**result, "device": f"local cpu: the same {cfg.precision} graph compiled for the host"}


def _fp32_agreement(run, ckpt: Checkpoint, model, inputs, source: str, cfg: CompileConfig, log: Log) -> dict:
    """A quantized artifact against the fp32 model it came from: top-1 agreement on the validation
    images (reported, and held to min_fp32_agreement), and the max abs error (reported only)."""
    from edgevit.errors import ValidationError

    fp32 = ckpt.build_model(quantized=False).eval()
    if hasattr(model, "block_ratios"):
        fp32.set_block_ratios(model.block_ratios())     # the same sparsity config
    figures = {**compare(run, torch_reference(fp32), inputs, cfg.batch), "source": source, "min_top1_agreement": cfg.min_fp32_agreement}
    log(f"against the fp32 model: top-1 agreement {figures['top1_agreement']:.1f}% on {figures['images']} {source} "
        f"(limit {cfg.min_fp32_agreement:g}%), max abs error {figures['max_abs_error']:.2e}")
    if source != "random" and figures["images"] >= MIN_AGREEMENT_IMAGES and figures["top1_agreement"] < cfg.min_fp32_agreement:
        raise ValidationError(f"the {ckpt.scheme} artifact's top-1 agrees with the fp32 model on only "
                              f"{figures['top1_agreement']:.1f}% of {source} (limit {cfg.min_fp32_agreement:g}%); "
                              "the artifact was not written: " + ("recalibrate (--method, --keep-fp32)" if ckpt.scheme == "int8"
                                                                   else "fine-tune the codebooks (--finetune), use more bits or "
                                                                   "centroids") + " or lower --min-fp32-agreement")
    return figures


def check_validation(result: dict, tolerance: Tolerance, noise_agreement: bool = True) -> None:
    """Every validation set within `tolerance`. `noise_agreement` False (fp16): on noise inputs only
    the max abs error is held to it, top-1 agreement is reported: noise through a classifier gives
    near-tied logits, and fp16 rounding flips their order (seen: Swin-T, max abs error 5.7e-4 on
    logits, 98.4% agreement on 64 noise images); on real images agreement is enforced."""
    for name, figures in result.items():
        if isinstance(figures, dict) and name != "fp32_model":
            noise = name.startswith("random") and not noise_agreement
            (replace(tolerance, min_top1_agreement=0.0) if noise else tolerance).check(figures, name)


def _manifest(ckpt, target, model, sparsity, cfg, reference, source, seconds, folder: Path, encoding: str) -> Manifest:
    from edgevit.backend.build import tvm_version

    return Manifest(
        target=_target_record(target),
        model={"name": ckpt.model_name, "config": asdict(model.cfg), "stage": ckpt.stage},
        sparsity=sparsity.to_dict() if sparsity is not None else None,
        input={"shape": [cfg.batch, *model_input_shape(model)], "batches": [cfg.batch, *cfg.extra_batches],
               "dtype": "float32",
               "layout": "NCHW", "mean": ckpt.data.get("mean"), "std": ckpt.data.get("std"),
               "classes": ckpt.data.get("classes")},
        output={"shape": list(reference.shape), "dtype": "float32"},
        encoding=encoding, tolerance=cfg.tolerance(encoding),
        reference={"source": source, "output_sha256": hashlib.sha256(reference.tobytes()).hexdigest()},
        files={name: file_sha256(folder / name) for name in (LIBRARY, WEIGHTS, REFERENCE, VALIDATION)},
        compile_seconds=round(seconds, 2), config=asdict(cfg), inputs={"checkpoint": ckpt.digest()},
        versions={**library_versions(), "tvm": tvm_version()})


def check_search_scheme(sparsity: str | None, ckpt: Checkpoint) -> None:
    """A search result found its config under one weight encoding's latency (and accuracy);
    compiling it with a checkpoint of another encoding would deploy what was not searched."""
    from edgevit.fileio import read_json

    if sparsity is None or not Path(sparsity).is_file():
        return
    try:
        data = read_json(sparsity, "sparsity config", "")
    except EdgeVitError:
        return   # SparsityConfig.load reports a bad file in one line
    scheme = (data.get("inputs") or {}).get("scheme") if isinstance(data, dict) and "pareto" in data else None
    if scheme is not None and scheme != ckpt.scheme:
        raise ConfigError(f"{sparsity} was searched for the {scheme} model; this checkpoint is {ckpt.scheme}: "
                          f"compile the checkpoint the search used, or search again with this one")


def model_input_shape(model) -> tuple[int, int, int]:
    c = model.cfg
    return (c.in_chans, c.img_size, c.img_size)


# ---------------------------------------------------------------------------- the recipe stage


@dataclass(frozen=True)
class CompileStageConfig:
    """The recipe's [compile] table: which targets, and the model under which sparsity."""

    targets: tuple[str, ...] = ("host",)
    sparsity: str = "search"     # "search": the search stage's result when there is one, else dense;
    batch: int = 1               # "dense"; or one uniform ratio such as "0.5"
    images: int = 64
    tuning: bool = True

    def __post_init__(self):
        from edgevit.targets import load_target

        if not self.targets:
            raise ValueError("targets must name at least one target (see `edgevit targets`)")
        for name in self.targets:
            try:
                load_target(name)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        if self.sparsity not in ("search", "dense"):
            try:
                ratio = float(self.sparsity)
            except ValueError:
                raise ValueError(f"sparsity '{self.sparsity}' must be 'search', 'dense' or a ratio like '0.5'") from None
            if not 0 <= ratio < 1:
                raise ValueError(f"sparsity ratio {ratio} must be in [0, 1)")
        CompileConfig(batch=self.batch, images=self.images)


def stage_sparsity(run: StageRun, model, choice: str) -> SparsityConfig | None:
    """The sparsity config [compile].sparsity names for the deployed model."""
    result = run.dir("search") / "result.json"
    if choice == "search" and result.exists():
        return SparsityConfig.load(result)
    if choice in ("search", "dense") or not hasattr(model, "set_block_ratios"):
        return None
    return SparsityConfig.uniform(model, float(choice))


def run_stage(run: StageRun) -> dict:
    """The `compile` recipe stage: OUT/compile/<target>/ per target, skipped when the artifact there
    was made from this checkpoint, sparsity and settings."""
    from edgevit.targets import load_target

    cfg = run.config("compile")
    ckpt = run.deployed_checkpoint()
    sparsity = stage_sparsity(run, ckpt.build_model(), cfg.sparsity)
    settings = CompileConfig(batch=cfg.batch, images=cfg.images, tuning=cfg.tuning)
    out = {}
    for name in cfg.targets:
        target, folder = load_target(name), run.dir("compile") / name
        if not run.force and _artifact_up_to_date(folder, ckpt, sparsity, settings):
            run.log(f"compile {target.name}: up to date ({folder})")
        else:
            run.log(f"compile {target.name}: {ckpt.model_name} sparsity "
                    f"{list(sparsity.ratios) if sparsity else 'dense'} -> {folder}")
            compile_model(ckpt, target, folder, sparsity, settings, log=run.log)
        art = CompiledArtifact.load(folder)
        out[target.name] = {"artifact": str(folder), "bytes": art.bytes, "validation": art.manifest.validation}
    return out


def _artifact_up_to_date(folder: Path, ckpt: Checkpoint, sparsity, cfg: CompileConfig) -> bool:
    from edgevit.errors import EdgeVitError

    try:
        m = CompiledArtifact.load(folder).manifest
    except EdgeVitError:
        return False
    as_stored = json.loads(json.dumps(asdict(cfg)))       # as the manifest holds it: tuples read back as lists
    return (m.inputs.get("checkpoint") == ckpt.digest() and m.config == as_stored
            and m.sparsity == (sparsity.to_dict() if sparsity is not None else None))
