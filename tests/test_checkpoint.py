import pytest
import torch

from edgevit.checkpoint import Checkpoint
from edgevit.errors import CheckpointError
from edgevit.models import create_model


def saved(tmp_path, name="swin_micro", **kw):
    model = create_model(name, **kw)
    ckpt = Checkpoint.from_model(model, data={"spec": "digits", "mean": [0.3], "std": [0.4]},
                                 metrics={"test": {"top1": 50.0}})
    return model, ckpt, ckpt.save(tmp_path / "m.pt")


def test_round_trip_restores_weights_and_metadata(tmp_path):
    model, ckpt, path = saved(tmp_path, img_size=32)
    loaded = Checkpoint.load(path)
    assert loaded.model_name == "swin_micro" and loaded.model_config["img_size"] == 32
    assert loaded.metrics == {"test": {"top1": 50.0}} and loaded.versions["torch"] == torch.__version__
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.build_model().eval()(x), model.eval()(x))


def test_loading_uses_weights_only(tmp_path, monkeypatch):
    _, _, path = saved(tmp_path)
    calls = []
    original = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or original(*a, **k))
    Checkpoint.load(path)
    assert calls and all(k.get("weights_only") is True for k in calls)


def test_truncated_and_garbage_files(tmp_path):
    _, _, path = saved(tmp_path)
    data = path.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "g.pt").write_bytes(b"\x00garbage" * 100)
    (tmp_path / "text.pt").write_text("epoch,loss\n1,0.5\n")
    (tmp_path / "folder.pt").mkdir()
    for name, reason in (("t.pt", "corrupt or truncated"), ("g.pt", "not a PyTorch checkpoint \\(an unknown binary"),
                         ("text.pt", "not a PyTorch checkpoint \\(a text file"), ("folder.pt", "is a folder")):
        with pytest.raises(CheckpointError, match=reason) as e:
            Checkpoint.load(tmp_path / name)
        assert e.value.exit_code == 4 and "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        Checkpoint.load(tmp_path / "missing.pt")


def test_mismatched_weights_name_the_key(tmp_path):
    _, ckpt, _ = saved(tmp_path)
    other = Checkpoint(model_name="swin_micro", model_config={**ckpt.model_config, "num_classes": 3},
                       state_dict=ckpt.state_dict)
    with pytest.raises(CheckpointError, match="'head.fc.weight' has shape \\(10, 32\\), the model expects \\(3, 32\\)"):
        other.build_model()
    wrong = Checkpoint(model_name="vit_micro", model_config={}, state_dict=ckpt.state_dict)
    with pytest.raises(CheckpointError, match="missing .* unexpected"):
        wrong.build_model()


def test_plain_state_dict_needs_a_model_name(tmp_path):
    model = create_model("vit_micro")
    torch.save({"model": model.state_dict()}, tmp_path / "plain.pt")   # a trainer-style wrapper
    with pytest.raises(CheckpointError, match="pass --model NAME"):
        Checkpoint.load(tmp_path / "plain.pt")
    loaded = Checkpoint.load(tmp_path / "plain.pt", model_name="vit_micro")
    assert loaded.stage == "import"
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.build_model().eval()(x), model.eval()(x))


def test_timm_style_buffers_are_ignored(tmp_path):
    """timm state dicts carry the derived buffers; the ones in the file (zeros here) are dropped
    and the model's own, rebuilt from its config, are used."""
    model = create_model("swin_micro").eval()
    state = dict(model.state_dict())
    index_key, mask_key = "layers.0.blocks.0.attn.relative_position_index", "layers.0.blocks.1.attn_mask"
    assert index_key not in state and mask_key not in state          # edgevit never saves them
    state[index_key] = torch.zeros(16, 16, dtype=torch.long)
    state[mask_key] = torch.zeros(4, 16, 16)
    torch.save(state, tmp_path / "timm.pt")
    loaded = Checkpoint.load(tmp_path / "timm.pt", model_name="swin_micro").build_model().eval()
    assert index_key not in loaded.state_dict() and mask_key not in loaded.state_dict()
    index = loaded.layers[0].blocks[0].attn.relative_position_index
    mask = loaded.layers[0].blocks[1].attn_mask
    assert torch.equal(index, model.layers[0].blocks[0].attn.relative_position_index)
    assert torch.equal(mask, model.layers[0].blocks[1].attn_mask)
    assert index.shape == (16, 16) and index.max() == (2 * 4 - 1) ** 2 - 1   # a real 4x4-window index
    assert mask.shape == (4, 16, 16) and (mask < 0).any()                    # the shifted windows' mask
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class _Payload:
    """Unpickling this runs `action(*args)`: what a malicious checkpoint does."""

    def __init__(self, action, *args):
        self.action, self.args = action, args

    def __reduce__(self):
        return self.action, self.args


def _touch(path):
    open(path, "w").close()


@pytest.mark.parametrize("kind", ["os.system", "python function"])
def test_a_checkpoint_that_runs_code_is_refused_without_running_it(tmp_path, kind):
    import os

    marker = tmp_path / "pwned"
    action = (_Payload(os.system, f"touch '{marker}'") if kind == "os.system" else _Payload(_touch, str(marker)))
    path = tmp_path / "evil.pt"
    torch.save({"format": "edgevit.checkpoint", "version": 1, "state_dict": {}, "meta": action}, path)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.load(path)
    message = str(e.value)
    assert e.value.exit_code == 4 and message.startswith(str(path)) and "\n" not in message
    # loose on the wording, which is changing to say the file would run code; the path (which
    # holds this test's name) is left out so it cannot supply the word
    rest = message.replace(str(path), "")
    assert "checkpoint" in rest or "run code" in rest
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        Checkpoint.load(path, model_name="swin_micro")               # the plain state dict path too
    assert not marker.exists()
    torch.load(path, weights_only=False)                             # the payload is live: an unsafe load runs it
    assert marker.exists()


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    _, ckpt, path = saved(tmp_path)
    before = path.read_bytes()

    def boom(obj, f, *a, **k):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        ckpt.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]       # no temp file left behind
