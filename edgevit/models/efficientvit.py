"""EfficientViT (Cai et al., ICCV 2023, MIT HAN Lab): MBConv stages, then stages of lightweight
multi-scale attention (LiteMLA) with ReLU linear attention, an edge-first ViT family.

The ops, for a feature map of T = H*W tokens:
- Attention: q, k, v from one 1x1 conv, plus a multi-scale copy of them (a 5x5 depthwise conv
  and a grouped 1x1 conv over each head's q/k/v) that doubles the heads. With ReLU as the kernel,
  softmax(q kᵀ) v becomes relu(q) (relu(k)ᵀ v) / (relu(q) Σ relu(k)ᵀ): the d x d product kᵀv is
  computed first, so the cost is linear in T. The normaliser has an epsilon (1e-15, the paper's),
  which keeps a head whose q or k the ReLU zeroed at 0 instead of NaN. Where a map has no more
  tokens than a head has channels (T <= d, 32x32 inputs' last stages), the quadratic form is as
  cheap and is used, as the official code does.
- Local detail: MBConv (1x1 expand, 3x3 depthwise, 1x1 project) after every attention, and as
  the downsampling blocks; Hardswish activations, batch norm.

Module and parameter names follow the official repository (mit-han-lab/efficientvit,
`backbone.input_stem.op_list.N`, `backbone.stages.S.op_list.N.context_module.main.qkv.conv`,
`head.op_list.N`), so its released state dicts load as they are. `for_inference()` returns a copy
with every batch norm folded into the conv before it, which compile uses.

Published sizes (the official classification README, ImageNet 224): B1 9.1M parameters,
0.52 GMACs; B2 24M, 1.6 GMACs. B0's classification model has no published figures.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from edgevit.models.registry import check_positive, register_model

ACTIVATIONS = {"hswish": nn.Hardswish, "relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU}


@dataclass(frozen=True)
class EfficientViTConfig:
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)   # stem, two MBConv stages, two attention stages
    depths: tuple[int, ...] = (1, 2, 3, 3, 4)
    head_dim: int = 16              # channels per attention head (the official `dim`)
    expand_ratio: int = 4           # MBConv hidden width / input width
    head_widths: tuple[int, ...] = (1536, 1600)     # classifier: 1x1 conv width, then hidden linear width
    stem_stride: int = 2            # 1 for 32x32 inputs, so the attention stages see 4x4 and 2x2 maps
    act: str = "hswish"
    attention_eps: float = 1e-15    # the normaliser's epsilon (the official LiteMLA's)
    scales: tuple[int, ...] = (5,)  # kernel sizes of the multi-scale q/k/v aggregation
    dropout: float = 0.0            # before the classifier's last linear layer

    def __post_init__(self):
        check_positive(self, "img_size", "in_chans", "widths", "depths", "head_dim", "expand_ratio",
                       "head_widths", "stem_stride", "scales")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes {self.num_classes!r} must be a positive integer")
        if len(self.widths) != 5 or len(self.depths) != 5:
            raise ValueError(f"widths {self.widths} and depths {self.depths} need 5 entries each "
                             "(stem, two MBConv stages, two attention stages)")
        if len(self.head_widths) != 2:
            raise ValueError(f"head_widths {self.head_widths} needs 2 entries (1x1 conv, hidden linear)")
        for w in self.widths[3:]:
            if w % self.head_dim:
                raise ValueError(f"attention width {w} is not a multiple of head_dim {self.head_dim}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride {self.stem_stride} must be 1 or 2")
        if any(k % 2 == 0 for k in self.scales):
            raise ValueError(f"scales {self.scales} must be odd kernel sizes")
        if self.img_size % self.downsampling:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the model's total stride "
                             f"{self.downsampling}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act '{self.act}' must be one of {', '.join(ACTIVATIONS)}")
        if not 0 < self.attention_eps < 1e-3:
            raise ValueError(f"attention_eps {self.attention_eps} must be in (0, 1e-3)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout {self.dropout} must be in [0, 1)")

    @property
    def downsampling(self) -> int:
        return self.stem_stride * 16     # the stem, then four stride-2 stages

    def map_sizes(self) -> list[int]:
        """Side of the feature map each of the four stages after the stem produces."""
        side = self.img_size // self.stem_stride
        return [side // 2 ** (i + 1) for i in range(4)]


class ConvLayer(nn.Module):
    """conv -> batch norm -> activation, each optional (the official ConvLayer's names)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 bias: bool = False, norm: bool = True, act: str | None = None):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=bias)
        self.norm = nn.BatchNorm2d(cout) if norm else None
        self.act = ACTIVATIONS[act]() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        return x if self.act is None else self.act(x)


class LinearLayer(nn.Module):
    """linear -> layer norm -> activation (the classifier head's; the official LinearLayer's names)."""

    def __init__(self, cin: int, cout: int, bias: bool, norm: bool = False, act: str | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.linear = nn.Linear(cin, cout, bias=bias)
        self.norm = nn.LayerNorm(cout) if norm else None
        self.act = ACTIVATIONS[act]() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)                                   # (B, C, 1, 1) -> (B, C)
        if self.dropout is not None:
            x = self.dropout(x)
        x = self.linear(x)
        if self.norm is not None:
            x = self.norm(x)
        return x if self.act is None else self.act(x)


class OpSequence(nn.Module):
    """Modules applied in order, kept in `op_list` (the official OpSequential's name)."""

    def __init__(self, ops: list[nn.Module]):
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class Residual(nn.Module):
    """x + main(x), or main(x) alone for blocks that change shape (the official ResidualBlock)."""

    def __init__(self, main: nn.Module, shortcut: bool):
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + x if self.shortcut else self.main(x)


class DSConv(nn.Module):
    """Depthwise 3x3 then pointwise 1x1 (the stem's local blocks)."""

    def __init__(self, cin: int, cout: int, act: str):
        super().__init__()
        self.depth_conv = ConvLayer(cin, cin, 3, groups=cin, act=act)
        self.point_conv = ConvLayer(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(x))


class MBConv(nn.Module):
    """Inverted bottleneck: 1x1 expand, 3x3 depthwise (carries the stride), 1x1 project.
    `light_norm`: biases and no norm on the first two convs (attention stages), as the official."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: str, light_norm: bool = False):
        super().__init__()
        mid = cin * expand
        self.inverted_conv = ConvLayer(cin, mid, 1, bias=light_norm, norm=not light_norm, act=act)
        self.depth_conv = ConvLayer(mid, mid, 3, stride, groups=mid, bias=light_norm, norm=not light_norm, act=act)
        self.point_conv = ConvLayer(mid, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class LiteMLA(nn.Module):
    """Lightweight multi-scale ReLU linear attention on a (B, C, H, W) map; heads of `head_dim`."""

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...], eps: float):
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        heads = channels // head_dim
        qkv_channels = 3 * heads * head_dim
        self.qkv = ConvLayer(channels, qkv_channels, 1, norm=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(nn.Conv2d(qkv_channels, qkv_channels, k, padding=k // 2, groups=qkv_channels, bias=False),
                          nn.Conv2d(qkv_channels, qkv_channels, 1, groups=3 * heads, bias=False))
            for k in scales)
        self.proj = ConvLayer(heads * head_dim * (1 + len(scales)), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        qkv = self.qkv(x)                                                  # (B, 3hd, H, W)
        qkv = torch.cat([qkv] + [op(qkv) for op in self.aggreg], dim=1)     # (B, 3h'd, H, W), h' = h(1+scales)
        qkv = qkv.reshape(B, -1, 3 * self.head_dim, H * W)                 # (B, h', 3d, T)
        q, k, v = qkv.split(self.head_dim, dim=2)                          # each (B, h', d, T)
        q, k = F.relu(q), F.relu(k)
        attend = linear_attention if H * W > self.head_dim else quadratic_attention
        out = attend(q, k, v, self.eps)                                    # (B, h', d, T)
        return self.proj(out.reshape(B, -1, H, W))                         # (B, C, H, W)


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """(v kᵀ) q / ((Σ_t k_t)ᵀ q + eps) on (B, h, d, T) tensors: O(T d²), the d x d product first."""
    kv = v @ k.transpose(-1, -2)                                           # (B, h, d, d)
    k_sum = k.sum(dim=-1, keepdim=True).transpose(-1, -2)                  # (B, h, 1, d)
    return (kv @ q) / guarded(k_sum @ q, eps)                              # (B, h, d, T) / (B, h, 1, T)


def quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The same attention with the T x T map formed (cheaper when T <= d)."""
    scores = k.transpose(-1, -2) @ q                                       # (B, h, T_k, T_q)
    scores = scores / guarded(scores.sum(dim=2, keepdim=True), eps)
    return v @ scores                                                      # (B, h, d, T_q)


def guarded(denominator: torch.Tensor, eps: float) -> torch.Tensor:
    """denominator + eps, for a denominator >= 0 (sums of ReLU outputs), written so that the guard
    survives ONNX export: torch.onnx's graph optimizer deletes an Add of a constant as small as
    1e-15 as if it were 0, and a head the ReLU silenced then gave 0 / 0 = NaN. Where d > 0 the
    select picks d + eps (d if the Add is deleted), where d == 0 it picks eps."""
    return torch.where(denominator > 0, denominator + eps, torch.full_like(denominator, eps))


class EfficientViTBlock(nn.Module):
    def __init__(self, channels: int, cfg: EfficientViTConfig):
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, cfg.head_dim, cfg.scales, cfg.attention_eps), True)
        self.local_module = Residual(MBConv(channels, channels, 1, cfg.expand_ratio, cfg.act, light_norm=True), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class Backbone(nn.Module):
    def __init__(self, cfg: EfficientViTConfig):
        super().__init__()
        w, d, act = cfg.widths, cfg.depths, cfg.act
        stem = [ConvLayer(cfg.in_chans, w[0], 3, cfg.stem_stride, act=act)]
        stem += [Residual(DSConv(w[0], w[0], act), True) for _ in range(d[0])]
        self.input_stem = OpSequence(stem)
        stages = []
        for i in (1, 2):              # MBConv stages, the first block of each downsampling
            blocks = [Residual(MBConv(w[i - 1] if j == 0 else w[i], w[i], 2 if j == 0 else 1, cfg.expand_ratio, act),
                               shortcut=j > 0) for j in range(d[i])]
            stages.append(OpSequence(blocks))
        for i in (3, 4):              # attention stages behind one downsampling MBConv
            blocks = [Residual(MBConv(w[i - 1], w[i], 2, cfg.expand_ratio, act, light_norm=True), False)]
            blocks += [EfficientViTBlock(w[i], cfg) for _ in range(d[i])]
            stages.append(OpSequence(blocks))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_stem(x)
        for stage in self.stages:
            x = stage(x)
        return x


class ClassifierHead(OpSequence):
    def __init__(self, cfg: EfficientViTConfig):
        c, h = cfg.head_widths
        super().__init__([ConvLayer(cfg.widths[-1], c, 1, act=cfg.act), nn.AdaptiveAvgPool2d(1),
                          LinearLayer(c, h, bias=False, norm=True, act=cfg.act),
                          LinearLayer(h, cfg.num_classes, bias=True, dropout=cfg.dropout)])


class EfficientViT(nn.Module):
    compile_layout = "NHWC"    # compile converts its convs to channels-last (1x1 convs become matmuls)
    # what adapt / search say to a model they cannot prune (sparsity.no_windows_message)
    latency_knobs = ("an EfficientViT trades latency by size and input resolution: train efficientvit_b0 or b1 "
                     "(`--set img_size=N`), compile each and `edgevit bench` it against the budget")

    def __init__(self, cfg: EfficientViTConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.head = ClassifierHead(cfg)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))                                 # (B, classes)

    def for_inference(self) -> "EfficientViT":
        """An eval-mode copy with every batch norm folded into the conv before it (one conv
        with a bias instead of conv + 4 elementwise ops); this model is left as it is."""
        folded = copy.deepcopy(self).eval()
        for m in folded.modules():
            if isinstance(m, ConvLayer) and m.norm is not None and type(m.conv) is nn.Conv2d:   # not quantized
                m.conv, m.norm = fuse_conv_bn_eval(m.conv, m.norm), None
            for name, child in m.named_children():
                if isinstance(child, nn.Hardswish):
                    setattr(m, name, MinimumHardswish())
        return folded


class MinimumHardswish(nn.Module):
    """Hardswish as x * min(relu(x + 3), 6) / 6: the same values, in ops whose layout TVM's
    ConvertLayout can change (torch exports nn.Hardswish as clip, which it cannot)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.minimum(F.relu(x + 3.0), torch.tensor(6.0)) / 6.0


# ---------------------------------------------------------------------------- registered sizes


@register_model
def efficientvit_b0():
    """EfficientViT-B0 at 224: widths 8/16/32/64/128, depths 1/2/2/2/2, heads of 16, head 1024/1280."""
    return EfficientViT, EfficientViTConfig(widths=(8, 16, 32, 64, 128), depths=(1, 2, 2, 2, 2),
                                            head_widths=(1024, 1280))


@register_model
def efficientvit_b1():
    """EfficientViT-B1 at 224: widths 16/32/64/128/256, depths 1/2/3/3/4, heads of 16, head 1536/1600."""
    return EfficientViT, EfficientViTConfig()


@register_model
def efficientvit_b2():
    """EfficientViT-B2 at 224: widths 24/48/96/192/384, depths 1/3/4/4/6, heads of 32, head 2304/2560."""
    return EfficientViT, EfficientViTConfig(widths=(24, 48, 96, 192, 384), depths=(1, 3, 4, 4, 6), head_dim=32,
                                            head_widths=(2304, 2560))


@register_model
def efficientvit_fashion():
    """For 32x32 grey images (Fashion-MNIST): stem stride 1, so the attention stages see 4x4 and
    2x2 maps, heads of 8 (linear attention on the 16-token maps), a 256/320 classifier."""
    return EfficientViT, EfficientViTConfig(img_size=32, in_chans=1, num_classes=10, widths=(16, 24, 48, 96, 128),
                                            depths=(1, 1, 2, 2, 2), head_dim=8, head_widths=(256, 320),
                                            stem_stride=1)
