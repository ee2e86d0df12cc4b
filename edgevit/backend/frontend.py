"""Frontends: a PyTorch model to a Relax module (torch.export), with the graph rewrites edgevit
applies before any target's pipeline: patch-embedding convs as matmuls, weight-only
computations done once at compile time."""

from __future__ import annotations

import re
import warnings

import numpy as np
import torch

from edgevit.backend.build import quiet_tvm_warnings
from edgevit.errors import EdgeVitError


def to_relax(model: torch.nn.Module, example: torch.Tensor, extra_batches: tuple[int, ...] = (), target=None,
             precision: str = "fp32"):
    """torch.export -> Relax IRModule with weights as inputs, in the model's weight encoding (a
    quantized model's int8 layers as int8 matmuls, see encodings.py); returns (mod, weights).

    `main` takes `example`'s batch; each of `extra_batches` gets its own function (`entry_name`:
    a kernel specialised to its exact row count is faster than one for any batch), all taking
    the same weights, which the artifact stores once. `target` (an edgevit Target) picks how
    int8 layers are laid out for its instructions (see encodings.int8); `precision` "fp16": the
    fp16 encoding (GPU targets)."""
    from edgevit.backend.runtime import entry_name
    from edgevit.quantization import quantized_layers

    if hasattr(model, "for_inference"):
        model = model.for_inference()     # EfficientViT: batch norms folded into their convs
    batch = int(example.shape[0])
    examples = {entry_name(b, batch): example.new_zeros((b, *example.shape[1:])) for b in (batch, *extra_batches)}
    mod, weights = import_float(model, examples)
    layers = {name: (m.weight, m.quant) for name, m in quantized_layers(model).items()}
    mod, weights = encode(mod, weights, layers, target, precision)
    return cpu_kernels(mod, weights, target, precision, packed=not layers)


def cpu_kernels(mod, weights: list[np.ndarray], target, precision: str = "fp32", packed: bool = True):
    """A CPU target's own kernels in the graph: fp32 weight matmuls reading panel-packed weights
    (`packed`: not for a quantized model, whose encodings lay out their own), attention as one
    kernel per (image x head, row tile) (attention.py); the weight-only steps these add (a
    relative position bias padded to whole vectors) done once, here. Other targets: unchanged."""
    if target is None or target.device == "cuda" or precision != "fp32":
        return mod, weights
    from edgevit.backend.attention import fuse_attention_pass
    from edgevit.backend.cpu_features import fp32_lanes, row_tile
    from edgevit.backend.packed_fp32 import pack_weight_matmuls

    tvm_target = target.tvm_target()
    mod = activations_in_place(mod)
    if packed:
        mod, weights = pack_weight_matmuls(mod, weights, panel=2 * fp32_lanes(tvm_target), row_tile=row_tile(tvm_target))
    return precompute_weight_transforms(fuse_attention_pass(tvm_target)(mod), weights)


UNARY_ACTIVATIONS = ("relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.relu", "relax.nn.silu", "relax.sigmoid",
                     "relax.tanh")


def activations_in_place(mod):
    """act(reshape(y)) -> reshape(act(y)) for elementwise activations: torch's Linear on tokens
    gives matmul -> reshape to [B, T, C] -> GELU, and the reshape kept the GELU out of the
    matmul's kernel (ViT-Ti: an extra pass over the MLP activations, 0.49 of 18 ms in the
    kernel profile); moved before the reshape it fuses into the matmul's write-back. (The same
    move for the residual add does not fuse it: the residual's own reshape joins the add's
    group, which then is not elementwise.)"""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    from edgevit.backend.rewrites import function_pass

    @mutator
    class InPlace(PyExprMutator):
        def reshaped(self, expr):
            """y when `expr` is bound to reshape(y), else None."""
            bound = self.lookup_binding(expr) if isinstance(expr, relax.Var) else None
            ok = isinstance(bound, relax.Call) and getattr(bound.op, "name", None) == "relax.reshape"
            return bound.args[0] if ok else None

        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = getattr(call.op, "name", None)
            if name in UNARY_ACTIVATIONS and self.reshaped(call.args[0]) is not None:
                y = self.builder_.emit(relax.Call(call.op, [self.reshaped(call.args[0])], call.attrs))
                return relax.op.reshape(y, call.ty.shape)
            return call

    return function_pass(InPlace, "EdgeVitActivationsInPlace", dead_code=True)(mod)


def encode(mod, weights: list[np.ndarray], layers: dict, target=None, precision: str = "fp32"):
    """The fp32 graph with `layers` ({name: (fp32 weight, LayerQuant or LayerCodebook)}) as int8 or
    codebook matmuls laid out for the target (none: fp32 as imported); precision "fp16": the fp16
    encoding instead."""
    from edgevit.backend.encodings import get_encoding
    from edgevit.backend.int8_rules import has_sdot

    if precision != "fp32":   # reduced precision: its weight casts computed once, here
        return precompute_weight_transforms(*get_encoding(precision)(mod, weights, layers))

    gpu = target is not None and target.device == "cuda"
    # GPUs' int8 tensor cores and ARM's sdot multiply s8 by s8; x86's vpdpbusd takes u8 activations
    signed = gpu or (target is not None and has_sdot(target.tvm_target()))
    scheme = getattr(next(iter(layers.values()))[1], "scheme", "int8") if layers else "fp32"
    return get_encoding(scheme)(mod, weights, layers, signed_activations=signed, panels=not gpu)


def import_onnx(proto, input_name: str, shapes: dict[str, tuple[int, ...]]):
    """An ONNX graph (TVM's ONNX frontend) as Relax, one function per named input shape, with the
    same rewrites as a PyTorch model's; returns (mod, weights)."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    def one(shape):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return from_onnx(proto, shape_dict={input_name: list(shape)}, keep_params_in_input=True)
        except Exception as e:  # noqa: BLE001 - the frontend raises anything from asserts to TVMErrors
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
            raise EdgeVitError(f"TVM's ONNX importer failed on this model ({first}); check that the graph runs "
                               "in ONNX Runtime, or export it again with a newer opset") from None

    return merge_functions(((name, one(shape)) for name, shape in shapes.items()), relax)


def onnx_unsupported_nodes(proto) -> list[tuple[str, str]]:
    """(node name, op type) of each node TVM's ONNX frontend has no converter for."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    known = set(_get_convert_map()) | {"Constant", "If"}
    return [(node.name or f"#{i}", node.op_type) for i, node in enumerate(proto.graph.node)
            if node.op_type not in known]


def import_float(model: torch.nn.Module, examples: dict[str, torch.Tensor]):
    """The model's fp32 graph (quantized layers in their fp32 view), one function per named
    example input, with the rewrites below."""
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from edgevit.quantization import float_view

    def exported(example):
        exported = torch.export.export(model, (example,))
        try:
            return from_exported_program(exported, keep_params_as_input=True, unwrap_unit_return_tuple=True)
        except AssertionError as e:
            ops = re.findall(r"'([\w.:]+)'", str(e))
            raise EdgeVitError(f"TVM's importer does not support operator(s) {', '.join(ops) or str(e)[:200]} "
                               "used by this model; rewrite them with supported ops") from None

    relayout = channels_last if getattr(model, "compile_layout", "NCHW") == "NHWC" else (lambda mod: mod)
    with torch.no_grad(), warnings.catch_warnings(), float_view(model):
        # torch 2.13's own pytree code trips its LeafSpec deprecation on every export
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        return merge_functions(((name, relayout(exported(example))) for name, example in examples.items()), relax)


def channels_last(mod):
    """Convolutions in NHWC with HWIO weights (TVM's ConvertLayout carries the layout through the
    elementwise ops between them): a conv-net's 1x1 convs then read and write rows of channels,
    which the matmul rewrite below makes plain matmuls, and depthwise convs vectorise over
    channels with their weights contiguous too. Layout changes remain only where a reshape needs
    NCHW (attention's heads)."""
    from tvm import relax

    return relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)


def merge_functions(named_mods, relax):
    """One module of the imported functions (each renamed), their weights detached once and
    checked to be the same list for every function, then weight-only transforms precomputed."""
    import tvm

    merged, params = tvm.IRModule(), None
    for name, mod in named_mods:
        mod, detached = relax.frontend.detach_params(mod)
        these = [p.numpy() for p in detached.get("main", [])]
        if params is not None and [(a.shape, a.dtype) for a in these] != [(a.shape, a.dtype) for a in params]:
            raise EdgeVitError(f"the {name} graph takes other weights than the first batch's; compile each "
                               "batch size separately (--batch N)")
        params = these if params is None else params
        merged[name] = patch_convs_as_matmuls(mod)["main"].with_attr("global_symbol", name)
    return precompute_weight_transforms(merged, params)


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
        layouts = (str(attrs.data_layout), str(attrs.kernel_layout), str(attrs.out_layout))
        if layouts == ("NHWC", "HWIO", "NHWC"):
            return pointwise_nhwc_as_matmul(call, x, w)
        if layouts != ("NCHW", "OIHW", "NCHW") \
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


def pointwise_nhwc_as_matmul(call, x, w):
    """A channels-last 1x1 conv (stride 1, no padding) as [N, H, W, C] x [C, O], or with groups
    (EfficientViT's per-head q/k/v mixing) as a batched matmul over the groups; other
    channels-last convs stay convs (scheduled as NHWC convolutions)."""
    from tvm.relax import op

    attrs = call.attrs
    n, h, wd, c = [int(d) for d in x.ty.shape]                  # NHWC
    kh, kw, cg, o = [int(d) for d in w.ty.shape]                # HWIO, I = C / groups
    g = int(attrs.groups)
    if (kh, kw) != (1, 1) or any(int(v) != 1 for v in attrs.strides) or any(int(v) for v in attrs.padding) \
            or (g > 1 and (cg == 1 or o % g)):
        return call
    dtype = str(call.ty.dtype)
    if g == 1:   # no reshape between the matmul and the bias / activation it then takes as epilogue
        return op.matmul(x, op.reshape(w, [c, o]), out_dtype=dtype)      # [N, H, W, C] x [C, O]
    og = o // g
    rows = op.permute_dims(op.reshape(x, [n * h * wd, g, cg]), [1, 0, 2])                   # [G, NHW, Cg]
    weight = op.permute_dims(op.reshape(w, [cg, g, og]), [1, 0, 2])                         # [G, Cg, Og]
    out = op.matmul(rows, weight, out_dtype=dtype)                                          # [G, NHW, Og]
    return op.reshape(op.permute_dims(out, [1, 0, 2]), [n, h, wd, o])                      # NHWC


def precompute_weight_transforms(mod, weights: list[np.ndarray]):
    """Run weight-only computations (the transposes nn.Linear's weights get before every matmul)
    once, at compile time: `main` then takes the transformed weights, the deployed library never
    computes them, and the matmul reads its weights with the output columns contiguous."""
    import tvm
    from tvm import relax

    shared = len([f for f in mod.functions.values() if isinstance(f, relax.Function)]) > 1
    lifted = relax.transform.LiftTransformParams(shared_transform=shared)(mod)
    transform = "transform_params" if shared else "main_transform_params"
    if transform not in [gv.name_hint for gv in lifted.functions]:
        return mod, weights
    prepare = tvm.IRModule({"main": lifted[transform].with_attr("global_symbol", "main")})
    with quiet_tvm_warnings():
        vm = relax.VirtualMachine(tvm.compile(prepare, target="llvm"), tvm.cpu())
    transformed = vm["main"]([tvm.runtime.tensor(w) for w in weights])
    kept = tvm.IRModule({gv: f for gv, f in lifted.functions.items() if gv.name_hint != transform})
    return kept, [t.numpy() for t in transformed]
