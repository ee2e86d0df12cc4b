"""Window sparsity: per-layer configs (SparseViT's search space) and all the window-count math.

One ratio ("knob") per pair of consecutive blocks, so W-MSA and the SW-MSA after it share a
ratio; Swin-T (depths 2/2/6/2) has 6 knobs. Ratios come from `levels` (0.0..0.8 by default)
and are non-decreasing within a stage, so later blocks keep a subset of earlier blocks'
windows. The Swin-T space holds 120,285 configs (SPARSEVIT.md).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from edgevit.errors import ConfigError, EdgeVitError
from edgevit.fileio import read_json, write_json

DEFAULT_LEVELS = tuple(round(0.1 * i, 1) for i in range(9))  # 0.0 .. 0.8


# ---------------------------------------------------------------------------- window counts


def keep_count(num_windows: int, ratio: float) -> int:
    """Windows kept at sparsity `ratio`: floor(nW * (1 - r)), at least 1 (a stage with no window
    left would be a zero-size tensor that neither ONNX nor TVM compile)."""
    return max(1, math.floor(round(num_windows * (1.0 - ratio), 6)))


def knobs_per_stage(depths: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(math.ceil(d / 2) for d in depths)


def knob_windows(model) -> list[int]:
    """Windows per knob (the stage's window count for each pair of blocks)."""
    counts = []
    for stage in model.layers:
        counts.extend(stage.blocks[b].num_windows for b in range(0, len(stage.blocks), 2))
    return counts


def keep_of(windows: list[int], block_ratios: list[list[float]]) -> list[int]:
    """Windows each knob keeps under per-stage knob ratios, sorted or not (a single-knob probe
    prunes one knob of a stage and leaves the ones after it dense)."""
    return [keep_count(n, r) for n, r in zip(windows, [r for stage in block_ratios for r in stage])]


def keep_counts(model, config: "SparsityConfig") -> tuple[int, ...]:
    """Windows each knob keeps under `config` (== the window count: the knob runs dense)."""
    return tuple(keep_of(knob_windows(model), config.per_stage()))


def single_knob_ratios(config_knobs: tuple[int, ...], knob: int, ratio: float) -> list[list[float]]:
    """Per-stage knob ratios with only `knob` pruned (for profiling one unit at a time)."""
    ratios = [0.0] * sum(config_knobs)
    ratios[knob] = ratio
    return split_per_stage(ratios, config_knobs)


def split_per_stage(ratios, stage_knobs: tuple[int, ...]) -> list[list[float]]:
    """A flat list of knob ratios cut into one list per stage."""
    out, i = [], 0
    for n in stage_knobs:
        out.append(list(ratios[i:i + n]))
        i += n
    return out


def distinct_units(windows: list[int], levels) -> list[tuple[int, int, float]]:
    """(knob, k, smallest ratio giving k) for every k < windows the levels can reach."""
    units = []
    for knob, n in enumerate(windows):
        seen = set()
        for r in levels:
            k = keep_count(n, r)
            if r > 0 and k < n and k not in seen:
                seen.add(k)
                units.append((knob, k, r))
    return units


def stage_keep_keys(model) -> list[tuple[int, ...]]:
    """Per stage: windows kept by every block up to and including it (two configs with the same
    key give the same output of that stage)."""
    keys, kept = [], ()
    for stage in model.layers:
        kept += tuple(keep_count(b.num_windows, r) for b, r in zip(stage.blocks, stage.ratios))
        keys.append(kept)
    return keys


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SparsityConfig:
    ratios: tuple[float, ...]
    stage_knobs: tuple[int, ...]                 # knobs in each stage
    levels: tuple[float, ...] = field(default=DEFAULT_LEVELS)

    def __post_init__(self):
        object.__setattr__(self, "ratios", tuple(float(r) for r in self.ratios))
        if len(self.ratios) != sum(self.stage_knobs):
            raise ConfigError(f"sparsity config has {len(self.ratios)} ratios; this model needs "
                              f"{sum(self.stage_knobs)} (one per pair of blocks, stages {list(self.stage_knobs)})")
        for r in self.ratios:
            if not any(abs(r - level) < 1e-9 for level in self.levels):
                raise ConfigError(f"sparsity ratio {r} is not one of the levels {list(self.levels)}")
        for s, ratios in enumerate(self.per_stage()):
            if any(b < a for a, b in zip(ratios, ratios[1:])):
                raise ConfigError(f"stage {s} ratios {ratios} decrease; within a stage ratios must be "
                                  "non-decreasing (sort them)")

    # -- construction ------------------------------------------------------------------

    @classmethod
    def for_model(cls, model, ratios: list[float] | None = None, levels=DEFAULT_LEVELS) -> "SparsityConfig":
        """A config for a swin-family model; all-dense when `ratios` is None."""
        depths = getattr(model.cfg, "depths", None)
        if depths is None or not hasattr(model, "set_block_ratios"):
            raise ConfigError(no_windows_message(model))
        knobs = knobs_per_stage(depths)
        return cls(tuple(ratios if ratios is not None else [0.0] * sum(knobs)), knobs, tuple(levels))

    @classmethod
    def uniform(cls, model, ratio: float, levels=DEFAULT_LEVELS) -> "SparsityConfig":
        knobs = cls.for_model(model, levels=levels).stage_knobs
        return cls.for_model(model, [ratio] * sum(knobs), levels)

    # -- views ---------------------------------------------------------------------------

    def per_stage(self) -> list[list[float]]:
        return split_per_stage(self.ratios, self.stage_knobs)

    def block_ratios(self, depths: tuple[int, ...]) -> list[list[float]]:
        """Per-block ratios: knob j of a stage covers blocks 2j and 2j+1."""
        if knobs_per_stage(depths) != self.stage_knobs:
            raise ConfigError(f"sparsity config for stages of {list(self.stage_knobs)} knobs does not fit a "
                              f"model of depths {list(depths)}")
        return [[knobs[b // 2] for b in range(d)] for knobs, d in zip(self.per_stage(), depths)]

    @property
    def is_dense(self) -> bool:
        return all(r == 0 for r in self.ratios)

    def key(self) -> str:
        """A short stable key, for caching results per config."""
        return "-".join(f"{r:.2f}" for r in self.ratios)

    # -- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"ratios": list(self.ratios), "stage_knobs": list(self.stage_knobs), "levels": list(self.levels)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "sparsity config") -> "SparsityConfig":
        if not isinstance(d, dict) or "ratios" not in d or "stage_knobs" not in d:
            raise ConfigError(f"{where}: expected a JSON object with 'ratios' and 'stage_knobs'")
        unknown = set(d) - {"ratios", "stage_knobs", "levels"}
        if unknown:
            raise ConfigError(f"{where}: unknown key '{sorted(unknown)[0]}'; valid keys: ratios, stage_knobs, levels")
        ratios, knobs = _numbers(d["ratios"], "ratios", where), _numbers(d["stage_knobs"], "stage_knobs", where)
        levels = _numbers(d.get("levels", DEFAULT_LEVELS), "levels", where)
        if any(isinstance(k, float) or k < 0 for k in knobs) or any(not 0 <= r < 1 for r in (*ratios, *levels)):
            raise ConfigError(f"{where}: stage_knobs must be counts >= 0 and ratios/levels in [0, 1)")
        return cls(ratios, knobs, levels)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "SparsityConfig":
        try:
            data = read_json(path, "sparsity config", "pass a config JSON, a search result or a uniform ratio like 0.5")
        except EdgeVitError as e:
            raise ConfigError(str(e)) from None
        if isinstance(data, dict) and "sparsity" in data:  # a SearchResult or artifact manifest
            data = data["sparsity"]
        return cls.from_dict(data, str(path))


def _finite(v) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:   # an int too large for a float
        return False


def _numbers(value, key: str, where: str) -> tuple:
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                   or not _finite(v) for v in value):
        raise ConfigError(f"{where}: '{key}' must be a list of numbers, got {str(value)[:60]}")
    return tuple(value)


# ---------------------------------------------------------------------------- the space


def space_size(stage_knobs: tuple[int, ...], levels=DEFAULT_LEVELS) -> int:
    """Non-decreasing sequences per stage: C(L + n - 1, n), multiplied over stages."""
    return math.prod(math.comb(len(levels) + n - 1, n) for n in stage_knobs)


def enumerate_space(stage_knobs: tuple[int, ...], levels=DEFAULT_LEVELS) -> Iterator[SparsityConfig]:
    per_stage = [itertools.combinations_with_replacement(levels, n) for n in stage_knobs]
    for combo in itertools.product(*per_stage):
        yield SparsityConfig(tuple(r for stage in combo for r in stage), tuple(stage_knobs), tuple(levels))


def sample_config(stage_knobs: tuple[int, ...], generator, levels=DEFAULT_LEVELS) -> SparsityConfig:
    """SparseViT's training-time sampling: per knob uniform over levels, sorted within each stage.

    `generator` is a torch.Generator so sampling is reproducible per seed and rank."""
    import torch

    ratios = []
    for n in stage_knobs:
        idx = torch.randint(len(levels), (n,), generator=generator).tolist()
        ratios.extend(sorted(levels[i] for i in idx))
    return SparsityConfig(tuple(ratios), tuple(stage_knobs), tuple(levels))


def no_windows_message(model) -> str:
    """What adapt / search / sparsity options tell a model that has no windows to prune."""
    name = getattr(model, "model_name", None) or "?"
    message = f"model '{name}' has no windows to prune; window sparsity (adapt, search) applies to the swin family"
    knobs = getattr(model, "latency_knobs", None)     # a family's own trade-offs, in its words
    return f"{message}; {knobs}" if knobs else message


def set_sparsity(model, config: SparsityConfig | None) -> None:
    """Apply `config` to a swin-family model (None restores the dense model)."""
    if not hasattr(model, "set_block_ratios"):
        raise ConfigError(no_windows_message(model))
    if config is None:
        config = SparsityConfig.for_model(model)
    model.set_block_ratios(config.block_ratios(tuple(model.cfg.depths)))
