"""Other libraries' checkpoints reproduce those libraries' outputs exactly.

Each fixture (tests/fixtures/make_references.py) holds a small random-weight model's state dict
as timm / open_clip (or a seed's repository around them) saves it, an input batch and that
library's own output: edgevit loads the file as a user's plain state dict and must give the
same output to 1e-5. A flipped convention (LayerNorm epsilon, GELU form, pooling, bias layout)
moves these outputs by far more: test_convention_matters checks that it would be caught.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgevit.checkpoint import Checkpoint
from edgevit.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
CASES = sorted(p.stem for p in FIXTURES.glob("*.pt"))
MAX_ABS_ERROR = 1e-5


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def edgevit_output(fixture: dict, tmp_path: Path, **extra) -> tuple[torch.Tensor, Checkpoint]:
    path = tmp_path / "user_state.pt"
    torch.save(fixture["state_dict"], path)
    ckpt = Checkpoint.load(path, model_name=fixture["model"], **{**fixture["settings"], **extra})
    with torch.no_grad():
        return ckpt.build_model().eval()(fixture["input"]), ckpt


def test_every_family_has_a_reference():
    assert {"timm_vit", "timm_vit_resized", "timm_deit_distilled", "timm_swin", "mae_encoder", "dino_encoder", "mocov3_encoder",
            "beit_encoder", "openai_clip", "efficientvit_official"} <= set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_reproduces_reference_library(name, tmp_path):
    fixture = load_fixture(name)
    out, ckpt = edgevit_output(fixture, tmp_path)
    assert out.shape == fixture["output"].shape
    assert (out - fixture["output"]).abs().max().item() <= MAX_ABS_ERROR
    assert ckpt.stage == "import" and ckpt.config["naming"] in ("timm", "beit", "openai-clip", "efficientvit")


@pytest.mark.parametrize("name, setting, value", [("timm_vit", "norm_eps", 1e-5), ("openai_clip", "act", "gelu"),
                                                  ("beit_encoder", "global_pool", "token"),
                                                  ("efficientvit_official", "act", "relu")])
def test_convention_matters(name, setting, value, tmp_path):
    """The conventions the loader sets are not cosmetic: the other value misses by > 10x the limit."""
    fixture = load_fixture(name)
    try:
        out, _ = edgevit_output(fixture, tmp_path, **{setting: value})
    except CheckpointError:
        return   # the other convention's model cannot even take these weights
    assert (out - fixture["output"]).abs().max().item() > 10 * MAX_ABS_ERROR


def test_settings_read_off_the_weights(tmp_path):
    """A distilled DeiT loaded as a plain ViT name becomes distilled; BEiT's shared bias is found."""
    deit = load_fixture("timm_deit_distilled")
    out, ckpt = edgevit_output({**deit, "model": "vit_tiny"}, tmp_path)
    assert ckpt.model_config["distilled"] is True
    assert (out - deit["output"]).abs().max().item() <= MAX_ABS_ERROR
    _, ckpt = edgevit_output(load_fixture("beit_shared_bias"), tmp_path)
    assert ckpt.model_config["rel_pos_bias"] == "shared" and ckpt.model_config["global_pool"] == "token"


def test_resized_checkpoint_resamples_positions_as_timm(tmp_path):
    """A 32x32 timm checkpoint used at 48x48 (`--set img_size=48`): the position grid is resampled
    exactly as timm resamples it on load."""
    fixture = load_fixture("timm_vit_resized")
    assert fixture["state_dict"]["pos_embed"].shape[1] == 17 and fixture["settings"]["img_size"] == 48
    out, ckpt = edgevit_output(fixture, tmp_path)
    assert ckpt.state_dict["pos_embed"].shape[1] == 37
    assert (out - fixture["output"]).abs().max().item() <= MAX_ABS_ERROR


def test_dropped_keys_are_counted(tmp_path):
    """MAE's decoder, DINO's head, MoCo v3's momentum encoder and CLIP's text tower are not the
    image encoder: they are left out, and the checkpoint says how many."""
    for name in ("mae_encoder", "dino_encoder", "mocov3_encoder", "openai_clip"):
        _, ckpt = edgevit_output(load_fixture(name), tmp_path)
        assert ckpt.config["dropped_keys"] > 0, name


def test_old_vit_checkpoints_keep_their_epsilon(tmp_path):
    """A ViT checkpoint saved before norm_eps existed computed with torch's 1e-5: it still does."""
    from edgevit.models import create_model

    model = create_model("vit_micro", norm_eps=1e-5)
    ckpt = Checkpoint.from_model(model)
    config = {k: v for k, v in ckpt.model_config.items() if k not in ("norm_eps", "act", "global_pool")}
    from dataclasses import replace

    path = replace(ckpt, model_config=config).save(tmp_path / "old.pt")
    loaded = Checkpoint.load(path)
    assert loaded.model_config["norm_eps"] == 1e-5
    assert loaded.build_model().blocks[0].norm1.eps == 1e-5


@pytest.mark.parametrize("name", ["openai_clip", "beit_encoder"])
def test_seed_encoder_compiles_and_matches(name, tmp_path):
    """A seed's encoder loaded from its own naming compiles and the artifact matches PyTorch."""
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.targets import load_target

    _, ckpt = edgevit_output(load_fixture(name), tmp_path)
    art = compile_model(ckpt, load_target("host"), tmp_path / "art", None, CompileConfig(images=8),
                        log=lambda _: None)
    assert art.manifest.validation["random"]["max_abs_error"] <= 1e-4
    assert art.manifest.output["shape"][1] == load_fixture(name)["output"].shape[1]
