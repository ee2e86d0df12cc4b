"""The stage registry: every stage a recipe can list, declared once.

A stage is a verb module (train, adapt, ...) plus one `Stage` entry below naming its recipe
table's config dataclass, the function `edgevit run` calls, and the artifacts it reads and
writes under the recipe's `out` folder. Recipe validation (`recipes.py`), `edgevit run`
(`pipeline.py`), `edgevit stages` and the README's recipe reference all derive from `STAGES`;
adding a stage is its module and one entry here. Entries name modules as strings so this
registry imports nothing heavy (recipes validate without loading TVM).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgevit.config import closest_key_hint
from edgevit.errors import ConfigError, EdgeVitError

FINAL, LAST = "model.pt", "last.pt"   # a training stage's result, and its per-epoch resume point


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    config: str                     # "module:Class": the dataclass of the recipe's [name] table
    run: str                        # "module:function" taking a StageRun, returning the stage's figures
    inputs: tuple[str, ...] = ()    # artifacts read, relative to the recipe's out folder
    outputs: tuple[str, ...] = ()   # artifacts written

    def config_class(self) -> type:
        return _resolve(self.config)

    def runner(self) -> Callable[["StageRun"], dict]:
        return _resolve(self.run)


STAGES: tuple[Stage, ...] = (
    Stage("train", "train [model] on [data] (resumes an interrupted run)",
          "edgevit.train:TrainConfig", "edgevit.train:run_stage", (), ("train/model.pt",)),
    Stage("adapt", "sparsity-aware adaptation: fine-tune under random per-layer window sparsity",
          "edgevit.adapt:AdaptConfig", "edgevit.adapt:run_stage", ("train/model.pt",), ("adapt/model.pt",)),
    Stage("eval", "top-1 of the trained (and adapted) model at uniform sparsity ratios",
          "edgevit.evaluation:EvalConfig", "edgevit.evaluation:run_stage", ("train/model.pt", "adapt/model.pt"),
          ("eval/results.json",)),
    Stage("quantize", "int8 weights and calibrated activations (or k-means / PQ codebooks) of the adapted "
          "(else trained) model; later stages profile, search and compile it in that scheme",
          "edgevit.quantize:QuantizeConfig", "edgevit.quantize:run_stage", ("adapt/model.pt or train/model.pt",),
          ("quantize/model.pt", "quantize/quantization.json")),
    Stage("profile", "latency table of the deployed (quantized, else adapted, else trained) model on a target",
          "edgevit.latency:ProfileStageConfig", "edgevit.latency:run_stage",
          ("quantize/model.pt, else adapt/ or train/model.pt",), ("profile/latency.json",)),
    Stage("search", "per-layer sparsity under a latency budget on [profile]'s target",
          "edgevit.search:SearchConfig", "edgevit.search:run_stage",
          ("quantize/model.pt, else adapt/ or train/model.pt", "profile/latency.json"), ("search/result.json",)),
    Stage("compile", "artifacts of the adapted (else trained) model, under the searched sparsity, per target",
          "edgevit.compile:CompileStageConfig", "edgevit.compile:run_stage",
          ("quantize/model.pt, else adapt/ or train/model.pt", "search/result.json"), ("compile/<target>/",)),
    Stage("bench", "latency (and the compiled artifact's own top-1) of every artifact that runs here",
          "edgevit.bench:BenchStageConfig", "edgevit.bench:run_stage", ("compile/<target>/",),
          ("bench/<target>.json",)),
    Stage("report", "accuracy-latency report of everything the run holds: Markdown, JSON, plots, one HTML page",
          "edgevit.report:ReportStageConfig", "edgevit.report:run_stage", ("the run folder",),
          ("report/index.html", "report/report.md", "report/report.json")),
)


def stage_names() -> list[str]:
    return [s.name for s in STAGES]


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ConfigError(f"unknown stage '{name}'; {closest_key_hint(str(name), stage_names())}")


def _resolve(ref: str) -> Any:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


class StageRun:
    """What a stage's `run` function gets: the recipe, its data, where stages keep their
    artifacts, and the shared rules (reuse an up-to-date result, require an earlier one)."""

    def __init__(self, recipe, data, log: Callable[[str], None], force: bool):
        self.recipe, self.data, self.log, self.force = recipe, data, log, force

    def config(self, stage: str):
        return self.recipe.sections[stage]

    def dir(self, stage: str) -> Path:
        return self.recipe.out / stage

    def meta(self, stage: str) -> dict:
        """Checkpoint metadata tying a result to the recipe settings that made it."""
        return {"config": {"recipe_digest": self.recipe.digest(stage)},
                "data": {"seed": self.recipe.data.seed, "val_fraction": self.recipe.data.val_fraction}}

    def require(self, stage: str):
        """The checkpoint an earlier training stage wrote."""
        from edgevit.checkpoint import Checkpoint

        path = self.dir(stage) / FINAL
        if not path.exists():
            raise EdgeVitError(f"{path} does not exist; add '{stage}' to the recipe's stages or run it first")
        return Checkpoint.load(path)

    def deployed_checkpoint(self, quantized: bool = True):
        """The model later stages work on: the quantized one when the recipe quantizes, else the
        adapted one when the recipe adapts (or did), else the trained one."""
        if quantized and "quantize" in self.recipe.stages:
            return self.require("quantize")
        adapted = "adapt" in self.recipe.stages or (self.dir("adapt") / FINAL).exists()
        return self.require("adapt" if adapted else "train")

    def cached(self, stage: str, make: Callable[[], Any]):
        """Reuse OUT/<stage>/model.pt when it was made from the same settings, else (re)run `make`."""
        from edgevit.checkpoint import Checkpoint

        final = self.dir(stage) / FINAL
        if not self.force and self._up_to_date(final, self.recipe.digest(stage)):
            self.log(f"{stage}: up to date ({final})")
            return Checkpoint.load(final)
        if self.force:
            for f in (self.dir(stage) / LAST, final):
                f.unlink(missing_ok=True)
        self.log(f"{stage}: {self.recipe.model.name} -> {final}")
        ckpt = make()
        if ckpt.metrics:
            self.log(f"{stage}: val top-1 {ckpt.metrics['val']['top1']:.2f}%  "
                     f"test top-1 {ckpt.metrics['test']['top1']:.2f}%")
        return ckpt

    @staticmethod
    def _up_to_date(path: Path, digest: str) -> bool:
        from edgevit.checkpoint import Checkpoint
        from edgevit.errors import CheckpointError

        if not path.exists():
            return False
        try:
            return Checkpoint.load(path).config.get("recipe_digest") == digest
        except CheckpointError:
            return False


# ---------------------------------------------------------------------------- reference


def config_rows(cls: type) -> list[tuple[str, str]]:
    """(key, default) of a config dataclass, in declaration order."""
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((f.name, _toml(default)))
    return rows


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "(none)"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def reference_markdown() -> str:
    """The recipe reference (README's "Recipe stages" section), generated from `STAGES`."""
    lines = ["| stage | what it does | reads | writes |", "|---|---|---|---|"]
    for s in STAGES:
        lines.append(f"| `{s.name}` | {s.summary} | {', '.join(s.inputs) or '-'} | {', '.join(s.outputs) or '-'} |")
    for s in STAGES:
        keys = ", ".join(f"`{k} = {v}`" for k, v in config_rows(s.config_class())) or "(no settings)"
        lines.append("")
        lines.append(f"`[{s.name}]`: {keys}")
    return "\n".join(lines) + "\n"
