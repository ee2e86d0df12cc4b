"""Plain ViT (Dosovitskiy et al. 2021), DeiT's distilled variant (Touvron et al. 2021) and the
ViT image encoders of the self-supervised seeds (MAE, DINO, MoCo v3, BEiT, CLIP).

Parameter names and numerical conventions follow timm's VisionTransformer (LayerNorm epsilon
1e-6, exact GELU, class-token pooling), so a timm state dict reproduces timm's logits. The
settings below cover what the seeds' encoders do differently; `models/naming.py` maps their
original repositories' key names onto these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.models.layers import DropPath, Mlp, drop_path_rates, init_weights
from edgevit.models.registry import check_fraction, check_positive, register_model

POOLS = ("token", "avg")
ACTIVATIONS = ("gelu", "quick_gelu")
REL_POS_BIAS = ("none", "block", "shared")


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000          # 0: a feature extractor (the pooled embedding is the output)
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    distilled: bool = False          # DeiT: a second token supervised by a teacher
    norm_eps: float = 1e-6           # timm / DeiT / MAE / DINO / BEiT; CLIP and torch's default: 1e-5
    act: str = "gelu"                # CLIP: quick_gelu, x * sigmoid(1.702 x)
    global_pool: str = "token"       # avg: mean of the patch tokens, then fc_norm (MAE fine-tuned, BEiT)
    pre_norm: bool = False           # CLIP: a LayerNorm on the tokens before the first block (ln_pre)
    patch_bias: bool = True          # CLIP's patch projection has no bias
    head_bias: bool = True           # CLIP's projection to the joint embedding has none
    pos_embed: bool = True           # BEiT: no absolute position embedding, only relative bias
    rel_pos_bias: str = "none"       # BEiT: a relative position bias table per block, or one shared
    layer_scale: float = 0.0         # BEiT: learned per-channel residual scales, initialised to this

    def __post_init__(self):
        check_positive(self, "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
        check_fraction(self, "drop_path")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes {self.num_classes!r} must be >= 0 (0: a feature extractor)")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} must be > 0")
        if not 0 < self.norm_eps < 1:
            raise ValueError(f"norm_eps {self.norm_eps} must be in (0, 1)")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name, allowed in (("act", ACTIVATIONS), ("global_pool", POOLS), ("rel_pos_bias", REL_POS_BIAS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} '{getattr(self, name)}' must be one of {', '.join(allowed)}")
        if self.distilled and (self.global_pool != "token" or self.num_classes == 0):
            raise ValueError("a distilled (DeiT) model pools its class and distillation tokens into a head")

    # what configs saved before a setting existed computed with (checkpoint.py fills them in)
    LEGACY_SETTINGS: ClassVar[dict] = {"norm_eps": 1e-5}

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


class QuickGELU(nn.Module):
    """CLIP's GELU approximation x * sigmoid(1.702 x), which its weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def beit_relative_index(grid: int) -> torch.Tensor:
    """BEiT's (T, T) index into its bias table, T = grid² + 1: one entry per (query, key) offset
    on the patch grid, then three for the class token's relations (cls->patch, patch->cls,
    cls->cls)."""
    n_offsets = (2 * grid - 1) ** 2
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)   # (N, N, 2)
    index = torch.empty(grid * grid + 1, grid * grid + 1, dtype=torch.long)          # (T, T)
    index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
    index[0, :] = n_offsets
    index[:, 0] = n_offsets + 1
    index[0, 0] = n_offsets + 2
    return index


class RelativePositionBias(nn.Module):
    """BEiT's learned bias per head for every (query, key) pair of tokens; owned by each block's
    attention, or one for the whole model (`rel_pos_bias: shared`, BEiT's pre-training)."""

    def __init__(self, grid: int, num_heads: int):
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
        self.register_buffer("relative_position_index", beit_relative_index(grid), persistent=False)

    def forward(self) -> torch.Tensor:
        return relative_bias(self.relative_position_bias_table, self.relative_position_index)


def relative_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    T = index.shape[0]
    return table[index.reshape(-1)].view(T, T, -1).permute(2, 0, 1)    # (T*T, h) -> (h, T, T)


class Attention(nn.Module):
    """Multi-head self-attention on tokens (B, T, C), written with plain matmuls so that it
    exports identically to torch.export, ONNX and TVM; with `grid`, BEiT's own relative bias."""

    def __init__(self, dim: int, num_heads: int, grid: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        if grid:   # BEiT's names: the table sits on the attention module itself
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
            self.register_buffer("relative_position_index", beit_relative_index(grid), persistent=False)
        else:
            self.relative_position_bias_table = None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)     # each (B, h, T, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)       # (B, h, T, T)
        if self.relative_position_bias_table is not None:
            attn = attn + relative_bias(self.relative_position_bias_table, self.relative_position_index)
        if bias is not None:
            attn = attn + bias
        out = attn.softmax(dim=-1) @ v                      # (B, h, T, d)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, cfg: ViTConfig | None = None):
        super().__init__()
        cfg = cfg or ViTConfig(embed_dim=dim, num_heads=num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, num_heads, cfg.grid if cfg.rel_pos_bias == "block" else None)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), QuickGELU() if cfg.act == "quick_gelu" else nn.GELU())
        self.drop_path = DropPath(drop_path)
        self.gamma_1 = nn.Parameter(torch.full((dim,), cfg.layer_scale)) if cfg.layer_scale else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), cfg.layer_scale)) if cfg.layer_scale else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = self.attn(self.norm1(x), bias)
        x = x + self.drop_path(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.gamma_2 is None else self.gamma_2 * y)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)      # (B, C, H', W') -> (B, T, C)


class VisionTransformer(nn.Module):
    """Class-token ViT; with `distilled` a DeiT: training returns (cls, dist) logits, inference
    their average. With num_classes 0 the output is the pooled embedding (an encoder)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim, eps = cfg.embed_dim, cfg.norm_eps
        n_prefix = 2 if cfg.distilled else 1
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim, cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2 + n_prefix, dim)) if cfg.pos_embed else None
        self.norm_pre = nn.LayerNorm(dim, eps=eps) if cfg.pre_norm else None
        self.rel_pos_bias = RelativePositionBias(cfg.grid, cfg.num_heads) if cfg.rel_pos_bias == "shared" else None
        rates = drop_path_rates(cfg.drop_path, cfg.depth)
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads, cfg.mlp_ratio, r, cfg) for r in rates)
        avg = cfg.global_pool == "avg"
        self.norm = None if avg else nn.LayerNorm(dim, eps=eps)
        self.fc_norm = nn.LayerNorm(dim, eps=eps) if avg else None
        self.head = nn.Linear(dim, cfg.num_classes, bias=cfg.head_bias) if cfg.num_classes else None
        self.head_dist = nn.Linear(dim, cfg.num_classes) if cfg.distilled else None
        init_weights(self)
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.trunc_normal_(p, std=0.02)

    def adapt_state_dict(self, state: dict) -> dict:
        """Weights saved at another input size: the absolute position embedding's patch grid
        resampled to this model's, as timm does on load (bicubic, antialiased; the class and
        distillation rows kept), so a 224 checkpoint serves `--set img_size=384`."""
        theirs, own = state.get("pos_embed"), self.pos_embed
        if theirs is None or own is None or theirs.shape == own.shape or theirs.ndim != 3 \
                or theirs.shape[2] != own.shape[2]:
            return state
        prefix = own.shape[1] - self.cfg.grid ** 2
        side = math.isqrt(theirs.shape[1] - prefix)
        if side * side != theirs.shape[1] - prefix:
            return state          # not a square grid: load_weights names the mismatch
        grid = theirs[:, prefix:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)        # (1, C, s, s)
        grid = F.interpolate(grid, size=(self.cfg.grid, self.cfg.grid), mode="bicubic", antialias=True)
        resampled = grid.permute(0, 2, 3, 1).reshape(1, -1, own.shape[2]).to(theirs.dtype)     # (1, g*g, C)
        return {**state, "pos_embed": torch.cat([theirs[:, :prefix], resampled], dim=1)}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)                                          # (B, T, C)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1)                               # (B, P + T, C)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None   # (h, P + T, P + T)
        for block in self.blocks:
            x = block(x, bias)
        return x if self.norm is None else self.norm(x)

    def forward(self, x: torch.Tensor):
        x = self.forward_features(x)                                     # (B, P + T, C)
        if self.fc_norm is not None:
            pooled = self.fc_norm(x[:, 1:].mean(dim=1))                  # (B, C)
        else:
            pooled = x[:, 0]
        if self.head is None:
            return pooled
        logits = self.head(pooled)                                       # (B, classes)
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(x[:, 1])
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2


# ---------------------------------------------------------------------------- registered sizes


@register_model
def vit_micro():
    """A test-sized ViT (16x16 input)."""
    return VisionTransformer, ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                        num_classes=10, in_chans=1)


@register_model
def deit_micro_distilled():
    """A test-sized DeiT with a distillation token."""
    return VisionTransformer, ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                        num_classes=10, in_chans=1, distilled=True)


@register_model
def vit_small_32():
    """The ViT of TVM_NOTES.md's measurements: dim 192, depth 6, 32x32 input, patch 4."""
    return VisionTransformer, ViTConfig(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3,
                                        num_classes=10)


@register_model
def vit_tiny():
    """ViT-Ti/16 (DeiT-Tiny): dim 192, depth 12, 3 heads, 224x224."""
    return VisionTransformer, ViTConfig(embed_dim=192, depth=12, num_heads=3, drop_path=0.1)


@register_model
def deit_tiny_distilled():
    """DeiT-Tiny with a distillation token."""
    return VisionTransformer, ViTConfig(embed_dim=192, depth=12, num_heads=3, drop_path=0.1, distilled=True)


SIZES = {"small": dict(embed_dim=384, depth=12, num_heads=6), "base": dict(embed_dim=768, depth=12, num_heads=12)}
SEEDS = {   # how each seed's released encoder computes; their key names: models/naming.py
    "mae": dict(num_classes=0),                                     # encoder of the pre-trained MAE
    "dino": dict(num_classes=0),
    "mocov3": dict(num_classes=0),
    "beit": dict(num_classes=0, pos_embed=False, rel_pos_bias="block", layer_scale=0.1, global_pool="avg"),
    "clip": dict(num_classes=512, head_bias=False, norm_eps=1e-5, act="quick_gelu", pre_norm=True,
                 patch_bias=False),                                 # output: the projected image embedding
}


SEED_SIZES = {("mocov3", "small"): dict(num_heads=12)}   # MoCo v3's vits.py: ViT-S with 12 heads of 32


def _register_seed(seed: str, size: str) -> None:
    def make():
        return VisionTransformer, ViTConfig(**{**SIZES[size], **SEED_SIZES.get((seed, size), {})}, **SEEDS[seed])

    make.__name__ = f"{seed}_vit_{size}_patch16"
    make.__doc__ = f"The {seed.upper()} ViT-{size[0].upper()}/16 image encoder at 224 (a feature extractor)."
    register_model(make)


for _seed in SEEDS:
    for _size in SIZES:
        _register_seed(_seed, _size)
