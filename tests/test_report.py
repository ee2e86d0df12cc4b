"""`report`: a run folder's figures, unchanged, in Markdown, JSON, plots and one self-contained
HTML page that a real browser renders; missing parts named, a user's folder never replaced."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgevit.bench import BenchResult, summarize
from edgevit.checkpoint import Checkpoint
from edgevit.cli import cli
from edgevit.evaluation import EVAL_KIND
from edgevit.fileio import write_json
from edgevit.latency import LatencyTable
from edgevit.models import create_model
from edgevit.report import LATENCY_DISTRIBUTION, LATENCY_TARGETS, PARETO, is_report, read_run, report
from edgevit.search import SearchResult

CHROMIUM = Path("/usr/bin/chromium")
PLOTS = (PARETO, LATENCY_TARGETS, LATENCY_DISTRIBUTION)
RATIOS = [0.0, 0.2, 0.4, 0.6, 0.8]


# ---------------------------------------------------------------------------- a run folder, from the real classes


def uniform_points(dense_ms: float) -> list[dict]:
    return [{"ratio": r, "predicted_ms": dense_ms * (1 - 0.45 * r), "val_top1": 91.0 - 6 * r * r} for r in RATIOS]


def make_search() -> SearchResult:
    """A front just above the uniform curve, the chosen config on it at 0.75 ms predicted."""
    def val(ms):
        return 91.3 - 6 * ((1 - ms / 0.85) / 0.45) ** 2

    front = [{"ratios": [round(0.8 - 0.1 * i, 1), 0.2], "predicted_ms": ms, "val_top1": val(ms)}
             for i, ms in enumerate((0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85))]
    measured = [{"ratios": [0.3, 0.2], "val_top1": val(0.75), "predicted_ms": 0.75, "measured_ms": 0.762, "fits": True},
                {"ratios": [0.2, 0.2], "val_top1": val(0.8), "predicted_ms": 0.8, "measured_ms": 0.803, "fits": False}]
    sparsity = {"ratios": [0.3, 0.2], "stage_knobs": [1, 1], "levels": RATIOS}
    return SearchResult(sparsity, 0.78, "host", val(0.75), 88.75, 0.75, 0.762, front, 40, 4, 51.5, measured,
                        table={"target": "host", "batch": 1}, seed=0, uniform=uniform_points(0.85))


def make_bench(name: str, n: int, scale_ms: float, accuracy: dict | None, seed: int) -> BenchResult:
    samples = scale_ms * (1 + np.random.default_rng(seed).gamma(2.0, 0.03, n))
    samples[::250] *= 3                     # a few stray slow calls, as a busy machine gives
    samples = samples.round(6).tolist()
    stats, validity = summarize(samples)
    return BenchResult(f"runs/x/compile/{name}", stats, validity, 1e3 / stats["mean"], 1, 4_200_000 + n, None,
                       {"device": "local cpu", "target": name}, [], accuracy, None, samples)


def make_run(root: Path) -> dict:
    """A run folder holding every part but compiled artifacts; the objects written, to compare with."""
    model = create_model("swin_micro")
    metrics = {"train": {"val": {"top1": 90.25, "loss": 0.31}, "test": {"top1": 89.5, "loss": 0.33}},
               "adapt": {"val": {"top1": 89.75, "loss": 0.35}, "test": {"top1": 88.875, "loss": 0.36}}}
    for stage, m in metrics.items():
        Checkpoint.from_model(model, metrics=m, stage=stage, data={"spec": "digits"}).save(root / stage / "model.pt")
    accuracy = {"dense": {f"{r:.1f}": 89.5 - 60 * r * r for r in RATIOS},
                "adapted": {f"{r:.1f}": 88.875 - 3 * r for r in RATIOS}}
    write_json(root / "eval" / "results.json", {"kind": EVAL_KIND, "version": 1, "split": "test", **accuracy})
    table = LatencyTable({"target": "host", "model": "swin_micro", "batch": 1}, 0.85, [{1: -0.2, 2: -0.1}, {1: -0.05}],
                         [4, 2], 0.018, validation={"configs": 30, "mape": 4.51, "max_ape": 20.52, "rows": []})
    table.save(root / "profile" / "latency.json")
    search = make_search()
    search.save(root / "search" / "result.json")
    benches = {"host": make_bench("host", 700, 0.74, {"top1": 88.5, "images": 1000, "data": "digits"}, 2),
               "rasp4b": make_bench("rasp4b", 100, 21.0, None, 3)}
    for name, b in benches.items():
        b.save(root / "bench" / f"{name}.json")
    return {"metrics": metrics, "accuracy": accuracy, "table": table, "search": search, "benches": benches}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    written = make_run(root)
    out = tmp_path_factory.mktemp("out") / "report"
    return root, out, written, report(root, out)


# ---------------------------------------------------------------------------- figures


def test_json_figures_equal_the_inputs(run):
    root, out, w, _ = run
    d = json.loads((out / "report.json").read_text())
    assert d["kind"] == "edgevit.report" and d["version"] == 1 and is_report(out)
    assert {s: m["metrics"] for s, m in d["models"].items()} == w["metrics"]
    assert d["models"]["train"]["model"] == "swin_micro" and d["models"]["adapt"]["data"] == "digits"
    assert d["accuracy"] == {"split": "test", **w["accuracy"]}
    assert d["profile"]["dense_ms"] == 0.85 and d["profile"]["target"] == "host" and d["profile"]["units"] == 3
    assert d["profile"]["validation"] == {"configs": 30, "mape": 4.51, "max_ape": 20.52}
    saved = {k: v for k, v in w["search"].to_dict().items() if k not in ("kind", "version")}
    assert d["search"] == json.loads(json.dumps(saved))
    # the best uniform ratio predicted within 0.78 ms: 0.2 (0.85 * 0.91 = 0.7735 ms)
    assert d["search_uniform_baseline"] == uniform_points(0.85)[1]
    for name, b in w["benches"].items():
        assert d["targets"][name]["bench"]["latency_ms"] == b.latency_ms
        assert d["targets"][name]["bench"]["throughput_ips"] == b.throughput_ips
        assert d["targets"][name]["bench"]["accuracy"] == b.accuracy
    assert d["plots"] == list(PLOTS)
    assert [m["path"] for m in d["missing"]] == ["compile/"] and d["problems"] == []
    assert set(d["sources"]) == {"train/model.pt", "adapt/model.pt", "eval/results.json", "profile/latency.json",
                                 "search/result.json", "bench/host.json", "bench/rasp4b.json"}


def md_row(md: str, first: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is `first`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no row '{first}' in report.md")


def test_markdown_tables_carry_the_inputs(run):
    _, out, w, _ = run
    md = (out / "report.md").read_text()
    assert md_row(md, "train")[3:] == ["90.25", "89.50"] and md_row(md, "adapt")[3:] == ["89.75", "88.88"]
    assert md_row(md, "model") == ["model", *(f"{r:.1f}" for r in RATIOS)]
    assert md_row(md, "dense")[1:] == [f"{v:.2f}" for v in w["accuracy"]["dense"].values()]
    assert md_row(md, "adapted")[1:] == [f"{v:.2f}" for v in w["accuracy"]["adapted"].values()]
    assert md_row(md, "dense model (ms)")[1] == "0.850"
    assert md_row(md, "chosen config")[1] == "[0.3, 0.2]" and md_row(md, "measured (ms)")[1] == "0.762"
    assert md_row(md, "budget (ms)")[1] == "0.78" and md_row(md, "test top-1 (%)")[1] == "88.75"
    for name, b in w["benches"].items():
        lat = b.latency_ms
        row = md_row(md, name)
        assert row[3:8] == [f"{lat['median']:.3f}", f"{lat['p90']:.3f}",
                            f"{lat['p99']:.3f}" if lat["p99"] is not None else "n/a", f"{lat['cov']:.1%}",
                            f"{b.throughput_ips:.1f}"]
        assert row[8] == f"{b.artifact_bytes / 1e6:.2f}"
        assert row[9] == (f"{b.accuracy['top1']:.2f}" if b.accuracy else "-")
    assert md_row(md, "rasp4b")[5] == "n/a" and "p99 needs 662" in md
    for name in PLOTS:
        assert f"]({name})" in md
    assert "`compile/`" in md


def test_plots_are_real_images_with_content(run):
    import matplotlib.image

    _, out, _, _ = run
    for name in PLOTS:
        img = matplotlib.image.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, name
        colours = np.unique(img.reshape(-1, img.shape[2]), axis=0)
        assert len(colours) > 1, f"{name} is one flat colour"


def test_html_is_self_contained_with_every_plot_inline(run):
    _, out, _, _ = run
    page = (out / "index.html").read_text()
    uris = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [name for name, _ in uris] == list(PLOTS)
    import base64

    for name, data in uris:
        assert base64.b64decode(data) == (out / name).read_bytes()
    assert not re.search(r"https?:", page) and "<script" not in page and "<link" not in page


# ---------------------------------------------------------------------------- what is missing, output rule


def test_an_empty_run_folder_gives_a_report_naming_what_is_missing(tmp_path):
    (tmp_path / "run").mkdir()
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "run"), "-o", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    d = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [m["path"] for m in d["missing"]] == ["train/model.pt", "adapt/model.pt", "eval/results.json",
                                                 "profile/latency.json", "search/result.json", "compile/", "bench/"]
    assert d["plots"] == [] and not list((tmp_path / "rep").glob("*.png"))
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "No search result in this run." in md and "`eval/results.json`: the recipe's `eval` stage writes it" in md
    assert "missing: train/model.pt" in result.output


def test_damaged_and_partial_parts_are_named_not_fatal(tmp_path):
    run = tmp_path / "run"
    make_search().save(run / "search" / "result.json")
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text("{not json")
    make_bench("host", 10, 1.0, None, 0).save(run / "bench" / "host.json")
    (run / "compile" / "orin").mkdir(parents=True)   # not an artifact
    rep = read_run(run)
    assert [p["path"] for p in rep.problems] == ["eval/results.json", "compile/orin"]
    assert {"path": "compile/host", "what": "host was benchmarked but its artifact is not in this run"} in rep.missing
    assert rep.plots() == [PARETO, LATENCY_TARGETS, LATENCY_DISTRIBUTION]
    assert rep.targets["host"]["bench"]["latency_ms"]["p90"] is None


def test_a_users_folder_is_refused_untouched(tmp_path, run):
    root = run[0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["report", str(root), "-o", str(mine)])
    assert result.exit_code == 1 and "not a report edgevit wrote" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]    # no temporary folder left beside it


def test_a_rerun_replaces_its_own_report(tmp_path, run):
    root, first, _, _ = run
    out = tmp_path / "rep"
    shutil.copytree(first, out)
    (out / "report.md").write_text("an older report")
    result = CliRunner().invoke(cli, ["report", str(root), "-o", str(out), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert (out / "report.json").read_text() == (first / "report.json").read_text()
    assert (out / "report.md").read_text() == (first / "report.md").read_text()
    assert json.loads((tmp_path / "r.json").read_text()) == json.loads((out / "report.json").read_text())
    # a file the user added to the report folder is never deleted: the report is refused instead
    (out / "my-notes.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["report", str(root), "-o", str(out)])
    assert result.exit_code == 1 and "holds files edgevit did not write" in result.stderr
    assert (out / "my-notes.txt").read_text() == "mine"


def test_a_missing_run_folder_is_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "nope"), "-o", str(tmp_path / "rep")])
    assert result.exit_code == 1 and result.stderr.startswith("error: ") and "no such folder" in result.stderr
    assert not (tmp_path / "rep").exists()


# ---------------------------------------------------------------------------- in a real browser

PROBE = """<script>
window.addEventListener("load", () => {
  const out = [];
  for (const img of document.images) {
    let colours = 0;
    if (img.complete && img.naturalWidth > 0 && img.naturalHeight > 0) {
      const c = document.createElement("canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const g = c.getContext("2d");
      g.drawImage(img, 0, 0);
      const d = g.getImageData(0, 0, c.width, c.height).data, seen = new Set();
      for (let i = 0; i < d.length && seen.size < 2; i += 4) seen.add(d.slice(i, i + 4).join(","));
      colours = seen.size;
    }
    out.push(img.alt + "=" + img.naturalWidth + "x" + img.naturalHeight + "/" + colours);
  }
  document.title = "PROBE " + out.join(" ");
});
</script>"""


def render(page: Path, tmp_path: Path) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    """Open `page` (plus the probe) in headless Chromium: per image (width, height, colours seen,
    capped at 2), and the page's console errors."""
    probed = tmp_path / f"probed-{page.name}"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0", "--dump-dom", probed.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    title = re.search(r"<title>PROBE ?(.*?)</title>", done.stdout)
    assert title, f"the probe did not run: {done.stdout[:300]!r} {done.stderr[-500:]!r}"
    images = {}
    for item in title.group(1).split():
        name, w, h, colours = re.fullmatch(r"(.+)=(\d+)x(\d+)/(\d+)", item).groups()
        images[name] = (int(w), int(h), int(colours))
    errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line
              and re.search(r"uncaught|error|failed to load|not allowed", line, re.I)]
    return images, errors


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium (apt-get install chromium)")
def test_a_browser_shows_every_plot_and_reports_no_error(run, tmp_path):
    images, errors = render(run[1] / "index.html", tmp_path)
    assert set(images) == set(PLOTS) and errors == []
    for name, (w, h, colours) in images.items():
        assert w > 300 and h > 200 and colours > 1, f"{name}: {w}x{h}, {colours} colours"
    # the probe sees what is wrong: a broken image, a blank one and a script error
    import base64
    import io

    import matplotlib.image

    buf = io.BytesIO()
    matplotlib.image.imsave(buf, np.ones((2, 3, 3)), format="png")
    blank = base64.b64encode(buf.getvalue()).decode()
    bad = tmp_path / "bad.html"
    bad.write_text(f'<!DOCTYPE html><html><head><title>x</title></head><body><img alt="broken" '
                   f'src="data:image/png;base64,AAAA"><img alt="blank" src="data:image/png;base64,{blank}">'
                   "<script>null.x</script></body></html>")
    images, errors = render(bad, tmp_path)
    assert images == {"broken": (0, 0, 0), "blank": (3, 2, 1)} and len(errors) == 1
