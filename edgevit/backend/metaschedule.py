"""MetaSchedule mechanics for `tune`: the fused kernels of a Relax module as tasks, edgevit's
default schedule of a kernel, builders and runners (here or on a device over RPC), and timing
one schedule the way MetaSchedule times its candidates."""

from __future__ import annotations

import functools

from edgevit.backend.runtime import Device, connect
from edgevit.errors import DeviceError
from edgevit.targets import Target


def extract_tasks(mod, target: Target) -> list:
    """The fused kernels `compile` would build from `mod` (same fast-math, legalize and fusion
    passes), so the database's structural-hash lookup finds them at compile time."""
    from tvm.s_tir import meta_schedule as ms

    from edgevit.backend.schedules import fused_module

    tvm_target = target.tvm_target()
    return list(ms.relax_integration.extract_tasks(fused_module(mod, tvm_target), tvm_target))


def default_schedule(task, tvm_target):
    """edgevit's rule-based schedule of the task's kernel (None if no rule applies)."""
    from edgevit.backend.cpu_rules import cpu_rules

    func = task.dispatched[0]["main"]
    for rule in cpu_rules():
        try:
            sch = rule.apply(func, tvm_target, False)
        except Exception:  # noqa: BLE001 - a rule that does not fit declines
            continue
        if sch is not None:
            return sch
    return None


def make_builder(target: Target, timeout_s: float):
    from tvm.s_tir import meta_schedule as ms

    from edgevit.backend.schedules import export_kernel_library

    export = functools.partial(export_kernel_library, cross_compiler=target.check_cross_compiler())
    return ms.builder.LocalBuilder(max_workers=1, timeout_sec=timeout_s, f_export=export)


def make_runner(device: Device | None, timeout_s: float, number: int, repeat: int, min_repeat_ms: int):
    """A local runner, or an RPC runner for `device` (checked reachable first)."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                          enable_cpu_cache_flush=False)
    if device is None or device.rpc is None:
        return ms.runner.LocalRunner(timeout_sec=timeout_s, evaluator_config=evaluator)
    try:
        connect(device)  # a session proves the tracker is up and the key is registered
    except DeviceError as e:
        raise DeviceError(f"{e}; tuning measures on the device, so it must be reachable") from None
    host, _, port = device.rpc.rpartition(":")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port), tracker_key=device.key,
                                 session_timeout_sec=int(timeout_s))
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)


def measure_schedule(sch, tvm_target, builder, runner) -> float | None:
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


def measure_default(task, db, tvm_target, builder, runner, local: bool) -> float | None:
    """edgevit's default schedule of a kernel, timed (seconds; TVM's own lowering when no rule
    fits) and committed to `db` as a tuning record when a rule scheduled it, so a search starts
    from it and a tuned build is never slower than the untuned one."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms

    mod = task.dispatched[0]
    sch = default_schedule(task, tvm_target)
    measured = sch or s_tir.Schedule(mod)
    secs = measure_locally(measured.mod, tvm_target) if local else measure_schedule(measured, tvm_target,
                                                                                    builder, runner)
    if secs is not None and sch is not None:
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(mod), [secs], tvm_target, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
    return secs


def unsearchable(task) -> str | None:
    """Why MetaSchedule's space cannot hold the kernel (None: it can). edgevit's fused
    attention computes several dependent reductions per row tile, which its multi-level tiling
    rules cannot express (generating its space fails in reverse_compute_at)."""
    from edgevit.backend.attention import ATTR

    attrs = task.dispatched[0]["main"].attrs
    if attrs is not None and ATTR in attrs:
        return "fused attention: MetaSchedule's tiling rules cannot express it"
    return None


def search_task(task, trials: int, per_round: int, seed: int, db, work_dir: str, builder, runner,
                cost_model: str) -> None:
    """Run MetaSchedule's evolutionary search on one kernel for `trials` candidates into `db`."""
    from tvm.s_tir import meta_schedule as ms

    contexts, _ = ms.relax_integration.extracted_tasks_to_tune_contexts([task], work_dir, num_threads=1, seed=seed)
    if contexts:
        ms.tune.tune_tasks(tasks=contexts, task_weights=[1.0], work_dir=work_dir, max_trials_global=trials,
                           max_trials_per_task=trials, num_trials_per_iter=min(per_round, trials), builder=builder,
                           runner=runner, database=db, cost_model=cost_model)


def kernel_records(task, db) -> list:
    return db.get_top_k(db.commit_workload(task.dispatched[0]), 1 << 20)


def kernel_key(task) -> str:
    import tvm_ffi

    return str(tvm_ffi.structural_hash(task.dispatched[0]))


def best_ms(records) -> float | None:
    times = [min(float(s) for s in r.run_secs) for r in records if r.run_secs]
    times = [t for t in times if t < 1e9]
    return min(times) * 1e3 if times else None
