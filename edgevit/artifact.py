"""The compiled artifact: a folder `compile` writes and `verify`, `package` (and a device) read.

    model.so         the compiled library (cross-compiled for aarch64 targets)
    weights.params   weights in TVM's param format (p0..pN, in the order `main` takes them)
    reference.npz    an input batch and PyTorch's output for it, for on-device self-checks
    validation.npz   more inputs (real images where the data set is at hand) and PyTorch's
                     outputs, for `edgevit verify` on the device
    manifest.json    a `Manifest`: target, model, input, sha256 of every file, versions, the
                     tolerance every check of this artifact uses, validation figures

Reading one needs numpy only: no torch, no compiler.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from edgevit.errors import EdgeVitError, ValidationError
from edgevit.fileio import file_sha256, holds_only, read_artifact, write_json

MANIFEST, LIBRARY, WEIGHTS, REFERENCE = "manifest.json", "model.so", "weights.params", "reference.npz"
VALIDATION = "validation.npz"      # more inputs + PyTorch outputs (stays with the artifact, not bundled)
ARTIFACT_KIND = "edgevit.compiled"
ARTIFACT_FILES = {MANIFEST, LIBRARY, WEIGHTS, REFERENCE, VALIDATION}
LOADER = "run_model.py"            # only in deploy bundles (`package`)


@dataclass(frozen=True)
class Tolerance:
    """How far an artifact's outputs may stray from PyTorch's: decided once, at compile time
    (an fp32 artifact and a quantized one differ), and used by compile, verify and the bundle's
    loader alike."""

    max_abs_error: float = 1e-3       # on logits
    min_top1_agreement: float = 99.0  # % of images whose top-1 class matches PyTorch's

    def __post_init__(self):
        if not self.max_abs_error > 0 or not 0 <= self.min_top1_agreement <= 100:
            raise ValueError("max_abs_error must be > 0 and min_top1_agreement in [0, 100]")

    def accepts(self, figures: dict) -> bool:
        return figures["max_abs_error"] <= self.max_abs_error and figures["top1_agreement"] >= self.min_top1_agreement

    def check(self, figures: dict, what: str) -> None:
        """ValidationError naming `what`, the figures and the limits, unless they pass."""
        if not self.accepts(figures):
            raise ValidationError(
                f"compiled model disagrees with PyTorch on {what}: max abs error {figures['max_abs_error']:.3g} "
                f"(limit {self.max_abs_error:g}), top-1 agreement {figures['top1_agreement']:.1f}% "
                f"(limit {self.min_top1_agreement:g}%); the artifact was not written")


@dataclass(frozen=True)
class Manifest:
    target: dict                       # name, device, arch, rpc_key, tvm (target JSON)
    model: dict                        # name, config, stage
    input: dict                        # shape, dtype, layout, mean, std, classes
    output: dict                       # shape, dtype
    files: dict[str, str]              # name -> sha256
    tolerance: Tolerance = field(default_factory=Tolerance)
    sparsity: dict | None = None
    encoding: str = "fp32"
    reference: dict = field(default_factory=dict)   # source, output_sha256
    schedules: dict = field(default_factory=dict)   # source ("rules" / "tuned:..."), database
    validation: dict = field(default_factory=dict)
    compile_seconds: float = 0.0
    config: dict = field(default_factory=dict)      # the CompileConfig
    versions: dict = field(default_factory=dict)
    inputs: dict = field(default_factory=dict)      # checkpoint: sha256 of the model it was made from
    cuda: dict | None = None   # GPU targets: the kernels' CUDA version, architectures, resources; the runtime needed
    kind: str = ARTIFACT_KIND
    version: int = 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.input["shape"])

    @property
    def batch(self) -> int:
        return self.input_shape[0]

    @property
    def batches(self) -> tuple[int, ...]:
        """Every batch size the library runs, its own first (compile --batch 1,8)."""
        return tuple(self.input.get("batches") or [self.batch])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "Manifest":
        """Artifacts from before the tolerance record take it from their compile config."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        problem = manifest_problem(d)
        if problem:
            raise EdgeVitError(f"{where}: damaged manifest ({problem}); recompile the artifact")
        config = d.get("config") or {}
        tol = d.get("tolerance") or {k: config[k] for k in ("max_abs_error", "min_top1_agreement") if k in config}
        try:
            return cls(**{**d, "tolerance": Tolerance(**tol)})
        except (TypeError, ValueError) as e:
            raise EdgeVitError(f"{where}: damaged manifest ({e}); recompile the artifact") from None

    def save(self, folder: Path) -> None:
        write_json(folder / MANIFEST, self.to_dict())

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = folder / MANIFEST
        if not path.is_file():
            raise EdgeVitError(f"{folder}: not a compiled artifact (no {MANIFEST}); create one with `edgevit compile`")
        return cls.from_dict(read_artifact(path, ARTIFACT_KIND, "recompile the artifact"), str(path))


@dataclass(frozen=True)
class CompiledArtifact:
    path: Path
    manifest: Manifest = field(repr=False)

    @property
    def library(self) -> Path:
        return self.path / LIBRARY

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.manifest.input_shape

    @property
    def bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.manifest.files)

    @classmethod
    def load(cls, path: str | Path) -> "CompiledArtifact":
        """Read the manifest and verify every file's sha256."""
        path = Path(path)
        manifest = Manifest.load(path)
        for name, digest in manifest.files.items():
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


def manifest_problem(d: dict) -> str | None:
    """What is wrong with a manifest's fields (None: nothing), so a damaged or edited manifest is
    refused by name instead of failing somewhere inside a run."""
    target, inp, out, files = d.get("target"), d.get("input"), d.get("output"), d.get("files")
    if not isinstance(target, dict) or target.get("device") not in ("cpu", "cuda") \
            or not all(isinstance(target.get(k), str) for k in ("name", "arch")):
        return "target must name a cpu or cuda device, an arch and a name"
    if not isinstance(inp, dict) or not _positive_ints(inp.get("shape"), 4) or inp.get("dtype", "float32") != "float32":
        return "input must be a float32 NCHW shape of four positive sizes"
    batches = inp.get("batches", [inp["shape"][0]])
    if not _positive_ints(batches, len(batches) if isinstance(batches, list) else -1) or not batches \
            or batches[0] != inp["shape"][0] or len(set(batches)) != len(batches):
        return "input batches must list distinct positive batch sizes, the input shape's first"
    channels = inp["shape"][1]
    for key in ("mean", "std"):
        v = inp.get(key)
        if v is not None and (not isinstance(v, list) or len(v) != channels or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            return f"input {key} must hold one number per channel ({channels})"
    if inp.get("std") and any(x <= 0 for x in inp["std"]):
        return "input std must be positive"
    if not isinstance(out, dict) or not _positive_ints(out.get("shape"), 2) or out["shape"][0] != inp["shape"][0]:
        return "output must be a (batch, classes) shape matching the input's batch"
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and k in ARTIFACT_FILES
                                              for k, v in files.items()):
        return f"files must map the artifact's own files ({', '.join(sorted(ARTIFACT_FILES))}) to sha256 digests"
    if not isinstance(d.get("model", {}), dict):
        return "model must be a table"
    return None


def _positive_ints(v, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                                       for x in v)


def is_compiled_artifact(folder: Path) -> bool:
    """Whether `folder` is an artifact `compile` wrote (not a deploy bundle, not a user's folder)."""
    return manifest_kind(folder) == ARTIFACT_KIND and holds_only(folder, ARTIFACT_FILES)


def manifest_kind(folder: Path) -> str | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) else None
