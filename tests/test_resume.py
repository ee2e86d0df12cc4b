"""kill -9, then resume: every resumable verb, run as the real CLI in a subprocess, is killed with
SIGKILL once its partial work is on disk, run again, and compared with an uninterrupted run of
the same command in another folder.

- train / adapt: `--resume` ends with the same weights, bit for bit, and the same metrics.
- tune: the resumed run repeats no finished work: records per kernel equal an uninterrupted run's.
- profile: the resumed run measures only the missing configs and keeps the rows measured before
  the kill; its table has the same key, windows and units (timings differ run to run).
- search: the resumed run continues from `<out>.state.json` and answers the same config and val top-1.

Models: swin_micro at 32x32 on digits for train/adapt; profile and search run on swin_micro at
its own 16x16 (a 4-config profile) and tune on a depth-1 ViT with two dominant kernels, to keep
the file near 6 minutes on a 2-core machine. Every subprocess gets EDGEVIT_TUNING_DIR under the
test's own folder (never ~/.cache)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from edgevit.checkpoint import Checkpoint

pytestmark = [pytest.mark.slow]

MODEL = ["--data", "digits", "--model", "swin_micro", "--set", "img_size=32"]
EPOCHS = ["--epochs", "3", "--batch-size", "32"]
TRAIN = ["train", *MODEL, *EPOCHS]


# ---------------------------------------------------------------------------- running the CLI


class Cli:
    """One `python -m edgevit.cli ...` in its own process group, output to files in `folder`."""

    def __init__(self, args: list, folder: Path, name: str, tuning: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.args, self.name = [str(a) for a in args], name
        self.out, self.err = folder / f"{name}.stdout", folder / f"{name}.stderr"
        env = dict(os.environ, EDGEVIT_TUNING_DIR=str(tuning), PYTHONUNBUFFERED="1")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgevit.cli", *self.args], cwd=folder, env=env,
                                         stdout=out, stderr=err, start_new_session=True)

    def log(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def tail(self, n: int = 3000) -> str:
        return f"$ edgevit {' '.join(self.args)}\n...{self.log()[-n:]}"

    def reap_group(self) -> None:
        """SIGKILL whatever this command started and left behind (MetaSchedule's builder and
        runner workers): its own process group, never anything else."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float) -> str:
        """Wait for a clean exit; its stdout + stderr."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.reap_group()
            pytest.fail(f"{self.name}: still running after {timeout} s; killed\n{self.tail()}")
        self.reap_group()
        if self.proc.returncode != 0:
            pytest.fail(f"{self.name}: exit {self.proc.returncode}\n{self.tail()}")
        return self.log()

    def kill9_when(self, ready, what: str, timeout: float) -> None:
        """Poll until `ready()`, then SIGKILL the command (a real kill -9: no handler runs)."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                self.reap_group()
                pytest.fail(f"{self.name}: ended (exit {self.proc.returncode}) before {what}\n{self.tail()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                self.reap_group()
                pytest.fail(f"{self.name}: no {what} after {timeout} s; killed\n{self.tail()}")
            time.sleep(0.05)
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reap_group()
        assert self.proc.returncode == -signal.SIGKILL, \
            f"{self.name}: finished (exit {self.proc.returncode}) before the kill landed\n{self.tail()}"


def run(args: list, folder: Path, name: str, tuning: Path, timeout: float = 300) -> str:
    return Cli(args, folder, name, tuning).wait(timeout)


def read_json(path: Path):
    """A JSON file's content, or None while it is missing (files are written atomically)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def assert_same_checkpoint(got_path: Path, want_path: Path) -> None:
    got, want = Checkpoint.load(got_path), Checkpoint.load(want_path)
    assert got.state_dict.keys() == want.state_dict.keys()
    differ = [k for k in want.state_dict if not torch.equal(got.state_dict[k], want.state_dict[k])]
    assert not differ, f"{len(differ)} of {len(want.state_dict)} tensors differ after resume, e.g. {differ[:5]}"
    assert got.metrics == want.metrics


# ---------------------------------------------------------------------------- uninterrupted runs


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def trained(work) -> Path:
    """The uninterrupted training run (also the dense model adapt starts from)."""
    out = work / "train-ref"
    run([*TRAIN, "--out", out], work, "train-ref", work / "tuning-none")
    return out


@pytest.fixture(scope="module")
def adapted(work, trained) -> Path:
    out = work / "adapt-ref"
    run(["adapt", "--checkpoint", trained / "model.pt", *EPOCHS, "--out", out], work, "adapt-ref",
        work / "tuning-none")
    return out


@pytest.fixture(scope="module")
def small(work) -> Path:
    """The model profile and search run on: swin_micro at its own 16x16 (4 windows, then 1), so a
    profile is dense + 3 units + 1 random config (~30 s here; at 32x32 it is 12 configs, ~90 s,
    and the profile test runs two). Trained enough (10 epochs, ~7 s; val top-1 ~50% dense, ~26% at
    0.6) that configs differ in accuracy and the search has something to rank."""
    out = work / "small"
    run(["train", "--data", "digits", "--model", "swin_micro", "--epochs", "10", "--batch-size", "32", "--lr", "3e-3",
         "--out", out], work, "small", work / "tuning-none")
    return out / "model.pt"


@pytest.fixture(scope="module")
def table(work, small) -> Path:
    """The uninterrupted profile of `small` (default schedules: an empty tuning root)."""
    path = work / "table-ref.json"
    run(["profile", "--target", "host", "--checkpoint", small, "--calibrate", "1", "-o", path],
        work, "profile-ref", work / "tuning-none", timeout=400)
    return path


# ---------------------------------------------------------------------------- train / adapt


def test_train_killed_after_an_epoch_resumes_bit_for_bit(trained, tmp_path):
    out = tmp_path / "train"
    args = [*TRAIN, "--out", out]
    Cli(args, tmp_path, "train-killed", tmp_path / "tuning").kill9_when(
        lambda: (out / "last.pt").exists(), "OUT/last.pt", timeout=120)
    assert not (out / "model.pt").exists()
    assert Checkpoint.load(out / "last.pt").train_state["epoch"] < 2     # killed with epochs left to run
    run([*args, "--resume"], tmp_path, "train-resumed", tmp_path / "tuning")
    assert_same_checkpoint(out / "model.pt", trained / "model.pt")


def test_adapt_killed_after_an_epoch_resumes_bit_for_bit(trained, adapted, tmp_path):
    out = tmp_path / "adapt"
    args = ["adapt", "--checkpoint", trained / "model.pt", *EPOCHS, "--out", out]
    Cli(args, tmp_path, "adapt-killed", tmp_path / "tuning").kill9_when(
        lambda: (out / "last.pt").exists(), "OUT/last.pt", timeout=120)
    assert not (out / "model.pt").exists()
    assert Checkpoint.load(out / "last.pt").train_state["epoch"] < 2
    run([*args, "--resume"], tmp_path, "adapt-resumed", tmp_path / "tuning")
    assert_same_checkpoint(out / "model.pt", adapted / "model.pt")


# ---------------------------------------------------------------------------- tune


def records_per_kernel(tuning_root: Path) -> Counter:
    """Tuning records per kernel (workload structural hash) in the one database under the root."""
    (db,) = tuning_root.glob("host-*")
    hashes = [json.loads(line)[0] for line in (db / "database_workload.json").read_text().splitlines() if line]
    return Counter(hashes[json.loads(line)[0]]
                   for line in (db / "database_tuning_record.json").read_text().splitlines() if line)


def tuned_kernels(tuning_root: Path) -> dict[str, str]:
    """Kernels whose search finished, by key: their names (from the progress file)."""
    progress = next((read_json(p) for p in tuning_root.glob("host-*/edgevit_progress.json")), None) or {}
    return {key: e["name"] for key, e in progress.items() if e.get("trials", 0) > 0}


@pytest.mark.tvm
def test_tune_killed_between_kernels_repeats_no_finished_trials(tmp_path):
    """A depth-1 ViT whose two MLP matmuls make ~92% of the kernel time: tune picks exactly those
    two (swin_micro has 18 kernels to cover 90%, ~30 s of MetaSchedule each here). Killed once
    the first kernel's trials are recorded, the rerun searches only the second."""
    from edgevit.models import create_model

    torch.manual_seed(0)
    ckpt = tmp_path / "vit.pt"
    Checkpoint.from_model(create_model("vit_micro", depth=1, embed_dim=128, mlp_ratio=64.0)).save(ckpt)
    args = ["tune", "--target", "host", "--checkpoint", ckpt, "--trials", "2"]
    run(args, tmp_path, "tune-ref", tmp_path / "tuning-ref", timeout=400)
    reference = tuned_kernels(tmp_path / "tuning-ref")
    assert len(reference) >= 2, f"the kill needs two tuned kernels; the model tuned {reference}"

    tuning = tmp_path / "tuning"
    Cli(args, tmp_path, "tune-killed", tuning).kill9_when(lambda: tuned_kernels(tuning), "a kernel's finished trials",
                                                          timeout=400)
    done = tuned_kernels(tuning)
    assert len(done) < len(reference), f"the kill landed after every kernel was tuned: {done}"
    log = run(args, tmp_path, "tune-resumed", tuning, timeout=400)
    searched = [line for line in log.splitlines() if "searching" in line]
    assert not [line for line in searched if any(f"] {name} x" in line for name in done.values())], searched
    assert len(searched) == len(reference) - len(done), searched
    assert records_per_kernel(tuning) == records_per_kernel(tmp_path / "tuning-ref")


# ---------------------------------------------------------------------------- profile


@pytest.mark.tvm
def test_profile_killed_midway_measures_only_the_missing_configs(small, table, tmp_path):
    from edgevit.latency import LatencyTable

    out = tmp_path / "table.json"
    partial = tmp_path / "table.json.partial"
    args = ["profile", "--target", "host", "--checkpoint", small, "--calibrate", "1", "-o", out]
    Cli(args, tmp_path, "profile-killed", tmp_path / "tuning").kill9_when(
        lambda: len((read_json(partial) or {}).get("rows", [])) >= 1, "a measured row in <table>.partial",
        timeout=300)
    assert not out.exists()
    kept = read_json(partial)["rows"]
    log = run(args, tmp_path, "profile-resumed", tmp_path / "tuning", timeout=400)
    want, got = LatencyTable.load(table), LatencyTable.load(out)
    total = len(want.measurements)
    assert f"resuming: {len(kept)} of {total} configs already measured" in log, log[-3000:]
    assert got.key == want.key and got.windows == want.windows
    assert [sorted(d) for d in got.deltas] == [sorted(d) for d in want.deltas]
    assert [r["keep"] for r in got.measurements] == [r["keep"] for r in want.measurements]
    assert got.measurements[: len(kept)] == kept          # rows measured before the kill, not measured again
    assert not partial.exists()


# ---------------------------------------------------------------------------- search


@pytest.mark.tvm
def test_search_killed_midway_resumes_to_the_same_answer(small, table, tmp_path):
    from edgevit.latency import LatencyTable

    budget = f"{5 * LatencyTable.load(table).dense_ms:.4f}ms"   # generous: the answer must not hinge on timing noise

    def args(out: Path) -> list:
        return ["search", "--budget", budget, "--target", "host", "--checkpoint", small, "--table", table,
                "--evaluations", "12", "--population", "4", "--val-images", "100", "-o", out]

    reference = tmp_path / "ref" / "result.json"
    run(args(reference), tmp_path, "search-ref", tmp_path / "tuning")
    out = tmp_path / "killed" / "result.json"
    state = out.with_name(out.name + ".state.json")
    Cli(args(out), tmp_path, "search-killed", tmp_path / "tuning").kill9_when(state.exists, "<out>.state.json",
                                                                             timeout=180)
    assert not out.exists()
    log = run(args(out), tmp_path, "search-resumed", tmp_path / "tuning")
    assert "resuming search at generation" in log, log[-3000:]
    want, got = json.loads(reference.read_text()), json.loads(out.read_text())
    assert got["sparsity"] == want["sparsity"]
    assert got["val_top1"] == want["val_top1"]
    assert got["evaluations"] == want["evaluations"] and got["pareto"] == want["pareto"]
    assert not state.exists()
