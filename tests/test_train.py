import math
import os
import subprocess
import sys

import pytest
import torch

import edgevit.train as train_mod
from edgevit.checkpoint import Checkpoint
from edgevit.data import load_data
from edgevit.errors import ConfigError, EdgeVitError
from edgevit.models import create_model
from edgevit.train import TrainConfig, classification_loss, train, warmup_cosine


def tiny_run(data, out, epochs=2, drop_path=0.0, **kw):
    torch.manual_seed(0)  # the same initial weights for every run, as the CLI and recipes do
    model = create_model("swin_micro", num_classes=data.num_classes, drop_path=drop_path)
    # no augmentation: the synthetic classes are bar positions, which random shifts would move
    return train(model, data, TrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_epochs=0.5, augment=False,
                                          **kw), out,
                 show_progress=False, **({"resume": True} if (out / "last.pt").exists() else {}))


def test_learns_a_learnable_set_and_records_metrics(idx_dir, tmp_path):
    data = load_data(f"idx:{idx_dir}", 16)
    ckpt = tiny_run(data, tmp_path / "run", epochs=20)
    assert ckpt.metrics["test"]["top1"] >= 75.0                  # 4 classes: chance is 25%
    saved = Checkpoint.load(tmp_path / "run" / "model.pt")
    assert saved.data["spec"] == data.spec and saved.data["mean"] == data.mean
    assert saved.train_state is None and (tmp_path / "run" / "last.pt").exists()


def test_resume_after_interruption_equals_an_uninterrupted_run(idx_dir, tmp_path, monkeypatch):
    data = load_data(f"idx:{idx_dir}", 16)
    straight = tiny_run(data, tmp_path / "a", epochs=3, drop_path=0.3)   # drop path draws from torch's RNG
    real_epoch = train_mod._train_epoch
    calls = {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)
    monkeypatch.setattr(train_mod, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(data, tmp_path / "b", epochs=3, drop_path=0.3)
    assert Checkpoint.load(tmp_path / "b" / "last.pt").train_state["epoch"] == 0
    monkeypatch.setattr(train_mod, "_train_epoch", real_epoch)
    resumed = tiny_run(data, tmp_path / "b", epochs=3, drop_path=0.3)
    for k, v in straight.state_dict.items():
        assert torch.equal(v, resumed.state_dict[k]), k


def test_existing_run_needs_resume_and_same_settings(idx_dir, tmp_path):
    data = load_data(f"idx:{idx_dir}", 16)
    tiny_run(data, tmp_path, epochs=1)
    model = create_model("swin_micro", num_classes=4)
    with pytest.raises(EdgeVitError, match="pass --resume"):
        train(model, data, TrainConfig(epochs=1, batch_size=16), tmp_path, show_progress=False)
    with pytest.raises(ConfigError, match="other model, data or training settings"):
        train(model, data, TrainConfig(epochs=1, batch_size=8), tmp_path, resume=True, show_progress=False)


def test_warmup_cosine_shape():
    f = warmup_cosine(total_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-5)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx((1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5))) / 1e-3)
    assert f(100) == pytest.approx(1e-2) and all(f(s) >= f(s + 1) for s in range(10, 100))


def test_deit_hard_distillation_loss():
    cls_out, dist_out = torch.randn(4, 5), torch.randn(4, 5)
    y, teacher = torch.tensor([0, 1, 2, 3]), torch.randn(4, 5)
    loss, logits = classification_loss((cls_out, dist_out), y, 0.0, teacher)
    ref = (torch.nn.functional.cross_entropy(cls_out, y) + torch.nn.functional.cross_entropy(dist_out, teacher.argmax(1))) / 2
    assert torch.allclose(loss, ref) and torch.allclose(logits, (cls_out + dist_out) / 2)


def test_distillation_trains_a_deit_from_a_teacher(idx_dir, tmp_path):
    data = load_data(f"idx:{idx_dir}", 16)
    tiny_run(data, tmp_path / "teacher", epochs=1)
    student = create_model("deit_micro_distilled", num_classes=4)
    cfg = TrainConfig(epochs=1, batch_size=16, teacher=str(tmp_path / "teacher" / "model.pt"))
    ckpt = train(student, data, cfg, tmp_path / "student", show_progress=False)
    assert ckpt.config["teacher"].endswith("model.pt")
    with pytest.raises(ConfigError, match="no distillation token"):
        train(create_model("vit_micro", num_classes=4), data, cfg, tmp_path / "s2", show_progress=False)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_gloo(idx_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29513",
           "-m", "edgevit.cli", "train", "--data", f"idx:{idx_dir}", "--model", "swin_micro", "--epochs", "20",
           "--batch-size", "8", "--lr", "3e-3", "--no-augment", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = Checkpoint.load(out / "model.pt")
    assert ckpt.metrics["test"]["top1"] >= 50.0                  # learnt across 2 ranks (chance 25%)
    last = Checkpoint.load(out / "last.pt")
    assert last.metrics["epoch"] == 19
