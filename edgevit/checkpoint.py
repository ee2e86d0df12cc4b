"""Checkpoint artifact: a state dict plus JSON metadata saying what made it.

Stored as one torch file {"format", "version", "meta" (a JSON string), "state_dict",
"train_state"} loaded with weights_only=True: tensors and plain values, never arbitrary
pickles. A user's own plain state dict (e.g. timm key names) loads too, given a model name.
"""

from __future__ import annotations

import json
import pickle
import platform
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from edgevit import __version__
from edgevit.errors import CheckpointError
from edgevit.fileio import atomic_path

FORMAT = "edgevit.checkpoint"
FORMAT_VERSION = 1
# buffers rebuilt from the config; present in timm state dicts, never needed from a file
DERIVED_KEYS = ("relative_position_index", "attn_mask")


def library_versions() -> dict[str, str]:
    return {"edgevit": __version__, "torch": torch.__version__, "python": platform.python_version()}


@dataclass(frozen=True)
class Checkpoint:
    model_name: str
    model_config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    data: dict[str, Any] = field(default_factory=dict)      # spec, image_size, mean, std, classes, seed
    metrics: dict[str, Any] = field(default_factory=dict)
    stage: str = "train"                                     # which verb made it: train, adapt, import
    config: dict[str, Any] = field(default_factory=dict)    # the verb's config
    versions: dict[str, str] = field(default_factory=library_versions)
    train_state: dict[str, Any] | None = None                # optimizer/scheduler/epoch, for --resume
    quantization: dict[str, Any] | None = None               # {"scheme", "layers": {name: LayerQuant dict}}

    @property
    def meta(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "model_config": self.model_config, "data": self.data,
                "metrics": self.metrics, "stage": self.stage, "config": self.config, "versions": self.versions}

    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash leaves the previous file intact."""
        path = Path(path)
        payload = {"format": FORMAT, "version": FORMAT_VERSION, "meta": json.dumps(self.meta, sort_keys=True),
                   "state_dict": self.state_dict, "train_state": self.train_state}
        if self.quantization is not None:
            payload["quantization"] = self.quantization
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return path

    def digest(self) -> str:
        """sha256 of what decides the model's outputs (name, config, weights): artifacts record it,
        so a stage can tell whether an artifact was made from this checkpoint."""
        import hashlib

        h = hashlib.sha256(json.dumps([self.model_name, self.model_config], sort_keys=True, default=str).encode())
        for name in sorted(self.state_dict):
            h.update(name.encode())
            h.update(self.state_dict[name].detach().contiguous().cpu().numpy().tobytes())
        if self.quantization is not None:
            h.update(self.scheme.encode())
            codebook = self.scheme != "int8"
            for name, layer in sorted(self.quantization["layers"].items()):
                h.update(name.encode())
                if not codebook:
                    h.update(json.dumps([layer["input_scale"], layer["input_zero_point"]]).encode())
                for key in ("codes", "codebook") if codebook else ("qweight", "weight_scale"):
                    h.update(layer[key].contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def scheme(self) -> str:
        """The weight encoding the model deploys with: fp32, or its quantization scheme."""
        return self.quantization["scheme"] if self.quantization else "fp32"

    def without_train_state(self) -> "Checkpoint":
        return replace(self, train_state=None)

    def build_model(self, quantized: bool = True) -> torch.nn.Module:
        """Create the registered model from the stored config and load the weights; a quantized
        checkpoint's model computes as its artifact does (int8 arithmetic, or codebook-decoded weights;
        quantized=False: the fp32 model it was quantized from, where the checkpoint keeps it)."""
        from edgevit.models import create_model

        model = create_model(self.model_name, **self.model_config)
        load_weights(model, self.state_dict, where=f"checkpoint of {self.model_name}")
        if self.quantization is not None and quantized:
            from edgevit.quantization import apply_quantization, layer_record

            try:
                layers = {n: layer_record(self.scheme, d) for n, d in self.quantization["layers"].items()}
                apply_quantization(model, layers)
            except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
                raise CheckpointError(f"checkpoint of {self.model_name}: damaged quantization record ({e}); "
                                      "quantize the model again with `edgevit quantize`") from None
        return model

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs: Any) -> "Checkpoint":
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(model_name=model.model_name, model_config=asdict(model.cfg), state_dict=state, **kwargs)

    @classmethod
    def load(cls, path: str | Path, model_name: str | None = None, **overrides: Any) -> "Checkpoint":
        """Load an edgevit checkpoint, or a plain state dict when `model_name` is given."""
        payload = read_torch_file(path)
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            return cls._from_payload(path, payload).with_model_settings(**overrides)
        return cls._from_plain(path, payload, model_name, overrides)

    def with_model_settings(self, **overrides: Any) -> "Checkpoint":
        """The same weights under changed model settings (e.g. img_size=448 for a Swin), validated;
        weights that no longer fit are reported when the model is built."""
        if not overrides:
            return self
        from edgevit.models import resolve_model

        _, cfg = resolve_model(self.model_name, **{**self.model_config, **overrides})
        return replace(self, model_config=asdict(cfg))

    @classmethod
    def _from_payload(cls, path: str | Path, payload: dict) -> "Checkpoint":
        if payload.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format version {payload.get('version')} is not "
                                  f"{FORMAT_VERSION}; re-save it with this edgevit version")
        try:
            meta = json.loads(payload["meta"])
            from edgevit.models.registry import complete_saved_config

            meta["model_config"] = complete_saved_config(meta["model_name"], meta["model_config"])
            quantization = payload.get("quantization")
            problem = quantization_problem(quantization)
            if problem:
                raise CheckpointError(f"{path}: damaged quantization record ({problem}); quantize the model again "
                                      "with `edgevit quantize`")
            return cls(state_dict=payload["state_dict"], train_state=payload.get("train_state"),
                       quantization=quantization, **meta)
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: damaged checkpoint metadata ({e}); use another checkpoint") from None

    @classmethod
    def _from_plain(cls, path: str | Path, payload: Any, model_name: str | None, overrides: dict) -> "Checkpoint":
        """A state dict in edgevit's (timm's) key names or a seed encoder's own (models/naming.py);
        settings the weights imply (class count, pooling, ...) apply unless `overrides` say otherwise."""
        from edgevit.models import create_model, resolve_model
        from edgevit.models.naming import adopt, unwrap

        payload = unwrap(payload)
        if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
            raise CheckpointError(f"{path}: neither an edgevit checkpoint nor a state dict of tensors")
        if model_name is None:
            raise CheckpointError(f"{path}: a plain state dict has no model name; pass --model NAME "
                                  "(see `edgevit models`)")
        cls_, cfg = resolve_model(model_name, **overrides)
        family = "vit" if cls_.__name__ == "VisionTransformer" else cls_.__name__
        adopted = adopt(payload, family, feature_extractor=getattr(cfg, "num_classes", 1) == 0)
        model = create_model(model_name, **{**adopted.settings, **overrides})
        load_weights(model, adopted.state, where=f"{path} ({adopted.naming} key names)")
        return cls.from_model(model, stage="import", config={"source": str(path), "naming": adopted.naming,
                                                              "settings": adopted.settings,
                                                              "dropped_keys": len(adopted.dropped)})


def quantization_problem(q: Any) -> str | None:
    """What is wrong with a checkpoint's quantization record (None: nothing, or no record)."""
    if q is None:
        return None
    if not isinstance(q, dict) or not isinstance(q.get("scheme"), str) or not isinstance(q.get("layers"), dict) \
            or not q["layers"]:
        return "expected a scheme and a non-empty table of layers"
    if q["scheme"] not in ("int8", "kmeans", "pq"):
        return f"unknown scheme '{q['scheme']}'"
    if q["scheme"] in ("kmeans", "pq"):
        from edgevit.codebooks import record_problem

        def problem(name, layer):
            if not isinstance(layer, dict) or layer.get("scheme") != q["scheme"]:
                return f"layer '{name}': not a {q['scheme']} record"
            return record_problem(name, layer)

        return next((p for p in (problem(n, layer) for n, layer in q["layers"].items()) if p), None)
    for name, layer in q["layers"].items():
        w, s = (layer.get(k) if isinstance(layer, dict) else None for k in ("qweight", "weight_scale"))
        if not (isinstance(w, torch.Tensor) and w.dtype == torch.int8 and w.ndim >= 2 and isinstance(s, torch.Tensor)
                and s.shape == (w.shape[0],)):
            return f"layer '{name}': int8 weights and one scale per output channel expected"
        scale, zero = layer.get("input_scale"), layer.get("input_zero_point")
        if not (isinstance(scale, (int, float)) and scale > 0 and isinstance(zero, int) and 0 <= zero <= 255):
            return f"layer '{name}': input scale must be > 0 and zero point in [0, 255]"
    return None


def read_torch_file(path: str | Path) -> Any:
    """The contents of a PyTorch file, loaded with weights_only=True (tensors and plain values
    only: nothing in the file is ever run). Anything else is a CheckpointError saying what the
    file is: a folder, text, another framework's format, a truncated file, or a pickle that
    would run code when unpickled (named, and never unpickled)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file; pass the .pt file inside it")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path (train one with `edgevit train`)")
    what = sniff_file(path)
    if what is not None:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({what}); pass a .pt file saved with torch.save")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch warns about pickle protocols before refusing
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        code = code_in_pickle(path)
        if code:
            raise CheckpointError(f"{path}: refused: unpickling this file would run code ({code}); it was not "
                                  "loaded. Save plain tensors (a state dict) with torch.save instead") from None
        raise CheckpointError(f"{path}: holds objects other than tensors and plain values, which edgevit does not "
                              "unpickle; save a plain state dict with torch.save") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError, IndexError, TypeError) as e:
        reason = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({reason[:160]}); "
                              "re-create it or use another file") from None


def sniff_file(path: Path) -> str | None:
    """What a file plainly is when it cannot be a torch.save file (None: it may be one)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "an empty file"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (e.g. Keras)"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            return None   # a truncated torch archive: torch.load says so
        if not any(n.endswith("data.pkl") for n in names):
            return "a zip archive without a PyTorch checkpoint inside (e.g. .npz)"
        return None
    if head[:1] == b"\x80":
        return None       # a pickle (torch's legacy format)
    if b"\x00" not in head and _mostly_text(head):
        return "a text file"
    if path.suffix.lower() == ".onnx" or (b"onnx" in head.lower() and head[:1] == b"\x08"):
        return "an ONNX model"
    if path.suffix.lower() == ".safetensors" or head[8:9] == b"{":
        return "a safetensors file or another binary format"
    return "an unknown binary format"


def _mostly_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return sum(c.isprintable() or c in "\n\r\t" for c in text) >= 0.95 * len(text)


# modules whose globals torch's weights-only unpickler may itself admit (tensors, containers)
SAFE_PICKLE_MODULES = ("torch", "collections", "numpy.core.multiarray", "numpy", "_codecs", "builtins")


def code_in_pickle(path: Path) -> str | None:
    """The first callable a pickle in `path` would import and call (e.g. 'posix.system'), read
    with pickletools (the file is parsed, never unpickled); None if none is found."""
    import pickletools

    data = _pickle_bytes(path)
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            name = None
            if op.name in ("GLOBAL", "INST"):
                name = arg.replace(" ", ".")
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            if name and not name.startswith(SAFE_PICKLE_MODULES):
                return name
    except Exception:  # noqa: BLE001 - a damaged pickle: what was read so far is all there is
        return None
    return None


def _pickle_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            return z.read(name) if name else b""
    return path.read_bytes()


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict with one-line errors for missing, unexpected and mis-shaped keys."""
    state = {k: v for k, v in state.items() if not k.endswith(DERIVED_KEYS)}
    if hasattr(model, "adapt_state_dict"):      # e.g. a ViT's position grid saved at another input size
        state = model.adapt_state_dict(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. '{missing[0]}')")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. '{unexpected[0]}')")
        raise CheckpointError(f"{where}: weights do not match model '{getattr(model, 'model_name', '?')}': "
                              f"{', '.join(parts)}; pick the model the weights were trained as")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{where}: '{k}' has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)}; check the model settings (img_size, num_classes, ...)")
    model.load_state_dict(state, strict=False)

