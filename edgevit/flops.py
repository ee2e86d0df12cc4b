"""FLOPs of a model as it actually executes (under its sparsity config), counted by
torch's FlopCounterMode: 2 FLOPs per multiply-accumulate of matmuls and convolutions.

Gather, scatter, softmax and LayerNorm are not counted (they are memory-bound), so pruned
blocks' FLOPs fall exactly in proportion to the windows they keep."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(model: torch.nn.Module, batch: int = 1) -> dict:
    """{"total": FLOPs per forward of `batch` images, "per_module": {name: FLOPs}} in eval mode."""
    cfg = model.cfg
    x = torch.zeros(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    per_module = {}
    for name, counts in counter.get_flop_counts().items():
        per_module[name] = int(sum(counts.values()))
    return {"total": int(counter.get_total_flops()), "per_module": per_module}


def stage_flops(model: torch.nn.Module, batch: int = 1) -> list[int]:
    """FLOPs of each swin stage (PatchMerging included), in order."""
    per_module = count_flops(model, batch)["per_module"]
    prefix = type(model).__name__
    return [per_module.get(f"{prefix}.layers.{i}", 0) for i in range(len(model.layers))]
