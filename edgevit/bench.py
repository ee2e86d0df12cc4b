"""`bench`: latency of a compiled artifact on its device (here, or over TVM RPC), as benchmark
users expect it (trtexec, onnxruntime_perf_test, MLPerf): warm-up excluded, one sample per
call timed on the device itself (TVM's time_evaluator with one call per repeat, so the device
is synchronised every call and RPC round trips are not counted), percentiles only where there
are enough samples to claim them (MLPerf: >= 64 for p90, >= 662 for p99), and an environment
record saying what was measured where."""

from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgevit.artifact import MANIFEST, CompiledArtifact
from edgevit.backend.runtime import Device, Session
from edgevit.errors import ConfigError, DataError, EdgeVitError
from edgevit.fileio import read_artifact, write_json
from edgevit.stages import StageRun
from edgevit.verify import open_session

BENCH_KIND = "edgevit.bench_result"
MIN_SAMPLES = {"p90": 64, "p95": 64, "p99": 662}   # MLPerf's early-stopping minimums
HIGH_COV = 0.10                                     # a coefficient of variation above this is flagged
Log = Callable[[str], None]


@dataclass(frozen=True)
class BenchConfig:
    duration_s: float = 10.0    # timed seconds (after warm-up), at least ...
    min_runs: int = 100         # ... this many calls
    warmup_s: float = 2.0
    max_runs: int = 100_000
    data: str | None = None     # a data spec: also run the artifact over its test split for top-1
    batches: tuple[int, ...] = ()   # batch sizes to measure, each for the whole duration (empty: the artifact's own)

    def __post_init__(self):
        if not self.duration_s >= 0 or not self.warmup_s >= 0 or self.min_runs < 1 or self.max_runs < self.min_runs:
            raise ValueError("duration and warm-up must be >= 0 s, min_runs >= 1 and max_runs >= min_runs")
        if any(b < 1 for b in self.batches) or len(set(self.batches)) != len(self.batches):
            raise ValueError(f"batches {list(self.batches)} must be distinct sizes >= 1")


@dataclass(frozen=True)
class BenchResult:
    artifact: str
    latency_ms: dict            # n, min, mean, median, p90, p95, p99, max, std, cov (None where invalid)
    validity: dict              # per percentile: valid, samples needed
    throughput_ips: float       # images per second at the mean latency
    batch: int
    artifact_bytes: int
    peak_rss_mb: float | None   # this process's peak resident memory (local runs only)
    environment: dict
    warnings: list[str]
    accuracy: dict | None = None
    config: dict | None = None
    samples_ms: list[float] = field(default_factory=list, repr=False)   # every timed call, in order
    gate: dict | None = None    # the verdict against a baseline or budget (bench --baseline/--against/--budget)
    by_batch: list[dict] = field(default_factory=list)   # bench --batch 1,8: batch, latency_ms, validity,
                                                         # throughput_ips of each (the fields above: the first)

    def to_dict(self) -> dict:
        return {"kind": BENCH_KIND, "version": 1, **asdict(self)}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "BenchResult":
        d = read_artifact(path, BENCH_KIND, "write one with `edgevit bench`")
        names = {f.name for f in fields(cls)}
        samples, lat = d.get("samples_ms", []), d.get("latency_ms")
        if not isinstance(samples, list) or not all(_finite_ms(v) for v in samples) or not isinstance(lat, dict) \
                or not _finite_ms(lat.get("median")):
            raise EdgeVitError(f"{path}: damaged bench result (latency_ms and samples_ms must hold positive "
                               "finite times); measure again with `edgevit bench`")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise EdgeVitError(f"{path}: damaged bench result ({e}); measure again with `edgevit bench`") from None

    def markdown(self) -> str:
        """A table for CI job summaries."""
        lat = self.latency_ms
        cell = (lambda k: f"{lat[k]:.3f}" if lat.get(k) is not None else "n/a (too few samples)")
        rows = [("samples", str(lat["n"])), *[(k, cell(k)) for k in ("min", "mean", "median", "p90", "p95", "p99",
                                                                      "max", "std")],
                ("CoV", f"{lat['cov']:.1%}"), ("throughput", f"{self.throughput_ips:.1f} img/s"),
                ("artifact", f"{self.artifact_bytes / 1e6:.2f} MB")]
        if self.accuracy:
            rows.append(("top-1", f"{self.accuracy['top1']:.2f}% on {self.accuracy['images']} {self.accuracy['data']}"))
        env = self.environment
        head = f"**{Path(self.artifact).name}** on {env.get('device')} ({env.get('cpu') or env.get('target')})"
        lines = [head, "", "| metric | ms |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
        if self.by_batch:
            lines += ["", "| batch | median ms | p90 ms | img/s |", "|---|---|---|---|"]
            lines += [f"| {r['batch']} | {r['latency_ms']['median']:.3f} | "
                      + (f"{r['latency_ms']['p90']:.3f}" if r["latency_ms"].get("p90") is not None else "n/a")
                      + f" | {r['throughput_ips']:.1f} |" for r in self.by_batch]
        lines += [f"> warning: {w}" for w in self.warnings]
        if self.gate is not None:
            lines += ["", f"**gate: {'pass' if self.gate['pass'] else 'FAIL (' + ', '.join(self.gate['failures']) + ')'}**"]
            lines += [f"- {name}: {describe_check(name, check)}" for name, check in self.gate["checks"].items()]
        return "\n".join(lines) + "\n"


def describe_check(name: str, c: dict) -> str:
    if name == "latency":
        return (f"median x{c['ratio']:.3f} of the baseline, Mann-Whitney p = {c['p_value']:.2g} "
                f"(regression: > x{c['factor']:g} and p < {c['alpha']:g})")
    if name == "accuracy":
        return f"top-1 {c['head']:.2f}% vs {c['baseline']:.2f}% (drop {c['drop']:+.2f}, allowed {c['max_drop']:g})"
    value = "n/a (too few samples)" if c["value_ms"] is None else f"{c['value_ms']:.3f} ms"
    return f"{c['stat']} {value} vs budget {c['limit_ms']:g} ms"


def _finite_ms(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and v != float("inf")


def summarize(samples_ms: list[float]) -> tuple[dict, dict]:
    """Statistics of per-call samples, and which percentiles their count can support."""
    x = np.asarray(samples_ms, dtype=np.float64)
    mean, std = float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0
    stats = {"n": int(len(x)), "min": float(x.min()), "mean": mean, "median": float(np.median(x)),
             "max": float(x.max()), "std": std, "cov": std / mean if mean else 0.0}
    validity = {}
    for name, need in MIN_SAMPLES.items():
        ok = len(x) >= need
        stats[name] = float(np.percentile(x, float(name[1:]))) if ok else None
        validity[name] = {"valid": ok, "samples_needed": need}
    return stats, validity


def sample(sessions: list[Session], inputs: list[np.ndarray], cfg: BenchConfig, chunk: int = 64
           ) -> list[list[float]]:
    """Per-call latencies (ms) of each session: warm-up calls first (not kept), then chunks of
    calls, the sessions in turn (several: interleaved, so drift hits them alike), until both the
    duration and the minimum count are reached."""
    warm_end = time.perf_counter() + cfg.warmup_s
    while True:
        for s, x in zip(sessions, inputs):
            s.time_ms(x, number=1, repeat=1)
        if time.perf_counter() >= warm_end:
            break
    samples: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(samples[0]) < cfg.max_runs and (len(samples[0]) < cfg.min_runs
                                              or time.perf_counter() - start < cfg.duration_s):
        n = min(chunk, cfg.max_runs - len(samples[0]))
        for s, x, out in zip(sessions, inputs, samples):
            out.extend(s.time_ms(x, number=1, repeat=n))
    return samples


def bench(artifact: CompiledArtifact, cfg: BenchConfig = BenchConfig(), rpc: str | None = None,
          key: str | None = None, timeout: float = 60.0, log: Log = print) -> BenchResult:
    """One artifact on its device; with several `cfg.batches`, each measured in turn, the first
    in the result's main fields (the one a gate judges) and all of them in `by_batch`."""
    batches = check_batches(artifact, cfg.batches)
    session = open_session(artifact, rpc, key, timeout)
    per_batch = []
    for batch in batches:
        start = time.perf_counter()
        samples = sample([session], [batch_input(artifact, batch)], cfg)[0]
        log(f"batch {batch}: {len(samples)} calls in {time.perf_counter() - start - cfg.warmup_s:.1f} s after "
            f"{cfg.warmup_s:g} s of warm-up")
        per_batch.append(samples)
    result = _result(artifact, per_batch[0], cfg, session.device, log, session, batches[0])
    if len(batches) == 1:
        return result
    summaries = [_batch_summary(b, s) for b, s in zip(batches, per_batch)]
    extra_warnings = [f"batch {row['batch']}: {w}" for row in summaries[1:]
                      for w in sample_warnings(row["latency_ms"], row["validity"])]
    return replace(result, by_batch=summaries, warnings=result.warnings + extra_warnings)


def check_batches(artifact: CompiledArtifact, wanted: tuple[int, ...]) -> tuple[int, ...]:
    """The batch sizes to measure (default: the artifact's own); one it has no function for, named."""
    have = artifact.manifest.batches
    missing = [b for b in wanted if b not in have]
    if missing:
        raise ConfigError(f"{artifact.path} runs batch {', '.join(map(str, have))}, not {', '.join(map(str, missing))}; "
                          f"compile it with --batch {','.join(map(str, (*have, *missing)))}")
    return tuple(wanted) or have[:1]


def batch_input(artifact: CompiledArtifact, batch: int) -> np.ndarray:
    """A batch of `batch` inputs: the reference batch, repeated or cut to size."""
    x = artifact.reference()[0]
    return np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])))


def _batch_summary(batch: int, samples: list[float]) -> dict:
    stats, validity = summarize(samples)
    return {"batch": batch, "latency_ms": stats, "validity": validity, "throughput_ips": batch * 1e3 / stats["mean"]}


def accuracy_on(session: Session, artifact: CompiledArtifact, spec: str, log: Log) -> dict:
    """Top-1 of the compiled artifact itself over the test split of `spec` (whole batches)."""
    from edgevit.data import batches, load_data

    m = artifact.manifest
    batch, size = m.batch, m.input_shape[-1]
    data = load_data(spec, size)
    if data.channels != m.input_shape[1]:
        raise DataError(f"{spec} has {data.channels}-channel images and the artifact takes {m.input_shape[1]}; "
                        "pass the data set the model was trained on")
    mean, std = m.input.get("mean") or data.mean, m.input.get("std") or data.std
    correct = seen = 0
    for x, y in batches(data.test, mean, std, batch):
        if len(x) < batch:
            break
        correct += int((session.run(x.numpy()).argmax(1) == y.numpy()).sum())
        seen += len(y)
    top1 = 100.0 * correct / max(seen, 1)
    log(f"top-1 of the compiled artifact on {seen} {spec} test images: {top1:.2f}%")
    return {"data": spec, "split": "test", "images": seen, "top1": top1}


def environment(artifact: CompiledArtifact, device: Device) -> dict:
    """What was measured where: enough to tell two benchmark results apart."""
    from edgevit import __version__

    versions = {"edgevit": __version__, "numpy": np.__version__, "python": platform.python_version()}
    try:
        import tvm

        versions["tvm"] = tvm.__version__
    except ImportError:  # pragma: no cover - a device with only the runtime
        pass
    env = {"device": device.label, "target": artifact.manifest.target.get("name"),
           "manifest_sha256": hashlib.sha256((artifact.path / MANIFEST).read_bytes()).hexdigest(),
           "versions": versions}
    if device.rpc is None:
        env.update(host_environment())
    return env


def host_environment() -> dict:
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == (platform.processor() or platform.machine()):
                cpu = value.strip()
            if key.strip() in ("flags", "Features") and not flags:
                wanted = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "fma", "neon", "asimd"}
                flags = sorted(set(value.split()) & wanted)
    except OSError:
        pass
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    mhz = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")
    from edgevit.backend.threads import physical_cores  # importing the backend sets TVM_NUM_THREADS

    return {"cpu": cpu, "cpu_flags": flags, "logical_cores": os.cpu_count(), "physical_cores": physical_cores(),
            "threads": _int_or_text(os.environ.get("TVM_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")),
            "governor": governor, "clock_mhz": round(int(mhz) / 1000) if mhz and mhz.isdigit() else None,
            "arch": platform.machine(), "os": platform.platform()}


def _int_or_text(value: str | None):
    """A thread count as the environment gives it: an int, or the text when it is not one."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / 1024 if platform.system() != "Darwin" else kb / 2**20, 1)


def default_out(artifact_dir: str | Path) -> Path:
    path = Path(artifact_dir)
    return path.with_name(path.name + ".bench.json")


# ---------------------------------------------------------------------------- the regression gate


@dataclass(frozen=True)
class GateConfig:
    """When a head artifact fails against a baseline (asv's rule: slower by more than `factor`
    AND significantly so, Mann-Whitney U p < `alpha`), loses accuracy, or misses a budget."""

    factor: float = 1.10             # median latency ratio head / baseline that counts as a regression
    alpha: float = 0.002             # significance of the one-sided Mann-Whitney U test
    max_accuracy_drop: float = 0.5   # points of top-1 the head may lose against the baseline
    budget: str | None = None        # e.g. "p90<=20ms"

    def __post_init__(self):
        if not self.factor >= 1.0 or not 0 < self.alpha < 1 or not self.max_accuracy_drop >= 0:
            raise ValueError("factor must be >= 1, alpha in (0, 1) and max_accuracy_drop >= 0")
        if self.budget is not None:
            parse_latency_budget(self.budget)


STATS = ("min", "mean", "median", "p90", "p95", "p99", "max")


def parse_latency_budget(text: str) -> tuple[str, float]:
    """'p90<=20ms' -> ('p90', 20.0): a statistic of the per-call latency and its limit in ms."""
    import re

    from edgevit.search import parse_budget

    m = re.fullmatch(r"\s*(\w+)\s*<=?\s*(.+)", text)
    if not m or m.group(1) not in STATS:
        raise ConfigError(f"--budget {text!r} is not STAT<=LATENCY with STAT one of {', '.join(STATS)}; "
                          "write e.g. p90<=20ms")
    return m.group(1), parse_budget(m.group(2))


def mann_whitney_p(head: list[float], base: list[float]) -> float:
    """One-sided p-value that head's latencies are larger than base's (scipy's Mann-Whitney U)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(head, base, alternative="greater").pvalue)


def gate(head: BenchResult, base: BenchResult | None, cfg: GateConfig) -> dict:
    """The verdict of `head` against `base` (None: the budget alone): each check with its
    figures, and the failures in the order their exit codes rank (latency, accuracy, budget)."""
    checks, failures = {}, []
    if base is not None:
        if not head.samples_ms or not base.samples_ms:
            raise ConfigError("a bench result without per-call samples cannot be compared; measure it again")
        if head.batch != base.batch:
            raise ConfigError(f"the baseline was measured at batch {base.batch}, this artifact at batch {head.batch}; "
                              f"measure both at one batch size (--batch {base.batch})")
        ratio = head.latency_ms["median"] / base.latency_ms["median"]
        p = mann_whitney_p(head.samples_ms, base.samples_ms)
        slower = ratio > cfg.factor and p < cfg.alpha
        checks["latency"] = {"ratio": ratio, "p_value": p, "factor": cfg.factor, "alpha": cfg.alpha,
                             "regressed": slower}
        if slower:
            failures.append("latency")
        if head.accuracy and base.accuracy:
            drop = base.accuracy["top1"] - head.accuracy["top1"]
            checks["accuracy"] = {"head": head.accuracy["top1"], "baseline": base.accuracy["top1"], "drop": drop,
                                  "max_drop": cfg.max_accuracy_drop, "regressed": drop > cfg.max_accuracy_drop}
            if drop > cfg.max_accuracy_drop:
                failures.append("accuracy")
    if cfg.budget is not None:
        stat, limit = parse_latency_budget(cfg.budget)
        value = head.latency_ms.get(stat)
        checks["budget"] = {"stat": stat, "limit_ms": limit, "value_ms": value,
                            "met": value is not None and value <= limit}
        if not checks["budget"]["met"]:
            failures.append("budget")
    return {"checks": checks, "failures": failures, "pass": not failures}


def bench_pair(head: CompiledArtifact, base: CompiledArtifact, cfg: BenchConfig = BenchConfig(),
               rpc: str | None = None, key: str | None = None, timeout: float = 60.0,
               log: Log = print) -> tuple[BenchResult, BenchResult]:
    """Both artifacts measured in alternating chunks of calls in one run, so a machine that
    slows down or speeds up mid-run moves both alike."""
    if len(cfg.batches) > 1:
        raise ConfigError(f"a gate compares one batch size, not {len(cfg.batches)}; pass one --batch with --against")
    batch = [check_batches(art, cfg.batches)[0] for art in (head, base)]
    if batch[0] != batch[1]:
        raise ConfigError(f"{head.path} runs batch {batch[0]} and {base.path} batch {batch[1]}; a gate compares one "
                          f"batch size: pass --batch N that both were compiled for")
    sessions = [open_session(art, rpc, key, timeout) for art in (head, base)]
    start = time.perf_counter()
    samples = sample(sessions, [batch_input(art, b) for art, b in zip((head, base), batch)], cfg, chunk=16)
    log(f"{len(samples[0])} calls each, interleaved in chunks of 16, in {time.perf_counter() - start:.1f} s")
    return tuple(_result(art, s, cfg, session.device, log, session, b)      # type: ignore[return-value]
                 for art, s, session, b in zip((head, base), samples, sessions, batch))


def _result(artifact: CompiledArtifact, samples: list[float], cfg: BenchConfig, device: Device, log: Log,
            session: Session | None = None, batch: int | None = None) -> BenchResult:
    stats, validity = summarize(samples)
    warnings = sample_warnings(stats, validity)
    batch = batch or artifact.manifest.batch
    accuracy = None
    if cfg.data:
        accuracy = accuracy_on(session or Session(device, artifact.library, artifact.weights), artifact, cfg.data, log)
    return BenchResult(str(artifact.path), stats, validity, batch * 1e3 / stats["mean"], batch, artifact.bytes,
                       _peak_rss_mb() if device.rpc is None else None, environment(artifact, device), warnings,
                       accuracy, {**asdict(cfg), "batches": list(cfg.batches)}, [round(v, 6) for v in samples])


def sample_warnings(stats: dict, validity: dict) -> list[str]:
    """A high coefficient of variation, and each percentile too few samples support."""
    warnings = [] if stats["cov"] <= HIGH_COV else [
        f"coefficient of variation {stats['cov']:.1%} > {HIGH_COV:.0%}: the machine was busy or its clock "
        "varied; pin clocks, stop other work and measure again"]
    return warnings + [f"{k} not reported: {stats['n']} samples, {v['samples_needed']} needed"
                       for k, v in validity.items() if not v["valid"]]


def gate_error(result: BenchResult):
    """The error (and exit code) of the first failed check, or None when the gate passes."""
    from edgevit.errors import AccuracyRegression, BudgetMiss, LatencyRegression

    if result.gate is None or result.gate["pass"]:
        return None
    first = result.gate["failures"][0]
    error = {"latency": LatencyRegression, "accuracy": AccuracyRegression, "budget": BudgetMiss}[first]
    return error(f"gate failed ({', '.join(result.gate['failures'])}): {describe_check(first, result.gate['checks'][first])}")


# ---------------------------------------------------------------------------- the recipe stage


@dataclass(frozen=True)
class BenchStageConfig:
    """The recipe's [bench] table: every artifact [compile] made that runs here is measured."""

    duration_s: float = 5.0
    min_runs: int = 100
    warmup_s: float = 1.0
    accuracy: bool = True        # also run each artifact over the recipe data's test split

    def __post_init__(self):
        BenchConfig(duration_s=self.duration_s, min_runs=self.min_runs, warmup_s=self.warmup_s)


def run_stage(run: StageRun) -> dict:
    """The `bench` recipe stage: OUT/bench/<target>.json per compiled artifact that runs on this
    machine (others are named with the command that measures them on their device); a result
    measured from the same artifact is kept unless --force."""
    cfg = run.config("bench")
    settings = BenchConfig(duration_s=cfg.duration_s, min_runs=cfg.min_runs, warmup_s=cfg.warmup_s,
                           data=run.recipe.data.spec if cfg.accuracy else None)
    out = {}
    folders = sorted(p for p in run.dir("compile").glob("*") if (p / MANIFEST).is_file())
    if not folders:
        raise EdgeVitError(f"{run.dir('compile')}: no compiled artifacts to measure; add 'compile' to the recipe's "
                           "stages or run it first")
    for folder in folders:
        artifact, path = CompiledArtifact.load(folder), run.dir("bench") / f"{folder.name}.json"
        if not _runs_here(artifact):
            run.log(f"bench {folder.name}: not this machine's; on the device: edgevit bench {folder} --rpc HOST:PORT")
            continue
        if not run.force and _measured_from(path, artifact):
            run.log(f"bench {folder.name}: up to date ({path})")
            result = BenchResult.load(path)
        else:
            result = bench(artifact, settings, log=run.log)
            result.save(path)
        lat = result.latency_ms
        run.log(f"bench {folder.name}: median {lat['median']:.3f} ms, p90 "
                f"{'n/a' if lat['p90'] is None else format(lat['p90'], '.3f')} ms over {lat['n']} calls"
                + (f", compiled top-1 {result.accuracy['top1']:.2f}%" if result.accuracy else "") + f" -> {path}")
        out[folder.name] = {"result": str(path), "median_ms": lat["median"], "p90_ms": lat["p90"],
                            "top1": result.accuracy["top1"] if result.accuracy else None}
    return out


def _runs_here(artifact: CompiledArtifact) -> bool:
    target = artifact.manifest.target
    return target["device"] == "cpu" and target["arch"] == platform.machine()


def _measured_from(path: Path, artifact: CompiledArtifact) -> bool:
    try:
        previous = BenchResult.load(path)
    except EdgeVitError:
        return False
    return previous.environment.get("manifest_sha256") == hashlib.sha256(
        (artifact.path / MANIFEST).read_bytes()).hexdigest()
