"""Every bad input a one-line error, nothing a user made ever deleted.

A battery of bad inputs over every `edgevit` command. Each case asserts the whole contract:

1. the exit code of the error's family (README): 1 general (including an output path edgevit
   refuses to write), 2 bad configuration (any bad option value, click usage errors), 3 bad
   data, 4 bad checkpoint, 5 device unreachable, 7 infeasible budget;
2. exactly one non-empty line on stderr, starting with "error: ", no traceback anywhere and no
   uncaught exception (a real user would see a traceback);
3. every file in the test's folder byte-identical afterwards and nothing new there (the test
   runs inside that folder, so default outputs such as runs/... land there too).

Inputs are written by the cases themselves, by name: an argument such as "{ckpt}" or
"idx:{idx}" is replaced by the path of a freshly made input (see BUILDERS) before the command
runs and before the folder is snapshotted.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import platform
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import class_images, write_idx
from edgevit.checkpoint import FORMAT, Checkpoint
from edgevit.cli import cli
from edgevit.models import create_model

# A folder that can never be created or written to, even by root.
UNWRITABLE = "/proc/edgevit-cannot-write-here"


# ---------------------------------------------------------------------------- the contract


def snapshot(root: Path) -> dict[str, bytes | None]:
    """{relative path: bytes} of every file under root, folders as None."""
    out: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = None if p.is_dir() and not p.is_symlink() else p.read_bytes()
    return out


def check(args: list[str], code: int, fragment: str | None, tmp_path: Path, *, quiet: bool = False,
          env: dict[str, str] | None = None) -> None:
    """Run `edgevit ARGS` in tmp_path and assert the contract (see the module docstring).

    `fragment`: a short piece the one error line must contain (case-insensitive), naming the
    problem; None where only the code and the form are asserted. `quiet`: the command must refuse
    before doing any work, so it prints nothing on stdout either."""
    ws = Workspace(tmp_path)
    args = [ws.fill(a) for a in args]
    env = {k: ws.fill(v) for k, v in (env or {}).items()}
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, args, env=env or None, catch_exceptions=True)
    after = snapshot(tmp_path)
    out, err = result.stdout, result.stderr
    lines = [line for line in err.splitlines() if line.strip()]
    problems = []
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"uncaught {type(result.exception).__name__}: {result.exception}")
    if result.exit_code != code:
        problems.append(f"exit code {result.exit_code}, expected {code}")
    if "Traceback" in out or "Traceback" in err:
        problems.append("a traceback was printed")
    if len(lines) != 1 or not lines[0].startswith("error: "):
        problems.append(f"stderr has {len(lines)} non-empty lines, expected one starting with 'error: '")
    elif fragment and fragment.lower() not in lines[0].lower():
        problems.append(f"the error line does not mention {fragment!r}")
    if quiet and out.strip():
        problems.append("stdout is not empty: the command did work before refusing")
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    removed = sorted(k for k in before if k not in after)
    added = sorted(k for k in after if k not in before)
    for what, paths in (("changed", changed), ("removed", removed), ("new", added)):
        if paths:
            problems.append(f"{what} in the folder: {paths[:8]}")
    assert not problems, "; ".join(problems) + (
        f"\n--- args: {args}\n--- stdout (end):\n{out[-1500:]}\n--- stderr (end):\n{err[-1500:]}")


def case(id_: str, args: list[str], code: int, fragment: str | None = None, *, quiet: bool = False,
         env: dict[str, str] | None = None):
    return pytest.param(args, code, fragment, quiet, env, id=id_)


PARAMS = "args, code, fragment, quiet, env"


# ---------------------------------------------------------------------------- inputs, by name


@pytest.fixture(scope="module", autouse=True)
def _blobs(tmp_path_factory):
    """The module's checkpoints, made once (no training): swin_micro, vit_micro, a plain state dict."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("blobs")
    Checkpoint.from_model(create_model("swin_micro")).save(d / "swin.pt")
    vit = create_model("vit_micro")
    Checkpoint.from_model(vit).save(d / "vit.pt")
    torch.save(vit.state_dict(), d / "state_dict.pt")
    BLOBS.update({p.name: p.read_bytes() for p in d.iterdir()})
    yield
    BLOBS.clear()


BLOBS: dict[str, bytes] = {}


@pytest.fixture(autouse=True)
def _inside_tmp(tmp_path, monkeypatch):
    """Commands run inside the test's folder, so relative default outputs are seen by the snapshot."""
    monkeypatch.chdir(tmp_path)


class Workspace:
    """Makes the named inputs of a case inside tmp_path, each once."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.made: dict[str, str] = {}

    def fill(self, text: str) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: self.get(m.group(1)), text)

    def get(self, name: str) -> str:
        if name not in self.made:
            if name in FILES:
                filename, content = FILES[name]
                path = self.tmp / filename
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(self.fill(content))
            else:
                path = BUILDERS[name](self)
            self.made[name] = str(path)
        return self.made[name]

    def blob(self, blob: str, as_name: str) -> Path:
        path = self.tmp / as_name
        path.write_bytes(BLOBS[blob])
        return path


class RunsCode:
    """Unpickling this calls open('pwned.txt', 'w'): code a checkpoint must never run (and a file
    the snapshot would catch if it ever did)."""

    def __reduce__(self):
        return open, ("pwned.txt", "w")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _png_folder(root: Path, classes: int, per_class: int, channels: int, empty: tuple[str, ...] = ()) -> Path:
    from PIL import Image

    x, y = class_images(per_class, classes, 10, channels)
    for i, (img, label) in enumerate(zip(x, y)):
        d = root / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        pic = img[0] if channels == 1 else img.transpose(1, 2, 0)
        Image.fromarray(pic).save(d / f"{i}.png")
    for name in empty:
        (root / name).mkdir(parents=True)
    return root


def _idx_dir(root: Path, classes: int = 10, truncate: bool = False) -> Path:
    """An IDX set of 12x12 grey images with as many classes as swin_micro predicts (10)."""
    root.mkdir()
    x, y = class_images(40 // classes, classes, 12, 1)
    xt, yt = class_images(2, classes, 12, 1, seed=1)
    write_idx(root / "train-images-idx3-ubyte.gz", x[:, 0], gz=True)
    write_idx(root / "train-labels-idx1-ubyte.gz", y, gz=True)
    write_idx(root / "t10k-images-idx3-ubyte", xt[:, 0])
    write_idx(root / "t10k-labels-idx1-ubyte", yt)
    if truncate:
        f = root / "t10k-images-idx3-ubyte"
        f.write_bytes(f.read_bytes()[:-100])
    return root


def _empty_test_idx(ws: Workspace) -> Path:
    root = ws.tmp / "idx-empty-test"
    root.mkdir()
    x, y = class_images(4, 10, 12, 1)
    write_idx(root / "train-images-idx3-ubyte", x[:, 0])
    write_idx(root / "train-labels-idx1-ubyte", y)
    write_idx(root / "t10k-images-idx3-ubyte", np.zeros((0, 12, 12), dtype=np.uint8))
    write_idx(root / "t10k-labels-idx1-ubyte", np.zeros((0,), dtype=np.uint8))
    return root


def _bad_image_folder(ws: Workspace) -> Path:
    root = _png_folder(ws.tmp / "badimg", 2, 3, 1)
    (root / "class1" / "broken.png").write_text("not an image at all\n")
    return root


def _evil_cifar(ws: Workspace) -> Path:
    root = ws.tmp / "cifar"
    root.mkdir()
    (root / "data_batch_1").write_bytes(pickle.dumps(RunsCode()))
    x, y = class_images(2, 3, 32, 3)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": x.reshape(len(x), -1), b"labels": y.tolist()}))
    return root


def _onnx(ws: Workspace) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = ws.tmp / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def _zip(ws: Workspace) -> Path:
    path = ws.tmp / "weights.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "a zip file, not a checkpoint\n")
    return path


def _torch_file(ws: Workspace, name: str, payload) -> Path:
    path = ws.tmp / name
    torch.save(payload, path)
    return path


def _truncated(ws: Workspace) -> Path:
    data = BLOBS["swin.pt"]
    path = ws.tmp / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])
    return path


def _user_dir(ws: Workspace, name: str = "mine") -> Path:
    d = ws.tmp / name
    d.mkdir()
    (d / "notes.txt").write_text("my own notes, not edgevit's\n")
    return d


def _artifact(ws: Workspace, name: str = "art", manifest_edit=None, after=None) -> Path:
    """A folder shaped like a compiled artifact (manifest with the sha256 of every file); the
    library is not real, so nothing here may run it."""
    d = ws.tmp / name
    d.mkdir()
    (d / "model.so").write_bytes(b"\x7fELF this is not really a library")
    (d / "weights.params").write_bytes(b"not really weights")
    np.savez(d / "reference.npz", input=np.zeros((1, 1, 16, 16), np.float32), output=np.zeros((1, 10), np.float32))
    manifest = {
        "kind": "edgevit.compiled", "version": 1,
        "target": {"name": "host", "device": "cpu", "arch": platform.machine(), "rpc_key": "host",
                   "tvm": {"kind": "llvm"}},
        "model": {"name": "swin_micro", "config": {}, "stage": "train"},
        "input": {"shape": [1, 1, 16, 16], "dtype": "float32", "layout": "NCHW", "mean": [0.5], "std": [0.25],
                  "classes": None},
        "output": {"shape": [1, 10], "dtype": "float32"},
        "files": {n: _sha256(d / n) for n in ("model.so", "weights.params", "reference.npz")},
        "tolerance": {"max_abs_error": 1e-3, "min_top1_agreement": 99.0},
    }
    if manifest_edit:
        manifest_edit(manifest)
    (d / "manifest.json").write_text(json.dumps(manifest))
    if after:
        after(d)
    return d


def _bundle(ws: Workspace) -> Path:
    d = _artifact(ws, "bundle")
    (d / "run_model.py").write_text("print('a deploy bundle')\n")
    return d


def _table(ws: Workspace) -> Path:
    """A latency table for {ckpt} on host (dense 10 ms, the sparsest config ~8.5 ms), keyed as
    `search` expects, so a search with it measures nothing before deciding feasibility."""
    from edgevit.latency import LatencyTable, table_key
    from edgevit.sparsity import SparsityConfig, distinct_units, knob_windows
    from edgevit.targets import load_target

    ckpt = Checkpoint.load(ws.get("ckpt"))
    model = ckpt.build_model()
    windows = knob_windows(model)
    deltas: list[dict[int, float]] = [{} for _ in windows]
    for knob, k, _ in distinct_units(windows, SparsityConfig.for_model(model).levels):
        deltas[knob][k] = -2.0 * (windows[knob] - k) / windows[knob]
    path = ws.tmp / "table.json"
    LatencyTable(table_key(ckpt, load_target("host"), 1, "rules"), 10.0, deltas, windows).save(path)
    return path


def _targets_dir(ws: Workspace, name: str, content: str) -> Path:
    d = ws.tmp / name
    d.mkdir()
    (d / "host.toml").write_text((Path(__file__).parent.parent / "targets" / "host.toml").read_text())
    (d / "mine.toml").write_text(content)
    return d


BUILDERS = {
    # checkpoints
    "ckpt": lambda ws: ws.blob("swin.pt", "swin.pt"),
    "vit": lambda ws: ws.blob("vit.pt", "vit.pt"),
    "state_dict": lambda ws: ws.blob("state_dict.pt", "weights.pt"),
    "text_pt": lambda ws: _write(ws, "model.pt", "this is a text file, renamed .pt\n"),
    "folder_pt": lambda ws: _user_dir(ws, "model.pt"),
    "onnx": _onnx,
    "npy": lambda ws: _np(ws, "weights.npy", np.save),
    "npz": lambda ws: _np(ws, "weights.npz", lambda p, a: np.savez(p, w=a)),
    "zip": _zip,
    "truncated": _truncated,
    "empty_pt": lambda ws: _write(ws, "empty.pt", ""),
    "evil_pt": lambda ws: _torch_file(ws, "evil.pt", {"state_dict": RunsCode()}),
    "evil_legacy": lambda ws: _write_bytes(ws, "evil-legacy.pt", pickle.dumps(RunsCode())),
    "list_pt": lambda ws: _torch_file(ws, "list.pt", [torch.zeros(2), "x"]),
    "future_pt": lambda ws: _torch_file(ws, "future.pt", {"format": FORMAT, "version": 99, "meta": "{}",
                                                          "state_dict": {}}),
    "badmeta_pt": lambda ws: _torch_file(ws, "badmeta.pt", {"format": FORMAT, "version": 1, "meta": "{not json",
                                                            "state_dict": {}}),
    # data sets
    "idx": lambda ws: _idx_dir(ws.tmp / "idx"),
    "idx_one_label": lambda ws: _idx_dir(ws.tmp / "idx-one-label", classes=1),
    "idx_truncated": lambda ws: _idx_dir(ws.tmp / "idx-truncated", truncate=True),
    "idx_empty_test": _empty_test_idx,
    "rgb": lambda ws: _png_folder(ws.tmp / "rgb", 10, 2, 3),
    "one_class": lambda ws: _png_folder(ws.tmp / "one-class", 1, 6, 1),
    "two_images": lambda ws: _png_folder(ws.tmp / "two-images", 2, 1, 1),
    "empty_class": lambda ws: _png_folder(ws.tmp / "empty-class", 2, 3, 1, empty=("class9",)),
    "bad_image": _bad_image_folder,
    "evil_cifar": _evil_cifar,
    # a user's own things
    "userdir": _user_dir,
    "userfile": lambda ws: _write(ws, "notes.txt", "my own notes, not edgevit's\n"),
    "userjson": lambda ws: _write(ws, "notes.json", '{"mine": true}\n'),
    # compiled artifacts, bundles, latency tables
    "art": _artifact,
    "art_tampered": lambda ws: _artifact(ws, "tampered", after=lambda d: (d / "weights.params").write_bytes(b"x")),
    "art_missing_file": lambda ws: _artifact(ws, "incomplete", after=lambda d: (d / "model.so").unlink()),
    "art_bad_json": lambda ws: _artifact(ws, "badjson", after=lambda d: (d / "manifest.json").write_text("{")),
    "art_other_kind": lambda ws: _artifact(ws, "otherkind", manifest_edit=lambda m: m.update(kind="edgevit.other")),
    "art_newer": lambda ws: _artifact(ws, "newer", manifest_edit=lambda m: m.update(version=99)),
    "art_bad_tolerance": lambda ws: _artifact(ws, "badtol", manifest_edit=lambda m: m.update(
        tolerance={"max_abs_error": -1.0, "min_top1_agreement": 99.0})),
    "bundle": _bundle,
    "table": _table,
    # target folders for EDGEVIT_TARGETS_DIR
    "targets_malformed": lambda ws: _targets_dir(ws, "targets-malformed", 'device = "cpu\n'),
    "targets_unknown_key": lambda ws: _targets_dir(ws, "targets-unknown-key", 'description = "x"\ndevice = "cpu"\n'
                                                   'arch = "x86_64"\nflavour = "x"\n[tvm]\nkind = "llvm"\n'),
}


def _write(ws: Workspace, name: str, text: str) -> Path:
    path = ws.tmp / name
    path.write_text(text)
    return path


def _write_bytes(ws: Workspace, name: str, data: bytes) -> Path:
    path = ws.tmp / name
    path.write_bytes(data)
    return path


def _np(ws: Workspace, name: str, save) -> Path:
    path = ws.tmp / name
    save(path, np.zeros((4, 4), np.float32))
    return path


HOST_TOML = 'description = "mine"\ndevice = "cpu"\narch = "x86_64"\n'
RECIPE_HEAD = 'out = "out"\n[data]\nspec = "idx:{idx}"\n'
RECIPE_MODEL = '[model]\nname = "swin_micro"\n'
RECIPE_TRAIN = "[train]\nepochs = 1\nbatch_size = 16\n"

# name: (file name, content); content may name other inputs, e.g. {idx}
FILES = {
    # sparsity configs
    "sp_malformed": ("sparsity.json", '{"ratios": [0.5'),
    "sp_empty": ("sparsity.json", ""),
    "sp_list": ("sparsity.json", "[0.5, 0.5]"),
    "sp_strings": ("sparsity.json", '{"ratios": "ab", "stage_knobs": [1, 1]}'),
    "sp_null_knobs": ("sparsity.json", '{"ratios": [0.5, 0.5], "stage_knobs": null}'),
    "sp_off_level": ("sparsity.json", '{"ratios": [0.55, 0.5], "stage_knobs": [1, 1]}'),
    "sp_unknown_key": ("sparsity.json", '{"ratios": [0.5, 0.5], "stage_knobs": [1, 1], "extra": 1}'),
    "sp_wrong_stages": ("sparsity.json", '{"ratios": [0.1, 0.2], "stage_knobs": [2]}'),
    "sp_bad_result": ("result.json", '{"sparsity": "half"}'),
    # target files
    "t_malformed": ("mine.toml", 'device = "cpu\n'),
    "t_unknown_key": ("mine.toml", HOST_TOML + 'flavour = "x"\n[tvm]\nkind = "llvm"\n'),
    "t_bad_device": ("mine.toml", 'description = "x"\ndevice = "gpu"\narch = "x86_64"\n[tvm]\nkind = "llvm"\n'),
    "t_bad_arch": ("mine.toml", 'description = "x"\ndevice = "cpu"\narch = "riscv"\n[tvm]\nkind = "llvm"\n'),
    "t_bad_kind": ("mine.toml", HOST_TOML + '[tvm]\nkind = "opencl"\n'),
    "t_kind_mismatch": ("mine.toml", HOST_TOML + '[tvm]\nkind = "cuda"\n'),
    "t_no_tvm": ("mine.toml", HOST_TOML),
    "t_name_key": ("mine.toml", HOST_TOML + 'name = "other"\n[tvm]\nkind = "llvm"\n'),
    "t_tvm_not_table": ("mine.toml", HOST_TOML + 'tvm = "llvm"\n'),
    # recipes
    "r_malformed": ("recipe.toml", 'stages = ["train"\n'),
    "r_unknown_key": ("recipe.toml", 'stagez = ["train"]\n' + RECIPE_HEAD + RECIPE_MODEL),
    "r_unknown_stage": ("recipe.toml", 'stages = ["train", "quantise"]\n' + RECIPE_HEAD + RECIPE_MODEL),
    "r_no_stages": ("recipe.toml", "stages = []\n" + RECIPE_HEAD + RECIPE_MODEL),
    "r_stages_string": ("recipe.toml", 'stages = "train"\n' + RECIPE_HEAD + RECIPE_MODEL),
    "r_name_int": ("recipe.toml", 'name = 5\nstages = ["train"]\n' + RECIPE_HEAD + RECIPE_MODEL),
    "r_epochs_zero": ("recipe.toml", 'stages = ["train"]\n' + RECIPE_HEAD + RECIPE_MODEL + "[train]\nepochs = 0\n"),
    "r_epochs_text": ("recipe.toml", 'stages = ["train"]\n' + RECIPE_HEAD + RECIPE_MODEL + '[train]\nepochs = "ten"\n'),
    "r_train_typo": ("recipe.toml", 'stages = ["train"]\n' + RECIPE_HEAD + RECIPE_MODEL + "[train]\nepoch = 1\n"),
    "r_unknown_model": ("recipe.toml", 'stages = ["train"]\n' + RECIPE_HEAD + '[model]\nname = "swin_nano"\n'),
    "r_model_no_name": ("recipe.toml", 'stages = ["train"]\n' + RECIPE_HEAD + "[model]\nimg_size = 16\n"),
    "r_patch_zero": ("recipe.toml", 'stages = ["train"]\n' + RECIPE_HEAD + RECIPE_MODEL + "patch_size = 0\n"
                     + RECIPE_TRAIN),
    "r_window_zero": ("recipe.toml", 'stages = ["train"]\n' + RECIPE_HEAD + RECIPE_MODEL + "window_size = 0\n"
                      + RECIPE_TRAIN),
    "r_val_fraction": ("recipe.toml", 'stages = ["train"]\nout = "out"\n[data]\nspec = "idx:{idx}"\n'
                       "val_fraction = 0.9\n" + RECIPE_MODEL + RECIPE_TRAIN),
    "r_unknown_data": ("recipe.toml", 'stages = ["train"]\nout = "out"\n[data]\nspec = "mnist-ish"\n'
                       + RECIPE_MODEL + RECIPE_TRAIN),
    "r_missing_data": ("recipe.toml", 'stages = ["train"]\nout = "out"\n[data]\nspec = "idx:no-such-dir"\n'
                       + RECIPE_MODEL + RECIPE_TRAIN),
    "r_bad_budget": ("recipe.toml", 'stages = ["train"]\n' + RECIPE_HEAD + RECIPE_MODEL + RECIPE_TRAIN
                     + '[search]\nbudget = "fast"\n'),
    "r_unknown_target": ("recipe.toml", 'stages = ["train", "profile"]\n' + RECIPE_HEAD + RECIPE_MODEL
                         + RECIPE_TRAIN + '[profile]\ntarget = "no-such-board"\n'),
    "r_ok": ("recipe.toml", 'stages = ["train"]\n' + RECIPE_HEAD + RECIPE_MODEL + RECIPE_TRAIN),
}


# ---------------------------------------------------------------------------- click usage errors


USAGE = [
    case("unknown-command", ["quantise"], 2, "quantise"),
    case("unknown-option", ["train", "--epoch", "3"], 2, "--epoch"),
    case("int-option-not-a-number", ["train", "--epochs", "ten"], 2, "--epochs"),
    case("float-option-not-a-number", ["verify", "{art}", "--timeout", "soon"], 2, "--timeout"),
    case("bad-choice", ["eval", "--checkpoint", "{ckpt}", "--split", "holdout"], 2, "--split"),
    case("missing-required-option", ["eval"], 2, "--checkpoint"),
    case("missing-required-out", ["compile", "--target", "host", "--checkpoint", "{ckpt}"], 2, "--out"),
    case("missing-argument", ["data"], 2, "SPEC"),
    case("extra-argument", ["models", "swin_t"], 2, "swin_t"),
    case("stages-unknown-option", ["stages", "--json", "x.json"], 2, "--json"),
    case("emulator-unknown-subcommand", ["emulator", "reboot"], 2, "reboot"),
    case("search-missing-budget", ["search", "--target", "host", "--checkpoint", "{ckpt}", "-o", "r.json"], 2,
         "--budget"),
]


@pytest.mark.parametrize(PARAMS, USAGE)
def test_usage(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- data


DATA = [
    case("unknown-spec", ["data", "mnist-ish"], 3, "mnist-ish"),
    case("spec-without-dir", ["data", "idx"], 3, "idx:DIR"),
    case("missing-dir", ["data", "idx:no-such-dir"], 3, "no-such-dir"),
    case("one-class-folder", ["data", "imagefolder:{one_class}"], 3, "fewer than two classes"),
    case("one-label-idx", ["data", "idx:{idx_one_label}"], 3, "fewer than two classes"),
    # two images, one per class: the 70/10/20 split leaves no test image and one class to train on
    case("two-image-pool", ["data", "imagefolder:{two_images}"], 3, None),
    case("empty-test-split-idx", ["data", "idx:{idx_empty_test}"], 3, "empty"),
    case("truncated-idx", ["data", "idx:{idx_truncated}"], 3, "truncated"),
    case("empty-class-folder", ["data", "imagefolder:{empty_class}"], 3, "class9"),
    case("unreadable-image", ["data", "imagefolder:{bad_image}"], 3, "broken.png"),
    case("cifar-pickle-runs-code", ["data", "cifar10:{evil_cifar}"], 3, "data_batch_1"),
    case("img-size-zero", ["data", "digits", "--img-size", "0"], 2, "size"),
    case("img-size-negative", ["data", "digits", "--img-size", "-8"], 2, "size"),
    case("json-is-a-folder", ["data", "digits", "--json", "{userdir}"], 1, "mine", quiet=True),
    case("json-inside-a-file", ["data", "digits", "--json", "{userfile}/figures.json"], 1, "notes.txt", quiet=True),
    case("json-unwritable", ["data", "digits", "--json", UNWRITABLE + "/figures.json"], 1, None),
]


@pytest.mark.parametrize(PARAMS, DATA)
def test_data(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- models, stages, targets, emulator


LISTINGS = [
    case("models-unknown-option", ["models", "--all"], 2, "--all"),
    case("stages-extra-argument", ["stages", "train"], 2, "train"),
    case("targets-json-is-a-folder", ["targets", "--json", "{userdir}"], 1, "mine", quiet=True),
    case("targets-json-unwritable", ["targets", "--json", UNWRITABLE + "/t.json"], 1, None),
    case("targets-dir-malformed-toml", ["targets"], 2, "mine.toml", env={"EDGEVIT_TARGETS_DIR": "{targets_malformed}"}),
    case("targets-dir-unknown-key", ["targets"], 2, "flavour", env={"EDGEVIT_TARGETS_DIR": "{targets_unknown_key}"}),
    case("emulator-status-json-is-a-folder", ["emulator", "status", "--json", "{userdir}"], 1, "mine", quiet=True),
    case("emulator-status-json-inside-a-file", ["emulator", "status", "--json", "{userfile}/s.json"], 1, "notes.txt",
         quiet=True),
    case("emulator-status-extra-argument", ["emulator", "status", "now"], 2, "now"),
]


@pytest.mark.parametrize(PARAMS, LISTINGS)
def test_listings(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- train


TRAIN_OPTS = ["--epochs", "1", "--batch-size", "16", "--no-augment"]
TRAIN_FAST = ["--data", "idx:{idx}", "--model", "swin_micro", *TRAIN_OPTS]

TRAIN = [
    case("epochs-zero", ["train", "--data", "idx:{idx}", "--model", "swin_micro", "--epochs", "0"], 2, "epochs"),
    case("epochs-negative", ["train", "--data", "idx:{idx}", "--model", "swin_micro", "--epochs", "-2"], 2, "epochs"),
    case("batch-size-zero", ["train", "--data", "idx:{idx}", "--model", "swin_micro", "--batch-size", "0"], 2,
         "batch"),
    case("lr-zero", ["train", "--data", "idx:{idx}", "--model", "swin_micro", "--lr", "0"], 2, "lr"),
    case("lr-huge", ["train", "--data", "idx:{idx}", "--model", "swin_micro", "--lr", "5"], 2, "lr"),
    case("unknown-model", ["train", "--model", "swin_nano"], 2, "swin_nano"),
    case("set-patch-size-zero", ["train", *TRAIN_FAST, "--set", "patch_size=0"], 2, "patch_size"),
    case("set-img-size-text", ["train", *TRAIN_FAST, "--set", "img_size=abc"], 2, "img_size"),
    case("set-img-size-negative", ["train", *TRAIN_FAST, "--set", "img_size=-16"], 2, "img_size"),
    case("set-window-size-zero", ["train", *TRAIN_FAST, "--set", "window_size=0"], 2, "window_size"),
    case("set-unknown-key", ["train", *TRAIN_FAST, "--set", "patchsize=2"], 2, "patchsize"),
    case("set-without-value", ["train", *TRAIN_FAST, "--set", "img_size"], 2, "img_size"),
    case("set-depths-heads-mismatch", ["train", *TRAIN_FAST, "--set", "depths=[2,2,2]"], 2, "depths"),
    case("unknown-data-spec", ["train", "--model", "swin_micro", "--data", "mnist-ish"], 3, "mnist-ish"),
    case("missing-data-dir", ["train", "--model", "swin_micro", "--data", "idx:no-such-dir"], 3, "no-such-dir"),
    case("one-class", ["train", "--model", "swin_micro", *TRAIN_OPTS, "--data", "imagefolder:{one_class}"], 3,
         "fewer than two classes"),
    case("rgb-data-one-channel-model", ["train", "--model", "swin_micro", *TRAIN_OPTS, "--data", "imagefolder:{rgb}",
                                        "--set", "in_chans=1"], 3, "channel"),
    case("teacher-for-undistilled-model", ["train", *TRAIN_FAST, "--teacher", "{vit}"], 2, "distill"),
    case("teacher-missing", ["train", "--data", "idx:{idx}", "--model", "deit_micro_distilled", *TRAIN_OPTS,
                             "--teacher", "gone.pt"], 4, "gone.pt"),
    case("teacher-not-a-checkpoint", ["train", "--data", "idx:{idx}", "--model", "deit_micro_distilled", *TRAIN_OPTS,
                                      "--teacher", "{text_pt}"], 4, "model.pt"),
    case("out-is-a-user-file", ["train", *TRAIN_FAST, "--out", "{userfile}"], 1, "notes.txt", quiet=True),
    case("out-unwritable", ["train", *TRAIN_FAST, "--out", UNWRITABLE], 1, None),
    case("json-is-a-folder", ["train", *TRAIN_FAST, "--out", "run", "--json", "{userdir}"], 1, "mine", quiet=True),
    case("resume-other-run", ["train", *TRAIN_FAST, "--out", "{ckpt_run}", "--resume"], 2, "last.pt"),
    case("earlier-run-without-resume", ["train", *TRAIN_FAST, "--out", "{ckpt_run}"], 1, "--resume"),
    case("resume-from-a-user-file", ["train", *TRAIN_FAST, "--out", "{text_run}", "--resume"], 1, "last.pt"),
]

BUILDERS["ckpt_run"] = lambda ws: _run_dir(ws, "earlier-run", BLOBS["swin.pt"])
BUILDERS["text_run"] = lambda ws: _run_dir(ws, "text-run", b"not a checkpoint\n")


def _run_dir(ws: Workspace, name: str, last: bytes) -> Path:
    d = ws.tmp / name
    d.mkdir()
    (d / "last.pt").write_bytes(last)
    return d


@pytest.mark.parametrize(PARAMS, TRAIN)
def test_train(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- checkpoints (eval)


EVAL_DATA = ["--data", "idx:{idx}"]

CHECKPOINTS = [
    case("missing-file", ["eval", "--checkpoint", "gone.pt"], 4, "gone.pt"),
    case("text-file-renamed-pt", ["eval", "--checkpoint", "{text_pt}"], 4, "model.pt"),
    case("a-folder", ["eval", "--checkpoint", "{folder_pt}"], 4, "model.pt"),
    case("onnx-file", ["eval", "--checkpoint", "{onnx}"], 4, "model.onnx"),
    case("numpy-npy", ["eval", "--checkpoint", "{npy}"], 4, "weights.npy"),
    case("numpy-npz", ["eval", "--checkpoint", "{npz}"], 4, "weights.npz"),
    case("zip-file", ["eval", "--checkpoint", "{zip}"], 4, "weights.zip"),
    case("truncated", ["eval", "--checkpoint", "{truncated}"], 4, "truncated.pt"),
    case("empty-file", ["eval", "--checkpoint", "{empty_pt}"], 4, "empty.pt"),
    case("pickle-runs-code", ["eval", "--checkpoint", "{evil_pt}"], 4, "would run code"),
    case("legacy-pickle-runs-code", ["eval", "--checkpoint", "{evil_legacy}"], 4, "would run code"),
    case("torch-file-of-a-list", ["eval", "--checkpoint", "{list_pt}"], 4, "list.pt"),
    case("future-format-version", ["eval", "--checkpoint", "{future_pt}"], 4, "version"),
    case("damaged-metadata", ["eval", "--checkpoint", "{badmeta_pt}"], 4, "badmeta.pt"),
    case("state-dict-without-model", ["eval", "--checkpoint", "{state_dict}", *EVAL_DATA], 4, "--model"),
    case("state-dict-of-another-model", ["eval", "--checkpoint", "{state_dict}", "--model", "swin_micro",
                                         *EVAL_DATA], 4, "weights.pt"),
    case("state-dict-unknown-model", ["eval", "--checkpoint", "{state_dict}", "--model", "vit_nano", *EVAL_DATA], 2,
         "vit_nano"),
    case("checkpoint-names-no-data", ["eval", "--checkpoint", "{ckpt}"], 2, "--data"),
]


@pytest.mark.parametrize(PARAMS, CHECKPOINTS)
def test_checkpoints(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


EVAL = [
    case("unknown-data-spec", ["eval", "--checkpoint", "{ckpt}", "--data", "mnist-ish"], 3, "mnist-ish"),
    case("rgb-data-one-channel-model", ["eval", "--checkpoint", "{ckpt}", "--data", "imagefolder:{rgb}"], 3,
         "channel"),
    case("one-class-data", ["eval", "--checkpoint", "{ckpt}", "--data", "imagefolder:{one_class}"], 3,
         "fewer than two classes"),
    case("empty-test-split", ["eval", "--checkpoint", "{ckpt}", "--data", "idx:{idx_empty_test}"], 3, "empty"),
    case("sparsity-off-level", ["eval", "--checkpoint", "{ckpt}", *EVAL_DATA, "--sparsity", "0.85"], 2, "0.85"),
    case("sparsity-above-one", ["eval", "--checkpoint", "{ckpt}", *EVAL_DATA, "--sparsity", "1.5"], 2, "1.5"),
    case("sparsity-negative", ["eval", "--checkpoint", "{ckpt}", *EVAL_DATA, "--sparsity", "-0.1"], 2, "-0.1"),
    case("sparsity-missing-file", ["eval", "--checkpoint", "{ckpt}", *EVAL_DATA, "--sparsity", "gone.json"], 2,
         "gone.json"),
    case("sparsity-malformed-json", ["eval", "--checkpoint", "{ckpt}", *EVAL_DATA, "--sparsity", "{sp_malformed}"],
         2, "sparsity.json"),
    case("sparsity-on-vit", ["eval", "--checkpoint", "{vit}", *EVAL_DATA, "--sparsity", "0.5"], 2, "swin"),
    case("json-is-a-folder", ["eval", "--checkpoint", "{ckpt}", *EVAL_DATA, "--json", "{userdir}"], 1, "mine",
         quiet=True),
]


@pytest.mark.parametrize(PARAMS, EVAL)
def test_eval(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- adapt


ADAPT_FAST = ["--data", "idx:{idx}", "--epochs", "1", "--batch-size", "16"]

ADAPT = [
    case("missing-checkpoint", ["adapt", "--checkpoint", "gone.pt", *ADAPT_FAST], 4, "gone.pt"),
    case("pickle-runs-code", ["adapt", "--checkpoint", "{evil_pt}", *ADAPT_FAST], 4, "would run code"),
    case("vit-has-no-windows", ["adapt", "--checkpoint", "{vit}", *ADAPT_FAST], 2, "swin"),
    case("epochs-zero", ["adapt", "--checkpoint", "{ckpt}", "--data", "idx:{idx}", "--epochs", "0"], 2, "epochs"),
    case("batch-size-zero", ["adapt", "--checkpoint", "{ckpt}", "--data", "idx:{idx}", "--batch-size", "0"], 2,
         "batch"),
    case("lr-negative", ["adapt", "--checkpoint", "{ckpt}", *ADAPT_FAST, "--lr", "-0.1"], 2, "lr"),
    case("unknown-data-spec", ["adapt", "--checkpoint", "{ckpt}", "--data", "mnist-ish"], 3, "mnist-ish"),
    case("rgb-data-one-channel-model", ["adapt", "--checkpoint", "{ckpt}", "--data", "imagefolder:{rgb}",
                                        "--epochs", "1"], 3, "channel"),
    case("out-is-a-user-file", ["adapt", "--checkpoint", "{ckpt}", *ADAPT_FAST, "--out", "{userfile}"], 1,
         "notes.txt", quiet=True),
    case("json-is-a-folder", ["adapt", "--checkpoint", "{ckpt}", *ADAPT_FAST, "--out", "run", "--json",
                              "{userdir}"], 1, "mine", quiet=True),
]


@pytest.mark.parametrize(PARAMS, ADAPT)
def test_adapt(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- flops: model settings and sparsity


SWIN = ["flops", "--model", "swin_micro"]

FLOPS = [
    case("neither-checkpoint-nor-model", ["flops"], 2, "--model"),
    case("unknown-model", ["flops", "--model", "swin_nano"], 2, "swin_nano"),
    case("set-patch-size-zero", [*SWIN, "--set", "patch_size=0"], 2, "patch_size"),
    case("set-img-size-text", [*SWIN, "--set", "img_size=abc"], 2, "img_size"),
    case("set-img-size-zero", [*SWIN, "--set", "img_size=0"], 2, "img_size"),
    case("set-img-size-odd", [*SWIN, "--set", "img_size=17"], 2, "img_size"),
    case("set-window-size-zero", [*SWIN, "--set", "window_size=0"], 2, "window_size"),
    case("set-num-heads-zero", [*SWIN, "--set", "num_heads=[0,2]"], 2, "num_heads"),
    case("set-mlp-ratio-negative", [*SWIN, "--set", "mlp_ratio=-1"], 2, "mlp_ratio"),
    case("set-in-chans-zero", [*SWIN, "--set", "in_chans=0"], 2, "in_chans"),
    case("set-embed-dim-text", [*SWIN, "--set", "embed_dim=abc"], 2, "embed_dim"),
    case("vit-set-patch-size-zero", ["flops", "--model", "vit_micro", "--set", "patch_size=0"], 2, "patch_size"),
    case("batch-zero", [*SWIN, "--batch", "0"], 2, "batch"),
    case("batch-negative", [*SWIN, "--batch", "-1"], 2, "batch"),
    case("sparsity-nan", [*SWIN, "--sparsity", "nan"], 2, "nan"),
    case("sparsity-empty-file", [*SWIN, "--sparsity", "{sp_empty}"], 2, "sparsity.json"),
    case("sparsity-json-list", [*SWIN, "--sparsity", "{sp_list}"], 2, "sparsity.json"),
    case("sparsity-ratios-not-numbers", [*SWIN, "--sparsity", "{sp_strings}"], 2, "ratio"),
    case("sparsity-null-stage-knobs", [*SWIN, "--sparsity", "{sp_null_knobs}"], 2, "stage_knobs"),
    case("sparsity-off-level", [*SWIN, "--sparsity", "{sp_off_level}"], 2, "0.55"),
    case("sparsity-unknown-key", [*SWIN, "--sparsity", "{sp_unknown_key}"], 2, "extra"),
    case("sparsity-other-model-stages", [*SWIN, "--sparsity", "{sp_wrong_stages}"], 2, None),
    case("sparsity-result-without-config", [*SWIN, "--sparsity", "{sp_bad_result}"], 2, "result.json"),
    case("sparsity-is-a-folder", [*SWIN, "--sparsity", "{userdir}"], 2, "mine"),
    case("checkpoint-runs-code", ["flops", "--checkpoint", "{evil_pt}"], 4, "would run code"),
    case("checkpoint-state-dict-without-model", ["flops", "--checkpoint", "{state_dict}"], 4, "--model"),
    case("json-is-a-folder", [*SWIN, "--json", "{userdir}"], 1, "mine", quiet=True),
    case("json-inside-a-file", [*SWIN, "--json", "{userfile}/f.json"], 1, "notes.txt", quiet=True),
]


@pytest.mark.parametrize(PARAMS, FLOPS)
def test_flops(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- compile


def compile_args(*extra, target="host", checkpoint="{ckpt}", out="out/art"):
    return ["compile", "--target", target, "--checkpoint", checkpoint, "-o", out, *extra]


COMPILE = [
    case("unknown-target", compile_args(target="jetson-nanoo"), 2, "jetson-nanoo", quiet=True),
    case("target-file-missing", compile_args(target="boards/mine.toml"), 2, "mine.toml", quiet=True),
    case("target-malformed-toml", compile_args(target="{t_malformed}"), 2, "mine.toml", quiet=True),
    case("target-unknown-key", compile_args(target="{t_unknown_key}"), 2, "flavour", quiet=True),
    case("target-bad-device", compile_args(target="{t_bad_device}"), 2, "device", quiet=True),
    case("target-bad-arch", compile_args(target="{t_bad_arch}"), 2, "arch", quiet=True),
    case("target-bad-tvm-kind", compile_args(target="{t_bad_kind}"), 2, "kind", quiet=True),
    case("target-kind-device-mismatch", compile_args(target="{t_kind_mismatch}"), 2, "kind", quiet=True),
    case("target-without-tvm-table", compile_args(target="{t_no_tvm}"), 2, "tvm", quiet=True),
    case("target-tvm-not-a-table", compile_args(target="{t_tvm_not_table}"), 2, "tvm", quiet=True),
    case("target-with-name-key", compile_args(target="{t_name_key}"), 2, "name", quiet=True),
    case("batch-zero", compile_args("--batch", "0"), 2, "batch", quiet=True),
    case("missing-checkpoint", compile_args(checkpoint="gone.pt"), 4, "gone.pt", quiet=True),
    case("checkpoint-runs-code", compile_args(checkpoint="{evil_pt}"), 4, "would run code", quiet=True),
    case("checkpoint-is-onnx", compile_args(checkpoint="{onnx}"), 4, "model.onnx", quiet=True),
    case("sparsity-on-vit", compile_args("--sparsity", "0.5", checkpoint="{vit}"), 2, "swin", quiet=True),
    case("sparsity-off-level", compile_args("--sparsity", "0.85"), 2, "0.85", quiet=True),
    case("sparsity-malformed-json", compile_args("--sparsity", "{sp_malformed}"), 2, "sparsity.json", quiet=True),
    case("out-is-a-user-folder", compile_args(out="{userdir}"), 1, "mine", quiet=True),
    case("out-is-a-user-file", compile_args(out="{userfile}"), 1, "notes.txt", quiet=True),
    case("out-inside-a-file", compile_args(out="{userfile}/art"), 1, "notes.txt", quiet=True),
    case("out-is-a-deploy-bundle", compile_args(out="{bundle}"), 1, "bundle", quiet=True),
    case("out-unwritable", compile_args(out=UNWRITABLE + "/art"), 1, None, quiet=True),
    case("json-is-a-folder", compile_args("--no-validate", "--no-tuning", "--json", "{userdir}"), 1, "mine",
         quiet=True),
]


@pytest.mark.parametrize(PARAMS, COMPILE)
def test_compile(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- tune


def tune_args(*extra, target="host", checkpoint="{ckpt}"):
    return ["tune", "--target", target, "--checkpoint", checkpoint, *extra]


NO_DEVICE = "127.0.0.1:9"   # the discard port: nothing listens there

TUNE = [
    case("trials-zero", tune_args("--trials", "0"), 2, "trials", quiet=True),
    case("batch-zero", tune_args("--batch", "0"), 2, "batch", quiet=True),
    case("unknown-target", tune_args(target="rasp9"), 2, "rasp9", quiet=True),
    case("gpu-target", tune_args(target="cuda-sm80"), 2, "cuda", quiet=True),
    case("missing-checkpoint", tune_args(checkpoint="gone.pt"), 4, "gone.pt", quiet=True),
    case("checkpoint-is-a-zip", tune_args(checkpoint="{zip}"), 4, "weights.zip", quiet=True),
    case("sparsity-on-vit", tune_args("--sparsity", "0.5", checkpoint="{vit}"), 2, "swin", quiet=True),
    case("database-is-a-user-file", tune_args("--database", "{userfile}"), 1, "notes.txt", quiet=True),
    case("device-unreachable", tune_args("--rpc", NO_DEVICE), 5, "127.0.0.1:9"),
    case("rpc-not-host-port", tune_args("--rpc", "my-board"), 2, "my-board"),
    case("json-is-a-folder", tune_args("--rpc", NO_DEVICE, "--json", "{userdir}"), 1, "mine", quiet=True),
]


@pytest.mark.parametrize(PARAMS, TUNE)
def test_tune(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- profile


def profile_args(*extra, target="host", checkpoint="{ckpt}"):
    return ["profile", "--target", target, "--checkpoint", checkpoint, *extra]


PROFILE = [
    case("batch-zero", profile_args("--batch", "0"), 2, "batch", quiet=True),
    case("calibrate-negative", profile_args("--calibrate", "-1"), 2, "calibrate", quiet=True),
    case("validate-negative", profile_args("--validate", "-3"), 2, "validate", quiet=True),
    case("unknown-target", profile_args(target="orin-nx"), 2, "orin-nx", quiet=True),
    case("target-malformed-toml", profile_args(target="{t_malformed}"), 2, "mine.toml", quiet=True),
    case("missing-checkpoint", profile_args(checkpoint="gone.pt"), 4, "gone.pt", quiet=True),
    case("vit-has-no-windows", profile_args(checkpoint="{vit}"), 2, "swin", quiet=True),
    case("device-unreachable", profile_args("--rpc", NO_DEVICE, "-o", "table.json"), 5, "127.0.0.1:9"),
    case("rpc-not-host-port", profile_args("--rpc", "localhost", "-o", "table.json"), 2, "localhost"),
    case("out-is-a-user-json", profile_args("-o", "{userjson}"), 1, "notes.json", quiet=True),
    case("out-is-a-user-text-file", profile_args("-o", "{userfile}"), 1, "notes.txt", quiet=True),
    case("out-is-a-folder", profile_args("-o", "{userdir}"), 1, "mine", quiet=True),
    case("json-is-a-folder", profile_args("--rpc", NO_DEVICE, "-o", "table.json", "--json", "{userdir}"), 1, "mine",
         quiet=True),
]


@pytest.mark.parametrize(PARAMS, PROFILE)
def test_profile(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- search


def search_args(*extra, budget="1ms", checkpoint="{ckpt}", table="{table}", out="result.json"):
    args = ["search", "--budget", budget, "--target", "host", "--checkpoint", checkpoint, "-o", out, *extra]
    return args + (["--table", table] if table else [])


SEARCH = [
    case("budget-not-a-latency", search_args(budget="fast"), 2, "budget", quiet=True),
    case("budget-zero", search_args(budget="0ms"), 2, "budget", quiet=True),
    case("budget-negative", search_args(budget="-2ms"), 2, "budget", quiet=True),
    case("budget-unknown-unit", search_args(budget="5 fortnights"), 2, "budget", quiet=True),
    case("population-too-small", search_args("--population", "2"), 2, "population", quiet=True),
    case("evaluations-zero", search_args("--evaluations", "0"), 2, "evaluations", quiet=True),
    case("val-images-negative", search_args("--val-images", "-1"), 2, "val", quiet=True),
    case("finetune-negative", search_args("--finetune", "-1"), 2, "finetune", quiet=True),
    case("unknown-target", ["search", "--budget", "1ms", "--target", "raspberry-pi-6", "--checkpoint", "{ckpt}", "-o",
                            "r.json"], 2, "raspberry-pi-6", quiet=True),
    case("missing-checkpoint", search_args(checkpoint="gone.pt"), 4, "gone.pt", quiet=True),
    case("checkpoint-runs-code", search_args(checkpoint="{evil_legacy}"), 4, "would run code", quiet=True),
    case("vit-has-no-windows", search_args(checkpoint="{vit}", table=None), 2, "swin", quiet=True),
    case("infeasible-budget", search_args(budget="1ms"), 7, "fastest reachable"),
    case("device-unreachable", search_args("--rpc", NO_DEVICE, budget="9.5ms"), 5, "127.0.0.1:9"),
    case("checkpoint-names-no-data", search_args(budget="9.5ms"), 2, "data"),
    case("table-is-a-folder", search_args(table="{userdir}"), 1, "mine", quiet=True),
    case("table-is-a-user-json", search_args(table="{userjson}"), 1, "notes.json", quiet=True),
    case("out-is-a-folder", search_args(out="{userdir}"), 1, "mine", quiet=True),
    case("json-is-a-folder", search_args("--json", "{userdir}"), 1, "mine", quiet=True),
]


@pytest.mark.parametrize(PARAMS, SEARCH)
def test_search(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- verify and package


VERIFY = [
    case("missing-folder", ["verify", "no-such-artifact"], 1, "no-such-artifact", quiet=True),
    case("a-user-folder", ["verify", "{userdir}"], 1, "not a compiled artifact", quiet=True),
    case("a-file", ["verify", "{userfile}"], 1, "notes.txt", quiet=True),
    case("tampered-file", ["verify", "{art_tampered}"], 1, "weights.params", quiet=True),
    case("file-missing", ["verify", "{art_missing_file}"], 1, "model.so", quiet=True),
    case("malformed-manifest", ["verify", "{art_bad_json}"], 1, "manifest.json", quiet=True),
    case("manifest-of-another-kind", ["verify", "{art_other_kind}"], 1, "manifest.json", quiet=True),
    case("manifest-from-a-newer-edgevit", ["verify", "{art_newer}"], 1, "version", quiet=True),
    case("manifest-bad-tolerance", ["verify", "{art_bad_tolerance}"], 1, "manifest", quiet=True),
    case("device-unreachable", ["verify", "{art}", "--rpc", NO_DEVICE, "--timeout", "5"], 5, "127.0.0.1:9"),
    case("rpc-not-host-port", ["verify", "{art}", "--rpc", "board"], 2, "board"),
    case("timeout-negative", ["verify", "{art}", "--timeout", "-1"], 2, "timeout"),
    case("timeout-zero", ["verify", "{art}", "--rpc", NO_DEVICE, "--timeout", "0"], 2, "timeout"),
    case("json-is-a-folder", ["verify", "{art}", "--json", "{userdir}"], 1, "mine", quiet=True),
]


@pytest.mark.parametrize(PARAMS, VERIFY)
def test_verify(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


PACKAGE = [
    case("out-is-the-artifact", ["package", "{art}", "-o", "{art}"], 1, "artifact", quiet=True),
    case("out-is-a-user-folder", ["package", "{art}", "-o", "{userdir}"], 1, "mine", quiet=True),
    case("out-is-a-user-file", ["package", "{art}", "-o", "{userfile}"], 1, "notes.txt", quiet=True),
    case("out-unwritable", ["package", "{art}", "-o", UNWRITABLE + "/bundle"], 1, None, quiet=True),
    case("source-is-a-user-folder", ["package", "{userdir}", "-o", "bundle"], 1, "not a compiled artifact",
         quiet=True),
    case("source-missing", ["package", "no-such-artifact", "-o", "bundle"], 1, "no-such-artifact", quiet=True),
    case("source-tampered", ["package", "{art_tampered}", "-o", "bundle"], 1, "weights.params", quiet=True),
    case("missing-out", ["package", "{art}"], 2, "--out"),
    case("json-is-a-folder", ["package", "{art}", "-o", "bundle", "--json", "{userdir}"], 1, "mine", quiet=True),
]


@pytest.mark.parametrize(PARAMS, PACKAGE)
def test_package(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- run (recipes)


RUN = [
    case("missing-recipe", ["run", "gone.toml"], 2, "gone.toml", quiet=True),
    case("recipe-is-a-folder", ["run", "{userdir}"], 2, "mine", quiet=True),
    case("malformed-toml", ["run", "{r_malformed}"], 2, "recipe.toml", quiet=True),
    case("unknown-top-key", ["run", "{r_unknown_key}"], 2, "stagez", quiet=True),
    case("unknown-stage", ["run", "{r_unknown_stage}"], 2, "quantise", quiet=True),
    case("no-stages", ["run", "{r_no_stages}"], 2, "stages", quiet=True),
    case("stages-not-a-list", ["run", "{r_stages_string}"], 2, "stages", quiet=True),
    case("name-not-a-string", ["run", "{r_name_int}"], 2, "name", quiet=True),
    case("epochs-zero", ["run", "{r_epochs_zero}"], 2, "epochs", quiet=True),
    case("epochs-not-a-number", ["run", "{r_epochs_text}"], 2, "epochs", quiet=True),
    case("train-key-typo", ["run", "{r_train_typo}"], 2, "epoch", quiet=True),
    case("unknown-model", ["run", "{r_unknown_model}"], 2, "swin_nano", quiet=True),
    case("model-without-name", ["run", "{r_model_no_name}"], 2, "name", quiet=True),
    case("model-patch-size-zero", ["run", "{r_patch_zero}"], 2, "patch_size", quiet=True),
    case("model-window-size-zero", ["run", "{r_window_zero}"], 2, "window_size", quiet=True),
    case("val-fraction-too-big", ["run", "{r_val_fraction}"], 2, "val_fraction", quiet=True),
    case("bad-budget", ["run", "{r_bad_budget}"], 2, "budget", quiet=True),
    case("unknown-profile-target", ["run", "{r_unknown_target}"], 2, "no-such-board", quiet=True),
    case("unknown-data-spec", ["run", "{r_unknown_data}"], 3, "mnist-ish", quiet=True),
    case("missing-data-dir", ["run", "{r_missing_data}"], 3, "no-such-dir", quiet=True),
    case("json-is-a-folder", ["run", "{r_ok}", "--json", "{userdir}"], 1, "mine", quiet=True),
]


@pytest.mark.parametrize(PARAMS, RUN)
def test_run(args, code, fragment, quiet, env, tmp_path):
    check(args, code, fragment, tmp_path, quiet=quiet, env=env)


# ---------------------------------------------------------------------------- found by hand, later


def test_replacing_an_artifact_never_deletes_files_a_user_added(tmp_path):
    """compile/package/report replace their own earlier output, but not a folder a user added to."""
    from edgevit.checkpoint import Checkpoint as Ckpt
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.errors import OutputError
    from edgevit.package import package
    from edgevit.targets import load_target

    torch.manual_seed(0)
    ckpt = Ckpt.from_model(create_model("swin_micro"))
    art = compile_model(ckpt, load_target("host"), tmp_path / "art", None, CompileConfig(validate=False, images=4),
                        log=lambda _: None)
    (art.path / "NOTES.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files edgevit did not write"):
        compile_model(ckpt, load_target("host"), art.path, None, CompileConfig(validate=False, images=4),
                      log=lambda _: None)
    assert (art.path / "NOTES.txt").read_text() == "mine"
    (art.path / "NOTES.txt").unlink()
    package(art, tmp_path / "bundle")
    (tmp_path / "bundle" / "README-mine.txt").write_text("mine")
    with pytest.raises(OutputError):
        package(art, tmp_path / "bundle")
    assert (tmp_path / "bundle" / "README-mine.txt").read_text() == "mine"


@pytest.mark.parametrize("recipe, message", [
    ('stages = ["compile", "train"]\n[model]\nname = "swin_micro"\n', "pipeline order"),
    ('stages = ["train", "train"]\n[model]\nname = "swin_micro"\n', "listed once each"),
    ('stages = ["train", "adapt"]\n[model]\nname = "vit_micro"\n', "prune windows"),
    ('stages = ["adapt"]\n[model]\nname = "swin_micro"\n[adapt]\nlevels = [0.5, 0.1]\n', "include 0.0"),
])
def test_recipes_refused_before_any_work(tmp_path, recipe, message):
    (tmp_path / "r.toml").write_text(recipe)
    check(["run", str(tmp_path / "r.toml")], 2, message, tmp_path, quiet=True)


def test_a_recipe_out_holding_user_files_is_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "r.toml").write_text('stages = ["train"]\nout = "mine"\n[model]\nname = "swin_micro"\n')
    check(["run", str(tmp_path / "r.toml")], 1, "holds things a run does not write", tmp_path, quiet=True)


def test_digits_takes_no_directory(tmp_path):
    check(["data", "digits:mine"], 3, "takes no directory", tmp_path, quiet=True)


def test_a_bench_stage_without_artifacts_says_what_to_run_first(tmp_path):
    (tmp_path / "r.toml").write_text('stages = ["bench"]\nout = "out"\n[model]\nname = "swin_micro"\n')
    check(["run", str(tmp_path / "r.toml")], 1, "no compiled artifacts to measure", tmp_path)


def test_a_project_file_naming_a_deleted_checkpoint_names_it(tmp_path):
    from edgevit.project import Project

    Project("r.toml", "out", "out/adapt/model.pt", "host", None, None).save(tmp_path)
    check(["compile", "--target", "host"], 2, "out/adapt/model.pt, which no longer exists", tmp_path, quiet=True)
