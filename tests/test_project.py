"""The design's short commands: `edgevit compile --target T` and `edgevit search --budget B` take
what they are not told from the latest run here (.edgevit.json), say what they took, and without
a run say in one line what to run first."""

import json

import pytest
import torch
from click.testing import CliRunner

from edgevit.checkpoint import Checkpoint
from edgevit.cli import cli
from edgevit.models import create_model
from edgevit.project import PROJECT_FILE, Project, load_project, record_run
from edgevit.recipes import load_recipe


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("args", [["compile", "--target", "jetson"], ["search", "--budget", "20ms"]])
def test_without_a_run_the_short_commands_say_what_to_run_first(in_tmp, args):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert "no --checkpoint given and no run in this folder" in r.stderr and "make demo" in r.stderr
    assert list(in_tmp.iterdir()) == []


def test_run_records_the_project_and_never_replaces_a_foreign_file(in_tmp):
    (in_tmp / "r.toml").write_text('stages = ["train"]\nout = "out"\n[model]\nname = "swin_micro"\n'
                                   '[profile]\ntarget = "rasp4b"\n')
    recipe = load_recipe(in_tmp / "r.toml")
    (in_tmp / "out" / "train").mkdir(parents=True)
    Checkpoint.from_model(create_model("swin_micro")).save(in_tmp / "out" / "train" / "model.pt")
    project = record_run(recipe)
    assert project == Project(str(in_tmp / "r.toml"), "out", "out/train/model.pt", "rasp4b", None, None)
    assert project.save() and load_project() == project
    (in_tmp / PROJECT_FILE).write_text('{"mine": true}')
    assert not project.save() and json.loads((in_tmp / PROJECT_FILE).read_text()) == {"mine": True}
    assert load_project() is None


@pytest.mark.tvm
def test_compile_takes_the_runs_checkpoint_and_search_result(in_tmp):
    from edgevit.search import SearchResult
    from edgevit.sparsity import SparsityConfig

    torch.manual_seed(0)
    model = create_model("swin_micro")
    (in_tmp / "out" / "train").mkdir(parents=True)
    Checkpoint.from_model(model).save(in_tmp / "out" / "train" / "model.pt")
    chosen = SparsityConfig.for_model(model, [0.5, 0.0])
    SearchResult(chosen.to_dict(), 20.0, "host", 50.0, 50.0, 1.0, 1.0, [], 1, 1, 1.0).save(in_tmp / "result.json")
    Project("r.toml", "out", "out/train/model.pt", "host", None, "result.json").save()
    r = CliRunner().invoke(cli, ["compile", "--target", "host", "--no-validate"])
    assert r.exit_code == 0, r.output
    assert "checkpoint out/train/model.pt, sparsity result.json, output out/compile/host" in r.stdout
    manifest = json.loads((in_tmp / "out" / "compile" / "host" / "manifest.json").read_text())
    assert manifest["sparsity"]["ratios"] == [0.5, 0.0]
    r = CliRunner().invoke(cli, ["compile", "--target", "host", "--checkpoint", "out/train/model.pt"])
    assert r.exit_code == 2 and "pass -o/--out DIR" in r.stderr
