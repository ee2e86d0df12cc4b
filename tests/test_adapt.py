
from edgevit.adapt import AdaptConfig, accuracy_under_sparsity, adapt
from edgevit.checkpoint import Checkpoint
from edgevit.data import load_data
from edgevit.models import create_model
from edgevit.train import TrainConfig, train


def test_adapt_samples_a_new_sorted_config_every_step(idx_dir, tmp_path, monkeypatch):
    data = load_data(f"idx:{idx_dir}", 32)
    model = create_model("swin_micro", img_size=32, num_classes=4, depths=(4, 2), num_heads=(1, 2))
    dense = train(model, data, TrainConfig(epochs=1, batch_size=16, lr=2e-3), tmp_path / "dense",
                  show_progress=False)
    seen = []
    from edgevit.models.swin import SwinTransformer

    original = SwinTransformer.set_block_ratios

    def record(self, per_stage):
        seen.append([list(s) for s in per_stage])
        return original(self, per_stage)
    monkeypatch.setattr(SwinTransformer, "set_block_ratios", record)
    adapted = adapt(dense, data, AdaptConfig(epochs=2, batch_size=8), tmp_path / "adapt", show_progress=False)
    steps = 2 * (len(data.train) // 8 + (len(data.train) % 8 > 0))
    sampled = seen[:steps]
    assert len({str(s) for s in sampled}) > steps // 2           # a fresh config nearly every step
    for per_stage in sampled:
        for stage in per_stage:
            assert stage == sorted(stage)
    assert seen[-1] == [[0.0] * 4, [0.0] * 2]                     # dense for evaluation and saving
    model_after = adapted.build_model().eval()
    from edgevit.train import evaluate

    assert adapted.metrics["test"]["top1"] == evaluate(model_after, data.test, data.mean, data.std)["top1"]
    assert adapted.stage == "adapt" and adapted.config["lr"] == dense.config["lr"] / 10
    assert Checkpoint.load(tmp_path / "adapt" / "model.pt").config["levels"][-1] == 0.8


def test_accuracy_under_sparsity_reports_each_ratio(idx_dir):
    data = load_data(f"idx:{idx_dir}", 32)
    model = create_model("swin_micro", img_size=32, num_classes=4).eval()
    table = accuracy_under_sparsity(model, data, "test", [0.0, 0.5], data.mean, data.std)
    assert set(table) == {0.0, 0.5} and all(0 <= v <= 100 for v in table.values())
    assert model.block_ratios() == [[0.0, 0.0], [0.0, 0.0]]


def test_adapt_resume_continues_an_interrupted_run_to_the_same_weights(idx_dir, tmp_path, monkeypatch):
    """`edgevit adapt --resume` after a run killed in its second epoch ends with the weights of an
    uninterrupted run (per-step configs, data order and optimizer state all continue). A resume
    is keyed by the run's settings, epochs included (the lr schedule spans them): a resume with
    other settings is refused, and an existing run is never restarted without --resume."""
    import torch
    from click.testing import CliRunner

    import edgevit.train as train_mod
    from edgevit.cli import cli

    data = load_data(f"idx:{idx_dir}", 16)
    torch.manual_seed(0)
    train(create_model("swin_micro", num_classes=4), data, TrainConfig(epochs=1, batch_size=16, lr=2e-3, augment=False),
          tmp_path / "dense", show_progress=False)
    dense = str(tmp_path / "dense" / "model.pt")

    def adapt_cli(out, *extra, epochs="3"):
        return CliRunner().invoke(cli, ["adapt", "--checkpoint", dense, "--epochs", epochs, "--batch-size", "16",
                                        "--out", str(tmp_path / out), *extra])

    straight = adapt_cli("straight")
    assert straight.exit_code == 0, straight.output

    real_epoch = train_mod._train_epoch
    epochs_run = []

    def killed_in_second_epoch(*a, **k):
        epochs_run.append(a[8])                  # _train_epoch's epoch argument
        if epochs_run == [0, 1]:
            raise KeyboardInterrupt
        return real_epoch(*a, **k)
    monkeypatch.setattr(train_mod, "_train_epoch", killed_in_second_epoch)
    killed = adapt_cli("resumed")
    assert killed.exit_code == 130 and "--resume" in killed.output
    last = Checkpoint.load(tmp_path / "resumed" / "last.pt")
    assert last.train_state["epoch"] == 0 and last.stage == "adapt"
    assert not (tmp_path / "resumed" / "model.pt").exists()

    again = adapt_cli("resumed")                                      # no --resume: refused, nothing lost
    assert again.exit_code != 0 and "pass --resume" in again.output
    other = adapt_cli("resumed", "--resume", epochs="4")              # other settings: refused
    assert other.exit_code == 2 and "other model, data or training settings" in other.output
    assert epochs_run == [0, 1]

    resumed = adapt_cli("resumed", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert epochs_run == [0, 1, 1, 2]                                 # continued at epoch 1, not from 0
    a = Checkpoint.load(tmp_path / "straight" / "model.pt")
    b = Checkpoint.load(tmp_path / "resumed" / "model.pt")
    assert a.state_dict.keys() == b.state_dict.keys()
    for k, v in a.state_dict.items():
        assert torch.equal(v, b.state_dict[k]), k
    assert a.metrics == b.metrics and b.stage == "adapt"
    assert any(not torch.equal(v, Checkpoint.load(dense).state_dict[k]) for k, v in b.state_dict.items())
