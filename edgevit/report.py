"""`report`: one page on a recipe run folder, every stage's figures side by side.

Reads whatever the run folder holds: the trained and adapted checkpoints, eval/results.json,
the latency table, the search result, compiled artifacts under compile/<target>/ and their
benchmarks under bench/<target>.json. Every part is optional; the report lists what is missing
(and what is there but unreadable) instead of failing. Writes report.md (Markdown tables),
report.json (every figure), PNG plots where the data allows them, and index.html: one
self-contained page, the plots embedded as data URIs, no script and nothing fetched, so it
opens offline and travels as one file (a CI artifact, an e-mail).
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

from edgevit.errors import EdgeVitError
from edgevit.fileio import file_sha256, holds_only, publish_dir, read_artifact, write_json
from edgevit.plots import (
    Series,
    format_ratios,
    plot_accuracy_latency,
    plot_latency_distribution,
    plot_latency_targets,
    search_series,
)
from edgevit.stages import STAGES, StageRun

REPORT_KIND = "edgevit.report"
REPORT_JSON, REPORT_MD, INDEX = "report.json", "report.md", "index.html"
PARETO, LATENCY_TARGETS, LATENCY_DISTRIBUTION = "pareto.png", "latency_targets.png", "latency_distribution.png"
COMPILE, BENCH = "compile", "bench"     # one folder per target: compile/<target>/, bench/<target>.json
HINTS = {COMPILE: "no compiled artifacts: `edgevit compile --target T --checkpoint CKPT -o RUN/compile/T`",
         BENCH: "no benchmark results: `edgevit bench RUN/compile/T -o RUN/bench/T.json`"}   # without such stages


# ---------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class Report:
    """The figures of one run folder. Each part is None (or empty) when the run lacks it; `missing`
    and `problems` say why."""

    run_dir: str
    models: dict = field(default_factory=dict)       # stage -> model, stage, data, metrics
    accuracy: dict | None = None                      # eval/results.json: split, dense/adapted {ratio: top-1}
    profile: dict | None = None                       # the latency table's figures
    search: dict | None = None                        # the SearchResult, as saved
    quantization: dict | None = None                  # quantize/quantization.json (runs that quantize)
    targets: dict = field(default_factory=dict)       # target -> artifact and bench figures
    missing: list = field(default_factory=list)       # {path, what}: parts the run does not have
    problems: list = field(default_factory=list)      # {path, error}: parts there but unreadable
    sources: dict = field(default_factory=dict)       # path read -> sha256 (a folder: its manifest's)
    samples_ms: dict = field(default_factory=dict, repr=False)   # target -> bench samples (plotted, not saved)

    def plots(self) -> list[str]:
        """The plots the data allows."""
        out = [PARETO] if self.search and self.search.get("pareto") else []
        if any("bench" in t for t in self.targets.values()):
            out.append(LATENCY_TARGETS)
        if any(len(s) > 1 for s in self.samples_ms.values()):
            out.append(LATENCY_DISTRIBUTION)
        return out

    def uniform_baseline(self) -> dict | None:
        """The most accurate uniform ratio predicted to fit the search's budget: what the search must beat."""
        if not self.search:
            return None
        fits = [u for u in self.search.get("uniform") or [] if u["predicted_ms"] <= self.search["budget_ms"]]
        return max(fits, key=lambda u: (u["val_top1"], -u["predicted_ms"]), default=None)

    def to_dict(self) -> dict:
        from edgevit import __version__

        return {"kind": REPORT_KIND, "version": 1, "edgevit": __version__, "run_dir": self.run_dir,
                "models": self.models, "accuracy": self.accuracy, "profile": self.profile, "search": self.search,
                "search_uniform_baseline": self.uniform_baseline(), "targets": self.targets,
                "missing": self.missing, "problems": self.problems, "sources": self.sources, "plots": self.plots()}

    def save(self, folder: Path) -> None:
        """Write report.json, report.md, the plots and index.html into `folder`."""
        images = {name: draw(self, name, folder / name) for name in self.plots()}
        doc = sections(self)
        (folder / REPORT_MD).write_text(to_markdown(doc, f"edgevit report: {self.run_dir}"))
        (folder / INDEX).write_text(to_html(doc, f"edgevit report: {self.run_dir}", images))
        write_json(folder / REPORT_JSON, self.to_dict())


def is_report(folder: Path) -> bool:
    """Whether `folder` is a report edgevit wrote (so a new one may replace it)."""
    try:
        data = json.loads((Path(folder) / REPORT_JSON).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == REPORT_KIND and holds_only(
        Path(folder), {REPORT_JSON, REPORT_MD, INDEX, PARETO, LATENCY_TARGETS, LATENCY_DISTRIBUTION})


def report(run_dir: str | Path, out_dir: str | Path) -> Report:
    """Read the run folder and publish its report at `out_dir` (checked before anything is read:
    only an earlier report is ever replaced)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise EdgeVitError(f"{run}: {'not a folder' if run.exists() else 'no such folder'}; pass a recipe's "
                           "out folder (the one holding train/, search/, ...)")
    with publish_dir(out_dir, is_report, "a report") as tmp:
        result = read_run(run)
        result.save(tmp)
    return result


# ---------------------------------------------------------------------------- reading a run folder


class RunReader:
    """Reads the parts of a run folder one at a time, noting what is missing or unreadable."""

    def __init__(self, root: Path):
        self.root, self.missing, self.problems, self.sources = root, [], [], {}

    def read(self, rel: str, load: Callable[[Path], object], what: str):
        """`load(RUN/rel)`, or None (noted as missing, or as unreadable with the loader's message)."""
        from edgevit.artifact import MANIFEST

        path = self.root / rel
        if not path.exists():
            self.missing.append({"path": rel, "what": what})
            return None
        try:
            value = load(path)
        except EdgeVitError as e:
            self.problems.append({"path": rel, "error": str(e)})
            return None
        self.sources[rel] = file_sha256(path if path.is_file() else path / MANIFEST)
        return value


def stage_hint(rel: str) -> str:
    """What a missing part means: the stage (from the registry) whose outputs live in its folder."""
    part = rel.split("/")[0]
    stage = next((s for s in STAGES if any(o.split("/")[0] == part for o in s.outputs)), None)
    if stage is None:
        return HINTS.get(part, "not in this run")
    return f"the recipe's `{stage.name}` stage writes it ({stage.summary})"


def read_run(run_dir: str | Path) -> Report:
    """Everything the report shows, from whatever `run_dir` holds."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.latency import LatencyTable
    from edgevit.search import SearchResult

    r = RunReader(Path(run_dir))
    models = {}
    for stage in ("train", "adapt"):
        rel = f"{stage}/model.pt"
        if (ckpt := r.read(rel, Checkpoint.load, stage_hint(rel))) is not None:
            models[stage] = {"model": ckpt.model_name, "stage": ckpt.stage, "data": ckpt.data.get("spec"),
                             "metrics": ckpt.metrics}
    accuracy = r.read("eval/results.json", read_eval, stage_hint("eval/results.json"))
    table = r.read("profile/latency.json", LatencyTable.load, stage_hint("profile/latency.json"))
    search = r.read("search/result.json", SearchResult.load, stage_hint("search/result.json"))
    quant = None
    if (Path(run_dir) / "quantize").exists():     # optional: only runs that quantize have it
        from edgevit.quantize import QuantizedModel

        quant = r.read("quantize/quantization.json", lambda p: QuantizedModel.load(p.parent),
                       stage_hint("quantize/quantization.json"))
        if quant is not None:
            c = quant.checkpoint
            models["quantize"] = {"model": c.model_name, "stage": c.stage, "data": c.data.get("spec"), "metrics": c.metrics}
    targets, samples = read_targets(r)
    return Report(str(run_dir), models, accuracy, table and profile_figures(table),
                  search and _without_kind(search.to_dict()), quant and _without_kind(quant.record), targets,
                  r.missing, r.problems, r.sources, samples)


def read_eval(path: Path) -> dict:
    from edgevit.evaluation import EVAL_KIND

    d = _without_kind(read_artifact(path, EVAL_KIND, "run the recipe's eval stage again"))
    for name in ("dense", "adapted"):
        row = d.get(name, {})
        if not isinstance(row, dict) or not all(isinstance(v, (int, float)) for v in row.values()):
            raise EdgeVitError(f"{path}: damaged eval result ('{name}' is not ratio: top-1); run the eval stage again")
    return d


def profile_figures(table) -> dict:
    """The latency table's figures (its raw measurements stay in the table)."""
    validation = table.validation and {k: v for k, v in table.validation.items() if k != "rows"}
    return {"target": table.key.get("target"), "dense_ms": table.dense_ms, "overhead_ms": table.overhead_ms,
            "units": sum(len(d) for d in table.deltas), "combine": table.combine, "validation": validation,
            "key": table.key}


def read_targets(r: RunReader) -> tuple[dict, dict]:
    """Per target: its compiled artifact (compile/<target>/) and benchmark (bench/<target>.json)."""
    from edgevit.artifact import CompiledArtifact
    from edgevit.bench import BenchResult

    folders = {COMPILE: _entries(r.root / COMPILE, lambda p: p.is_dir(), lambda p: p.name),
               BENCH: _entries(r.root / BENCH, lambda p: p.suffix == ".json", lambda p: p.stem)}
    for part, names in folders.items():
        if names is None:
            r.missing.append({"path": f"{part}/", "what": stage_hint(part)})
    targets, samples = {}, {}
    for name in sorted(set(folders[COMPILE] or ()) | set(folders[BENCH] or ())):
        artifact = bench = None
        if folders[COMPILE] is not None:
            artifact = r.read(f"{COMPILE}/{name}", CompiledArtifact.load, f"{name} was benchmarked but its "
                              "artifact is not in this run")
        if folders[BENCH] is not None:
            bench = r.read(f"{BENCH}/{name}.json", BenchResult.load, f"{name} was compiled but not benchmarked: "
                           f"`edgevit bench RUN/compile/{name} -o RUN/bench/{name}.json`")
        targets[name] = target_figures(artifact, bench)
        if bench is not None:
            samples[name] = list(bench.samples_ms)
    return targets, samples


def _entries(folder: Path, keep: Callable[[Path], bool], name: Callable[[Path], str]) -> list[str] | None:
    """Names of the visible entries of `folder` that `keep` accepts; None when there is no such folder."""
    if not folder.is_dir():
        return None
    return sorted(name(p) for p in folder.iterdir() if not p.name.startswith(".") and keep(p))


def target_figures(artifact, bench) -> dict:
    out = {}
    if artifact is not None:
        m = artifact.manifest
        out["artifact"] = {"target": m.target.get("name"), "device": m.target.get("device"), "model": m.model.get(
            "name"), "encoding": m.encoding, "sparsity": m.sparsity, "batch": m.batch, "bytes": artifact.bytes,
            "validation": m.validation}
    if bench is not None:
        out["bench"] = {k: getattr(bench, k) for k in ("latency_ms", "validity", "throughput_ips", "batch",
                                                       "artifact_bytes", "peak_rss_mb", "accuracy", "environment",
                                                       "warnings")}
    return out


def _without_kind(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("kind", "version")}


# ---------------------------------------------------------------------------- the document


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]


@dataclass(frozen=True)
class Plot:
    name: str       # file name in the report folder
    caption: str


@dataclass(frozen=True)
class Bullets:
    items: list[str]


Block = Union[str, Table, Plot, Bullets]   # a str is a paragraph; `code` spans allowed


@dataclass(frozen=True)
class Section:
    title: str
    blocks: list[Block]


def sections(rep: Report) -> list[Section]:
    """The report's content, rendered alike as Markdown and HTML."""
    plots = set(rep.plots())
    doc = [models_section(rep), accuracy_section(rep)]
    if rep.quantization:
        doc.append(quantization_section(rep.quantization))
    doc += [profile_section(rep), search_section(rep, plots), targets_section(rep, plots)]
    if rep.missing:
        doc.append(Section("Missing", [Bullets([f"`{m['path']}`: {m['what']}" for m in rep.missing])]))
    if rep.problems:
        doc.append(Section("Unreadable", [Bullets([f"`{p['path']}`: {p['error']}" for p in rep.problems])]))
    return doc


def models_section(rep: Report) -> Section:
    if not rep.models:
        return Section("Models", ["No trained model in this run."])
    rows = [(stage, m["model"], m["data"] or "-", _pct(_top1(m, "val")), _pct(_top1(m, "test")))
            for stage, m in rep.models.items()]
    return Section("Models", [Table(("stage", "model", "data", "val top-1 (%)", "test top-1 (%)"), rows)])


def quantization_section(q: dict) -> Section:
    """Top-1 before and after, weight bytes, and the layers whose quantization hurts most."""
    scheme = q["scheme"]
    rows = [(split, _pct(t["fp32"]), _pct(t[scheme]), f"{t[scheme] - t['fp32']:+.2f}") for split, t in q["top1"].items()]
    b = q["weight_bytes"]
    if scheme != "int8":
        return _codebook_section(q, rows)
    worst = sorted(q["layers"].items(), key=lambda kv: kv[1]["sqnr_db"])[:3]
    return Section(f"Quantization ({scheme})", [
        f"{len(q['layers'])} layers {scheme}, activations calibrated on {q['calibration']['images']} training images "
        f"({q['calibration']['method']} ranges); quantized weights {b['fp32'] / 1e3:.1f} kB -> {b[scheme] / 1e3:.1f} kB "
        f"({b['fp32'] / max(b[scheme], 1):.2f}x smaller).",
        Table(("split", "fp32 top-1 (%)", f"{scheme} top-1 (%)", "change (points)"), rows),
        Bullets([f"lowest output SQNR: `{n}` {v['sqnr_db']:.1f} dB" for n, v in worst])])


def _codebook_section(q: dict, rows: list) -> Section:
    """k-means / PQ: the codebook settings, bytes (coded layers and the whole model), top-1 of the
    fitted and (when fine-tuned) the fine-tuned model, the layers whose weights it rounds most."""
    scheme, cfg, b = q["scheme"], q["config"], q["weight_bytes"]
    what = f"{cfg['bits']}-bit k-means" if scheme == "kmeans" else \
        f"PQ, sub-vectors of {cfg['subvector']}, up to {cfg['centroids']} centroids"
    tuned = [split for split, t in q["top1"].items() if "before_finetune" in t]
    if tuned:
        rows = [(*row, _pct(q["top1"][row[0]].get("before_finetune"))) for row in rows]
    whole = q.get("model_bytes") or {}
    worst = sorted(q["layers"].items(), key=lambda kv: kv[1]["weight_sqnr_db"])[:3]
    header = ("split", "fp32 top-1 (%)", f"{scheme} top-1 (%)", "change (points)") + (("before fine-tuning (%)",)
                                                                                     if tuned else ())
    return Section(f"Quantization ({scheme})", [
        f"{len(q['layers'])} layers {what}" + (f", centroids fine-tuned for {cfg['finetune']:g} epoch(s)"
                                               if tuned else "") +
        f"; coded weights {b['fp32'] / 1e3:.1f} kB -> {b[scheme] / 1e3:.1f} kB ({b['fp32'] / max(b[scheme], 1):.2f}x "
        "smaller)" + (f", the whole model {whole['fp32'] / max(whole[scheme], 1):.2f}x" if whole else "") + ".",
        Table(header, rows),
        Bullets([f"lowest weight SQNR: `{n}` {v['weight_sqnr_db']:.1f} dB" for n, v in worst])])


def accuracy_section(rep: Report) -> Section:
    acc = rep.accuracy
    rows = {k: acc[k] for k in ("dense", "adapted") if acc and acc.get(k)}
    if not rows:
        return Section("Accuracy at uniform sparsity", ["No accuracy at uniform sparsity in this run."])
    ratios = sorted({r for row in rows.values() for r in row}, key=float)
    table = Table(("model", *ratios), [(name, *(_pct(row.get(r)) for r in ratios)) for name, row in rows.items()])
    return Section("Accuracy at uniform sparsity", [f"{acc.get('split', 'test')} top-1 (%) by window sparsity "
                                                    "ratio (the same ratio for every layer).", table])


def profile_section(rep: Report) -> Section:
    p = rep.profile
    if not p:
        return Section("Latency table", ["No latency table in this run."])
    v = p["validation"]
    check = (f"mean abs error {v['mape']:.2f}%, max {v['max_ape']:.2f}% over {v['configs']} random configs"
             if v else "not validated (`edgevit profile --validate N`)")
    rows = [("target", p["target"] or "-"), ("dense model (ms)", _ms(p["dense_ms"])),
            ("units profiled", str(p["units"])), ("overhead (ms)", f"{p['overhead_ms']:+.3f}"),
            ("predictor on fresh configs", check)]
    return Section("Latency table", [Table(("figure", "value"), rows)])


def search_section(rep: Report, plots: set[str]) -> Section:
    s = rep.search
    if not s:
        return Section("Latency-constrained search", ["No search result in this run."])
    rows = [("target", s["target"]), ("budget (ms)", f"{s['budget_ms']:g}"),
            ("chosen config", format_ratios(s["sparsity"]["ratios"])), ("val top-1 (%)", _pct(s["val_top1"])),
            ("test top-1 (%)", _pct(s["test_top1"]))]
    if s.get("finetuned_test_top1") is not None:
        rows.append(("test top-1 after fine-tuning (%)", _pct(s["finetuned_test_top1"])))
    rows += [("predicted (ms)", _ms(s["predicted_ms"])), ("measured (ms)", _ms(s["measured_ms"])),
             ("evaluations", str(s["evaluations"])), ("generations", str(s["generations"])),
             ("search time (s)", f"{s['seconds']:.0f}")]
    base = rep.uniform_baseline()
    if base:
        rows.append(("best uniform ratio within budget", f"{base['ratio']:g}: val {_pct(base['val_top1'])}%, "
                     f"predicted {_ms(base['predicted_ms'])} ms ({s['val_top1'] - base['val_top1']:+.2f} points)"))
    blocks: list[Block] = [Table(("figure", "value"), rows)]
    if not s.get("uniform"):
        blocks.append("No uniform-sparsity baseline recorded (a search result from before it was kept).")
    if PARETO in plots:
        blocks.append(Plot(PARETO, "Validation top-1 against latency: the search's Pareto front and uniform "
                                   "sparsity (predicted by the latency table), the candidates measured on the "
                                   "target and the chosen config at its measured latency."))
    blocks += _search_tables(s)
    return Section("Latency-constrained search", blocks)


def _search_tables(s: dict) -> list[Block]:
    front = [(format_ratios(p["ratios"]), _ms(p["predicted_ms"]), _pct(p["val_top1"])) for p in s["pareto"]]
    out: list[Block] = ["Pareto front (predicted latency):",
                        Table(("config", "predicted (ms)", "val top-1 (%)"), front)]
    if s.get("candidates_measured"):
        out += ["Candidates compiled and measured on the target:",
                Table(("config", "val top-1 (%)", "predicted (ms)", "measured (ms)", "fits"),
                      [(format_ratios(c["ratios"]), _pct(c["val_top1"]), _ms(c["predicted_ms"]), _ms(c["measured_ms"]),
                        "yes" if c["fits"] else "no") for c in s["candidates_measured"]])]
    return out


TARGET_HEADER = ("target", "encoding", "sparsity", "median (ms)", "p90 (ms)", "p99 (ms)", "CoV", "throughput (img/s)",
                 "size (MB)", "top-1 (%)", "vs PyTorch")


def targets_section(rep: Report, plots: set[str]) -> Section:
    if not rep.targets:
        return Section("Compiled targets", ["No compiled or benchmarked target in this run."])
    blocks: list[Block] = [Table(TARGET_HEADER, [target_row(n, t) for n, t in rep.targets.items()])]
    needed = {k: v["samples_needed"] for t in rep.targets.values() if "bench" in t
              for k, v in t["bench"]["validity"].items() if not v["valid"]}
    notes = ("top-1: the compiled artifact's own, on the test split (`edgevit bench --data`); vs PyTorch: its "
             "check at compile time (max abs error on logits, top-1 agreement).")
    if needed:
        notes += " n/a: too few calls to claim the percentile (" + ", ".join(
            f"{k} needs {n}" for k, n in sorted(needed.items())) + ")."
    blocks.append(notes)
    for name, caption in ((LATENCY_TARGETS, "Median latency per call on each target; whiskers reach p90."),
                          (LATENCY_DISTRIBUTION, "Every timed call, per target, with its median, p90 and p99.")):
        if name in plots:
            blocks.append(Plot(name, caption))
    return Section("Compiled targets", blocks)


def target_row(name: str, t: dict) -> tuple[str, ...]:
    a, b = t.get("artifact") or {}, t.get("bench")
    sparsity = format_ratios(a["sparsity"]["ratios"]) if a.get("sparsity") else ("dense" if a else "-")
    size = a.get("bytes") or (b["artifact_bytes"] if b else None)
    return (name, a.get("encoding", "-"), sparsity, *bench_cells(b), f"{size / 1e6:.2f}" if size else "-",
            _pct(b["accuracy"]["top1"]) if b and b["accuracy"] else "-", _agreement(a))


def bench_cells(b: dict | None) -> tuple[str, ...]:
    """median, p90, p99, CoV, throughput."""
    if b is None:
        return ("-",) * 5
    lat = b["latency_ms"]
    return (_ms(lat["median"]), _ms(lat.get("p90")), _ms(lat.get("p99")), f"{lat['cov']:.1%}",
            f"{b['throughput_ips']:.1f}")


def _agreement(artifact: dict) -> str:
    """The artifact's own check against PyTorch at compile time, on its first input source."""
    v = artifact.get("validation") or {}
    checks = [f for f in v.values() if isinstance(f, dict) and "max_abs_error" in f]
    if not checks:
        return "not checked" if v.get("skipped") else "-"
    return f"max err {checks[0]['max_abs_error']:.1e}, {checks[0]['top1_agreement']:.0f}% agree"


def _top1(model: dict, split: str) -> float | None:
    return (model["metrics"].get(split) or {}).get("top1")


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


# ---------------------------------------------------------------------------- rendering


def to_markdown(doc: list[Section], title: str) -> str:
    out = [f"# {title}"]
    for sec in doc:
        out += ["", f"## {sec.title}"]
        for block in sec.blocks:
            out += [""] + _markdown_block(block)
    return "\n".join(out) + "\n"


def _markdown_block(block: Block) -> list[str]:
    if isinstance(block, Table):
        cell = (lambda s: str(s).replace("|", "\\|"))
        return ["| " + " | ".join(map(cell, block.header)) + " |", "|" + "---|" * len(block.header),
                *("| " + " | ".join(map(cell, row)) + " |" for row in block.rows)]
    if isinstance(block, Plot):
        return [f"![{Path(block.name).stem}]({block.name})", "", f"*{block.caption}*"]
    if isinstance(block, Bullets):
        return [f"- {item}" for item in block.items]
    return [block]


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;"
         "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
         "td{white-space:nowrap}img{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}"
         "code{background:#f3f3f3}")


def to_html(doc: list[Section], title: str, images: dict[str, bytes]) -> str:
    """One page with everything inline: styles in <style>, plots as data URIs, no scripts."""
    body = []
    for sec in doc:
        body.append(f"<h2>{html.escape(sec.title)}</h2>")
        body += [_html_block(b, images) for b in sec.blocks]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n" + "\n".join(body)
            + "\n</body></html>\n")


def _html_block(block: Block, images: dict[str, bytes]) -> str:
    if isinstance(block, Table):
        head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
        rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
    if isinstance(block, Plot):
        data = base64.b64encode(images[block.name]).decode("ascii")
        return (f'<figure><img alt="{html.escape(block.name)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_inline(block.caption)}</figcaption></figure>")
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>"
    return f"<p>{_inline(block)}</p>"


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text), quote=False))


# ---------------------------------------------------------------------------- plots


def accuracy_latency_series(rep: Report) -> list[Series]:
    """Every series of the accuracy-latency plot (today: the fp32 search)."""
    return search_series(rep.search) if rep.search else []


def draw(rep: Report, name: str, path: Path) -> bytes:
    """Draw plot `name` to `path`; its PNG bytes."""
    fig = {PARETO: lambda: plot_accuracy_latency(accuracy_latency_series(rep), rep.search["budget_ms"],
                                                 rep.search["target"]),
           LATENCY_TARGETS: lambda: plot_latency_targets(rep.targets),
           LATENCY_DISTRIBUTION: lambda: plot_latency_distribution(rep.targets, rep.samples_ms)}[name]()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    return path.read_bytes()


# ---------------------------------------------------------------------------- the recipe stage


@dataclass(frozen=True)
class ReportStageConfig:
    """The recipe's [report] table: nothing to set yet; the report covers whatever the run holds."""


def run_stage(run: StageRun) -> dict:
    """The `report` recipe stage: OUT/report/ (index.html, report.md, report.json, plots), rebuilt
    every run (reading the run folder takes a second)."""
    out = run.dir("report")
    rep = report(run.recipe.out, out)
    run.log(f"report: {out / INDEX} (open it in a browser), {out / REPORT_MD}"
            + (f"; not in this run: {', '.join(m['path'] for m in rep.missing)}" if rep.missing else ""))
    return {"report": str(out / INDEX), "missing": [m["path"] for m in rep.missing]}
