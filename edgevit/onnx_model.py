"""ONNX models users bring (`compile --onnx`) and ONNX files edgevit writes (`export`).

An `OnnxModel` is a file checked once on load: one float32 NCHW image input (its batch axis may
be symbolic; the other sizes come from the file or `--input-shape`), one (batch, features)
output, every operator one TVM imports. ONNX Runtime is the reference an imported model is
validated against.

int8 travels as QDQ: a MatMul (or Gemm) whose weight is DequantizeLinear(int8 initializer,
per-output-channel scales, zero point 0) and whose input is DequantizeLinear(QuantizeLinear(x,
s, z uint8)) is an int8 layer, the format ONNX Runtime's static quantizer writes and `export`
writes for a quantized checkpoint. `qdq_layers` reads such layers back as edgevit's records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgevit.errors import CheckpointError, ConfigError
from edgevit.fileio import file_sha256


@dataclass(frozen=True)
class OnnxModel:
    path: Path
    proto: Any                              # onnx.ModelProto, external data loaded
    input_name: str
    input_shape: tuple[int | None, ...]     # (batch or None if symbolic, C, H, W)
    output_name: str
    sha256: str

    @classmethod
    def load(cls, path: str | Path, input_shape: tuple[int, ...] | None = None) -> "OnnxModel":
        """Read and check an ONNX file; `input_shape` fills (and must agree with) its input sizes."""
        import onnx

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such ONNX file; check the path")
        try:
            proto = onnx.load(str(path))
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, missing external data, ...
            raise CheckpointError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); "
                                  "export it again with torch.onnx.export") from None
        initializers = {i.name for i in proto.graph.initializer}
        inputs = [i for i in proto.graph.input if i.name not in initializers]
        if len(inputs) != 1 or len(proto.graph.output) != 1:
            raise ConfigError(f"{path}: {len(inputs)} inputs and {len(proto.graph.output)} outputs; edgevit compiles "
                              "image models with one image input and one output")
        name, shape = inputs[0].name, _declared_shape(inputs[0], path)
        shape = _merged_shape(shape, input_shape, path)
        return cls(path, proto, name, shape, proto.graph.output[0].name, file_sha256(path))

    def shape(self, batch: int) -> tuple[int, ...]:
        """The input shape at `batch`; a file whose batch axis is fixed takes only that batch."""
        if self.input_shape[0] is not None and self.input_shape[0] != batch:
            raise ConfigError(f"{self.path}: the input's batch axis is fixed at {self.input_shape[0]}; compile with "
                              f"--batch {self.input_shape[0]}, or export the model with a dynamic batch axis")
        return (batch, *self.input_shape[1:])

    def check_operators(self) -> None:
        """One line naming the first node TVM cannot import (which node, which op) and how many more."""
        from edgevit.backend.frontend import onnx_unsupported_nodes

        bad = onnx_unsupported_nodes(self.proto)
        if bad:
            ops = sorted({op for _, op in bad})
            raise ConfigError(f"{self.path}: node '{bad[0][0]}' uses operator {bad[0][1]}, which TVM's ONNX importer "
                              f"does not support ({len(bad)} such nodes, ops: {', '.join(ops)}); export the model "
                              "without it (another opset, or the op rewritten)")

    def session(self, optimize: bool = True):
        return ort_session(self.path, optimize)

    @property
    def name(self) -> str:
        return self.path.stem


def ort_session(path: str | Path, optimize: bool = True):
    """An ONNX Runtime CPU session (without graph optimisations: QDQ nodes then compute in float
    exactly as written, instead of being fused into ORT's own integer kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return _open_session(str(path), options, str(path))


def _open_session(model, options, where: str):
    """An ORT CPU session; a graph ONNX Runtime refuses is a one-line ConfigError."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's pybind errors (InvalidGraph, Fail, ...)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"{where}: ONNX Runtime cannot load this graph ({first}); export it again "
                          "(opset 13 or newer) and check it with onnx.checker") from None


def ort_reference(session) -> Any:
    """A callable x -> output of the session's one input and first output."""
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def _declared_shape(value_info, path: Path) -> tuple[int | None, ...]:
    t = value_info.type.tensor_type
    if t.elem_type != 1:   # onnx.TensorProto.FLOAT
        raise ConfigError(f"{path}: input '{value_info.name}' is not float32; edgevit takes float32 NCHW images")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    if len(dims) != 4:
        raise ConfigError(f"{path}: input '{value_info.name}' has {len(dims)} axes; edgevit takes NCHW images "
                          "(batch, channels, height, width)")
    return tuple(dims)


def _merged_shape(declared: tuple, given: tuple | None, path: Path) -> tuple:
    if given is not None:
        if len(given) != 4 or any(int(g) < 1 for g in given):
            raise ConfigError(f"--input-shape {','.join(map(str, given))}: expected four positive sizes N,C,H,W")
        clash = [i for i, (d, g) in enumerate(zip(declared, given)) if d is not None and d != g and i > 0]
        if clash:
            raise ConfigError(f"{path}: the file fixes its input at {declared}, --input-shape says {tuple(given)}; "
                              "drop --input-shape or export the model at that size")
        return (declared[0], *given[1:])
    if any(d is None for d in declared[1:]):
        raise ConfigError(f"{path}: the input's channel/height/width are not fixed in the file ({declared}); "
                          "pass --input-shape N,C,H,W")
    return declared


# ---------------------------------------------------------------------------- QDQ int8


def dequantized_graph(proto) -> tuple[Any, dict]:
    """(graph, layers): `proto` with every QDQ int8 MatMul/Gemm read back as an fp32 layer (its
    weight dequantized into an initializer, its input's Q/DQ pair bypassed) and `layers`
    {node name: (weight [N, K] float32, LayerQuant)} for the int8 encoding to put back as int8
    kernels. A graph without such layers comes back unchanged, with no layers."""
    import onnx

    from edgevit.quantization import LayerQuant

    graph = onnx.ModelProto()
    graph.CopyFrom(proto)
    g = graph.graph
    inits = {i.name: i for i in g.initializer}
    producer = {out: node for node in g.node for out in node.output}
    layers: dict = {}
    for node in list(g.node):
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        found = _qdq_layer(node, producer, inits)
        if found is None:
            continue
        x_name, weight_kn, quant, weight_name = found
        w_init = onnx.numpy_helper.from_array(weight_kn if _gemm_trans_b(node) is False else weight_kn.T.copy(),
                                              name=f"{weight_name}_dequantized")
        g.initializer.append(w_init)
        node.input[0], node.input[1] = x_name, w_init.name
        layers[node.name or weight_name] = (weight_kn.T.copy(), LayerQuant(**quant))
    if layers:
        _drop_dead_nodes(g)
    return graph, layers


def _gemm_trans_b(node) -> bool | None:
    """MatMul: False (B is [K, N]); Gemm: its transB (True: B is [N, K])."""
    if node.op_type == "MatMul":
        return False
    if any(a.name == "transA" and a.i for a in node.attribute):
        return None       # a transposed activation: not a layer edgevit recognises
    return any(a.name == "transB" and a.i for a in node.attribute)


def _qdq_layer(node, producer: dict, inits: dict):
    """(input before Q, weight [K, N] float32 dequantized, LayerQuant fields, weight name) of a QDQ
    layer, or None when `node` is not one (fp32 inputs, per-tensor weights with a zero point, ...)."""
    import torch
    from onnx import numpy_helper

    trans_b = _gemm_trans_b(node)
    a_dq, b_dq = producer.get(node.input[0]), producer.get(node.input[1])
    if trans_b is None or not _is(a_dq, "DequantizeLinear") or not _is(b_dq, "DequantizeLinear"):
        return None
    a_q = producer.get(a_dq.input[0])
    if not _is(a_q, "QuantizeLinear") or b_dq.input[0] not in inits:
        return None
    consts = [_const(name, inits, producer) for name in (*a_q.input[1:3], *a_dq.input[1:3], *b_dq.input[1:3])]
    if len(a_q.input) < 3 or len(a_dq.input) < 3 or any(c is None for c in consts[:4]):
        return None
    q_scale, q_zero, dq_scale, dq_zero = consts[:4]
    if q_scale.size != 1 or float(q_scale) != float(dq_scale) or int(q_zero) != int(dq_zero):
        return None
    zero = int(q_zero) + (128 if q_zero.dtype == np.int8 else 0)     # s8 codes are the u8 codes minus 128
    if q_zero.dtype not in (np.uint8, np.int8):
        return None
    q = numpy_helper.to_array(inits[b_dq.input[0]])
    w_scale = consts[4]
    w_zero = consts[5] if len(b_dq.input) > 2 else np.zeros(1, np.int8)
    if q.dtype != np.int8 or q.ndim != 2 or w_scale is None or w_zero is None or np.any(w_zero != 0):
        return None
    q_kn = q.T if trans_b else q                                                   # [K, N]
    n = q_kn.shape[1]
    axis = next((a.i for a in b_dq.attribute if a.name == "axis"), 1)
    out_axis = 0 if trans_b else 1
    if w_scale.size != 1 and (w_scale.size != n or axis % 2 != out_axis):
        return None
    scale_n = np.broadcast_to(w_scale.astype(np.float32).reshape(-1), (n,)).copy()           # [N]
    weight_kn = (q_kn.astype(np.float32) * scale_n[None, :]).astype(np.float32)            # [K, N]
    quant = dict(qweight=torch.from_numpy(np.array(q_kn.T, order="C")), weight_scale=torch.from_numpy(scale_n),
                 input_scale=float(q_scale), input_zero_point=zero)
    return a_q.input[0], weight_kn, quant, b_dq.input[0]


def _is(node, op: str) -> bool:
    return node is not None and node.op_type == op


def _const(name: str, inits: dict, producer: dict) -> np.ndarray | None:
    from onnx import numpy_helper

    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producer.get(name)
    if _is(node, "Constant"):
        return numpy_helper.to_array(next(a.t for a in node.attribute if a.name == "value"))
    return None


def _drop_dead_nodes(g) -> None:
    """Remove nodes whose outputs nothing reads (the bypassed Q/DQ pairs), then unused initializers."""
    while True:
        used = {i for node in g.node for i in node.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    _drop_unused_initializers(g)


def _drop_unused_initializers(g) -> None:
    """Remove initializers no node reads, and their graph-input entries (older exports list every
    weight as an input too, which would otherwise become a required input)."""
    used = {i for node in g.node for i in node.input}
    unused = {i.name for i in g.initializer if i.name not in used}
    for init in [i for i in g.initializer if i.name in unused]:
        g.initializer.remove(init)
    for value in [v for v in g.input if v.name in unused]:
        g.input.remove(value)


def dataset_images(spec: str, split: str, shape: tuple[int, ...], count: int, mean=None, std=None
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """(images, labels, number of classes): the first `count` images of a split at the model's size, normalised with
    `mean`/`std` (default: the data set's own); a channel count other than the model's is refused."""
    from edgevit.data import batches, load_split, native_statistics
    from edgevit.errors import DataError

    images = load_split(spec, split, shape[-1], count)
    if images.channels != shape[1]:
        raise DataError(f"{spec} has {images.channels}-channel images and the model takes {shape[1]}; "
                        "use a data set with the model's channels")
    if mean is None or std is None:
        stats = native_statistics(spec)
        mean, std = mean or stats[0], std or stats[1]
    x, y = next(batches(images, list(mean), list(std), max(count, 1)))
    return x.numpy(), y.numpy(), len(images.classes)


# ---------------------------------------------------------------------------- edgevit's own QDQ


def linear_nodes(proto) -> dict[str, tuple[Any, np.ndarray]]:
    """{node name: (node, weight [N, K])} of each fp32 MatMul/Gemm with a 2-D initializer weight:
    the layers `quantize --onnx` can make int8."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for i, node in enumerate(proto.graph.node):
        trans_b = _gemm_trans_b(node) if node.op_type in ("MatMul", "Gemm") else None
        if trans_b is None or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim == 2 and w.dtype == np.float32:
            out[node.name or f"#{i}"] = (node, np.ascontiguousarray(w if trans_b else w.T))
    return out


def calibrate_onnx(model: OnnxModel, images: np.ndarray, method: str = "mse", percentile: float = 99.99,
                   keep_fp32: tuple[str, ...] = (), batch: int = 8) -> dict:
    """{node name: (weight [N, K], LayerQuant)}: per-channel int8 weights and each layer's input
    range fitted (quantization.fit_range) on its values over `images`, read by ONNX Runtime."""
    import fnmatch

    import onnx
    import torch

    from edgevit.quantization import SAMPLES_PER_LAYER, LayerQuant, activation_params, fit_range, weight_int8

    layers = {n: v for n, v in linear_nodes(model.proto).items()
              if not any(fnmatch.fnmatchcase(n, p) for p in keep_fp32)}
    if not layers:
        raise ConfigError(f"{model.path}: no fp32 MatMul/Gemm with a constant weight to quantize")
    probe = onnx.ModelProto()
    probe.CopyFrom(model.proto)
    wanted = sorted({node.input[0] for node, _ in layers.values()})
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in wanted if n not in known)
    session = _session_from_proto(probe)
    rng = np.random.default_rng(0)
    samples: dict[str, list[np.ndarray]] = {n: [] for n in wanted}
    names = [o.name for o in session.get_outputs()]
    images = images[: max(batch, len(images) // batch * batch)]
    for i in range(0, len(images) - batch + 1, batch):
        values = dict(zip(names, session.run(None, {model.input_name: images[i:i + batch]})))
        for n in wanted:
            flat = values[n].reshape(-1)
            keep = SAMPLES_PER_LAYER // max(1, -(-len(images) // batch))
            samples[n].append(flat if len(flat) <= keep else rng.choice(flat, keep, replace=False))
    ranges = {n: fit_range(torch.from_numpy(np.concatenate(v)), method, percentile) for n, v in samples.items()}
    out = {}
    for name, (node, weight) in layers.items():
        q, scale = weight_int8(torch.from_numpy(weight))
        s, z = activation_params(*ranges[node.input[0]])
        out[name] = (weight, LayerQuant(q, scale, s, z))
    return out


def _session_from_proto(proto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return _open_session(proto.SerializeToString(), options, "the calibration graph")


def insert_qdq(proto, layers: dict) -> int:
    """Each quantized layer's MatMul/Gemm in QDQ form (found by its weight's values, as the
    compiler finds them); returns how many were rewritten."""
    from onnx import helper, numpy_helper

    def digest(a):
        return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()

    by_value = {digest(np.asarray(w, np.float32).reshape(w.shape[0], -1)): q for w, q in layers.values()}
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    done = 0
    for node in list(g.node):
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in inits:
            continue
        trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.ndim != 2:
            continue
        quant = by_value.get(digest(np.ascontiguousarray(w if trans_b else w.T, np.float32)))
        if quant is None:
            continue
        stem = f"{node.input[1]}_qdq"
        q_w = quant.qweight.numpy().reshape(quant.qweight.shape[0], -1)          # [N, K] int8
        q_w = q_w if trans_b else np.ascontiguousarray(q_w.T)                     # as the node reads it
        g.initializer.extend([
            numpy_helper.from_array(q_w, f"{stem}_w_int8"),
            numpy_helper.from_array(quant.weight_scale.numpy().astype(np.float32), f"{stem}_w_scale"),
            numpy_helper.from_array(np.zeros(q_w.shape[0 if trans_b else 1], np.int8), f"{stem}_w_zero"),
            numpy_helper.from_array(np.array(quant.input_scale, np.float32), f"{stem}_x_scale"),
            numpy_helper.from_array(np.array(quant.input_zero_point, np.uint8), f"{stem}_x_zero")])
        x = node.input[0]
        new = [helper.make_node("QuantizeLinear", [x, f"{stem}_x_scale", f"{stem}_x_zero"], [f"{stem}_xq"]),
               helper.make_node("DequantizeLinear", [f"{stem}_xq", f"{stem}_x_scale", f"{stem}_x_zero"], [f"{stem}_x"]),
               helper.make_node("DequantizeLinear", [f"{stem}_w_int8", f"{stem}_w_scale", f"{stem}_w_zero"],
                                [f"{stem}_w"], axis=0 if trans_b else 1)]
        position = list(g.node).index(node)
        for i, extra in enumerate(new):
            g.node.insert(position + i, extra)
        node.input[0], node.input[1] = f"{stem}_x", f"{stem}_w"
        done += 1
    _drop_unused_initializers(g)
    return done
