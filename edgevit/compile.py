"""`compile`: checkpoint (+ sparsity config) -> torch.export -> Relax -> the target's TVM
pipeline -> an artifact folder, validated against PyTorch wherever it can run.

Artifact folder (written atomically, verified on load):
    model.so         the compiled library (cross-compiled for aarch64 targets)
    weights.params   weights in TVM's param format (p0..pN, in the order `main` takes them)
    reference.npz    an input batch and PyTorch's output for it, for on-device self-checks
    validation.npz   more inputs (real images where the data set is at hand) and PyTorch's
                     outputs, for `edgevit verify` on the device
    manifest.json    target, input shape/dtype, model, sparsity, sha256 of every file, versions,
                     reference output digest, validation figures, compile time
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgevit.checkpoint import Checkpoint, file_sha256, library_versions
from edgevit.errors import EdgeVitError, ValidationError
from edgevit.sparsity import SparsityConfig
from edgevit.targets import Target

MANIFEST, LIBRARY, WEIGHTS, REFERENCE = "manifest.json", "model.so", "weights.params", "reference.npz"
VALIDATION = "validation.npz"      # up to CompileConfig.images inputs + PyTorch outputs (not bundled)
VALIDATION_BYTES = 16 << 20
ARTIFACT_KIND = "edgevit.compiled"
Log = Callable[[str], None]
# Printed by TVM's C++ logger for every build, dozens of lines each, and harmless here: every
# `take` index edgevit's graphs hold (window ranks, relative positions) is in range by
# construction; the pragma is a schedule annotation LLVM codegen has no use for.
BENIGN_TVM_WARNINGS = ("Fast mode segfaults when there are out-of-bounds indices", "Unknown pragma pragma_scope")


@dataclass(frozen=True)
class CompileConfig:
    batch: int = 1
    encoding: str = "fp32"
    validate: bool = True
    max_abs_error: float = 1e-3      # fail past this on logits
    min_top1_agreement: float = 99.0  # % of images whose top-1 class matches PyTorch's
    images: int = 64                 # real validation images (from the checkpoint's data set)
    tuning: bool = True              # use the target's tuning database (`edgevit tune`) if it has records
    database: str | None = None      # a tuning database folder other than the target's default

    def __post_init__(self):
        if self.batch < 1:
            raise ValueError("batch must be >= 1")


@dataclass(frozen=True)
class CompiledArtifact:
    path: Path
    manifest: dict = field(repr=False)

    @property
    def library(self) -> Path:
        return self.path / LIBRARY

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input"]["shape"])

    @classmethod
    def load(cls, path: str | Path) -> "CompiledArtifact":
        """Read the manifest and verify every file's sha256."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise EdgeVitError(f"{path}: not a compiled artifact (no {MANIFEST}); create one with `edgevit compile`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise EdgeVitError(f"{manifest_path}: malformed JSON ({e}); recompile the artifact") from None
        if manifest.get("kind") != ARTIFACT_KIND:
            raise EdgeVitError(f"{manifest_path}: kind '{manifest.get('kind')}' is not a compiled artifact")
        for name, digest in manifest.get("files", {}).items():
            f = path / name
            if not f.is_file() or file_sha256(f) != digest:
                raise EdgeVitError(f"{f}: {'missing' if not f.is_file() else 'sha256 mismatch'}; the artifact "
                                   "is damaged or was edited, recompile it")
        return cls(path, manifest)

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.path / REFERENCE, allow_pickle=False) as ref:
            return ref["input"], ref["output"]

    def validation_set(self) -> tuple[np.ndarray, np.ndarray]:
        """All stored check inputs and PyTorch outputs (the reference batch if there are no more)."""
        if not (self.path / VALIDATION).is_file():
            return self.reference()
        with np.load(self.path / VALIDATION, allow_pickle=False) as ref:
            return ref["input"], ref["output"]


# ---------------------------------------------------------------------------- steps


def to_relax(model: torch.nn.Module, example: torch.Tensor):
    """torch.export -> Relax IRModule with weights as inputs; returns (mod, weights)."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13's own pytree code trips its LeafSpec deprecation on every export
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        exported = torch.export.export(model, (example,))
        try:
            mod = from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
        except AssertionError as e:
            ops = re.findall(r"'([\w.:]+)'", str(e))
            raise EdgeVitError(f"TVM's importer does not support operator(s) {', '.join(ops) or str(e)[:200]} "
                               "used by this model; rewrite them with supported ops") from None
    mod, params = relax.frontend.detach_params(mod)
    mod = patch_convs_as_matmuls(mod)
    return precompute_weight_transforms(mod, [p.numpy() for p in params.get("main", [])])


def patch_convs_as_matmuls(mod):
    """Rewrite patch-embedding convs (stride == kernel, no padding, no groups) as the matmul
    they are: non-overlapping patches flattened to rows times the weight flattened to columns.
    Scheduled as a conv, ViT-Ti's 16x16/16 patch embedding was 37% of its latency; as a matmul
    it gets the matmul rule (and its weight reshape is precomputed with the other transforms)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    x_pat, w_pat = wildcard(), wildcard()
    pattern = is_op("relax.nn.conv2d")(x_pat, w_pat)

    def rewrite(call, matches):
        attrs = call.attrs
        x, w = matches[x_pat], matches[w_pat]
        xs, ws = [int(d) for d in x.ty.shape], [int(d) for d in w.ty.shape]
        n, c, h, wd = xs                                        # NCHW
        o, _, kh, kw = ws                                       # OIHW
        if (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout)) != ("NCHW", "OIHW", "NCHW") \
                or [int(v) for v in attrs.strides] != [kh, kw] or any(int(v) for v in attrs.padding) \
                or any(int(v) != 1 for v in attrs.dilation) or int(attrs.groups) != 1 or h % kh or wd % kw:
            return call
        gh, gw = h // kh, wd // kw
        op = relax.op
        patches = op.reshape(x, [n, c, gh, kh, gw, kw])                 # [N, C, gh, kh, gw, kw]
        patches = op.permute_dims(patches, [0, 2, 4, 1, 3, 5])          # [N, gh, gw, C, kh, kw]
        patches = op.reshape(patches, [n * gh * gw, c * kh * kw])       # [N*gh*gw, C*kh*kw]
        weight = op.permute_dims(op.reshape(w, [o, c * kh * kw]), [1, 0])  # [C*kh*kw, O]
        out = op.matmul(patches, weight, out_dtype=str(call.ty.dtype))  # [N*gh*gw, O]
        return op.permute_dims(op.reshape(out, [n, gh, gw, o]), [0, 3, 1, 2])  # [N, O, gh, gw]

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, rewrite, func)
    return mod


def precompute_weight_transforms(mod, weights: list[np.ndarray]):
    """Run weight-only computations (the transposes nn.Linear's weights get before every matmul)
    once, at compile time: `main` then takes the transformed weights, the deployed library never
    computes them, and the matmul reads its weights with the output columns contiguous."""
    import tvm
    from tvm import relax

    lifted = relax.transform.LiftTransformParams()(mod)
    transform = "main_transform_params"
    if transform not in [gv.name_hint for gv in lifted.functions]:
        return mod, weights
    prepare = tvm.IRModule({"main": lifted[transform].with_attr("global_symbol", "main")})
    with quiet_tvm_warnings():
        vm = relax.VirtualMachine(tvm.compile(prepare, target="llvm"), tvm.cpu())
    transformed = vm["main"]([tvm.runtime.tensor(w) for w in weights])
    main_only = tvm.IRModule({"main": lifted["main"]})
    return main_only, [t.numpy() for t in transformed]


def build(mod, target: Target, database: str | Path | None = None):
    """Compile a Relax module for the target with its pipeline (see schedules.py); kernels the
    tuning `database` holds come from it, the rest from edgevit's default rules."""
    import tvm

    from edgevit.schedules import relax_pipeline

    from tvm import relax

    tvm_target = target.tvm_target()
    with tvm.transform.PassContext(opt_level=3), quiet_tvm_warnings():
        # "compiled": the VM's own instructions become native code too; on the fashion model the
        # bytecode interpreter's per-kernel dispatch was a quarter of the latency (2.46 -> 1.85 ms)
        return relax.build(mod, tvm_target, relax_pipeline=relax_pipeline(tvm_target, str(database) if database else None),
                           exec_mode="compiled")


def schedule_source(target: Target, cfg: CompileConfig) -> tuple[str, Path | None]:
    """("rules", None) or ("tuned:<digest of the database's records>", folder)."""
    from edgevit.tune import database_dir, has_records

    if not cfg.tuning:
        return "rules", None
    folder = Path(cfg.database) if cfg.database else database_dir(target)
    if cfg.database and not has_records(folder):
        raise EdgeVitError(f"{folder}: no tuning records there; run `edgevit tune` first or drop --database")
    if not has_records(folder):
        return "rules", None
    digest = file_sha256(folder / "database_tuning_record.json")[:12]
    return f"tuned:{digest}", folder


def export_library(executable, target: Target, path: Path) -> None:
    import tvm.support.cc as cc

    cross = target.check_cross_compiler()
    with quiet_tvm_warnings():
        if cross:
            executable.export_library(str(path), fcompile=cc.cross_compiler(cross))
        else:
            executable.export_library(str(path))


@contextmanager
def quiet_tvm_warnings(benign: tuple[str, ...] = BENIGN_TVM_WARNINGS):
    """Drop the known-harmless lines TVM's C++ logger writes to stderr (fd 2) inside the block;
    every other line, errors included, is written on once the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode(errors="replace").splitlines(keepends=True)
                    if not any(b in line for b in benign)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def save_weights(weights: list[np.ndarray], path: Path) -> None:
    import tvm

    blob = tvm.runtime.save_param_dict({f"p{i}": tvm.runtime.tensor(w) for i, w in enumerate(weights)})
    path.write_bytes(blob)


def validation_inputs(ckpt: Checkpoint, shape: tuple[int, ...], images: int) -> tuple[np.ndarray, str]:
    """Real normalised images from the checkpoint's validation split, or seeded noise."""
    from edgevit.data import batches, load_data
    from edgevit.errors import DataError

    batch = shape[0]
    count = max(batch, (images // batch) * batch)
    spec = ckpt.data.get("spec")
    if spec:
        try:
            data = load_data(spec, shape[-1], ckpt.data.get("seed", 0), ckpt.data.get("val_fraction", 0.1))
            x, _ = next(batches(data.val, ckpt.data.get("mean", data.mean), ckpt.data.get("std", data.std), count))
            if len(x) >= batch:
                return x[: (len(x) // batch) * batch].numpy(), f"{spec} val images"
        except DataError:
            pass
    rng = np.random.default_rng(0)
    return rng.standard_normal((count, *shape[1:]), dtype=np.float32), "random"


def save_references(model: torch.nn.Module, inputs: np.ndarray, batch: int, folder: Path) -> np.ndarray:
    """reference.npz: the first batch; validation.npz: as many whole batches as fit 16 MB."""
    per_batch = inputs[:batch].nbytes
    keep = max(1, min(len(inputs) // batch, VALIDATION_BYTES // max(per_batch, 1))) * batch
    with torch.no_grad():
        outputs = np.concatenate([model(torch.from_numpy(inputs[i:i + batch])).numpy()
                                  for i in range(0, keep, batch)])
    np.savez(folder / REFERENCE, input=inputs[:batch], output=outputs[:batch])
    np.savez(folder / VALIDATION, input=inputs[:keep], output=outputs)
    return outputs[:batch]


def compare(run: Callable[[np.ndarray], np.ndarray], model: torch.nn.Module, inputs: np.ndarray,
            batch: int) -> dict:
    """Max abs error and top-1 agreement of `run` against PyTorch over `inputs`, batch by batch."""
    errors, agree, n = [], 0, 0
    for i in range(0, len(inputs) - batch + 1, batch):
        x = inputs[i:i + batch]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        got = run(x)
        errors.append(float(np.abs(got - ref).max()))
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        n += batch
    return {"max_abs_error": max(errors), "top1_agreement": 100.0 * agree / n, "images": n}


# ---------------------------------------------------------------------------- the verb


def compile_model(ckpt: Checkpoint, target: Target, out_dir: str | Path, sparsity: SparsityConfig | None = None,
                  cfg: CompileConfig = CompileConfig(), log: Log = print) -> CompiledArtifact:
    from edgevit.encodings import get_encoding

    encode = get_encoding(cfg.encoding)
    target.check_cross_compiler()
    model = ckpt.build_model().eval()
    if sparsity is not None:
        model.set_sparsity(sparsity)
    c = model.cfg
    shape = (cfg.batch, c.in_chans, c.img_size, c.img_size)
    start = time.perf_counter()
    mod, weights = encode(*to_relax(model, torch.zeros(shape)))
    schedule_source_name, database = schedule_source(target, cfg)
    executable = build(mod, target, database)
    log(f"schedules: {schedule_source_name}" + (f" ({database})" if database else " (edgevit's default rules)"))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes 0700; artifacts get the usual permissions
    try:
        export_library(executable, target, tmp / LIBRARY)
        compile_seconds = time.perf_counter() - start
        save_weights(weights, tmp / WEIGHTS)
        inputs, source = validation_inputs(ckpt, shape, cfg.images)
        reference = save_references(model, inputs, cfg.batch, tmp)
        manifest = _manifest(ckpt, target, model, sparsity, cfg, shape, reference, source, compile_seconds, tmp)
        manifest["schedules"] = {"source": schedule_source_name, "database": str(database) if database else None}
        manifest["validation"] = _validate(tmp, target, model, inputs, source, cfg, log)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return CompiledArtifact.load(out_dir)


def _validate(tmp: Path, target: Target, model, inputs, source, cfg: CompileConfig, log: Log) -> dict:
    from edgevit.runtime import Device, Session

    if not cfg.validate:
        return {"skipped": "disabled (--no-validate)"}
    if not target.runs_here:
        return {"skipped": f"{target.device}/{target.arch} does not run on this machine; "
                           "check on the device with `edgevit verify`"}
    session = Session(Device("cpu"), tmp / LIBRARY, tmp / WEIGHTS)
    result = {"device": "local cpu", source: compare(session.run, model, inputs, cfg.batch)}
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((cfg.batch * 4, *inputs.shape[1:]), dtype=np.float32)
    result["random"] = compare(session.run, model, noise, cfg.batch)
    check_validation(result, cfg)
    real = result[source]
    log(f"validated on {real['images']} {source}: max abs error {real['max_abs_error']:.2e}, "
        f"top-1 agreement {real['top1_agreement']:.1f}%")
    return result


def check_validation(result: dict, cfg: CompileConfig) -> None:
    for name, r in result.items():
        if not isinstance(r, dict):
            continue
        if r["max_abs_error"] > cfg.max_abs_error or r["top1_agreement"] < cfg.min_top1_agreement:
            raise ValidationError(
                f"compiled model disagrees with PyTorch on {name}: max abs error {r['max_abs_error']:.3g} "
                f"(limit {cfg.max_abs_error:g}), top-1 agreement {r['top1_agreement']:.1f}% "
                f"(limit {cfg.min_top1_agreement:g}%); the artifact was not written")


def _manifest(ckpt, target, model, sparsity, cfg, shape, reference, source, seconds, folder: Path) -> dict:
    import tvm

    tvm_target = target.tvm_target()
    return {
        "kind": ARTIFACT_KIND, "version": 1,
        "target": {"name": target.name, "device": target.device, "arch": target.arch, "rpc_key": target.rpc_key,
                   "tvm": json.loads(str(tvm_target))},
        "model": {"name": ckpt.model_name, "config": asdict(model.cfg), "stage": ckpt.stage},
        "sparsity": sparsity.to_dict() if sparsity is not None else None,
        "input": {"shape": list(shape), "dtype": "float32", "layout": "NCHW", "mean": ckpt.data.get("mean"),
                  "std": ckpt.data.get("std"), "classes": ckpt.data.get("classes")},
        "output": {"shape": list(reference.shape), "dtype": "float32"},
        "encoding": cfg.encoding,
        "reference": {"source": source, "output_sha256": hashlib.sha256(reference.tobytes()).hexdigest()},
        "files": {name: file_sha256(folder / name) for name in (LIBRARY, WEIGHTS, REFERENCE, VALIDATION)},
        "compile_seconds": round(seconds, 2),
        "config": asdict(cfg),
        "versions": {**library_versions(), "tvm": tvm.__version__},
    }


def _publish(tmp: Path, out_dir: Path) -> None:
    """Swap the finished folder into place; an existing artifact is replaced only at the end."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
