"""`edgevit run RECIPE`: walk a recipe's stages, skipping those whose output is up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgevit.recipes import Recipe

Log = Callable[[str], None]


def run_recipe(recipe: Recipe, log: Log = print, force: bool = False) -> dict:
    """Run the recipe's stages in order; returns the figures each stage produced."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.data import load_data
    from edgevit.train import FINAL, evaluate, train

    cls, cfg = recipe.model.resolve()
    data = load_data(recipe.data.spec, cfg.img_size, recipe.data.seed, recipe.data.val_fraction)
    results: dict = {"recipe": str(recipe.path), "name": recipe.name}
    train_dir = recipe.out / "train"
    digest = recipe.digest("train")
    final = train_dir / FINAL
    if "train" in recipe.stages:
        if not force and _up_to_date(final, digest):
            log(f"train: up to date ({final})")
            ckpt = Checkpoint.load(final)
        else:
            from edgevit.models import create_model
            from edgevit.train import LAST

            if force:
                for f in (train_dir / LAST, final):
                    f.unlink(missing_ok=True)

            model = create_model(recipe.model.name, num_classes=data.num_classes, in_chans=data.channels,
                                 **recipe.model.overrides)
            log(f"train: {recipe.model.name} on {data.spec} ({len(data.train)} train / {len(data.val)} val / "
                f"{len(data.test)} test images) -> {train_dir}")
            ckpt = train(model, data, recipe.sections["train"], train_dir, resume=True,
                         extra_meta={"config": {"recipe_digest": digest},
                                     "data": {"seed": recipe.data.seed, "val_fraction": recipe.data.val_fraction}})
        results["train"] = ckpt.metrics
    if "eval" in recipe.stages:
        ckpt = Checkpoint.load(final)
        model = ckpt.build_model().eval()
        results["eval"] = {s: evaluate(model, data.split(s), ckpt.data["mean"], ckpt.data["std"])
                           for s in ("val", "test")}
        log(f"eval: val top-1 {results['eval']['val']['top1']:.2f}%  "
            f"test top-1 {results['eval']['test']['top1']:.2f}%  ({final})")
    return results


def _up_to_date(path: Path, digest: str) -> bool:
    from edgevit.checkpoint import Checkpoint
    from edgevit.errors import CheckpointError

    if not path.exists():
        return False
    try:
        return Checkpoint.load(path).config.get("recipe_digest") == digest
    except CheckpointError:
        return False
