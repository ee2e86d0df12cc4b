"""Swin-style hierarchical window-attention ViT (Liu et al. 2021) with SparseViT window
activation pruning (Chen et al. 2023; spec in SPARSEVIT.md).

Blocks run attention and MLP on a tensor of windows (B, nW, N, C). With a sparsity ratio r,
a stage scores its windows once, keeps the top k = max(1, floor(nW * (1 - r))) per image,
gathers them, runs the block on (B, k, N, C) and scatters results back, so pruned windows
pass through unchanged. k depends only on r, so every config is a static-shape graph (rank, gather, scatter).

k is clamped to at least 1: a stage with no windows left would be a zero-size tensor that
neither ONNX nor TVM compile, and a stage of one window (the last Swin stage at small
resolutions) then simply stays dense.

Parameter names follow timm's SwinTransformer (layers.i.downsample at the start of stage i).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.models.layers import DropPath, Mlp, drop_path_rates, init_weights
from edgevit.models.registry import check_fraction, check_positive, register_model
from edgevit.sparsity import keep_count, set_sparsity

MASK_VALUE = -100.0  # Swin's shifted-window mask value


@dataclass(frozen=True)
class SwinConfig:
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path: float = 0.2

    def __post_init__(self):
        check_positive(self, "img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths", "num_heads",
                       "window_size")
        check_fraction(self, "drop_path")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} must be > 0")
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} differ in length")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        res = self.img_size // self.patch_size
        if res % (2 ** (len(self.depths) - 1)):
            raise ValueError(f"patch grid {res} cannot be halved {len(self.depths) - 1} times; "
                             "choose img_size/patch_size divisible by 2^(stages-1)")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2 ** i) % heads:
                raise ValueError(f"stage {i} dim {self.embed_dim * 2 ** i} not divisible by {heads} heads")

    def stage_resolutions(self) -> list[int]:
        res = self.img_size // self.patch_size
        return [res // 2 ** i for i in range(len(self.depths))]


# ---------------------------------------------------------------------------- windows


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, ws*ws, C), windows in row-major order."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)                  # (B, Hw, ws, Ww, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, (H // ws) * (W // ws), ws * ws, C)


def window_reverse(windows: torch.Tensor, ws: int, H: int, W: int) -> torch.Tensor:
    """(B, nW, ws*ws, C) -> (B, H, W, C)."""
    B, _, _, C = windows.shape
    x = windows.view(B, H // ws, W // ws, ws, ws, C)            # (B, Hw, Ww, ws, ws, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)


def pad_to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """Zero-pad (B, H, W, C) at the bottom/right so H and W are multiples of ws."""
    H, W = x.shape[1:3]
    ph, pw = (-H) % ws, (-W) % ws
    return F.pad(x, (0, 0, 0, pw, 0, ph)) if ph or pw else x


def shifted_window_mask(H: int, W: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, N, N) additive mask: tokens that came from different regions of the rolled map
    may not attend to each other."""
    region = torch.zeros(1, H, W, 1)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for n, (hs, wsl) in enumerate((h, w) for h in cuts for w in cuts):
        region[:, hs, wsl, :] = n
    ids = window_partition(region, ws).squeeze(-1).squeeze(0)       # (nW, N)
    diff = ids[:, None, :] - ids[:, :, None]                         # (nW, N, N)
    return torch.where(diff != 0, MASK_VALUE, 0.0)


def window_scores(x: torch.Tensor, ws: int, shift: int = 0) -> torch.Tensor:
    """SparseViT window importance. x: (B, H, W, C) residual stream -> (B, nW).

    Score = L2 norm, over a window's tokens, of the channel-mean of |x|."""
    m = x.abs().mean(dim=-1, keepdim=True)                     # (B, H, W, 1)
    m = pad_to_windows(m, ws)
    if shift:
        m = torch.roll(m, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(m, ws).squeeze(-1).norm(dim=-1)     # (B, nW, N) -> (B, nW)


def keep_windows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (B, k) of each image's k best windows, best first: torch.topk's answer.

    Written as ranking by pairwise comparison (O(nW^2), negligible next to a block) rather
    than with topk: TVM lowers topk on CPUs to an extern call (tvm.contrib.sort.topk) that
    lives in the compiler library, which a device running only the TVM runtime lacks. Ties
    go to the lower window index."""
    n = scores.shape[1]
    order = torch.arange(n, device=scores.device)
    s_i, s_j = scores.unsqueeze(2), scores.unsqueeze(1)                     # (B, n, 1), (B, 1, n)
    earlier = order.view(1, 1, n) < order.view(1, n, 1)                     # (1, n, n): j < i
    beaten_by = (s_j > s_i) | ((s_j == s_i) & earlier)                      # (B, n, n)
    rank = beaten_by.to(torch.int64).sum(dim=2)                             # (B, n), 0 = best
    slot = rank.unsqueeze(1) == order[:k].view(1, k, 1)                     # (B, k, n) one-hot
    return (slot.to(torch.int64) * order.view(1, 1, n)).sum(dim=2)          # (B, k)


# ---------------------------------------------------------------------------- layers


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, ws: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)   # (N, N, 2)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * ws - 1) + rel[..., 1],
                             persistent=False)

    def position_bias(self) -> torch.Tensor:
        N = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]  # (N*N, h)
        return bias.view(N, N, -1).permute(2, 0, 1)                                          # (h, N, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, nW, N, C); mask: (B or 1, nW, N, N) additive, or None."""
        B, nW, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B * nW, N, 3, h, C // h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)           # each (B*nW, h, N, d)
        attn = (q * self.scale) @ k.transpose(-2, -1)             # (B*nW, h, N, N)
        attn = attn + self.position_bias()
        if mask is not None:
            attn = attn.view(B, nW, h, N, N) + mask.unsqueeze(2)  # (B, nW, h, N, N)
            attn = attn.view(B * nW, h, N, N)
        out = attn.softmax(dim=-1) @ v                             # (B*nW, h, N, d)
        out = out.transpose(1, 2).reshape(B, nW, N, C)
        return self.proj(out)


class SwinBlock(nn.Module):
    """Pre-norm (S)W-MSA + MLP, computed on windows so that a subset can be gathered."""

    def __init__(self, dim: int, num_heads: int, resolution: int, ws: int, shifted: bool,
                 mlp_ratio: float, drop_path: float):
        super().__init__()
        if resolution <= ws:  # the whole map is one window: no shift (as in Swin)
            ws, shifted = resolution, False
        self.ws = ws
        self.shift = ws // 2 if shifted else 0
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, ws)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        padded = resolution + (-resolution) % ws
        self.num_windows = (padded // ws) ** 2
        mask = shifted_window_mask(padded, padded, ws, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)

    def transform(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The block's residual computation on windows (B, n, N, C)."""
        windows = windows + self.drop_path(self.attn(self.norm1(windows), mask))
        return windows + self.drop_path(self.mlp(self.norm2(windows)))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, H, W, C); keep: (B, k) window indices to compute, or None for all."""
        B, H, W, C = x.shape
        x = pad_to_windows(x, self.ws)
        Hp, Wp = x.shape[1:3]
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, self.ws)                                 # (B, nW, N, C)
        N = windows.shape[2]
        if keep is None:
            mask = None if self.attn_mask is None else self.attn_mask.unsqueeze(0)
            windows = self.transform(windows, mask)
        else:
            k = keep.shape[1]
            index = keep[:, :, None, None].expand(B, k, N, C)                 # (B, k, N, C)
            kept = torch.gather(windows, 1, index)                             # (B, k, N, C)
            mask = None
            if self.attn_mask is not None:
                mask = self.attn_mask.index_select(0, keep.reshape(-1)).view(B, k, N, N)
            windows = torch.scatter(windows, 1, index, self.transform(kept, mask))
        x = window_reverse(windows, self.ws, Hp, Wp)                          # (B, Hp, Wp, C)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x[:, :H, :W, :] if (Hp, Wp) != (H, W) else x


class PatchMerging(nn.Module):
    """2x2 neighbours -> LayerNorm(4C) -> Linear 4C -> 2C; runs dense on the full map."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5)  # (B, H/2, W/2, 2, 2, C)
        return self.reduction(self.norm(x.reshape(B, H // 2, W // 2, 4 * C)))


class SwinStage(nn.Module):
    """Optional PatchMerging, then blocks alternating W-MSA and SW-MSA.

    `ratios` holds one sparsity ratio per block (non-decreasing). The stage scores windows
    once, at its first pruned block, and later blocks keep a prefix of the same ranking."""

    def __init__(self, dim: int, depth: int, num_heads: int, resolution: int, ws: int,
                 mlp_ratio: float, drop_paths: list[float], downsample: bool):
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else None
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, resolution, ws, i % 2 == 1, mlp_ratio, drop_paths[i])
            for i in range(depth))
        self.ratios = [0.0] * depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is not None:
            x = self.downsample(x)
        rankings: dict[int, torch.Tensor] | None = None
        for block, ratio in zip(self.blocks, self.ratios):
            k = keep_count(block.num_windows, ratio)
            if ratio == 0.0 or k == block.num_windows:
                x = block(x)
                continue
            if rankings is None:  # first pruned block: rank for both partitions at once
                k_max = keep_count(block.num_windows, ratio)
                rankings = {s: keep_windows(window_scores(x, block.ws, s), k_max)
                            for s in {b.shift for b in self.blocks}}
            x = block(x, keep=rankings[block.shift][:, :k])
        return x


class SwinTransformer(nn.Module):
    def __init__(self, cfg: SwinConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        self.patch_embed.norm = nn.LayerNorm(cfg.embed_dim)
        rates = drop_path_rates(cfg.drop_path, sum(cfg.depths))
        self.layers = nn.ModuleList()
        for i, (depth, heads, res) in enumerate(zip(cfg.depths, cfg.num_heads, cfg.stage_resolutions())):
            start = sum(cfg.depths[:i])
            self.layers.append(SwinStage(cfg.embed_dim * 2 ** i, depth, heads, res, cfg.window_size,
                                         cfg.mlp_ratio, rates[start:start + depth], downsample=i > 0))
        self.num_features = cfg.embed_dim * 2 ** (len(cfg.depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Module()
        self.head.fc = nn.Linear(self.num_features, cfg.num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).permute(0, 2, 3, 1)       # (B, C, H, W) -> (B, H, W, C)
        x = self.patch_embed.norm(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)                                      # (B, H', W', C')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.fc(self.forward_features(x).mean(dim=(1, 2)))

    # -- sparsity ---------------------------------------------------------------------

    def set_block_ratios(self, per_stage: list[list[float]]) -> None:
        """Per-block sparsity ratios, one list per stage (use set_sparsity for a config)."""
        for stage, ratios in zip(self.layers, per_stage):
            stage.ratios = [float(r) for r in ratios]

    def block_ratios(self) -> list[list[float]]:
        return [list(stage.ratios) for stage in self.layers]

    def set_sparsity(self, config) -> None:
        """Apply a SparsityConfig (None: dense)."""
        set_sparsity(self, config)


@register_model
def swin_micro():
    """A test-sized Swin: 16x16 input, patch 2, window 4 (4 windows, then 1)."""
    return SwinTransformer, SwinConfig(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=16,
                                       depths=(2, 2), num_heads=(1, 2), window_size=4, drop_path=0.0)


@register_model
def swin_quickstart():
    """The quickstart model for 8x8 digits upsampled to 16x16."""
    return SwinTransformer, SwinConfig(img_size=16, patch_size=2, in_chans=1, num_classes=10, embed_dim=32,
                                       depths=(2, 2), num_heads=(2, 4), window_size=4, drop_path=0.0)


@register_model
def swin_fashion():
    """Fashion-MNIST at 32x32, patch 2: 16 windows of 4x4 in stage 1, 4 in stage 2, 1 in stage 3."""
    return SwinTransformer, SwinConfig(img_size=32, patch_size=2, in_chans=1, num_classes=10, embed_dim=32,
                                       depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=4, drop_path=0.1)


@register_model
def swin_t():
    """Swin-T: patch 4, dims 96/192/384/768, depths 2/2/6/2, heads 3/6/12/24, window 7, 224x224."""
    return SwinTransformer, SwinConfig()
