"""`edgevit tune`: MetaSchedule records land in the target's database, compile uses them,
tuning resumes instead of repeating work, and bad requests fail with one line."""


import pytest
from click.testing import CliRunner

from edgevit.checkpoint import Checkpoint
from edgevit.cli import cli
from edgevit.compile import CompileConfig, compile_model
from edgevit.models import create_model
from edgevit.targets import load_target

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tune") / "swin_micro.pt"
    Checkpoint.from_model(create_model("swin_micro")).save(path)
    return path


@pytest.mark.slow
def test_tune_records_resume_and_feed_compile(ckpt_path, tmp_path):
    from edgevit.tune import TuneConfig, tune_model

    ckpt = Checkpoint.load(ckpt_path)
    sparsity = None   # dense: its slowest kernels are matmuls, which MetaSchedule's CPU space covers
    target = load_target("host")
    db = tmp_path / "db"
    cfg = TuneConfig(trials_per_kernel=2, trials_per_round=2, cover=0.05, database=str(db))
    logs: list[str] = []
    report = tune_model(ckpt, target, sparsity, cfg, log=logs.append)
    tuned = [k for k in report.kernels if k.trials > 1]
    assert tuned and any("searching" in line for line in logs), "\n".join(logs)
    assert all(k.default_ms is not None for k in report.kernels)
    # the default schedule is a record, so the database's best is never worse than it
    assert all(k.best_ms <= k.default_ms * 1.0001 for k in report.kernels if k.best_ms and k.default_ms)
    assert report.estimate_ms("best_ms") <= report.estimate_ms("default_ms") * 1.0001

    again: list[str] = []
    second = tune_model(ckpt, target, sparsity, cfg, log=again.append)
    assert not any("searching" in line for line in again), again
    assert [k.trials for k in second.kernels] == [k.trials for k in report.kernels]

    art = compile_model(ckpt, target, tmp_path / "art", sparsity, CompileConfig(database=str(db), images=8),
                        log=lambda _: None)
    assert art.manifest.schedules["source"].startswith("tuned:")
    assert art.manifest.validation["random"]["max_abs_error"] < 1e-4


@pytest.mark.parametrize("args, message", [
    (["--target", "rasp4b"], "does not run on this machine"),
    (["--target", "jetson-orin"], "tunes CPU targets"),
    (["--target", "host", "--trials", "0"], "--trials': 0 is not in the range x>=1"),
    (["--target", "host", "--rpc", "127.0.0.1:9"], "unreachable"),
])
def test_tune_rejects_bad_requests_in_one_line(ckpt_path, args, message):
    result = CliRunner().invoke(cli, ["tune", "--checkpoint", str(ckpt_path), *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


def test_select_kernels_covers_the_costliest_share():
    from edgevit.tune import select_kernels

    assert select_kernels([1.0, 5.0, 3.0, 1.0], 0.75) == [1, 2]
    assert select_kernels([1.0, 5.0, 3.0, 1.0], 1.0) == [1, 2, 0, 3]
    assert select_kernels([0.0, 0.0], 0.9) == []
