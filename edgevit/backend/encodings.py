"""Weight encodings: how weights travel through the compile path.

An encoding rewrites the imported Relax module and its weight list, given the quantized layers
of the model it was imported from (e.g. int8 with scales, k-means or product-quantization
codebooks decoded inside TVM): {name: (fp32 weight, its quantization record)}, from a PyTorch
model or an ONNX graph's QDQ nodes alike. `fp32` passes them through. New encodings register
here; `compile` needs no change.

The contract: `encoder(mod, weights, layers, signed_activations=..., panels=...)` (the keywords
say what the target's instructions take: s8 or u8 activations, CPU panels or the GPU layout;
an encoder may ignore them) returns (mod, weights). `mod` holds one Relax function per batch
size (`main`, `main_b8`, ...), all taking the same weights: rewrite every one of them.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgevit.backend import codebook_kernels
from edgevit.backend.weight_match import match_weights, replace_weight_matmuls
from edgevit.config import closest_key_hint
from edgevit.errors import ConfigError

Encoder = Callable[..., tuple[object, list[np.ndarray]]]   # (mod, weights, layers, **target options)
_ENCODINGS: dict[str, Encoder] = {}


def register_encoding(name: str):
    def wrap(fn: Encoder) -> Encoder:
        _ENCODINGS[name] = fn
        return fn
    return wrap


def get_encoding(name: str) -> Encoder:
    if name not in _ENCODINGS:
        raise ConfigError(f"unknown weight encoding '{name}'; {closest_key_hint(name, list(_ENCODINGS))}")
    return _ENCODINGS[name]


def list_encodings() -> list[str]:
    return sorted(_ENCODINGS)


@register_encoding("fp32")
def fp32(mod, weights: list[np.ndarray], _layers=None, **_options):
    """Weights stay as imported (float32; an ONNX graph's own scales and zero points keep their types),
    bound as function inputs."""
    return mod, [np.asarray(w, order="C") for w in weights]


@register_encoding("fp16")
def fp16(mod, weights: list[np.ndarray], layers=None, **_options):
    """Mixed precision for GPUs (`compile --precision fp16`), as PyTorch's autocast does it: every
    matmul and conv takes fp16 operands, accumulates in fp32 and rounds its result to fp16 (TVM's
    ToMixedPrecision, out_dtype float32). Softmax is computed in fp32 (that pass never lowers it),
    and so are LayerNorm, the bias adds and the residual stream: the pass computes an op in fp32
    when any input is fp32, and their scales, shifts and biases are fp32 parameters (tested).
    The casts of weights to fp16 are weight-only work, which the frontend's weight-transform step
    does once at compile time (frontend.encode), so weights.params stores the matmul weights in
    fp16 (biases and norm parameters, which feed fp32 ops, stay fp32)."""
    from tvm import relax

    if layers:
        raise ConfigError("fp16: this model has int8 layers; compile an int8 checkpoint as int8 (no --precision), "
                          "or its fp32 checkpoint with --precision fp16")
    return relax.transform.ToMixedPrecision(out_dtype="float32")(mod), weights


@register_encoding("int8")
def int8(mod, weights: list[np.ndarray], layers: dict, signed_activations: bool = False, panels: bool = True):
    """Every matmul whose weight belongs to a quantized layer becomes

        x_u8 = clip(round(x * 1/s_x) + z, 0, 255)              (fused into x's producer)
        y    = f32(x_u8 @ W_s8 - z * colsum(W)) * (s_x * s_w)   (int32 accumulation, one kernel
                                                                  with the bias / GELU / residual after it)

    with W_s8 [K, N] int8, the compensation z * colsum(W) [N] int32 and the scales [N] float32 as
    function inputs in place of the fp32 weight: weights.params holds int8, not fp32 (constants
    would be re-expanded by FoldConstant, TVM_QUANT.md). Layers are found by their fp32 weight's
    value (the importer renames parameters; the values pass through unchanged).

    `signed_activations` (ARM with the dot-product extension, whose `sdot` multiplies s8 by s8):
    the codes are x_u8 - 128 as int8, the same numbers shifted, and the compensation becomes
    (z - 128) * colsum(W).

    `panels` False (GPUs): W_s8 is [K/4, N, 4] (K zero-padded to a multiple of 4), and each
    output is a row of activations dotted with a column of weights 4 bytes at a time (`__dp4a`,
    int8_rules), neighbouring threads reading neighbouring 4-byte words.
    (TVM 0.27's own int8 tensor-core matmul schedule fails to build: TVM_QUANT.md.)"""
    layers = match_weights(weights, layers, "int8")
    shift = SIGNED_SHIFT if signed_activations else 0
    arrays = [_int8_arrays(hit[1], shift, panels) if hit else [np.asarray(w, order="C")]
              for w, hit in zip(weights, layers)]
    return replace_weight_matmuls(mod, layers, arrays, ("s8", "comp", "scale"), _int8_lowering(shift, panels), "int8")


def _int8_lowering(shift: int, panels: bool):
    """matmul(x, W) of a quantized layer as u8/s8 x s8 kernels (shared by shape) on its
    (W_s8, comp, scale) inputs."""
    from tvm import relax

    def lower(call, x, q, encoded, kernel):
        w_packed, comp, scale = encoded
        op = relax.op
        x = op.multiply(x, relax.const(np.float32(q.inv_input_scale)))
        zero = relax.const(np.float32(q.input_zero_point - shift))
        codes = op.astype(op.clip(op.add(op.round(x), zero), -shift, 255 - shift), "int8" if shift else "uint8")
        dims = [int(d) for d in call.args[0].ty.shape]
        lead, k, n = dims[:-1], dims[-1], int(comp.ty.shape[0])
        rows = int(np.prod(lead))
        codes = op.reshape(codes, [rows, k])                                                # (M, K)
        if panels:   # CPU: whole register tiles of rows (197 tokens -> 200)
            padded, depth, prefix = -(-rows // TILE_ROWS) * TILE_ROWS, k, f"matmul_{'s8' if shift else 'u8'}s8"
            make = lambda: packed_matmul(padded, k, n, "int8" if shift else "uint8")         # noqa: E731
        else:        # GPU: whole 4-byte groups of depth for __dp4a
            padded, depth, prefix = rows, -(-k // DP4A_DEPTH) * DP4A_DEPTH, "matmul_s8s8_rows"
            make = lambda: row_dot_matmul(rows, depth, n)                                     # noqa: E731
        func = kernel((prefix, padded, depth, n), prefix, make)
        if (padded, depth) != (rows, k):
            codes = op.nn.pad(codes, [0, padded - rows, 0, depth - k])                      # (M', K')
        acc = relax.call_tir(func, relax.Tuple([codes, w_packed]),
                             relax.TensorType([padded, n], "int32"))                       # (M', N)
        y = op.multiply(op.astype(op.subtract(acc, comp), "float32"), scale)              # (M', N)
        if padded != rows:
            y = op.strided_slice(y, [0], [0], [rows])                                       # (M, N)
        return op.reshape(y, [*lead, n])                                                    # (..., N)

    return lower


PANEL_COLS, PANEL_DEPTH = 16, 4   # packed weight panels: 16 output columns x 4 k (one vpdpbusd / sdot x4)
TILE_ROWS = 4                     # activation rows padded to a multiple of the kernel's register tile
SIGNED_SHIFT = 128                # s8 codes = u8 codes - 128 (targets whose dot product is s8 x s8)
DP4A_DEPTH = 4                    # GPU layout: weights [K'/4, N, 4], K' a multiple of dp4a's 4 bytes


def row_dot_matmul(m: int, k: int, n: int):
    """TIR of C[i, j] = sum_r i32(A[i, r]) * i32(W[r // 4, j, r % 4]): s8 activations times s8
    weights in groups of 4 along K (the GPU layout: 4 consecutive bytes of each are one `__dp4a`,
    and the threads of a block, one column each, read consecutive words of W)."""
    from tvm import te, tirx

    def i64(*dims):
        return [tirx.IntImm("int64", d) for d in dims]

    a = te.placeholder(i64(m, k), "int8", name="A")
    w = te.placeholder(i64(k // DP4A_DEPTH, n, DP4A_DEPTH), "int8", name="W")
    r = te.reduce_axis(i64(0, k), name="k")
    c = te.compute(i64(m, n), lambda i, j: te.sum(
        a[i, r].astype("int32") * w[r // DP4A_DEPTH, j, r % DP4A_DEPTH].astype("int32"), axis=r),
        name="matmul_int8_rows")
    return te.create_prim_func([a, w, c]).with_attr("op_pattern", 4)


def packed_matmul(m: int, k: int, n: int, a_dtype: str = "uint8"):
    """TIR of C[i, j] = sum_r i32(A[i, r]) * i32(W[j // 16, r // 4, j % 16, r % 4]): u8 (or s8)
    activations times s8 weights packed in panels (PANEL_COLS x PANEL_DEPTH), the layout x86
    VNNI's `vpdpbusd` and ARM's `sdot` read with one vector load (tensorize computes wrong
    results on unpacked [K, N] weights, TVM_QUANT.md). Marked out-elementwise-fusable so the
    dequantize / bias / GELU / residual epilogue fuses into it."""
    from tvm import te, tirx

    def i64(*dims):   # Relax's legalized kernels use int64 shapes; FuseTIR needs them to match
        return [tirx.IntImm("int64", d) for d in dims]

    a = te.placeholder(i64(m, k), a_dtype, name="A")
    w = te.placeholder(i64(-(-n // PANEL_COLS), -(-k // PANEL_DEPTH), PANEL_COLS, PANEL_DEPTH), "int8", name="W")
    r = te.reduce_axis(i64(0, k), name="k")
    c = te.compute(i64(m, n), lambda i, j: te.sum(
        a[i, r].astype("int32") * w[j // PANEL_COLS, r // PANEL_DEPTH, j % PANEL_COLS, r % PANEL_DEPTH].astype("int32"),
        axis=r),
        name="matmul_int8")
    return te.create_prim_func([a, w, c]).with_attr("op_pattern", 4)


def _int8_arrays(q, shift: int = 0, panels: bool = True) -> list[np.ndarray]:
    """(W_s8 packed in CPU panels [N/16, K/4, 16, 4] or GPU groups [K/4, N, 4], int8; (z - shift) *
    colsum(W_s8) [N] int32; s_x * s_w [N] float32) of one layer."""
    w = q.qweight.numpy().reshape(q.qweight.shape[0], -1)                                   # (N, K)
    comp = ((q.input_zero_point - shift) * w.astype(np.int64).sum(axis=1)).astype(np.int32)  # (N,)
    packed = pack_panels(w) if panels else _dp4a_groups(w)                                  # panels / (K'/4, N, 4)
    return [packed, comp, q.output_scale().numpy().astype(np.float32)]


def pack_panels(w: np.ndarray) -> np.ndarray:
    """[N, K] -> [N/16, K/4, 16, 4] (zero-padded): panel (j, r) holds columns 16j.. at depth 4r.."""
    padded = _zero_pad(w, PANEL_COLS, PANEL_DEPTH)
    nb, kb = padded.shape[0] // PANEL_COLS, padded.shape[1] // PANEL_DEPTH
    panels = padded.reshape(nb, PANEL_COLS, kb, PANEL_DEPTH).transpose(0, 2, 1, 3)         # (N/16, K/4, 16, 4)
    return np.ascontiguousarray(panels)


def _dp4a_groups(w: np.ndarray) -> np.ndarray:
    """[N, K] -> [K'/4, N, 4], K zero-padded to K' (a multiple of 4: the zeros add nothing)."""
    padded = _zero_pad(w, 1, DP4A_DEPTH)
    return np.ascontiguousarray(padded.reshape(w.shape[0], -1, DP4A_DEPTH).transpose(1, 0, 2))


def _zero_pad(w: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[N, K] with zeros appended up to multiples of (rows, cols)."""
    n, k = w.shape
    out = np.zeros((-(-n // rows) * rows, -(-k // cols) * cols), w.dtype)
    out[:n, :k] = w
    return out


# the codebook encodings (their kernels live beside their schedules)
register_encoding("kmeans")(codebook_kernels.kmeans)
register_encoding("pq")(codebook_kernels.pq)
