"""Latency measurement as benchmark users expect it (trtexec, onnxruntime_perf_test, MLPerf):
warm-up excluded, one timestamp per call, percentiles from per-call samples."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def measure(fn: Callable[[], object], *, warmup: int = 3, min_runs: int = 10, min_seconds: float = 1.0,
            max_runs: int = 1000) -> dict[str, float]:
    """Call `fn` until both `min_runs` calls and `min_seconds` have passed; stats in ms."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def summarize(samples_ms: list[float]) -> dict[str, float]:
    s = sorted(samples_ms)
    mean = statistics.fmean(s)
    std = statistics.stdev(s) if len(s) > 1 else 0.0

    def pct(p: float) -> float:
        return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]
    return {"n": len(s), "min": s[0], "mean": mean, "median": statistics.median(s), "p90": pct(90),
            "p99": pct(99), "max": s[-1], "std": std, "cv": std / mean if mean else 0.0}
