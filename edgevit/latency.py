"""`profile`: a latency table measured on the target, and the predictor `search` uses.

What is measured is what deployment runs: each config is compiled by `compile`'s own steps
(same pipeline, same tuning database) and timed on the target by TVM's time_evaluator, here or
on a device through the RPC tracker. The units are the prunable knobs (a pair of blocks sharing
a ratio): a knob's cost depends only on how many windows it keeps, k = max(1, floor(nW (1 - r))),
so the table holds, per knob, the latency change against the dense model for every distinct k:

    predicted(config) = dense + sum over knobs of delta[knob][k] + overhead (when any knob prunes)

Every unit is measured alone, then `calibrate` random full configs; the deltas and the overhead
(what the sum misses once TVM fuses operators and stages share their window ranking) are fitted
to all of these measurements at once by least squares, so each delta rests on several timings
rather than one (a unit's effect, 0.03-0.3 ms on a small model, is the size of one timing's
noise on a busy machine). `validate` measures fresh random configs end to end against the
prediction.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgevit.backend.runtime import Device
from edgevit.checkpoint import Checkpoint
from edgevit.errors import ConfigError, EdgeVitError, OutputError
from edgevit.fileio import check_output_file, read_artifact, read_cache, write_json
from edgevit.sparsity import (
    SparsityConfig,
    distinct_units,
    keep_counts,
    keep_of,
    knob_windows,
    sample_config,
    single_knob_ratios,
)
from edgevit.stages import StageRun
from edgevit.targets import Target

TABLE_KIND = "edgevit.latency_table"
TIMING = "fastest repeat"   # of repeats of >= min_repeat_ms each (Measurer.time); in the table key
Log = Callable[[str], None]


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class LatencyTable:
    key: dict                                   # model, config digest, input, batch, target, schedules
    dense_ms: float
    deltas: list[dict[int, float]]              # per knob: {windows kept: ms against dense}
    windows: list[int]                          # windows per knob
    overhead_ms: float = 0.0
    measurements: list[dict] = field(default_factory=list)  # what the fit used: keep, measured_ms, dense_ms
    validation: dict | None = None
    combine: str = "product"                    # how pruned units' deltas combine: "product" or "sum"

    def predict(self, keep: tuple[int, ...]) -> float:
        """dense x the product of (1 + delta / dense) over pruned units and the overhead; tables
        from before the product fit add the deltas instead ("sum")."""
        if len(keep) != len(self.windows):
            raise ConfigError(f"config has {len(keep)} knobs; the latency table has {len(self.windows)}")
        pruned = [self.deltas[knob][k] for knob, (k, n) in enumerate(zip(keep, self.windows)) if k < n]
        if pruned:
            pruned.append(self.overhead_ms)
        if self.combine == "sum":
            return self.dense_ms + sum(pruned)
        return self.dense_ms * math.prod(1.0 + d / self.dense_ms for d in pruned)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["deltas"] = [{str(k): v for k, v in unit.items()} for unit in self.deltas]
        return {"kind": TABLE_KIND, "version": 2, **d}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        d = read_artifact(path, TABLE_KIND, "measure one with `edgevit profile`", versions=(1, 2))
        try:
            table = cls(d["key"], d["dense_ms"], [{int(k): v for k, v in u.items()} for u in d["deltas"]],
                        d["windows"], d.get("overhead_ms", 0.0), d.get("measurements", []), d.get("validation"),
                        d.get("combine", "sum"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise EdgeVitError(f"{path}: damaged latency table ({type(e).__name__}: {e}); profile again") from None
        problem = table.problem()
        if problem:
            raise EdgeVitError(f"{path}: damaged latency table ({problem}); profile again")
        return table

    def problem(self) -> str | None:
        """What makes a table unusable (None: nothing): every figure a finite number, ms positive."""
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not isinstance(self.key, dict) or not number(self.dense_ms) or self.dense_ms <= 0:
            return "key must be a table and dense_ms a positive number"
        if not isinstance(self.windows, list) or len(self.windows) != len(self.deltas) or not all(
                isinstance(n, int) and n > 0 for n in self.windows):
            return "windows must list a positive count per knob, one per deltas entry"
        if not number(self.overhead_ms) or not all(number(v) for unit in self.deltas for v in unit.values()):
            return "deltas and overhead_ms must be finite numbers"
        if self.combine not in ("sum", "product"):
            return f"combine {self.combine!r} must be 'sum' or 'product'"
        return None


def table_key(ckpt: Checkpoint, target: Target, batch: int, schedules: str) -> dict:
    c = ckpt.model_config
    digest = hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {"model": ckpt.model_name, "model_config": digest, "input": [batch, c.get("in_chans"), c.get("img_size"),
            c.get("img_size")], "batch": batch, "target": target.name, "tvm_target": str(target.tvm_target()),
            "schedules": schedules, "timing": TIMING, "encoding": _encoding_key(ckpt)}


def _encoding_key(ckpt: Checkpoint) -> str:
    """The weight encoding, and for codebooks the kernel layouts (bits, groups, centroids, sub-vector
    per layer), which decide the kernels' speed: a table measured for 4-bit codes is not 3-bit's."""
    if ckpt.scheme in ("fp32", "int8"):
        return ckpt.scheme
    from edgevit.backend.codebook_kernels import layout_of
    from edgevit.quantization import layer_record

    layouts = sorted(repr(layout_of(layer_record(ckpt.scheme, d))) for d in ckpt.quantization["layers"].values())
    return f"{ckpt.scheme}-{hashlib.sha256(json.dumps(layouts).encode()).hexdigest()[:10]}"


def default_table_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    return Path("runs") / "latency" / f"{key['model']}-{key['target']}-b{key['batch']}-{digest}.json"


# ---------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class ProfileConfig:
    batch: int = 1
    calibrate: int = 12         # random full configs, fitted together with the single units
    validate: int = 0           # fresh random configs measured end to end against the predictor
    tuning: bool = True         # use the target's tuning database when it has records
    repeat: int = 15            # timed repeats per config (the fastest counts)
    min_repeat_ms: float = 30.0  # each repeat runs the model this long (several calls when fast)
    seconds_per_config: float = 2.0  # timing per config and dense alongside, in alternating rounds
    seed: int = 0

    def __post_init__(self):
        if self.batch < 1 or self.calibrate < 0 or self.validate < 0:
            raise ValueError("batch must be >= 1, calibrate and validate >= 0")
        if self.repeat < 1 or self.min_repeat_ms <= 0 or self.seconds_per_config <= 0:
            raise ValueError("repeat must be >= 1, min_repeat_ms and seconds_per_config > 0")


@dataclass(frozen=True)
class ProfileStageConfig(ProfileConfig):
    """The recipe's [profile] table: the target, and how to profile on it."""

    target: str = "host"

    def __post_init__(self):
        super().__post_init__()
        from edgevit.targets import load_target

        try:
            load_target(self.target)    # a misspelt target fails when the recipe loads, not after training
        except ConfigError as e:
            raise ValueError(str(e)) from None


class Measurer:
    """Compiles a model config exactly as `compile` does and times it on the target.

    Timing on a shared machine drifts by 10-20% over minutes (other processes, frequency), far
    more than a unit's effect. So the dense model stays loaded and is timed in alternation with
    every config (`versus_dense`): a unit's delta is taken against the dense timings around it."""

    def __init__(self, ckpt: Checkpoint, target: Target, device: Device | None, cfg: ProfileConfig):
        from edgevit.backend.database import schedule_source

        self.ckpt, self.target, self.cfg = ckpt, target, cfg
        self.device = device or Device(target.device)
        if not target.runs_here and self.device.rpc is None:
            raise EdgeVitError(f"target '{target.name}' ({target.arch}) does not run on this machine; measure on "
                               "the device: --rpc HOST:PORT --key KEY (see `edgevit emulator start`)")
        self.schedules, self.database = schedule_source(target, cfg.tuning)
        self.model = ckpt.build_model().eval()
        c = self.model.cfg
        self.shape = (cfg.batch, c.in_chans, c.img_size, c.img_size)
        self.sample = np.random.default_rng(0).standard_normal(self.shape, dtype=np.float32)
        self._dense, self._rounds = None, None
        self.measured = 0
        # one RPC session for every config: the dense model stays loaded beside each config, and
        # a board serves one session at a time; a profile can outlast any fixed session timeout
        self.remote = None
        if self.device.rpc is not None:
            from edgevit.backend.runtime import connect

            self.remote = connect(self.device, session_timeout=0)

    def load(self, block_ratios: list[list[float]]):
        """Compile, export and load one config on the device; returns its Session."""
        from edgevit.backend.build import build, export_library, save_weights
        from edgevit.backend.frontend import to_relax
        from edgevit.backend.runtime import Session

        depths = tuple(self.model.cfg.depths)
        self.model.set_block_ratios([[knobs[b // 2] for b in range(d)] for knobs, d in zip(block_ratios, depths)])
        mod, weights = to_relax(self.model, torch.zeros(self.shape), target=self.target)
        executable = build(mod, self.target, self.database)
        with tempfile.TemporaryDirectory(prefix="edgevit-profile-") as tmp:
            # a distinct name per config: uploading over a library the board has loaded breaks it
            lib, params = Path(tmp) / f"model-{self.measured}.so", Path(tmp) / "weights.params"
            export_library(executable, self.target, lib)
            save_weights(weights, params)
            self.measured += 1
            return Session(self.device, lib, params, remote=self.remote)

    def time(self, session, repeat: int | None = None) -> float:
        """Fastest over repeats of the mean latency of enough calls to last min_repeat_ms (ms).

        Other processes only ever add time, so the fastest repeat is the stable estimate of the
        model's own cost: the dense fashion model timed every 6 s for 4 minutes here varied by
        1.0% (coefficient of variation) this way and by 5.4% as the median of the repeats."""
        first = min(session.time_ms(self.sample, number=1, repeat=3))
        number = max(1, math.ceil(self.cfg.min_repeat_ms / max(first, 1e-3)))
        return min(session.time_ms(self.sample, number=number, repeat=repeat or self.cfg.repeat))

    def dense(self):
        if self._dense is None:
            self._dense = self.load(SparsityConfig.for_model(self.model).per_stage())
        return self._dense

    def versus_dense(self, block_ratios: list[list[float]]) -> tuple[float, float]:
        """(config ms, dense ms): the fastest repeats over rounds that time the dense model and the
        config in alternation, so drift hits both alike; as many rounds as fit
        `seconds_per_config` (5-25)."""
        session, dense = self.load(block_ratios), self.dense()
        config_ms, dense_ms = [], []
        for _ in range(self.rounds()):
            dense_ms.append(self.time(dense, self.PER_ROUND))
            config_ms.append(self.time(session, self.PER_ROUND))
        return min(config_ms), min(dense_ms)

    PER_ROUND = 3   # repeats per round

    def rounds(self) -> int:
        """Rounds of PER_ROUND repeats of the dense model and a config that fill
        `seconds_per_config` (5-25); the dense model's latency sets it, so once per Measurer."""
        if self._rounds is None:
            round_ms = 2 * self.PER_ROUND * max(self.cfg.min_repeat_ms, self.time(self.dense(), self.PER_ROUND))
            self._rounds = self._rounds_filling(round_ms, 5, 25)
        return self._rounds

    def _rounds_filling(self, round_ms: float, fewest: int, most: int) -> int:
        """How many rounds of `round_ms` fill `seconds_per_config`, within [fewest, most]."""
        return min(most, max(fewest, int(self.cfg.seconds_per_config * 1e3 / round_ms)))

    def close(self) -> None:
        """Release the loaded models and the board's RPC session (the next Measurer needs it)."""
        self._dense, self.remote = None, None

    def __call__(self, block_ratios: list[list[float]]) -> float:
        """Latency (ms) of the model with these per-stage knob ratios: the fastest repeat over
        rounds spread across ~`seconds_per_config` (10-50 rounds); a single 0.5 s burst of
        repeats measured the same fashion config at 0.607 ms and, minutes later, 0.812 ms."""
        session = self.load(block_ratios)
        first = self.time(session, self.PER_ROUND)
        rounds = self._rounds_filling(self.PER_ROUND * max(self.cfg.min_repeat_ms, first), 10, 50)
        return min([first] + [self.time(session, self.PER_ROUND) for _ in range(rounds - 1)])


# ---------------------------------------------------------------------------- checkpointing


class MeasuredRows:
    """Rows measured so far, saved after each one: a profile killed after hours on a board
    resumes where it stopped. A file made for another plan (model, target, configs) is ignored."""

    def __init__(self, path: Path | None, plan: dict):
        self.path, self.plan, self.rows = path, plan, []
        saved = read_cache(path) or {}
        if saved.get("plan") == json.loads(json.dumps(plan)):
            self.rows = saved.get("rows", [])

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if self.path is not None:
            write_json(self.path, {"plan": self.plan, "rows": self.rows})


# ---------------------------------------------------------------------------- the verbs


def profile(ckpt: Checkpoint, target: Target, device: Device | None = None, cfg: ProfileConfig = ProfileConfig(),
            log: Log = print, checkpoint: Path | None = None) -> LatencyTable:
    """Measure dense, every (knob, k) unit alone and `cfg.calibrate` random configs, then fit the
    table; with `checkpoint`, measured rows are kept there and a rerun skips them (the caller
    removes it once the table is safely saved)."""
    from tqdm import tqdm

    measure = Measurer(ckpt, target, device, cfg)
    model = measure.model
    base = SparsityConfig.for_model(model)
    windows = knob_windows(model)
    units = distinct_units(windows, base.levels)
    log(f"profiling {ckpt.model_name} on {target.name} ({measure.device.label}, schedules {measure.schedules}): "
        f"dense + {len(units)} units + {cfg.calibrate} random configs")
    rng = torch.Generator().manual_seed(cfg.seed)
    configs = [single_knob_ratios(base.stage_knobs, knob, ratio) for knob, _, ratio in units]
    configs += [c.per_stage() for c in _random_sparse_configs(base, rng, cfg.calibrate)]
    key = table_key(ckpt, target, cfg.batch, measure.schedules)
    done = MeasuredRows(checkpoint, {"key": key, "configs": configs, "cfg": _timing_settings(cfg)})
    if done.rows:
        log(f"resuming: {len(done.rows)} of {len(configs)} configs already measured ({checkpoint})")
    bar = tqdm(total=len(configs), initial=len(done.rows), unit="build", desc="profile", leave=False,
               disable=None)
    for block_ratios in configs[len(done.rows):]:
        config_ms, dense_ms = measure.versus_dense(block_ratios)
        done.add({"keep": keep_of(windows, block_ratios), "measured_ms": config_ms, "dense_ms": dense_ms})
        bar.update()
    bar.close()
    measure.close()
    return fit_table(key, windows, statistics.median(r["dense_ms"] for r in done.rows), done.rows)


def fit_table(key: dict, windows: list[int], dense_ms: float, rows: list[dict], combine: str = "product") -> LatencyTable:
    """Least-squares deltas per (knob, k) and overhead from measured rows.

    Each row gives log(measured / dense timed alongside) = the sum of its pruned units' log
    factors (+ the overhead's): a ratio, because a busy machine slows the config and the dense
    model alike by a factor (Swin-T rows timed while the machine ran 10-45% slow moved deltas
    fitted in ms by tens of ms); a product of factors, because pruned units do not add up once
    several are pruned: on Swin-T the summed deltas under-predicted 23 of 30 validation configs,
    heavily pruned ones by up to 17.5%, and the product cut the mean error from 5.9% to 5.2%
    (max 17.5% -> 10.6%; the fashion model: 4.5% -> 4.8%). Factors are stored as each unit's
    delta in ms of `dense_ms`. The overhead is only fitted when some row prunes two or more
    knobs: with single-knob rows alone it cannot be told apart from the deltas. `combine="sum"`
    fits measured / dense - 1 as a sum of fractions instead (for comparison)."""
    columns = sorted({(knob, k) for r in rows for knob, (k, n) in enumerate(zip(r["keep"], windows)) if k < n})
    index = {c: i for i, c in enumerate(columns)}
    with_overhead = any(sum(k < n for k, n in zip(r["keep"], windows)) > 1 for r in rows)
    x = np.zeros((len(rows), len(columns) + with_overhead))   # rows x (units [+ overhead])
    ratios = np.array([r["measured_ms"] / r["dense_ms"] for r in rows])
    y = np.log(ratios) if combine == "product" else ratios - 1.0
    for i, r in enumerate(rows):
        pruned = [index[(knob, k)] for knob, (k, n) in enumerate(zip(r["keep"], windows)) if k < n]
        x[i, pruned] = 1.0
        if with_overhead and pruned:
            x[i, -1] = 1.0
    solution = np.linalg.lstsq(x, y, rcond=None)[0] if rows else np.zeros(0)
    solution = dense_ms * (np.expm1(solution) if combine == "product" else solution)
    deltas: list[dict[int, float]] = [{} for _ in windows]
    for (knob, k), value in zip(columns, solution):
        deltas[knob][k] = float(value)
    overhead = float(solution[-1]) if with_overhead else 0.0
    return LatencyTable(key, dense_ms, deltas, windows, overhead, rows, combine=combine)


def validate(table: LatencyTable, ckpt: Checkpoint, target: Target, n: int, device: Device | None = None,
             cfg: ProfileConfig = ProfileConfig(), log: Log = print, checkpoint: Path | None = None) -> dict:
    """Compile and measure `n` fresh random configs; absolute percentage error of the predictor."""
    from tqdm import tqdm

    measure = Measurer(ckpt, target, device, replace(cfg, tuning=table.key["schedules"] != "rules"))
    base = SparsityConfig.for_model(measure.model)
    rng = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    configs = _random_sparse_configs(base, rng, n)
    done = MeasuredRows(checkpoint, {"table": table.to_dict() | {"validation": None},
                                     "configs": [list(c.ratios) for c in configs], "cfg": _timing_settings(cfg)})
    for config in tqdm(configs[len(done.rows):], total=n, initial=len(done.rows), unit="config", desc="validate", disable=None,
                       leave=False):
        predicted = table.predict(keep_counts(measure.model, config))
        measured, dense_now = measure.versus_dense(config.per_stage())
        done.add({"ratios": list(config.ratios), "predicted_ms": predicted, "measured_ms": measured,
                  "dense_now_ms": dense_now, "ape": abs(predicted - measured) / measured * 100,
                  "ape_same_dense": abs(predicted * dense_now / table.dense_ms - measured) / measured * 100})
    measure.close()
    rows = done.rows
    apes, same = [r["ape"] for r in rows], [r["ape_same_dense"] for r in rows]
    result = {"configs": n, "mape": statistics.fmean(apes), "max_ape": max(apes),
              "within_10pct": 100.0 * sum(a <= 10 for a in apes) / n,
              "mape_same_dense": statistics.fmean(same), "max_ape_same_dense": max(same), "rows": rows}
    log(f"predictor on {n} random configs: mean abs error {result['mape']:.2f}%, max {result['max_ape']:.2f}%, "
        f"{result['within_10pct']:.0f}% within +-10%; against the dense model timed alongside (machine drift "
        f"removed): mean {result['mape_same_dense']:.2f}%, max {result['max_ape_same_dense']:.2f}%")
    return result


def _timing_settings(cfg: ProfileConfig) -> dict:
    """The settings a measured row depends on (a resumed run must share them; how many configs
    to validate, or the recipe's target name, do not change a row)."""
    return {k: v for k, v in asdict(cfg).items() if k in {f.name for f in fields(ProfileConfig)} - {"validate"}}


def _random_sparse_configs(base: SparsityConfig, rng: torch.Generator, n: int) -> list[SparsityConfig]:
    out = []
    while len(out) < n:
        config = sample_config(base.stage_knobs, rng, base.levels)
        if not config.is_dense:
            out.append(config)
    return out


def ensure_table(ckpt: Checkpoint, target: Target, device: Device | None, cfg: ProfileConfig,
                 path: str | Path | None = None, log: Log = print) -> tuple[LatencyTable, Path]:
    """The table for this model/target/schedules: loaded when it exists and matches, else profiled
    (and saved). `cfg.validate` > 0 measures that many random configs into its `validation`."""
    from edgevit.backend.database import schedule_source

    source, _ = schedule_source(target, cfg.tuning)
    key = table_key(ckpt, target, cfg.batch, source)
    path = Path(path) if path else default_table_path(key)
    check_output_file(path, TABLE_KIND)   # a folder, a user's file or no write access: refused before profiling
    table = None
    if path.is_file():
        try:
            table = LatencyTable.load(path)
        except EdgeVitError:
            raise OutputError(f"{path} exists and is not a latency table edgevit wrote; edgevit does not replace "
                              "files it did not write: pass another path") from None
        if table.key != key:
            changed = ", ".join(f"{k} {table.key.get(k)!r} -> {key[k]!r}" for k in key if table.key.get(k) != key[k])
            log(f"{path}: made for other settings ({changed}); profiling again")
            table = None
        else:
            log(f"latency table {path} (dense {table.dense_ms:.3f} ms)")
    if table is None:
        partial = path.with_name(path.name + ".partial")
        table = profile(ckpt, target, device, cfg, log, checkpoint=partial)
        table.save(path)
        partial.unlink(missing_ok=True)   # the measurements live in the table now
        log(f"wrote latency table {path}: dense {table.dense_ms:.3f} ms, calibrated overhead "
            f"{table.overhead_ms:+.3f} ms")
    if cfg.validate and (table.validation or {}).get("configs") != cfg.validate:
        partial = path.with_name(path.name + ".validate.partial")
        table = replace(table, validation=validate(table, ckpt, target, cfg.validate, device, cfg, log, partial))
        table.save(path)
        partial.unlink(missing_ok=True)
    return table, path


def run_stage(run: StageRun) -> dict:
    """The `profile` recipe stage: the deployed model's table on [profile].target (reused while
    model, target and schedules match)."""
    from edgevit.targets import load_target

    cfg = run.config("profile")
    path = run.dir("profile") / "latency.json"
    if run.force:
        path.unlink(missing_ok=True)
    table, _ = ensure_table(run.deployed_checkpoint(), load_target(cfg.target), None, cfg, path, run.log)
    return {"table": str(path), "dense_ms": table.dense_ms, "overhead_ms": table.overhead_ms,
            "validation": {k: v for k, v in (table.validation or {}).items() if k != "rows"}}
