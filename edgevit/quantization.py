"""Scalar int8 quantization of a model: the math, the calibrated modules, the record.

W8A8 with the integer arithmetic a compiled int8 kernel does, emulated exactly in PyTorch:
- weights: per output channel, symmetric int8 in [-127, 127] (scale = max |w| / 127);
- activations (the input of every quantized linear and of the patch embedding): per tensor,
  asymmetric uint8 (VNNI's `vpdpbusd` multiplies u8 by s8), range calibrated by percentile or
  by minimising the quantization MSE (min-max collapses ViTs: Swin-T -16.97 points, ANCHORS.md);
- post-LayerNorm activations, whose channels differ in range by 10-100x in ViTs, are first
  equalised per channel: a scale s_c is folded into the LayerNorm's affine (divide) and into the
  consuming linears' input columns (multiply), which leaves the fp32 function unchanged
  (SmoothQuant's migration, alpha 0.5; RepQ-ViT does the same for LayerNorm outputs);
- LayerNorm, softmax, GELU, residual adds and the attention matmuls stay fp32.

`QuantLinear` / `QuantPatchConv` compute y = float32(sum (q_x - z) q_w) * float32(s_x s_w) + b with
the sum exact (float64 holds K * 255 * 127 exactly), which is what the compiled kernel computes in
int32; `float_view(model)` switches them back to their fp32 weights for export (the compiler
reads the int8 record beside the fp32 graph, see backend/encodings.py).
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8", "kmeans", "pq")   # k-means codebooks and product quantization: codebooks.py
METHODS = ("mse", "percentile", "minmax")
SAMPLES_PER_LAYER = 1 << 18       # activation values kept per layer for range fitting
MSE_SAMPLES = 1 << 15             # of which the MSE range search scores this many


# ---------------------------------------------------------------------------- integer math


def weight_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q [N, ...] int8, scale [N] float32)."""
    flat = w.detach().reshape(w.shape[0], -1).float()                      # (N, K)
    scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(1e-12)              # (N,)
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scale


def activation_params(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero point) of asymmetric uint8 covering [lo, hi] (widened to hold 0 exactly)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    return scale, int(min(255, max(0, round(-lo / scale))))


def quantize_u8(x: torch.Tensor, inv_scale: float, zero_point: int) -> torch.Tensor:
    """uint8 codes of x (as float32 values): clip(round(x / s) + z, 0, 255); x / s computed as x *
    float32(1 / s), exactly as the compiled graph does."""
    return torch.clamp(torch.round(x * torch.tensor(inv_scale, dtype=torch.float32)) + zero_point, 0, 255)


def fit_range(values: torch.Tensor, method: str, percentile: float) -> tuple[float, float]:
    """The clipping range [lo, hi] of one layer's input values (a 1-D sample)."""
    lo, hi = float(values.min()), float(values.max())
    if method == "minmax":
        return lo, hi
    if method == "percentile":
        q = torch.tensor([(100.0 - percentile) / 100.0, percentile / 100.0], dtype=values.dtype)
        lo_p, hi_p = torch.quantile(values, q).tolist()
        return lo_p, hi_p
    return _mse_range(values, lo, hi)


def _mse_range(values: torch.Tensor, lo: float, hi: float) -> tuple[float, float]:
    """The range (shrinking each end of [lo, hi] independently on a grid) whose uint8 rounding
    and clipping error on `values` (at most MSE_SAMPLES of them) is least."""
    if len(values) > MSE_SAMPLES:
        values = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))[:MSE_SAMPLES]]
    best, best_err = (lo, hi), float("inf")
    grid = torch.linspace(0.1, 1.0, 19).tolist()
    for a in grid:
        for b in grid:
            scale, z = activation_params(lo * a, hi * b)
            q = quantize_u8(values, 1.0 / scale, z)
            err = float(((q - z) * scale - values).pow(2).mean())
            if err < best_err:
                best, best_err = (lo * a, hi * b), err
    return best


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio, dB (inf when exact)."""
    noise = float((reference.double() - approx.double()).pow(2).sum())
    signal = float(reference.double().pow(2).sum())
    return float("inf") if noise == 0 else 10.0 * torch.log10(torch.tensor(signal / noise)).item()


# ---------------------------------------------------------------------------- modules


@dataclass(frozen=True)
class LayerQuant:
    """One quantized layer: int8 weights, their per-channel scales, the input's uint8 scale and zero point."""

    qweight: torch.Tensor          # int8, the layer's weight shape
    weight_scale: torch.Tensor     # float32 [out]
    input_scale: float
    input_zero_point: int

    def to_dict(self) -> dict:
        return {"qweight": self.qweight, "weight_scale": self.weight_scale,
                "input_scale": float(self.input_scale), "input_zero_point": int(self.input_zero_point)}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerQuant":
        return cls(d["qweight"], d["weight_scale"], float(d["input_scale"]), int(d["input_zero_point"]))

    @property
    def inv_input_scale(self) -> float:
        return 1.0 / self.input_scale

    def output_scale(self) -> torch.Tensor:
        """float32(s_x * s_w) per output channel: the dequantization multiplier."""
        return (self.weight_scale.double() * self.input_scale).float()


def layer_record(scheme: str, d: dict):
    """One layer of a checkpoint's quantization record: LayerQuant (int8) or LayerCodebook."""
    if scheme == "int8":
        return LayerQuant.from_dict(d)
    from edgevit.codebooks import LayerCodebook

    return LayerCodebook.from_dict(d)


class _Quantized(nn.Module):
    """Shared by the linear and the patch conv: the fp32 layer it wraps keeps its parameters (and
    state-dict keys); `float_view` runs it in fp32."""

    def __init__(self, layer: nn.Module, quant: LayerQuant):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.quant = quant
        self.float_view = False

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quant
        return (quantize_u8(x, q.inv_input_scale, q.input_zero_point) - q.input_zero_point).double()


class QuantLinear(_Quantized):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_view:
            return F.linear(x, self.weight, self.bias)
        acc = self._codes(x) @ self.quant.qweight.double().t()            # (..., N) exact integers
        y = acc.float() * self.quant.output_scale()
        return y if self.bias is None else y + self.bias


class QuantPatchConv(_Quantized):
    """A patch-embedding conv (stride == kernel, no padding), which compile runs as a matmul."""

    def __init__(self, layer: nn.Conv2d, quant: LayerQuant):
        super().__init__(layer, quant)
        self.stride = layer.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_view:
            return F.conv2d(x, self.weight, self.bias, stride=self.stride)
        acc = F.conv2d(self._codes(x), self.quant.qweight.double(), stride=self.stride)   # (B, O, H', W')
        y = acc.float() * self.quant.output_scale()[None, :, None, None]
        return y if self.bias is None else y + self.bias[None, :, None, None]


class CodebookLinear(_Quantized):
    """A linear whose weight is its codebook's decode (codebooks.py): it computes in fp32 with that
    weight, which is what the compiled kernel decodes tile by tile."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class CodebookPatchConv(_Quantized):
    def __init__(self, layer: nn.Conv2d, quant):
        super().__init__(layer, quant)
        self.stride = layer.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, stride=self.stride)


def is_patch_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and tuple(m.stride) == tuple(m.kernel_size) and m.groups == 1
            and all(p == 0 for p in m.padding) and all(d == 1 for d in m.dilation))


def quantizable_layers(model: nn.Module, keep_fp32: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Every linear layer and patch-embedding conv, minus those matching a --keep-fp32 pattern."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) or is_patch_conv(m):
            if not any(fnmatch.fnmatchcase(name, p) for p in keep_fp32):
                out[name] = m
    return out


def quantized_layers(model: nn.Module) -> dict[str, _Quantized]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _Quantized)}


def apply_quantization(model: nn.Module, layers: dict[str, LayerQuant]) -> nn.Module:
    """Swap each named layer for its quantized twin (in place; parameters are shared)."""
    modules = dict(model.named_modules())
    for name, quant in layers.items():
        if name not in modules:
            raise KeyError(name)
        layer = modules[name]
        linear = isinstance(layer, nn.Linear)
        if isinstance(quant, LayerQuant):
            twin = QuantLinear(layer, quant) if linear else QuantPatchConv(layer, quant)
        else:       # a codebook layer (codebooks.LayerCodebook): its weight already holds the decode
            with torch.no_grad():
                layer.weight.copy_(quant.decode())
            twin = CodebookLinear(layer, quant) if linear else CodebookPatchConv(layer, quant)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, attr, twin)
    return model


@contextmanager
def float_view(model: nn.Module):
    """Inside the block the model's quantized layers compute in fp32 (for export)."""
    layers = list(quantized_layers(model).values())
    for m in layers:
        m.float_view = True
    try:
        yield model
    finally:
        for m in layers:
            m.float_view = False


# ---------------------------------------------------------------------------- equalisation


def norm_consumers(model: nn.Module) -> list[tuple[str, nn.LayerNorm, list[nn.Linear]]]:
    """(name, LayerNorm, the linears that read its output, directly or through a linear op such as
    window partition, pooling or class-token selection) for the ViT and Swin families."""
    pairs = []
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        for norm, consumers in (("norm1", ("attn.qkv",)), ("norm2", ("mlp.fc1",)), ("norm", ("reduction",)),
                                ("norm", ("head", "head_dist")), ("norm", ("head.fc",))):
            ln = getattr(m, norm, None)
            linears = [m.get_submodule(c) for c in consumers if _has(m, c)]
            if isinstance(ln, nn.LayerNorm) and linears and all(isinstance(x, nn.Linear) for x in linears):
                pairs.append((prefix + norm, ln, linears))
    return pairs


def _has(m: nn.Module, path: str) -> bool:
    try:
        return m.get_submodule(path) is not None
    except AttributeError:
        return False


@torch.no_grad()
def equalize(model: nn.Module, channel_absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, float]:
    """Fold s_c = a_c^alpha / w_c^(1-alpha) (a_c: the LayerNorm output's max |value| in channel c,
    w_c: the consumers' max |weight| in input column c) into each LayerNorm and its consumers.
    Returns, per LayerNorm, the spread of channel ranges before / after (max / median)."""
    spread = {}
    for name, ln, linears in norm_consumers(model):
        if name not in channel_absmax:
            continue
        a = channel_absmax[name].clamp_min(1e-5)                                          # (C,)
        w = torch.stack([lin.weight.abs().amax(dim=0) for lin in linears]).amax(0).clamp_min(1e-5)  # (C,)
        s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(1e-2, 1e2)
        ln.weight.div_(s)
        ln.bias.div_(s)
        for lin in linears:
            lin.weight.mul_(s[None, :])
        after = a / s
        spread[name] = round(float(a.max() / a.median()), 2), round(float(after.max() / after.median()), 2)
    return spread
