"""`export --onnx`: a checkpoint (under a sparsity config, in its quantization scheme) as an ONNX
file a user can run in ONNX Runtime or TensorRT, checked with ONNX Runtime against PyTorch.

- fp32: torch's ONNX exporter (dynamo) on the model as it deploys; a SparseViT config keeps a
  fixed number of windows per stage, so the graph's window gather/scatter have static shapes
  (a ranking, GatherElements, ScatterElements) and the file is as fast as the config.
- int8: the same graph with each quantized layer in QDQ form (QuantizeLinear/DequantizeLinear
  on its input with the calibrated uint8 scale and zero point, its weight stored as int8 with
  per-output-channel scales): what ONNX Runtime's and TensorRT's int8 paths read, and what
  `compile --onnx` turns back into int8 kernels. Patch-embedding convs stay fp32 in the file.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from edgevit.checkpoint import Checkpoint
from edgevit.errors import OutputError, ValidationError
from edgevit.fileio import atomic_path, writable_parent
from edgevit.sparsity import SparsityConfig

PRODUCER = "edgevit"
OPSET = 18
Log = Callable[[str], None]


@dataclass(frozen=True)
class ExportConfig:
    batch: int = 1
    images: int = 64                   # validation images (the checkpoint's data set, else noise)
    max_abs_error: float | None = None  # default: 1e-4 fp32, the int8 artifact tolerance for QDQ

    def __post_init__(self):
        if self.batch < 1 or self.images < 0:
            raise ValueError("batch must be >= 1 and images >= 0")

    def tolerance(self, scheme: str) -> float:
        from edgevit.compile import DEFAULT_MAX_ABS_ERROR

        return self.max_abs_error if self.max_abs_error is not None else \
            (1e-4 if scheme == "fp32" else DEFAULT_MAX_ABS_ERROR[scheme])


def export_onnx(ckpt: Checkpoint, out: str | Path, sparsity: SparsityConfig | None = None,
                cfg: ExportConfig = ExportConfig(), log: Log = print) -> dict:
    """Write `out` (atomically; refused if a file edgevit did not write is there) and return the
    check's figures; a file ONNX Runtime computes differently from PyTorch is not written."""
    import onnx

    from edgevit.compile import compare, model_input_shape, torch_reference, validation_inputs
    from edgevit.onnx_model import insert_qdq, ort_reference, ort_session
    from edgevit.quantization import float_view, quantized_layers

    out = check_onnx_output(out)
    model = ckpt.build_model().eval()
    if sparsity is not None:
        model.set_sparsity(sparsity)
    shape = (cfg.batch, *model_input_shape(model))
    with atomic_path(out) as tmp:
        with float_view(model), warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(shape),), str(tmp), input_names=["input"], output_names=["output"],
                              dynamo=True, external_data=False, opset_version=OPSET, verbose=False)
        proto = onnx.load(str(tmp))
        layers = {n: (m.weight.detach().numpy(), m.quant) for n, m in quantized_layers(model).items()}
        if ckpt.scheme != "int8" and layers:   # ONNX has no codebook operator: the decoded weights, in fp32
            log(f"the {ckpt.scheme} model's {len(layers)} codebook layers are written with their decoded fp32 "
                "weights (ONNX has no codebook operator; `edgevit compile` keeps them compressed)")
            layers = {}
        qdq = insert_qdq(proto, layers) if layers else 0
        if qdq < len(layers):
            log(f"{len(layers) - qdq} of {len(layers)} quantized layers stay fp32 in the file (patch-embedding "
                "convs, which QDQ readers run as convolutions)")
        proto.producer_name = PRODUCER
        onnx.save(proto, str(tmp))
        inputs, source = validation_inputs(ckpt, shape, cfg.images, log)
        figures = compare(ort_reference(ort_session(tmp, optimize=not layers)), torch_reference(model), inputs,
                          cfg.batch)
        limit = cfg.tolerance(ckpt.scheme)
        if figures["max_abs_error"] > limit:
            raise ValidationError(f"ONNX Runtime's output differs from PyTorch's by {figures['max_abs_error']:.3g} "
                                  f"(limit {limit:g}) on {source}; the file was not written")
    log(f"ONNX Runtime vs PyTorch on {figures['images']} {source}: max abs error {figures['max_abs_error']:.2e}, "
        f"top-1 agreement {figures['top1_agreement']:.1f}%")
    return {"onnx": str(out), "scheme": ckpt.scheme, "qdq_layers": qdq, "opset": OPSET, "batch": cfg.batch,
            "sparsity": sparsity.to_dict() if sparsity is not None else None, "bytes": out.stat().st_size,
            "check": {**figures, "source": source, "limit": limit, "against": "pytorch"}}


def check_onnx_output(path: str | Path, option: str = "--onnx") -> Path:
    """The output path, refused before any work if it is a folder, unwritable, or a file edgevit
    did not write (an ONNX file another tool produced is the user's)."""
    import onnx

    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; pass a file path such as model.onnx")
    writable_parent(path, option)
    if path.exists():
        try:
            producer = onnx.load(str(path), load_external_data=False).producer_name
        except Exception:  # noqa: BLE001 - not an ONNX file at all
            producer = None
        if producer != PRODUCER:
            raise OutputError(f"{option} {path} exists and is not an ONNX file edgevit wrote; edgevit does not replace "
                              "files it did not write: pass another path")
    return path
