"""Refit a profiled latency table's rows three ways and score each on its validation rows.

The validation configs were measured after the profile and never enter a fit, so this compares
the predictors on held-out timings without building anything:
- `ms sum`: measured - dense timed alongside, in ms, is the sum of the deltas (the first fit);
- `ratio sum`: measured / dense timed alongside - 1 is the sum of fractions of dense;
- `ratio product`: measured / dense timed alongside is the product of per-unit factors
  (`edgevit.latency.fit_table`'s default).

    python benchmarks/predictor_fits.py runs/latency/swin_t-host.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace

import numpy as np

from edgevit.errors import EdgeVitError
from edgevit.latency import LatencyTable, fit_table
from edgevit.sparsity import keep_count


def fit_in_ms(table: LatencyTable) -> LatencyTable:
    """The difference fit, as `fit_table` first did: y = measured - dense, summed."""
    rows = [dict(r, measured_ms=table.dense_ms + r["measured_ms"] - r["dense_ms"], dense_ms=table.dense_ms)
            for r in table.measurements]
    return replace(fit_table(table.key, table.windows, table.dense_ms, rows, combine="sum"),
                   measurements=table.measurements)


def score(table: LatencyTable, validation: list[dict], scale_to_dense_now: bool) -> dict:
    """Absolute percentage errors on the validation rows, against the table's dense latency or
    (scale_to_dense_now) against the dense model timed beside each config."""
    errors = []
    for row in validation:
        keep = tuple(keep_count(n, r) for n, r in zip(table.windows, row["ratios"]))
        predicted = table.predict(keep)
        if scale_to_dense_now:
            predicted *= row["dense_now_ms"] / table.dense_ms
        errors.append(abs(predicted - row["measured_ms"]) / row["measured_ms"] * 100)
    return {"mape": round(statistics.fmean(errors), 2), "max": round(max(errors), 2),
            "within_10pct": round(100 * float(np.mean(np.array(errors) <= 10)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("table")
    args = ap.parse_args()
    try:
        table = LatencyTable.load(args.table)
    except EdgeVitError as e:
        raise SystemExit(f"error: {e}") from None
    if not table.measurements or not table.validation:
        raise SystemExit(f"{args.table}: needs measured rows and a validation (`edgevit profile --validate N`)")
    validation = table.validation["rows"]
    dense = statistics.median(r["dense_ms"] for r in table.measurements)
    fits = (("ms sum", fit_in_ms(replace(table, dense_ms=dense))),
            ("ratio sum", fit_table(table.key, table.windows, dense, table.measurements, combine="sum")),
            ("ratio product", fit_table(table.key, table.windows, dense, table.measurements)))
    report = {}
    for name, fitted in fits:
        report[name] = {"absolute": score(fitted, validation, False), "vs_dense_alongside": score(fitted, validation, True)}
        a, s = report[name]["absolute"], report[name]["vs_dense_alongside"]
        print(f"{name:13s} fit: mean abs error {a['mape']:.2f}% (max {a['max']:.2f}%, {a['within_10pct']:.0f}% within "
              f"+-10%); against the dense model timed alongside {s['mape']:.2f}% (max {s['max']:.2f}%)")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
