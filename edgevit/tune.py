"""`tune`: MetaSchedule search over a model's kernels, on this machine or on the device over RPC,
into a database `compile` reuses.

- The tasks are the fused kernels exactly as `compile` sees them (same fast-math, legalize and
  fusion passes), so the database's structural-hash lookup finds them at compile time. Dense
  and sparse configs share every kernel they have in common.
- One database per target (backend/database.py); MetaSchedule's JSON database, appended record
  by record.
- Before a kernel is searched, edgevit's default schedule for it is measured and recorded: the
  search starts from it, and a tuned build is never slower than the untuned one.
- Resumable: each kernel's records are counted first and only the missing trials are run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgevit.backend import metaschedule as ms_
from edgevit.backend.database import database_dir, open_database
from edgevit.backend.runtime import Device
from edgevit.checkpoint import Checkpoint
from edgevit.errors import ConfigError, EdgeVitError
from edgevit.fileio import read_cache, write_json
from edgevit.sparsity import SparsityConfig
from edgevit.targets import Target

Log = Callable[[str], None]
PROGRESS = "edgevit_progress.json"   # per kernel: default time and trials searched (for resume)


@dataclass(frozen=True)
class TuneConfig:
    trials_per_kernel: int = 64      # MetaSchedule candidates measured per kernel
    trials_per_round: int = 16       # candidates built and measured per search round
    builder_timeout_s: float = 300.0  # one build here takes 2-10 s; 30 s (TVM's default) timed out
    runner_timeout_s: float = 60.0
    number: int = 3                  # time_evaluator: runs per measurement ...
    repeat: int = 1                  # ... measurements per candidate
    min_repeat_ms: int = 20
    cost_model: str = "xgb"
    seed: int = 0
    cover: float = 0.9               # tune the slowest kernels making up this share of default time
    batch: int = 1
    database: str | None = None      # a database folder other than the target's default

    def __post_init__(self):
        if self.trials_per_kernel < 1:
            raise ValueError("trials must be >= 1")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")


@dataclass(frozen=True)
class KernelResult:
    name: str
    weight: int                      # calls per inference
    default_ms: float | None         # edgevit's default schedule, measured
    best_ms: float | None            # best record in the database after tuning
    trials: int                      # records in the database


@dataclass(frozen=True)
class TuneReport:
    target: str
    database: str
    kernels: list[KernelResult] = field(default_factory=list)
    seconds: float = 0.0

    def estimate_ms(self, attr: str) -> float:
        """Sum of kernel latencies x calls: an estimate of the model's kernel time (a kernel with
        no tuned record counts at its default time)."""
        return sum((getattr(k, attr) or k.default_ms or 0.0) * k.weight for k in self.kernels)

    def to_dict(self) -> dict:
        return {"target": self.target, "database": self.database, "seconds": round(self.seconds, 1),
                "default_kernel_ms": round(self.estimate_ms("default_ms"), 4),
                "tuned_kernel_ms": round(self.estimate_ms("best_ms"), 4),
                "kernels": [k.__dict__ for k in self.kernels]}


def model_tasks(ckpt: Checkpoint, target: Target, sparsity: SparsityConfig | None, batch: int = 1) -> list:
    """The fused kernels `compile` would build for this model, as MetaSchedule tasks."""
    from edgevit.backend.frontend import to_relax

    model = ckpt.build_model().eval()
    if sparsity is not None:
        model.set_sparsity(sparsity)
    c = model.cfg
    mod, _ = to_relax(model, torch.zeros(batch, c.in_chans, c.img_size, c.img_size), target=target)
    return ms_.extract_tasks(mod, target)


def select_kernels(costs: list[float], cover: float) -> list[int]:
    """Indices of the costliest kernels whose sum reaches `cover` of the total, costliest first."""
    order = sorted(range(len(costs)), key=lambda i: -costs[i])
    total, chosen, acc = sum(costs), [], 0.0
    for i in order:
        if acc >= cover * total or costs[i] <= 0:
            break
        chosen.append(i)
        acc += costs[i]
    return chosen


class Tuning:
    """One tuning run's database, builder, runner and progress file (the default time and trials
    searched of every kernel, so a resumed run picks the same kernels and skips done trials)."""

    def __init__(self, target: Target, cfg: TuneConfig, device: Device | None, log: Log):
        self.target, self.cfg, self.device, self.log = target, cfg, device, log
        self.path = Path(cfg.database) if cfg.database else database_dir(target)
        self.tvm_target = target.tvm_target()
        # the device first: an unreachable one must not leave an empty database behind
        self.runner = ms_.make_runner(device, cfg.runner_timeout_s, cfg.number, cfg.repeat, cfg.min_repeat_ms)
        self.builder = ms_.make_builder(target, cfg.builder_timeout_s)
        self.db = open_database(self.path)
        self.progress = self._load_progress()

    def _load_progress(self) -> dict:
        return read_cache(self.path / PROGRESS) or {}

    def save_progress(self) -> None:
        write_json(self.path / PROGRESS, self.progress)

    def entry(self, task) -> dict:
        return self.progress.setdefault(ms_.kernel_key(task), {"name": task.task_name, "default_ms": None, "trials": 0})

    def default_ms(self, task) -> float | None:
        """edgevit's default schedule of a kernel, measured once (kept in the progress file)."""
        entry = self.entry(task)
        if entry["default_ms"] is None:
            secs = ms_.measure_default(task, self.db, self.tvm_target, self.builder, self.runner,
                                       local=self.device is None)
            entry["default_ms"] = None if secs is None else secs * 1e3
        return entry["default_ms"]

    def tune(self, task, label: str, seed: int) -> KernelResult:
        """Search the trials of `task` not yet run; its best record after."""
        entry = self.entry(task)
        # a run killed inside this kernel's search left its records but not the count: the
        # records beyond the default schedule's are trials already measured
        entry["trials"] = max(entry["trials"], len(ms_.kernel_records(task, self.db)) - 1)
        remaining = self.cfg.trials_per_kernel - entry["trials"]
        why_not = ms_.unsearchable(task)
        if why_not and remaining > 0:
            self.log(f"{label}: kept edgevit's schedule ({why_not})")
        elif remaining > 0:
            self.log(f"{label}: searching {remaining} candidates (default {entry['default_ms'] or float('nan'):.4f} ms)")
            ms_.search_task(task, remaining, self.cfg.trials_per_round, seed, self.db, str(self.path / "logs"),
                            self.builder, self.runner, self.cfg.cost_model)
            entry["trials"] += remaining
            self.save_progress()
        result = self.result(task, entry["default_ms"])
        self.log(f"{label}: best {result.best_ms:.4f} ms after {result.trials} records" if result.best_ms
                 else f"{label}: no valid schedule found")
        return result

    def result(self, task, default_ms: float | None) -> KernelResult:
        records = ms_.kernel_records(task, self.db)
        return KernelResult(task.task_name, int(task.weight), default_ms, ms_.best_ms(records), len(records))


def tune_model(ckpt: Checkpoint, target: Target, sparsity: SparsityConfig | None = None,
               cfg: TuneConfig = TuneConfig(), device: Device | None = None, log: Log = print) -> TuneReport:
    if target.device != "cpu":
        raise ConfigError(f"target '{target.name}' is a {target.device} target; `edgevit tune` tunes CPU "
                           "targets (GPU kernels use dlight's schedules)")
    if not target.runs_here and (device is None or device.rpc is None):
        raise EdgeVitError(f"target '{target.name}' ({target.arch}) does not run on this machine; tune on the "
                           "device: --rpc HOST:PORT --key KEY (see `edgevit emulator start`)")
    start = time.perf_counter()
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)   # its per-round tables
    tuning = Tuning(target, cfg, device, log)   # an unreachable device fails first
    tasks = model_tasks(ckpt, target, sparsity, cfg.batch)
    log(f"measuring edgevit's default schedule of {len(tasks)} kernels on {device.label if device else 'this machine'}")
    defaults = [tuning.default_ms(task) for task in tasks]
    tuning.save_progress()
    chosen = select_kernels([(d or 0.0) * t.weight for d, t in zip(defaults, tasks)], cfg.cover)
    log(f"tuning the {len(chosen)} slowest kernels ({cfg.cover:.0%} of the default kernel time), "
        f"{cfg.trials_per_kernel} trials each, into {tuning.path}")
    results: dict[int, KernelResult] = {}
    for n, i in enumerate(chosen, 1):
        results[i] = tuning.tune(tasks[i], f"[{n}/{len(chosen)}] {tasks[i].task_name} x{tasks[i].weight}", cfg.seed + n)
        done = _report(tuning, tasks, defaults, results)
        log(f"  model kernel time so far: default {done.estimate_ms('default_ms'):.3f} ms -> "
            f"tuned {done.estimate_ms('best_ms'):.3f} ms ({n}/{len(chosen)} kernels)")
    report = _report(tuning, tasks, defaults, results)
    return TuneReport(report.target, report.database, report.kernels, time.perf_counter() - start)


def _report(tuning: Tuning, tasks, defaults, results: dict[int, KernelResult]) -> TuneReport:
    kernels = [results[i] if i in results else tuning.result(task, defaults[i]) for i, task in enumerate(tasks)]
    return TuneReport(tuning.target.name, str(tuning.path), kernels)
