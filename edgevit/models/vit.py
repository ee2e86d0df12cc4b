"""Plain ViT (Dosovitskiy et al. 2021) and the DeiT distilled variant (Touvron et al. 2021).

Parameter names follow timm, so a user's timm-style state dict loads without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgevit.models.layers import DropPath, Mlp, drop_path_rates, init_weights
from edgevit.models.registry import check_fraction, check_positive, register_model


@dataclass(frozen=True)
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    distilled: bool = False  # DeiT: a second token supervised by a teacher

    def __post_init__(self):
        check_positive(self, "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads")
        check_fraction(self, "drop_path")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} must be > 0")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")


class Attention(nn.Module):
    """Multi-head self-attention on tokens (B, T, C), written with plain matmuls so that it
    exports identically to torch.export, ONNX and TVM."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)     # each (B, h, T, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)       # (B, h, T, T)
        out = attn.softmax(dim=-1) @ v                      # (B, h, T, d)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)      # (B, C, H', W') -> (B, T, C)


class VisionTransformer(nn.Module):
    """Class-token ViT; with `distilled` a DeiT: training returns (cls, dist) logits, inference
    their average."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        n_tokens = (cfg.img_size // cfg.patch_size) ** 2
        n_prefix = 2 if cfg.distilled else 1
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens + n_prefix, dim))
        rates = drop_path_rates(cfg.drop_path, cfg.depth)
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads, cfg.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, cfg.num_classes)
        self.head_dist = nn.Linear(dim, cfg.num_classes) if cfg.distilled else None
        init_weights(self)
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: torch.Tensor):
        x = self.patch_embed(x)                                          # (B, T, C)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.dist_token is not None:
            prefix.append(self.dist_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed              # (B, P + T, C)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        logits = self.head(x[:, 0])                                      # (B, classes)
        if self.head_dist is None:
            return logits
        logits_dist = self.head_dist(x[:, 1])
        if self.training:
            return logits, logits_dist
        return (logits + logits_dist) / 2


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
