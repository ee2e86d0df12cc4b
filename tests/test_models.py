"""Every registered model: forward, torch.export and ONNX (run by onnxruntime) match eager."""

import dataclasses

import numpy as np
import pytest
import torch

from edgevit.errors import ConfigError
from edgevit.models import create_model, list_models, resolve_model

LARGE = {"swin_t", "vit_tiny", "deit_tiny_distilled"}
SEEDS = {n for n in list_models() if n.endswith("_patch16")}        # the seeds' encoders, ViT-S/B at 224
SMALL_SEED = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)   # same code, test-sized
EFFICIENTVIT_224 = {n for n in list_models() if n.startswith("efficientvit_b")}    # exported at 64x64


def eval_model(name):
    settings = SMALL_SEED if name in SEEDS else dict(img_size=64) if name in EFFICIENTVIT_224 else {}
    model = create_model(name, **settings).eval()
    cfg = model.cfg
    x = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    return model, x


def slow_if_large(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in names]


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_finite(name):
    model, x = eval_model(name)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, model.cfg.num_classes or model.cfg.embed_dim) and torch.isfinite(y).all()


@pytest.mark.parametrize("name", slow_if_large(list_models()))
def test_torch_export_matches_eager(name):
    model, x = eval_model(name)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        diff = (exported.module()(x) - model(x)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("name", slow_if_large(list_models()))
def test_onnx_export_matches_eager(name, tmp_path):
    import onnxruntime as ort

    model, x = eval_model(name)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4


def test_swin_t_matches_published_size():
    cls, cfg = resolve_model("swin_t")
    assert (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size, cfg.img_size) == \
        (96, (2, 2, 6, 2), (3, 6, 12, 24), 7, 224)
    n = sum(p.numel() for p in create_model("swin_t").parameters())
    assert 28.0e6 < n < 28.6e6  # Swin-T: 28.3M parameters (Liu et al. 2021, Table 1)


@pytest.mark.parametrize("name, millions", [("dino_vit_small_patch16", 21.67), ("dino_vit_base_patch16", 85.80),
                                            ("clip_vit_base_patch16", 86.19), ("beit_vit_base_patch16", 85.77)])
def test_seed_encoders_match_published_sizes(name, millions):
    """DINO ViT-S/16 21.7M and ViT-B/16 85.8M (Caron et al. 2021, Table 2 lists 21M / 85M);
    CLIP ViT-B/16's image tower with its projection 86.2M; BEiT-B 86M with its bias tables."""
    n = sum(p.numel() for p in create_model(name).parameters())
    assert abs(n / 1e6 - millions) < 0.01


@pytest.mark.parametrize("name, heads", [("mocov3_vit_small_patch16", 12), ("dino_vit_small_patch16", 6),
                                         ("mae_vit_base_patch16", 12)])
def test_seed_encoders_use_their_repositories_head_counts(name, heads):
    """Heads change no tensor shape, so a wrong count loads silently and computes wrongly."""
    assert resolve_model(name)[1].num_heads == heads


def test_overrides_and_unknown_settings():
    m = create_model("swin_micro", num_classes=3, depths=[2, 4], num_heads=[1, 2])
    assert m.cfg.depths == (2, 4) and m.head.fc.out_features == 3
    with pytest.raises(ConfigError, match="did you mean 'window_size'"):
        create_model("swin_micro", windw_size=4)
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        create_model("vit_micro", img_size=18)


def test_deit_training_returns_two_heads_and_inference_their_mean():
    model = create_model("deit_micro_distilled")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        cls_out, dist_out = model.train()(x)
        model.eval()
        assert torch.allclose(model(x), (cls_out + dist_out) / 2, atol=1e-6)


def test_window_partition_round_trip_and_shift_mask():
    from edgevit.models.swin import shifted_window_mask, window_partition, window_reverse

    x = torch.randn(2, 8, 8, 5)
    w = window_partition(x, 4)
    assert w.shape == (2, 4, 16, 5)
    assert torch.equal(window_reverse(w, 4, 8, 8), x)
    # the first window's first 4x4 block is one region: nothing masked there
    mask = shifted_window_mask(8, 8, 4, 2)
    assert mask.shape == (4, 16, 16) and mask[0].eq(0).all() and mask[3].ne(0).any()


def test_swin_padding_path_runs():
    """A resolution that is not a multiple of the window pads like Swin does."""
    model = create_model("swin_micro", img_size=20).eval()   # 10x10 tokens, window 4 -> padded to 12
    with torch.no_grad():
        assert model(torch.randn(1, 1, 20, 20)).shape == (1, 10)


def test_configs_are_frozen():
    _, cfg = resolve_model("swin_t")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.img_size = 3
