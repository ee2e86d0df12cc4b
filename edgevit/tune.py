"""`tune`: MetaSchedule search over a model's kernels, on this machine or on the device over RPC,
into a database `compile` reuses.

- The tasks are the fused kernels exactly as `compile` sees them (same fast-math, legalize and
  fusion passes), so the database's structural-hash lookup finds them at compile time. Dense
  and sparse configs share every kernel they have in common.
- One database per target (TVM target JSON, so `host` on another CPU gets its own), by default
  under ~/.cache/edgevit/tuning; it is MetaSchedule's JSON database, appended record by record.
- Before a kernel is searched, edgevit's default schedule for it is measured and recorded: the
  search starts from it, and a tuned build is never slower than the untuned one.
- Resumable: each kernel's records are counted first and only the missing trials are run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from edgevit.checkpoint import Checkpoint
from edgevit.errors import DeviceError, EdgeVitError
from edgevit.runtime import Device, connect
from edgevit.sparsity import SparsityConfig
from edgevit.targets import Target

Log = Callable[[str], None]


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

    def __post_init__(self):
        if self.trials_per_kernel < 1:
            raise ValueError("trials must be >= 1")


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


# ---------------------------------------------------------------------------- database


def default_database_root() -> Path:
    return Path(os.environ.get("EDGEVIT_TUNING_DIR", Path.home() / ".cache" / "edgevit" / "tuning"))


def database_dir(target: Target, root: str | Path | None = None) -> Path:
    """<root>/<target name>-<hash of the resolved TVM target>: one database per CPU/GPU model."""
    spec = str(target.tvm_target())
    digest = hashlib.sha256(spec.encode()).hexdigest()[:10]
    return Path(root or default_database_root()) / f"{target.name}-{digest}"


def open_database(path: Path):
    from tvm.s_tir import meta_schedule as ms

    path.mkdir(parents=True, exist_ok=True)
    try:
        return ms.database.JSONDatabase(work_dir=str(path))
    except Exception as e:  # noqa: BLE001 - TVM raises its own error types on a damaged file
        raise EdgeVitError(f"{path}: the tuning database is unreadable ({str(e).splitlines()[0][:120]}); "
                           "move it away and tune again") from None


def has_records(path: Path) -> bool:
    return (path / "database_tuning_record.json").is_file() and (path / "database_tuning_record.json").stat().st_size > 0


# ---------------------------------------------------------------------------- tasks


def model_tasks(ckpt: Checkpoint, target: Target, sparsity: SparsityConfig | None, batch: int = 1):
    """The fused kernels `compile` would build for this model, as MetaSchedule tasks."""
    from tvm.s_tir import meta_schedule as ms

    from edgevit.compile import to_relax
    from edgevit.schedules import fused_module

    model = ckpt.build_model().eval()
    if sparsity is not None:
        model.set_sparsity(sparsity)
    c = model.cfg
    mod, _ = to_relax(model, torch.zeros(batch, c.in_chans, c.img_size, c.img_size))
    tvm_target = target.tvm_target()
    return list(ms.relax_integration.extract_tasks(fused_module(mod, tvm_target), tvm_target))


def _default_schedule(task, tvm_target):
    """edgevit's rule-based schedule of the task's kernel (None if no rule applies)."""
    from edgevit.cpu_rules import cpu_rules

    func = task.dispatched[0]["main"]
    for rule in cpu_rules():
        try:
            sch = rule.apply(func, tvm_target, False)
        except Exception:  # noqa: BLE001 - a rule that does not fit declines
            continue
        if sch is not None:
            return sch
    return None


# ---------------------------------------------------------------------------- measuring


def _builder(target: Target, cfg: TuneConfig):
    from tvm.s_tir import meta_schedule as ms

    from edgevit.schedules import export_kernel_library

    export = functools.partial(export_kernel_library, cross_compiler=target.check_cross_compiler())
    return ms.builder.LocalBuilder(max_workers=1, timeout_sec=cfg.builder_timeout_s, f_export=export)


def _runner(cfg: TuneConfig, device: Device | None):
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=cfg.number, repeat=cfg.repeat, min_repeat_ms=cfg.min_repeat_ms,
                                          enable_cpu_cache_flush=False)
    if device is None or device.rpc is None:
        return ms.runner.LocalRunner(timeout_sec=cfg.runner_timeout_s, evaluator_config=evaluator)
    try:
        connect(device)  # a session proves the tracker is up and the key is registered
    except DeviceError as e:
        raise DeviceError(f"{e}; tuning measures on the device, so it must be reachable") from None
    host, _, port = device.rpc.rpartition(":")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=device.key,
                                 session_timeout_sec=int(cfg.runner_timeout_s))
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)


def measure_schedule(sch, task, tvm_target, builder, runner) -> float | None:
    """Build and time one schedule the way MetaSchedule measures its candidates (seconds)."""
    from tvm.s_tir import meta_schedule as ms

    mod = sch.mod
    built = builder.build([ms.builder.BuilderInput(mod, tvm_target)])[0]
    if built.error_msg:
        return None
    args = ms.arg_info.ArgInfo.from_entry_func(mod, remove_preproc=True)
    future = runner.run([ms.runner.RunnerInput(built.artifact_path, tvm_target.kind.name, args)])[0]
    result = future.result()
    if result.error_msg or not result.run_secs:
        return None
    return min(float(s) for s in result.run_secs)


# ---------------------------------------------------------------------------- the verb


def tune_model(ckpt: Checkpoint, target: Target, sparsity: SparsityConfig | None = None,
               cfg: TuneConfig = TuneConfig(), database: str | Path | None = None,
               device: Device | None = None, batch: int = 1, log: Log = print) -> TuneReport:
    if target.device != "cpu":
        raise EdgeVitError(f"target '{target.name}' is a {target.device} target; `edgevit tune` tunes CPU "
                           "targets (GPU kernels use dlight's schedules)")
    if not target.runs_here and (device is None or device.rpc is None):
        raise EdgeVitError(f"target '{target.name}' ({target.arch}) does not run on this machine; tune on the "
                           "device: --rpc HOST:PORT --key KEY (see `edgevit emulator start`)")
    start = time.perf_counter()
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)   # its per-round tables
    path = Path(database) if database else database_dir(target)
    db = open_database(path)
    tvm_target = target.tvm_target()
    builder, runner = _builder(target, cfg), _runner(cfg, device)   # an unreachable device fails first
    tasks = model_tasks(ckpt, target, sparsity, batch)
    log(f"measuring edgevit's default schedule of {len(tasks)} kernels on {device.label if device else 'this machine'}")
    progress = _load_progress(path)
    defaults = [_record_default(task, db, tvm_target, builder, runner, device is None, progress) for task in tasks]
    _save_progress(path, progress)
    chosen = select_kernels([(d or 0.0) * t.weight for d, t in zip(defaults, tasks)], cfg.cover)
    log(f"tuning the {len(chosen)} slowest kernels ({cfg.cover:.0%} of the default kernel time), "
        f"{cfg.trials_per_kernel} trials each, into {path}")
    results = {}
    for n, i in enumerate(chosen, 1):
        results[i] = _tune_task(tasks[i], n, len(chosen), db, path, tvm_target, builder, runner, cfg, log,
                                progress)
        done = _report(target, path, tasks, defaults, db, results)
        log(f"  model kernel time so far: default {done.estimate_ms('default_ms'):.3f} ms -> "
            f"tuned {done.estimate_ms('best_ms'):.3f} ms ({n}/{len(chosen)} kernels)")
    report = _report(target, path, tasks, defaults, db, results)
    return TuneReport(report.target, report.database, report.kernels, time.perf_counter() - start)


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


def _report(target, path, tasks, defaults, db, results) -> TuneReport:
    kernels = []
    for i, task in enumerate(tasks):
        if i in results:
            kernels.append(results[i])
            continue
        records = db.get_top_k(db.commit_workload(task.dispatched[0]), 1 << 20)
        kernels.append(KernelResult(task.task_name, int(task.weight), defaults[i], _best_ms(records), len(records)))
    return TuneReport(target.name, str(path), kernels)


PROGRESS = "edgevit_progress.json"   # per kernel: default time and trials searched (for resume)


def _kernel_key(mod) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(mod))


def _load_progress(path: Path) -> dict:
    try:
        return json.loads((path / PROGRESS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _save_progress(path: Path, progress: dict) -> None:
    from edgevit.fileio import write_json

    write_json(path / PROGRESS, progress)


def _record_default(task, db, tvm_target, builder, runner, local: bool, progress: dict) -> float | None:
    """edgevit's default schedule of a kernel, measured once: committed as a tuning record when a
    rule scheduled it, and its time kept in the progress file so a resumed run picks the same
    kernels to tune."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    mod = task.dispatched[0]
    entry = progress.setdefault(_kernel_key(mod), {"name": task.task_name, "default_ms": None, "trials": 0})
    if entry["default_ms"] is not None:
        return entry["default_ms"]
    sch = _default_schedule(task, tvm_target)
    measured = sch or s_tir.Schedule(mod)     # no rule fits: TVM's own lowering is the default
    secs = measure_locally(measured.mod, tvm_target) if local else measure_schedule(measured, task, tvm_target,
                                                                                    builder, runner)
    if secs is None:
        return None
    if sch is not None:
        workload = db.commit_workload(mod)
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, [secs], tvm_target, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    entry["default_ms"] = secs * 1e3
    return entry["default_ms"]


def measure_locally(mod, tvm_target, number: int = 3, repeat: int = 5) -> float | None:
    """Build a scheduled kernel in this process and time it on random inputs (seconds, median)."""
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    try:
        lib = tvm.compile(mod, target=tvm_target).mod
    except Exception:  # noqa: BLE001 - an unbuildable schedule is no default
        return None
    args = [tvm.runtime.tensor(np.random.default_rng(0).standard_normal([int(d) for d in a.shape]).astype(a.dtype))
            if "float" in a.dtype else tvm.runtime.tensor(np.zeros([int(d) for d in a.shape], a.dtype))
            for a in ms.arg_info.ArgInfo.from_prim_func(mod["main"])]
    timer = lib.time_evaluator(lib.entry_name if hasattr(lib, "entry_name") else "main", tvm.cpu(),
                               number=number, repeat=repeat, min_repeat_ms=5)
    return float(np.median(timer(*args).results))


def _tune_task(task, n, total, db, path: Path, tvm_target, builder, runner, cfg: TuneConfig, log: Log,
               progress: dict) -> KernelResult:
    from tvm.s_tir import meta_schedule as ms

    mod = task.dispatched[0]
    workload = db.commit_workload(mod)
    records = db.get_top_k(workload, 1 << 20)
    entry = progress[_kernel_key(mod)]
    default_ms = entry["default_ms"]
    remaining = cfg.trials_per_kernel - entry["trials"]
    label = f"[{n}/{total}] {task.task_name} x{task.weight}"
    if remaining > 0:
        log(f"{label}: searching {remaining} candidates (default {default_ms or float('nan'):.4f} ms)")
        contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [task], str(path / "logs"), num_threads=1, seed=cfg.seed + n)
        if contexts:
            ms.tune.tune_tasks(tasks=contexts, task_weights=[1.0], work_dir=str(path / "logs"),
                               max_trials_global=remaining, max_trials_per_task=remaining,
                               num_trials_per_iter=min(cfg.trials_per_round, remaining), builder=builder,
                               runner=runner, database=db, cost_model=cfg.cost_model)
        entry["trials"] += remaining
        _save_progress(path, progress)
    records = db.get_top_k(workload, 1 << 20)
    best = _best_ms(records)
    log(f"{label}: best {best:.4f} ms after {len(records)} records" if best else f"{label}: no valid schedule found")
    return KernelResult(task.task_name, int(task.weight), default_ms, best, len(records))


def _best_ms(records) -> float | None:
    times = [min(float(s) for s in r.run_secs) for r in records if r.run_secs]
    times = [t for t in times if t < 1e9]
    return min(times) * 1e3 if times else None
