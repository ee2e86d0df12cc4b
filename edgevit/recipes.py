"""Recipes: a pipeline as data (recipes/*.toml), validated on load, run stage by stage.

    name = "quickstart"
    stages = ["train", "eval"]
    out = "runs/quickstart"
    [data]   spec = "digits"  seed = 0  val_fraction = 0.1
    [model]  name = "swin_quickstart"  (other keys override the model's config)
    [train]  epochs = 40 ...               (each stage's config: see stages.py, `edgevit stages`)

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
from edgevit.stages import STAGES, stage_names


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
    sections: dict[str, Any]   # every registered stage's config dataclass, e.g. {"train": TrainConfig(...)}

    def digest(self, upto: str) -> str:
        """Hash of everything that decides the output of stage `upto` (and the stages before it)."""
        parts = {"data": asdict(self.data), "model": asdict(self.model)}
        names = stage_names()
        for stage in names[: names.index(upto) + 1]:
            if stage in self.sections:
                parts[stage] = asdict(self.sections[stage])
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    raw = read_toml(path)
    names = stage_names()
    top = {"name", "stages", "out", "data", "model", *names}
    for key in raw:
        if key not in top:
            raise ConfigError(f"{path}: unknown key {key!r}; {closest_key_hint(key, sorted(top))}")
    stages = raw.get("stages", ["train", "eval"])
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: 'stages' must be a non-empty list, e.g. [\"train\", \"eval\"]")
    for s in stages:
        if s not in names:
            raise ConfigError(f"{path}: unknown stage {s!r}; {closest_key_hint(str(s), names)}")
    if [names.index(s) for s in stages] != sorted({names.index(s) for s in stages}):
        raise ConfigError(f"{path}: stages {stages} must be listed once each, in pipeline order: {', '.join(names)}")
    out = raw.get("out", f"runs/{path.stem}")
    if not isinstance(out, str) or not out:
        raise ConfigError(f"{path}: 'out' must be a folder path as a string, e.g. out = \"runs/{path.stem}\"")
    name = raw.get("name", path.stem)
    if not isinstance(name, str):
        raise ConfigError(f"{path}: 'name' must be a string, e.g. name = \"{path.stem}\"")
    windowed = ("adapt", "profile", "search")
    model = _model_spec(path, raw.get("model", {}))
    if any(s in stages for s in windowed) and not hasattr(model.resolve()[0], "set_block_ratios"):
        raise ConfigError(f"{path}: stages {', '.join(s for s in stages if s in windowed)} prune windows, and model "
                          f"'{model.name}' has none; use a swin-family model (see `edgevit models`)")
    sections = {s.name: from_mapping(s.config_class(), raw.get(s.name, {}), f"{path} [{s.name}]") for s in STAGES}
    return Recipe(path=path, name=name, stages=tuple(stages), out=Path(out),
                  data=from_mapping(DataConfig, raw.get("data", {}), f"{path} [data]"),
                  model=model, sections=sections)


def _model_spec(path: Path, raw) -> ModelSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: [model] must be a table with at least name = \"...\"")
    raw = dict(raw)
    if "name" not in raw:
        raise ConfigError(f"{path} [model]: missing required key 'name' (see `edgevit models`)")
    name = raw.pop("name")
    if not isinstance(name, str):
        raise ConfigError(f"{path} [model]: name must be a string (see `edgevit models`)")
    model = ModelSpec(name, raw)
    try:
        model.resolve()
    except ConfigError as e:
        raise ConfigError(f"{path} [model]: {e}") from None
    return model
