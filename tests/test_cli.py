"""The CLI in-process (click's CliRunner) and, for exit behaviour, as the real console script."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgevit.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_and_version():
    assert "sparsify" in run("--help").output
    assert run("--version").output.strip().startswith("edgevit, version")
    for command in ("train", "eval", "adapt", "flops", "run", "models", "data"):
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_models_lists_the_registry():
    out = run("models").output
    assert "swin_t" in out and "deit_tiny_distilled" in out


def test_train_eval_flops_with_json(idx_dir, tmp_path):
    out = tmp_path / "run"
    result = run("train", "--data", f"idx:{idx_dir}", "--model", "swin_micro", "--epochs", "2", "--no-augment",
                 "--batch-size", "16", "--out", str(out), "--json", str(tmp_path / "t.json"))
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.output
    metrics = json.loads((tmp_path / "t.json").read_text())
    result = run("eval", "--checkpoint", str(out / "model.pt"), "--json", str(tmp_path / "e.json"))
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["top1"] == pytest.approx(metrics["test"]["top1"])
    result = run("flops", "--checkpoint", str(out / "model.pt"), "--sparsity", "0.5", "--json", str(tmp_path / "f.json"))
    flops = json.loads((tmp_path / "f.json").read_text())
    assert result.exit_code == 0 and flops["flops"] < flops["dense_flops"]


def test_run_recipe_skips_up_to_date_stages(idx_dir, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'stages = ["train", "adapt", "eval"]\nout = "{tmp_path / "out"}"\n'
                      f'[data]\nspec = "idx:{idx_dir}"\n[model]\nname = "swin_micro"\nimg_size = 32\n'
                      '[train]\nepochs = 1\nbatch_size = 16\n[adapt]\nepochs = 1\nbatch_size = 16\n'
                      '[eval]\nratios = [0.0, 0.5]\n')
    first = run("run", str(recipe), "--json", str(tmp_path / "r.json"))
    assert first.exit_code == 0, first.output
    table = json.loads((tmp_path / "r.json").read_text())["eval"]
    assert set(table) == {"dense", "adapted"} and set(table["adapted"]) == {"0.0", "0.5"}
    second = run("run", str(recipe))
    assert "train: up to date" in second.output and "adapt: up to date" in second.output


@pytest.mark.parametrize("args, code, message", [
    (["train", "--model", "swin_nano"], 2, "unknown model 'swin_nano'; did you mean"),
    (["eval", "--checkpoint", "/no/such.pt"], 4, "/no/such.pt: no such checkpoint file"),
    (["train", "--data", "idx:/no/dir"], 3, "/no/dir: no such directory"),
    (["run", "/no/recipe.toml"], 2, "/no/recipe.toml: no such file"),
    (["flops", "--model", "swin_micro", "--sparsity", "0.85"], 2, "not one of the levels"),
    (["flops", "--model", "vit_micro", "--sparsity", "0.5"], 2, "swin family"),
])
def test_errors_are_one_line_with_exit_codes(args, code, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_console_script_prints_no_traceback(tmp_path):
    import torch

    torch.save({"w": torch.zeros(64)}, tmp_path / "real.pt")
    blob = (tmp_path / "real.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "zeros.pt").write_bytes(b"\x00" * 64)
    for name, reason in (("cut.pt", "corrupt or truncated"), ("zeros.pt", "not a PyTorch checkpoint")):
        result = subprocess.run([sys.executable, "-m", "edgevit.cli", "eval", "--checkpoint", str(tmp_path / name)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 4
        assert "Traceback" not in result.stderr and reason in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_import_edgevit_stays_light():
    code = "import sys, edgevit; print(any(m.split('.')[0] in ('torch', 'tvm', 'onnxruntime') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("args, code, message", [
    (["compile", "--target", "jetsn", "--checkpoint", "x.pt", "-o", "out"], 2, "did you mean 'jetson-orin'"),
    (["verify", "/no/artifact"], 1, "not a compiled artifact"),
    (["package", "/no/artifact", "-o", "b"], 1, "not a compiled artifact"),
])
def test_compile_family_errors(args, code, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, result.output
    assert result.output.startswith("error: ") and message in result.output


def test_targets_lists_all(tmp_path):
    result = run("targets", "--json", str(tmp_path / "t.json"))
    assert "rasp4b" in result.output and "jetson-orin" in result.output
    assert {t["name"] for t in json.loads((tmp_path / "t.json").read_text())} >= {"host", "cuda-sm90"}


def test_run_force_redoes_up_to_date_stages(idx_dir, tmp_path):
    """--force retrains a stage that is up to date: the log says it runs (not "up to date") and
    model.pt is written anew (a mark put into the up-to-date file survives a plain run, not --force)."""
    import dataclasses

    from edgevit.checkpoint import Checkpoint

    out = tmp_path / "out"
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'stages = ["train"]\nout = "{out}"\n[data]\nspec = "idx:{idx_dir}"\n'
                      '[model]\nname = "swin_micro"\n[train]\nepochs = 1\nbatch_size = 16\naugment = false\n')
    first = run("run", str(recipe))
    assert first.exit_code == 0, first.output
    model_pt = out / "train" / "model.pt"
    marked = Checkpoint.load(model_pt)
    marked = dataclasses.replace(marked, metrics={**marked.metrics, "mark": 1})
    marked.save(model_pt)
    plain = run("run", str(recipe))
    assert plain.exit_code == 0 and f"train: up to date ({model_pt})" in plain.output
    assert Checkpoint.load(model_pt).metrics["mark"] == 1
    before = model_pt.stat()
    forced = run("run", str(recipe), "--force")
    assert forced.exit_code == 0, forced.output
    assert "up to date" not in forced.output
    assert f"train: swin_micro -> {model_pt}" in forced.output and "train: val top-1" in forced.output
    after = model_pt.stat()
    assert (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)
    redone = Checkpoint.load(model_pt)
    assert "mark" not in redone.metrics and redone.stage == "train"
    assert redone.metrics["test"]["top1"] == pytest.approx(marked.metrics["test"]["top1"])  # same seeded run


@pytest.mark.parametrize("items, expected", [
    (("img_size=32",), {"img_size": 32}),
    (("drop_path=0.1", "lr=1e-3"), {"drop_path": 0.1, "lr": 0.001}),
    (("depths=[2,2]",), {"depths": [2, 2]}),
    (("num_heads=[1, 2, 4]", "window_size=4"), {"num_heads": [1, 2, 4], "window_size": 4}),
    (("name=swin",), {"name": "swin"}),                       # not TOML: the text itself
    (('name="quoted"',), {"name": "quoted"}),                  # a TOML string
    (("flag=true",), {"flag": True}),
    ((" img_size = 48 ",), {"img_size": 48}),                  # spaces around key and value
    (("path=a=b",), {"path": "a=b"}),                          # only the first '=' splits
    (("img_size=16", "img_size=32"), {"img_size": 32}),        # the last one wins
    ((), {}),
])
def test_parse_sets_values(items, expected):
    from edgevit.cli import _parse_sets

    parsed = _parse_sets(items)
    assert parsed == expected
    assert all(type(parsed[k]) is type(v) for k, v in expected.items())


def test_parse_sets_without_equals_is_a_one_line_error():
    from edgevit.cli import _parse_sets
    from edgevit.errors import EdgeVitError

    with pytest.raises(EdgeVitError, match="--set 'img_size': expected key=value") as e:
        _parse_sets(("img_size",))
    assert "\n" not in str(e.value)
    result = CliRunner().invoke(cli, ["flops", "--model", "swin_micro", "--set", "img_size"])
    assert result.exit_code == e.value.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {e.value}"


def test_set_overrides_reach_the_model(tmp_path):
    """--set parsed values build the model: a list for depths, an int for img_size."""
    result = run("flops", "--model", "swin_micro", "--set", "img_size=32", "--set", "depths=[2,4]",
                 "--json", str(tmp_path / "f.json"))
    assert result.exit_code == 0, result.output
    deeper = json.loads((tmp_path / "f.json").read_text())["dense_flops"]
    result = run("flops", "--model", "swin_micro", "--set", "img_size=32", "--json", str(tmp_path / "g.json"))
    assert deeper > json.loads((tmp_path / "g.json").read_text())["dense_flops"]
