
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
