"""`edgevit run RECIPE`: walk a recipe's stages, skipping those whose output is up to date.

Layout of a run: OUT/train/model.pt (dense), OUT/adapt/model.pt (sparsity-aware), and
each training stage's OUT/<stage>/last.pt for resuming.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgevit.checkpoint import Checkpoint
from edgevit.data import DataBundle
from edgevit.errors import CheckpointError, EdgeVitError
from edgevit.recipes import Recipe

Log = Callable[[str], None]


def run_recipe(recipe: Recipe, log: Log = print, force: bool = False) -> dict:
    """Run the recipe's stages in order; returns the figures each stage produced."""
    from edgevit.data import load_data

    _, cfg = recipe.model.resolve()
    data = load_data(recipe.data.spec, cfg.img_size, recipe.data.seed, recipe.data.val_fraction)
    log(f"data: {data.spec}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
        f"{data.num_classes} classes")
    results: dict = {"recipe": str(recipe.path), "name": recipe.name}
    for stage in recipe.stages:
        results[stage] = STAGE_RUNNERS[stage](recipe, data, log, force)
    return results


def stage_dir(recipe: Recipe, stage: str) -> Path:
    return recipe.out / stage


def _train_stage(recipe: Recipe, data: DataBundle, log: Log, force: bool) -> dict:
    from edgevit.models import create_model
    from edgevit.train import train

    def make() -> Checkpoint:
        import torch

        torch.manual_seed(recipe.sections["train"].seed)  # weight init is part of the recipe
        model = create_model(recipe.model.name, num_classes=data.num_classes, in_chans=data.channels,
                             **recipe.model.overrides)
        return train(model, data, recipe.sections["train"], stage_dir(recipe, "train"), resume=True,
                     extra_meta=_meta(recipe, "train"))
    return _cached_stage(recipe, "train", make, log, force).metrics


def _adapt_stage(recipe: Recipe, data: DataBundle, log: Log, force: bool) -> dict:
    from edgevit.adapt import adapt

    dense = _require(recipe, "train")

    def make() -> Checkpoint:
        return adapt(dense, data, recipe.sections["adapt"], stage_dir(recipe, "adapt"), resume=True,
                     extra_meta=_meta(recipe, "adapt"))
    return _cached_stage(recipe, "adapt", make, log, force).metrics


def _eval_stage(recipe: Recipe, data: DataBundle, log: Log, force: bool) -> dict:
    """Top-1 of each trained model at each uniform sparsity ratio of [eval]."""
    from edgevit.sparsity import SparsityConfig
    from edgevit.train import evaluate

    cfg = recipe.sections["eval"]
    out = {}
    for stage in ("train", "adapt"):
        path = stage_dir(recipe, stage) / "model.pt"
        if stage == "adapt" and "adapt" not in recipe.stages:
            continue
        ckpt = _require(recipe, stage)
        model = ckpt.build_model().eval()
        row = {}
        for r in cfg.ratios:
            if r > 0:
                model.set_sparsity(SparsityConfig.uniform(model, r))
            row[f"{r:.1f}"] = evaluate(model, data.split(cfg.split), ckpt.data["mean"], ckpt.data["std"])["top1"]
        out["dense" if stage == "train" else "adapted"] = row
        cells = "  ".join(f"{k}: {v:.2f}%" for k, v in row.items())
        log(f"eval ({cfg.split} top-1, {'dense' if stage == 'train' else 'adapted'} model {path}): {cells}")
    return out


def _searched_checkpoint(recipe: Recipe) -> Checkpoint:
    return _require(recipe, "adapt" if "adapt" in recipe.stages or (stage_dir(recipe, "adapt") / "model.pt").exists()
                    else "train")


def _profile_stage(recipe: Recipe, data: DataBundle, log: Log, force: bool) -> dict:
    """Latency table on [profile].target (reused while model, target and schedules match)."""
    from edgevit.latency import ProfileConfig, ensure_table
    from edgevit.targets import load_target

    cfg = recipe.sections["profile"]
    path = stage_dir(recipe, "profile") / "latency.json"
    if force:
        path.unlink(missing_ok=True)
    table, _ = ensure_table(_searched_checkpoint(recipe), load_target(cfg.target), None,
                            ProfileConfig(batch=cfg.batch), path, cfg.tuning, cfg.validate, log)
    return {"table": str(path), "dense_ms": table.dense_ms, "overhead_ms": table.overhead_ms,
            "validation": {k: v for k, v in (table.validation or {}).items() if k != "rows"}}


def _search_stage(recipe: Recipe, data: DataBundle, log: Log, force: bool) -> dict:
    """Evolutionary search under [search].budget; writes OUT/search/result.json."""
    from edgevit.search import SearchConfig, parse_budget, run_search
    from edgevit.targets import load_target

    cfg, prof = recipe.sections["search"], recipe.sections["profile"]
    out = stage_dir(recipe, "search") / "result.json"
    scfg = SearchConfig(budget_ms=parse_budget(cfg.budget), population=cfg.population,
                        parents=max(2, cfg.population // 4), evaluations=cfg.evaluations,
                        val_images=cfg.val_images, seed=cfg.seed)
    table = stage_dir(recipe, "profile") / "latency.json"
    result = run_search(_searched_checkpoint(recipe), load_target(prof.target), scfg, out,
                        table if table.exists() else None, None, prof.tuning, cfg.finetune, log)
    log(f"search: {result.sparsity['ratios']} val {result.val_top1:.2f}% test {result.test_top1:.2f}%, measured "
        f"{result.measured_ms:.3f} ms within {result.budget_ms:g} ms -> {out}")
    return {"result": str(out), "ratios": result.sparsity["ratios"], "test_top1": result.test_top1,
            "measured_ms": result.measured_ms, "predicted_ms": result.predicted_ms}


STAGE_RUNNERS = {"train": _train_stage, "adapt": _adapt_stage, "eval": _eval_stage, "profile": _profile_stage,
                 "search": _search_stage}


def _meta(recipe: Recipe, stage: str) -> dict:
    return {"config": {"recipe_digest": recipe.digest(stage)},
            "data": {"seed": recipe.data.seed, "val_fraction": recipe.data.val_fraction}}


def _cached_stage(recipe: Recipe, stage: str, make: Callable[[], Checkpoint], log: Log, force: bool) -> Checkpoint:
    """Reuse OUT/<stage>/model.pt when it was made from the same settings, else (re)run."""
    from edgevit.train import FINAL, LAST

    final = stage_dir(recipe, stage) / FINAL
    if not force and _up_to_date(final, recipe.digest(stage)):
        log(f"{stage}: up to date ({final})")
        return Checkpoint.load(final)
    if force:
        for f in (stage_dir(recipe, stage) / LAST, final):
            f.unlink(missing_ok=True)
    log(f"{stage}: {recipe.model.name} -> {final}")
    ckpt = make()
    if ckpt.metrics:
        log(f"{stage}: val top-1 {ckpt.metrics['val']['top1']:.2f}%  test top-1 {ckpt.metrics['test']['top1']:.2f}%")
    return ckpt


def _require(recipe: Recipe, stage: str) -> Checkpoint:
    path = stage_dir(recipe, stage) / "model.pt"
    if not path.exists():
        raise EdgeVitError(f"{path} does not exist; add '{stage}' to the recipe's stages or run it first")
    return Checkpoint.load(path)


def _up_to_date(path: Path, digest: str) -> bool:
    if not path.exists():
        return False
    try:
        return Checkpoint.load(path).config.get("recipe_digest") == digest
    except CheckpointError:
        return False
