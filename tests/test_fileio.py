"""Artifact I/O: one reader (kind and version checked, one-line errors), one publisher that
never replaces what edgevit did not write, and manifests old and new."""

import json

import pytest

from edgevit.artifact import Manifest, Tolerance
from edgevit.errors import EdgeVitError, ValidationError
from edgevit.fileio import publish_dir, read_artifact, write_json


def one_line(e) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("content, message", [
    (None, "no latency table there; profile"),
    ("{not json", "malformed latency table"),
    ('{"kind": "edgevit.search_result"}', "not a latency table (kind edgevit.search_result); profile"),
    ("[1, 2]", "not a latency table (kind missing)"),
    ('{"kind": "edgevit.latency_table", "version": 9}', "version 9 is not one this edgevit reads (1, 2)"),
])
def test_read_artifact_checks_kind_and_version(tmp_path, content, message):
    path = tmp_path / "t.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EdgeVitError) as e:
        read_artifact(path, "edgevit.latency_table", "profile again", versions=(1, 2))
    assert message in one_line(e) and str(path) in str(e.value)


def test_read_artifact_returns_the_data(tmp_path):
    write_json(tmp_path / "t.json", {"kind": "edgevit.x", "version": 1, "a": [1]})
    assert read_artifact(tmp_path / "t.json", "edgevit.x", "fix")["a"] == [1]


def mine(folder) -> bool:
    return (folder / "made_by_me").is_file()


def test_publish_dir_builds_beside_and_swaps_in(tmp_path):
    out = tmp_path / "art"
    with publish_dir(out, mine, "an artifact") as tmp:
        assert tmp.parent == tmp_path and not out.exists()
        (tmp / "made_by_me").write_text("1")
    assert (out / "made_by_me").read_text() == "1"
    with publish_dir(out, mine, "an artifact") as tmp:       # its own earlier output is replaced
        (tmp / "made_by_me").write_text("2")
    assert (out / "made_by_me").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["art"]


def test_publish_dir_leaves_the_old_artifact_when_the_block_fails(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "made_by_me").write_text("old")
    with pytest.raises(RuntimeError), publish_dir(out, mine, "an artifact") as tmp:
        (tmp / "made_by_me").write_text("new")
        raise RuntimeError("build failed")
    assert (out / "made_by_me").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["art"]


@pytest.mark.parametrize("make, message", [
    (lambda p: (p.mkdir(), (p / "thesis.tex").write_text("years of work")), "not an artifact edgevit wrote"),
    (lambda p: p.write_text("a file"), "not a folder edgevit wrote"),
])
def test_publish_dir_refuses_what_it_did_not_write(tmp_path, make, message):
    out = tmp_path / "out"
    make(out)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(EdgeVitError) as e, publish_dir(out, mine, "an artifact"):
        pytest.fail("the block must not run")
    assert message in one_line(e)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_publish_dir_fills_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with publish_dir(tmp_path / "empty", mine, "an artifact") as tmp:
        (tmp / "made_by_me").write_text("1")
    assert (tmp_path / "empty" / "made_by_me").is_file()


def test_publish_dir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(EdgeVitError) as e, publish_dir(tmp_path / "f" / "art", mine, "an artifact"):
        pass
    assert "is a file, not a folder" in one_line(e)


MANIFEST = {"kind": "edgevit.compiled", "version": 1, "target": {"name": "host", "device": "cpu", "arch": "x86_64"},
            "model": {"name": "m"},
            "input": {"shape": [2, 1, 8, 8]}, "output": {"shape": [2, 3]}, "files": {}, "encoding": "fp32",
            "config": {"max_abs_error": 0.01, "min_top1_agreement": 95.0}}


def test_manifest_round_trips_and_old_manifests_take_their_tolerance_from_the_config(tmp_path):
    old = Manifest.from_dict(MANIFEST, "old")
    assert old.tolerance == Tolerance(0.01, 95.0) and old.input_shape == (2, 1, 8, 8) and old.batch == 2
    old.save(tmp_path)
    again = Manifest.load(tmp_path)
    assert again == old and json.loads((tmp_path / "manifest.json").read_text())["tolerance"]["max_abs_error"] == 0.01
    bare = Manifest.from_dict({k: v for k, v in MANIFEST.items() if k != "config"}, "older")
    assert bare.tolerance == Tolerance()


def test_tolerance_checks_both_limits():
    tol = Tolerance(1e-3, 99.0)
    assert tol.accepts({"max_abs_error": 1e-3, "top1_agreement": 99.0})
    with pytest.raises(ValidationError, match="max abs error 0.002 \\(limit 0.001\\)"):
        tol.check({"max_abs_error": 2e-3, "top1_agreement": 100.0}, "random")
    with pytest.raises(ValidationError, match="top-1 agreement 98.0% \\(limit 99%\\)"):
        tol.check({"max_abs_error": 0.0, "top1_agreement": 98.0}, "random")
    with pytest.raises(ValueError):
        Tolerance(0.0, 99.0)


@pytest.mark.parametrize("change, problem", [
    ({"files": ["model.so"]}, "files must map"),
    ({"files": {"../../etc/passwd": "0" * 64}}, "files must map"),
    ({"target": "host"}, "target must name"),
    ({"input": {"shape": "1x1x8x8"}}, "input must be"),
    ({"input": {"shape": [-1, 1, 8, 8]}}, "input must be"),
    ({"input": {"shape": [2, 1, 8, 8], "std": [0.0]}}, "std must be positive"),
    ({"input": {"shape": [2, 1, 8, 8], "mean": [0.1, 0.2, 0.3]}}, "one number per channel"),
    ({"output": {"shape": [1, 7]}}, "matching the input's batch"),
])
def test_damaged_manifests_are_refused_by_name(change, problem):
    with pytest.raises(EdgeVitError, match=problem) as e:
        Manifest.from_dict({**MANIFEST, **change}, "m.json")
    assert "recompile" in one_line(e)
