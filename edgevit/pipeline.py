"""`edgevit run RECIPE`: walk a recipe's stages in registry order (stages.py), each stage's own
`run` function doing the work and skipping what is up to date.

Layout of a run: OUT/<stage>/ per stage: OUT/train/model.pt (dense), OUT/adapt/model.pt
(sparsity-aware), each training stage's OUT/<stage>/last.pt for resuming,
OUT/profile/latency.json, OUT/search/result.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from edgevit.recipes import Recipe
from edgevit.stages import StageRun, get_stage

Log = Callable[[str], None]


def run_recipe(recipe: Recipe, log: Log = print, force: bool = False) -> dict:
    """Run the recipe's stages in order; returns the figures each stage produced."""
    from edgevit.data import load_data

    check_run_folder(recipe.out)
    _, cfg = recipe.model.resolve()
    data = load_data(recipe.data.spec, cfg.img_size, recipe.data.seed, recipe.data.val_fraction)
    log(f"data: {data.spec}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
        f"{data.num_classes} classes")
    run = StageRun(recipe, data, log, force)
    results: dict = {"recipe": str(recipe.path), "name": recipe.name}
    for stage in recipe.stages:
        results[stage] = get_stage(stage).runner()(run)
        _keep_project(recipe, log)
    return results


def check_run_folder(out: Path) -> None:
    """A recipe's `out` is new, empty, or a run folder edgevit made (stage folders only): a user's
    folder or an artifact is refused before any work."""
    from edgevit.errors import OutputError
    from edgevit.stages import stage_names

    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"{out}: the recipe's out is a file; point `out` at a new folder")
    foreign = sorted(p.name for p in out.iterdir() if not (p.is_dir() and p.name in stage_names()))
    if foreign:
        raise OutputError(f"{out}: the recipe's out holds things a run does not write ({', '.join(foreign[:3])}); "
                          "edgevit does not write into other folders: point `out` at a new folder")


def _keep_project(recipe: Recipe, log: Log) -> None:
    """The project file the short commands read (`edgevit search --budget 20ms` after a run)."""
    from edgevit.project import PROJECT_FILE, record_run

    if not record_run(recipe).save():
        log(f"{PROJECT_FILE} here is not edgevit's project file; left as it is")
