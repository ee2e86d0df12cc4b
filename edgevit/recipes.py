"""Recipes: a pipeline as data (recipes/*.toml), validated on load, run stage by stage.

    name = "quickstart"
    stages = ["train", "eval"]
    out = "runs/quickstart"
    [data]   spec = "digits"  seed = 0  val_fraction = 0.1
    [model]  name = "swin_quickstart"  (other keys override the model's config)
    [train]  epochs = 40 ...               (TrainConfig fields)

A stage whose output exists and was made from the same settings is skipped; an interrupted
training stage resumes from its last epoch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgevit.config import closest_key_hint, from_mapping, read_toml
from edgevit.errors import ConfigError



@dataclass(frozen=True)
class DataConfig:
    spec: str = "digits"
    seed: int = 0
    val_fraction: float = 0.1

    def __post_init__(self):
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction {self.val_fraction} must be in (0, 0.5)")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def resolve(self):
        from edgevit.models import resolve_model

        return resolve_model(self.name, **self.overrides)


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    stages: tuple[str, ...]
    out: Path
    data: DataConfig
    model: ModelSpec
    sections: dict[str, Any]   # per-stage config dataclasses, e.g. {"train": TrainConfig}

    def digest(self, upto: str) -> str:
        """Hash of everything that decides the output of stage `upto` (and the stages before it)."""
        parts = {"data": asdict(self.data), "model": asdict(self.model)}
        for stage in STAGE_ORDER[: STAGE_ORDER.index(upto) + 1]:
            if stage in self.sections:
                parts[stage] = asdict(self.sections[stage])
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


STAGE_ORDER = ["train", "adapt", "eval", "profile", "search"]


@dataclass(frozen=True)
class ProfileStageConfig:
    """[profile]: latency table of the adapted (else trained) model on a target."""

    target: str = "host"
    batch: int = 1
    validate: int = 0            # random configs measured end to end against the predictor
    tuning: bool = True          # use the target's tuning database when it has records

    def __post_init__(self):
        if self.batch < 1 or self.validate < 0:
            raise ValueError("batch must be >= 1 and validate >= 0")


@dataclass(frozen=True)
class SearchStageConfig:
    """[search]: per-knob sparsity under a latency budget on [profile]'s target."""

    budget: str = "1ms"
    evaluations: int = 500
    population: int = 100
    val_images: int = 2000
    seed: int = 0
    finetune: int = 0

    def __post_init__(self):
        from edgevit.search import parse_budget

        try:
            parse_budget(self.budget)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if self.evaluations < 1 or self.population < 4:
            raise ValueError("evaluations must be >= 1 and population >= 4")


@dataclass(frozen=True)
class EvalConfig:
    """Which uniform sparsity ratios the eval stage reports (swin family; [0.0] = dense only)."""

    ratios: tuple[float, ...] = (0.0,)
    split: str = "test"

    def __post_init__(self):
        if self.split not in ("val", "test"):
            raise ValueError(f"split '{self.split}' must be 'val' or 'test'")
        for r in self.ratios:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"ratio {r} must be in [0, 1)")


def section_types() -> dict[str, type]:
    from edgevit.adapt import AdaptConfig
    from edgevit.train import TrainConfig

    return {"train": TrainConfig, "adapt": AdaptConfig, "eval": EvalConfig, "profile": ProfileStageConfig,
            "search": SearchStageConfig}


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    raw = read_toml(path)
    top = {"name", "stages", "out", "data", "model", *section_types()}
    for key in raw:
        if key not in top:
            raise ConfigError(f"{path}: unknown key '{key}'; {closest_key_hint(key, sorted(top))}")
    stages = raw.get("stages", ["train", "eval"])
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list, e.g. [\"train\", \"eval\"]")
    for s in stages:
        if s not in STAGE_ORDER:
            raise ConfigError(f"{path}: unknown stage '{s}'; {closest_key_hint(str(s), STAGE_ORDER)}")
    model_raw = dict(raw.get("model", {}))
    if "name" not in model_raw:
        raise ConfigError(f"{path} [model]: missing required key 'name' (see `edgevit models`)")
    model = ModelSpec(model_raw.pop("name"), model_raw)
    try:
        model.resolve()
    except ConfigError as e:
        raise ConfigError(f"{path} [model]: {e}") from None
    sections = {name: from_mapping(cls, raw.get(name, {}), f"{path} [{name}]")
                for name, cls in section_types().items()}
    return Recipe(path=path, name=str(raw.get("name", path.stem)), stages=tuple(stages),
                  out=Path(raw.get("out", f"runs/{path.stem}")),
                  data=from_mapping(DataConfig, raw.get("data", {}), f"{path} [data]"),
                  model=model, sections=sections)
