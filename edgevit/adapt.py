"""Sparsity-aware adaptation (SparseViT's SAA): fine-tune a dense model while every training
step runs under a freshly sampled sparsity config, so one set of weights serves every config.

Sampling: per knob uniform over the levels, then sorted within each stage (no sandwich rule).
Official recipe: lr 10x below dense training, wd 0.05 (SPARSEVIT.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from edgevit.checkpoint import Checkpoint
from edgevit.data import DataBundle
from edgevit.sparsity import DEFAULT_LEVELS, SparsityConfig, sample_config
from edgevit.stages import StageRun
from edgevit.train import TrainConfig, evaluate, train


@dataclass(frozen=True)
class AdaptConfig(TrainConfig):
    epochs: int = 3
    lr: float | None = None    # None: 10x below the lr the dense checkpoint was trained with
    min_lr: float = 1e-6
    warmup_epochs: float = 0.2
    levels: tuple[float, ...] = DEFAULT_LEVELS

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.lr is not None:
            super().__post_init__()
        if not self.levels or any(not 0.0 <= r < 1.0 for r in self.levels):
            raise ValueError(f"levels {list(self.levels)} must be ratios in [0, 1)")
        if 0.0 not in self.levels or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels {list(self.levels)} must be increasing and include 0.0 (the dense config)")

    def train_config(self, source_lr: float | None) -> TrainConfig:
        fields = {k: v for k, v in asdict(self).items() if k != "levels"}
        if fields["lr"] is None:
            fields["lr"] = (source_lr or 1e-3) / 10
        fields["min_lr"] = min(fields["min_lr"], fields["lr"])
        return TrainConfig(**fields)


def adapt(checkpoint: Checkpoint, data: DataBundle, cfg: AdaptConfig, out_dir: str | Path, *,
          resume: bool = False, show_progress: bool = True, extra_meta: dict | None = None) -> Checkpoint:
    """Fine-tune `checkpoint` under random per-step sparsity; returns the adapted checkpoint."""
    model = checkpoint.build_model()
    knobs = SparsityConfig.for_model(model, levels=cfg.levels).stage_knobs  # swin family only

    def sample_sparsity(m: torch.nn.Module, gen: torch.Generator) -> None:
        m.set_sparsity(sample_config(knobs, gen, cfg.levels))

    meta = dict(extra_meta or {})
    meta["config"] = {"levels": list(cfg.levels), "source_checkpoint": checkpoint.config.get("digest", ""),
                      **meta.get("config", {})}
    meta["data"] = {k: checkpoint.data[k] for k in ("seed", "val_fraction") if k in checkpoint.data} | \
        meta.get("data", {})
    ckpt = train(model, data, cfg.train_config(checkpoint.config.get("lr")), out_dir, resume=resume, stage="adapt",
                 show_progress=show_progress, before_step=sample_sparsity,
                 before_eval=lambda m: m.set_sparsity(None), extra_meta=meta)
    return ckpt


def accuracy_under_sparsity(model: torch.nn.Module, data: DataBundle, split: str, ratios: list[float],
                            mean: list[float], std: list[float]) -> dict[float, float]:
    """Top-1 on `split` at each uniform sparsity ratio."""
    out = {}
    for r in ratios:
        model.set_sparsity(SparsityConfig.uniform(model, r))
        out[r] = evaluate(model, data.split(split), mean, std)["top1"]
    model.set_sparsity(None)
    return out


def run_stage(run: StageRun) -> dict:
    """The `adapt` recipe stage: the trained model adapted with [adapt]."""
    dense = run.require("train")
    return run.cached("adapt", lambda: adapt(dense, run.data, run.config("adapt"), run.dir("adapt"), resume=True,
                                             extra_meta=run.meta("adapt"))).metrics
