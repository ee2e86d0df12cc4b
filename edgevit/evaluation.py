"""The `eval` recipe stage: top-1 of the trained (and adapted) model at uniform sparsity ratios."""

from __future__ import annotations

from dataclasses import dataclass

from edgevit.fileio import write_json
from edgevit.sparsity import DEFAULT_LEVELS
from edgevit.stages import StageRun

EVAL_KIND, RESULTS = "edgevit.eval_result", "results.json"


@dataclass(frozen=True)
class EvalConfig:
    """Which uniform sparsity ratios the eval stage reports (swin family; [0.0] = dense only)."""

    ratios: tuple[float, ...] = (0.0,)
    split: str = "test"

    def __post_init__(self):
        if self.split not in ("val", "test"):
            raise ValueError(f"split '{self.split}' must be 'val' or 'test'")
        for r in self.ratios:
            if not any(abs(r - level) < 1e-9 for level in DEFAULT_LEVELS):
                raise ValueError(f"ratio {r} is not one of the sparsity levels {list(DEFAULT_LEVELS)}")


def run_stage(run: StageRun) -> dict:
    """Top-1 of each trained model at each uniform sparsity ratio of [eval]."""
    from edgevit.sparsity import SparsityConfig
    from edgevit.train import evaluate

    cfg = run.config("eval")
    out = {}
    for stage in ("train", "adapt"):
        if stage == "adapt" and "adapt" not in run.recipe.stages:
            continue
        ckpt = run.require(stage)
        model = ckpt.build_model().eval()
        row = {}
        for r in cfg.ratios:
            if r > 0:
                model.set_sparsity(SparsityConfig.uniform(model, r))
            row[f"{r:.1f}"] = evaluate(model, run.data.split(cfg.split), ckpt.data["mean"], ckpt.data["std"])["top1"]
        name = "dense" if stage == "train" else "adapted"
        out[name] = row
        cells = "  ".join(f"{k}: {v:.2f}%" for k, v in row.items())
        log_path = run.dir(stage) / "model.pt"
        run.log(f"eval ({cfg.split} top-1, {name} model {log_path}): {cells}")
    write_json(run.dir("eval") / RESULTS, {"kind": EVAL_KIND, "version": 1, "split": cfg.split, **out})
    return out
