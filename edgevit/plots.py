"""The report's plots (matplotlib, imported inside each function so `import edgevit` stays light):
accuracy against latency (the search's Pareto front, the uniform-sparsity curve, measured
candidates, the chosen config; one colour per weight encoding, so quantized variants are more
series), latency per target, and per-target latency distributions from `bench`."""

from __future__ import annotations

from dataclasses import dataclass


def format_ratio(r: float) -> str:
    s = f"{r:g}"
    return s if "." in s or "e" in s else s + ".0"


def format_ratios(ratios: list[float]) -> str:
    return "[" + ", ".join(map(format_ratio, ratios)) + "]"

@dataclass(frozen=True)
class Series:
    """Points on the accuracy-latency plot. `role` sets the marker and line, `encoding` the colour,
    so variants of the model (one set of series per artifact encoding: fp32, and quantized schemes
    as they come) share one plot."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    role: str                       # front, uniform, measured, chosen
    encoding: str = "fp32"
    notes: tuple[str, ...] = ()     # per-point labels


ROLE_STYLE = {
    "front": {"marker": "o", "linestyle": "-", "drawstyle": "steps-post", "markersize": 5},
    "uniform": {"marker": "s", "linestyle": "--", "markersize": 5, "alpha": 0.6},
    "measured": {"marker": "x", "linestyle": "none", "markersize": 8},
    "chosen": {"marker": "*", "linestyle": "none", "markersize": 18, "markeredgecolor": "black", "zorder": 5},
}


def search_series(search: dict, encoding: str = "fp32") -> list[Series]:
    """A search result as plot series: its Pareto front and uniform baseline (predicted latency),
    the candidates measured on the target and the chosen config (measured latency)."""
    front = sorted(search["pareto"], key=lambda p: p["predicted_ms"])
    out = [Series("Pareto front (predicted)", _col(front, "predicted_ms"), _col(front, "val_top1"), "front", encoding)]
    uniform = sorted(search.get("uniform") or [], key=lambda u: u["predicted_ms"])
    if uniform:
        out.append(Series("uniform sparsity (predicted)", _col(uniform, "predicted_ms"), _col(uniform, "val_top1"),
                          "uniform", encoding, tuple(f"r={format_ratio(u['ratio'])}" for u in uniform)))
    measured = search.get("candidates_measured") or []
    if measured:
        out.append(Series("candidates (measured)", _col(measured, "measured_ms"), _col(measured, "val_top1"),
                          "measured", encoding))
    out.append(Series(f"chosen {format_ratios(search['sparsity']['ratios'])}: measured {search['measured_ms']:.3f} ms "
                      f"(predicted {search['predicted_ms']:.3f})", (search["measured_ms"],), (search["val_top1"],),
                      "chosen", encoding))
    return out


def _col(rows: list[dict], key: str) -> tuple[float, ...]:
    return tuple(float(r[key]) for r in rows)


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas: no pyplot, no global backend, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colours(encodings) -> dict[str, str]:
    return {e: f"C{i % 10}" for i, e in enumerate(dict.fromkeys(encodings))}


def plot_accuracy_latency(series: list[Series], budget_ms: float, target: str):
    fig = _figure(8.5, 5.5)
    ax = fig.add_subplot()
    colour = _colours(s.encoding for s in series)
    several = len(colour) > 1
    for s in series:
        label = f"{s.label} [{s.encoding}]" if several else s.label
        ax.plot(s.x, s.y, label=label, color=colour[s.encoding], **ROLE_STYLE[s.role])
        for x, y, note in zip(s.x, s.y, s.notes):
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, -11), fontsize=7, color="dimgray")
    xmax = max((x for s in series for x in s.x), default=budget_ms)
    if budget_ms <= 2 * xmax:
        ax.axvline(budget_ms, color="crimson", linestyle=":", linewidth=1.5, label=f"budget {budget_ms:g} ms")
    else:   # a generous budget far to the right would squash every point against the axis
        ax.plot([], [], color="crimson", linestyle=":", label=f"budget {budget_ms:g} ms (off scale, right)")
    ax.set_xlabel(f"latency on {target} (ms per call)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(f"Accuracy against latency on {target}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return fig


def plot_latency_targets(targets: dict):
    """Median per target, whisker to p90 where the sample count supports it."""
    names = [n for n, t in targets.items() if "bench" in t]
    lat = [targets[n]["bench"]["latency_ms"] for n in names]
    encodings = [(targets[n].get("artifact") or {}).get("encoding", "fp32") for n in names]
    colour = _colours(encodings)
    fig = _figure(max(5.0, 1.3 * len(names) + 2.5), 4.5)
    ax = fig.add_subplot()
    medians = [v["median"] for v in lat]
    upper = [(v["p90"] - v["median"]) if v.get("p90") is not None else 0.0 for v in lat]
    ax.bar(names, medians, yerr=[[0.0] * len(names), upper], capsize=8, color=[colour[e] for e in encodings],
           error_kw={"elinewidth": 1.5})
    for i, v in enumerate(lat):
        note = f"{v['median']:.3f} ms" + ("" if v.get("p90") is not None else "\n(p90 n/a)")
        ax.annotate(note, (i, v["median"] + upper[i]), textcoords="offset points", xytext=(0, 4), ha="center",
                    fontsize=8)
    if min(medians) > 0 and max(medians) / min(medians) > 10:   # else the fast targets' bars vanish
        ax.set_yscale("log")
    ax.set_ylabel("latency per call (ms)")
    ax.set_title("Median latency per target (whisker: p90)")
    ax.margins(y=0.15)
    if len(colour) > 1:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c, label=e) for e, c in colour.items()], fontsize=8)
    return fig


def plot_latency_distribution(targets: dict, samples_ms: dict):
    """One histogram per target (each on its own scale: targets differ by orders of magnitude)."""
    names = [n for n, s in samples_ms.items() if len(s) > 1]
    fig = _figure(8.0, 2.4 * len(names) + 0.6)
    for i, name in enumerate(names):
        latency_histogram(fig.add_subplot(len(names), 1, i + 1), name, samples_ms[name], targets[name]["bench"])
    return fig


def latency_histogram(ax, name: str, samples_ms: list[float], bench: dict) -> None:
    import numpy as np

    x = np.asarray(samples_ms)
    lat, cut = bench["latency_ms"], histogram_cut(x)
    ax.hist(x[x <= cut], bins=min(60, max(10, len(x) // 20)), color="C0", alpha=0.8)
    for key, style in (("median", "-"), ("p90", "--"), ("p99", ":")):
        if lat.get(key) is not None:
            off = " (beyond the axis)" if lat[key] > cut else ""
            ax.axvline(lat[key], color="black", linestyle=style, linewidth=1.2, label=f"{key} {lat[key]:.3f} ms{off}")
    pad = 0.02 * (cut - x.min()) or 0.01 * cut
    ax.set_xlim(x.min() - pad, cut + pad)
    unclaimed = [f"{k} n/a: needs {v['samples_needed']}" for k, v in bench["validity"].items() if not v["valid"]]
    beyond = int((x > cut).sum())
    notes = [f"{len(x)} calls", f"CoV {lat['cov']:.1%}", *unclaimed[:1]]
    if beyond:
        notes.append(f"{beyond} slower call{'s' if beyond > 1 else ''} (up to {x.max():.3f} ms) not shown")
    ax.set_title(f"{name}: " + ", ".join(notes), fontsize=10)
    ax.set_xlabel("latency per call (ms)")
    ax.set_ylabel("calls")
    ax.legend(fontsize=8)


def histogram_cut(x) -> float:
    """Where the histogram's axis ends: past the slowest call, unless stray calls lie far out
    (beyond the third quartile + 5 interquartile ranges, Tukey's far-out fence widened), which
    would squash the distribution into one bar; the title counts them."""
    import numpy as np

    q1, q3 = np.quantile(x, [0.25, 0.75])
    return float(x[x <= q3 + 5 * (q3 - q1)].max())
