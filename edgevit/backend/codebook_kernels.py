"""The kmeans and pq weight encodings: codes and codebooks carried compressed into the artifact and
decoded inside the matmul kernel.

Every matmul whose weight belongs to a codebook layer (codebooks.py) becomes one kernel

    C[i, j] = sum_k A[i, k] * W(k, j),   W(k, j) = codebook lookup of the codes   (K x N, never stored)

whose inputs are the packed codes and the codebook (function inputs, as the int8 weights are:
bound as constants, FoldConstant would re-expand them to fp32, TVM_QUANT.md), so weights.params
holds the codes and codebooks, not fp32 weights. The decode is a block of its own
(`codebook_decode`) that the schedules place inside the matmul: on CPUs one tile of output
columns is decoded into a small buffer and reused by every row tile (codebook_rules.py); on
GPUs the codebook is staged in shared memory and each thread decodes the weights it multiplies.

Layouts (output columns contiguous, so a tile of columns is one contiguous run of codes):
- kmeans: codes [K, N / per] uint8, `per` codes of neighbouring output columns per byte (four
  2-bit, two 4-bit (3- and 4-bit codebooks) or one 8-bit); codebook [G, C] float32, column j in
  group j // (N / G);
- pq: codes [K / D, N] uint8 (one byte per sub-vector), codebook [C, D] float32:
  W(k, j) = codebook[codes[k // D, j], k % D].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevit.backend.weight_match import match_weights, replace_weight_matmuls
from edgevit.errors import EdgeVitError

DECODE_BLOCK = "codebook_decode"
MATMUL_BLOCK = "codebook_matmul"


@dataclass(frozen=True)
class Layout:
    """What a codebook kernel is specialised to (besides its row count)."""

    scheme: str
    k: int
    n: int
    centroids: int
    groups: int = 1         # kmeans
    code_bits: int = 8      # kmeans: bits per stored code (2, 4, 8)
    subvector: int = 1      # pq

    @property
    def per_byte(self) -> int:
        return 8 // self.code_bits

    @property
    def codes_shape(self) -> tuple[int, int]:
        return (self.k // self.subvector, self.n) if self.scheme == "pq" else (self.k, self.n // self.per_byte)

    @property
    def codebook_shape(self) -> tuple[int, int]:
        return (self.centroids, self.subvector) if self.scheme == "pq" else (self.groups, self.centroids)


VECTOR = 16    # columns one vector lookup decodes (AVX-512's vpermps: 16 fp32 entries, 16 lanes)


def layout_of(q) -> Layout:
    """The kernel layout of a codebooks.LayerCodebook (k-means codebooks of up to 16 values are
    padded to 16, the table one `vpermps` looks up)."""
    from edgevit.codebooks import storage_bits

    n, k = q.shape[0], int(np.prod(q.shape[1:]))
    if q.scheme == "pq":
        return Layout("pq", k, n, q.centroids, subvector=q.subvector)
    return Layout("kmeans", k, n, max(q.centroids, VECTOR) if q.centroids <= VECTOR else q.centroids,
                  groups=int(q.codebook.shape[0]), code_bits=storage_bits(q.bits))


def codebook_array(q, layout: Layout) -> np.ndarray:
    """The codebook as the kernel reads it (k-means: zero-padded to the layout's centroids)."""
    book = q.codebook.numpy().astype(np.float32)
    if layout.scheme == "kmeans" and book.shape[1] < layout.centroids:
        book = np.pad(book, ((0, 0), (0, layout.centroids - book.shape[1])))
    return np.ascontiguousarray(book)


def vector_decodable(layout: Layout) -> bool:
    """Whether the decode is laid out for 16-column vector lookups: k-means with a 16-entry table,
    whole 16-column tiles, each tile inside one group of output channels."""
    return (layout.scheme == "kmeans" and layout.centroids == VECTOR and layout.code_bits in (2, 4)
            and layout.n % VECTOR == 0 and (layout.n // layout.groups) % VECTOR == 0)


def pack_codes(q, layout: Layout) -> np.ndarray:
    """The layer's codes in the kernel's layout (uint8)."""
    codes = q.codes.numpy().astype(np.uint8)                                             # (N, K) or (N, K/D)
    if layout.scheme == "pq":
        return np.ascontiguousarray(codes.T)                                             # (K/D, N)
    per, bits = layout.per_byte, layout.code_bits
    t = codes.T.reshape(layout.k, layout.n // per, per).astype(np.uint16)                # (K, N/per, per)
    packed = sum(t[:, :, s] << (bits * s) for s in range(per))
    return np.ascontiguousarray(packed.astype(np.uint8))                                 # (K, N/per)


def unpack_codes(packed: np.ndarray, layout: Layout) -> np.ndarray:
    """Inverse of pack_codes: codes [N, K] (kmeans) or [N, K/D] (pq)."""
    if layout.scheme == "pq":
        return np.ascontiguousarray(packed.T)
    per, bits = layout.per_byte, layout.code_bits
    parts = [(packed.astype(np.uint16) >> (bits * s)) & ((1 << bits) - 1) for s in range(per)]
    return np.stack(parts, axis=-1).reshape(layout.k, layout.n).T.astype(np.uint8)


def codebook_matmul(m: int, layout: Layout):
    """TIR of C [M, N] = A [M, K] x W(codes, codebook), the decode as its own block."""
    from tvm import te, tirx

    def i64(*dims):   # Relax's legalized kernels use int64 shapes; FuseTIR needs them to match
        return [tirx.IntImm("int64", d) for d in dims]

    k, n = layout.k, layout.n
    a = te.placeholder(i64(m, k), "float32", name="A")
    codes = te.placeholder(i64(*layout.codes_shape), "uint8", name="codes")
    book = te.placeholder(i64(*layout.codebook_shape), "float32", name="codebook")
    if layout.scheme == "pq":
        d = layout.subvector

        def weight(r, j):
            return book[codes[r // d, j].astype("int64"), r % d]
    else:
        per, bits, size = layout.per_byte, layout.code_bits, n // layout.groups

        def weight(r, j):
            byte = codes[r, j // per].astype("int32") if per > 1 else codes[r, j].astype("int32")
            code = (byte >> ((j % per) * bits).astype("int32")) & ((1 << bits) - 1) if per > 1 else byte
            group = j // size if layout.groups > 1 else tirx.IntImm("int64", 0)
            return book[group, code.astype("int64")]

    r = te.reduce_axis(i64(0, k), name="k")
    if vector_decodable(layout):    # (K, N/16, 16): each 16-column tile one vector lookup (codebook_rules)
        w = te.compute(i64(k, n // VECTOR, VECTOR), lambda r_, t, lane: decode_tile_lane(
            codes, book, r_, t, lane, layout), name=DECODE_BLOCK)
        c = te.compute(i64(m, n), lambda i, j: te.sum(a[i, r] * w[r, j // VECTOR, j % VECTOR], axis=r),
                       name=MATMUL_BLOCK)
    else:
        w = te.compute(i64(k, n), weight, name=DECODE_BLOCK)                              # (K, N)
        c = te.compute(i64(m, n), lambda i, j: te.sum(a[i, r] * w[r, j], axis=r), name=MATMUL_BLOCK)
    # out-elementwise-fusable: the bias / GELU / residual epilogue fuses into it
    return te.create_prim_func([a, codes, book, c]).with_attr("op_pattern", 4)


def decode_tile_lane(codes, book, r, tile, lane, layout: Layout):
    """Weight (r, 16 * tile + lane) of a vector-decodable layout: the code's byte and nibble are
    indexed by the lane alone, the group by the tile alone, so that every tile's 16 lanes are
    the same computation (the one codebook_rules' vector lookup replaces)."""
    from tvm import tirx

    per, bits = layout.per_byte, layout.code_bits
    byte = codes[r, tile * (VECTOR // per) + lane // per].astype("int32")
    code = (byte >> ((lane % per) * bits).astype("int32")) & ((1 << bits) - 1)
    size = layout.n // layout.groups
    group = (tile * VECTOR) // size if layout.groups > 1 else tirx.IntImm("int64", 0)
    return book[group, code.astype("int64")]


def kmeans(mod, weights: list[np.ndarray], layers: dict, **_options):
    """k-means codebooks decoded inside the matmul kernels (the module's docstring)."""
    return _encode(mod, weights, layers, "kmeans")


def pq(mod, weights: list[np.ndarray], layers: dict, **_options):
    """Product-quantized weights decoded inside the matmul kernels (the module's docstring)."""
    return _encode(mod, weights, layers, "pq")


def _encode(mod, weights: list[np.ndarray], layers: dict, scheme: str):
    hits = match_weights(weights, layers, scheme)
    arrays = []
    for w, hit in zip(weights, hits):
        if hit is None:
            arrays.append([np.asarray(w, order="C")])
            continue
        layout = layout_of(hit[1])
        if (layout.k, layout.n) != w.shape:
            raise EdgeVitError(f"{scheme}: layer {hit[0]} is [{layout.k}, {layout.n}] in its record but "
                               f"{list(w.shape)} in the graph; quantize the model again")
        arrays.append([pack_codes(hit[1], layout), codebook_array(hit[1], layout)])
    return replace_weight_matmuls(mod, hits, arrays, ("codes", "codebook"), _lower, scheme)


def _lower(call, x, q, encoded, kernel):
    """matmul(x, W) of a codebook layer as its codebook kernel (shared by layout and rows)."""
    from tvm import relax

    layout, (codes, book) = layout_of(q), encoded
    op = relax.op
    lead = [int(d) for d in call.args[0].ty.shape][:-1]
    rows = int(np.prod(lead))
    func = kernel((layout, rows), f"{MATMUL_BLOCK}_{layout.scheme}", lambda: codebook_matmul(rows, layout))
    y = relax.call_tir(func, relax.Tuple([op.reshape(x, [rows, layout.k]), codes, book]),
                       relax.TensorType([rows, layout.n], "float32"))                      # (M, K) -> (M, N)
    return op.reshape(y, [*lead, layout.n])                                                 # (..., N)
