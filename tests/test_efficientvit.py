"""EfficientViT: published sizes, the linear attention's algebra and guard, batch-norm folding,
and compiled artifacts that match PyTorch with every kernel scheduled. (The official code's key
names and outputs: tests/test_reference_models.py, fixture efficientvit_official.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgevit.flops import count_flops
from edgevit.models import create_model
from edgevit.models.efficientvit import LiteMLA, linear_attention, quadratic_attention


@pytest.mark.parametrize("name, size, millions, gmacs", [
    ("efficientvit_b1", 224, 9.1, 0.52), ("efficientvit_b1", 256, 9.1, 0.68), ("efficientvit_b1", 288, 9.1, 0.86),
    ("efficientvit_b2", 224, 24.0, 1.6)])
def test_matches_published_sizes(name, size, millions, gmacs):
    """The official classification README (ImageNet-1k): parameters and MACs within 2%."""
    model = create_model(name, img_size=size)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    macs = count_flops(model)["total"] / 2e9
    assert abs(params / millions - 1) < 0.02 and abs(macs / gmacs - 1) < 0.02, (params, macs)


def test_linear_attention_is_the_quadratic_form_computed_in_linear_time():
    """(v kᵀ) q / (Σk)ᵀq equals v (kᵀq / Σ_keys kᵀq) and its FLOPs grow linearly in tokens."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 50, generator=g, dtype=torch.float64) for _ in range(3))
    q, k = q.relu(), k.relu()
    assert torch.allclose(linear_attention(q, k, v, 1e-15), quadratic_attention(q, k, v, 1e-15), atol=1e-10)

    def flops(tokens):
        x = torch.rand(1, 4, 8, tokens)
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            linear_attention(x, x, x, 1e-15)
        return counter.get_total_flops()

    assert flops(4096) == 16 * flops(256)


def test_a_head_the_relu_silences_stays_finite():
    """All of q (or k) negative: ReLU zeroes it, and the epsilon keeps 0 / 0 (NaN) out."""
    attention = LiteMLA(16, 8, (5,), 1e-15).eval()
    with torch.no_grad():
        attention.qkv.conv.weight.zero_()
        out = attention(torch.randn(1, 16, 6, 6))
    assert torch.isfinite(out).all()


def test_folded_model_matches_and_leaves_the_original_alone(tiny_efficientvit):
    model = tiny_efficientvit
    folded = model.for_inference()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() < 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 5
    assert not any(isinstance(m, nn.Hardswish) for m in folded.modules())   # the layout-friendly form


def test_bad_settings_name_the_problem():
    from edgevit.errors import ConfigError
    from edgevit.models import resolve_model

    for setting, message in [(dict(widths=(8, 16)), "5 entries"), (dict(img_size=40), "total stride 32"),
                             (dict(head_dim=12), "multiple of head_dim"), (dict(act="gelu2"), "act 'gelu2'")]:
        with pytest.raises(ConfigError, match=message):
            resolve_model("efficientvit_b1", **setting)


@pytest.mark.tvm
def test_compiles_for_the_host_with_every_kernel_scheduled(tiny_efficientvit, tmp_path):
    """Channels-last convs, 1x1 convs as matmuls, folded norms: the artifact matches PyTorch, no
    1x1 conv is left a conv, and no kernel is left to TVM's unscheduled default (the attention's
    multi-output copy was; the batch-1 classifier LayerNorm got dlight's reduction rule, which
    recomputed the mean per element)."""
    import tvm

    from edgevit.backend.frontend import to_relax
    from edgevit.backend.schedules import fused_module, schedule_passes
    from edgevit.checkpoint import Checkpoint
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.targets import load_target

    model = tiny_efficientvit
    art = compile_model(Checkpoint.from_model(model), load_target("host"), tmp_path / "art", None,
                        CompileConfig(images=8), log=lambda _: None)
    assert art.manifest.validation["random"]["max_abs_error"] <= 1e-4

    target = load_target("host")
    mod, _ = to_relax(model, torch.zeros(1, 1, 32, 32), target=target)
    convs = [line for line in mod.script().splitlines() if "R.nn.conv2d(" in line]
    assert convs and all('kernel_layout="HWIO"' in c and 'data_layout="NHWC"' in c for c in convs)
    pointwise = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in model.modules()) - pointwise   # 1x1s: matmuls
    tvm_target = target.tvm_target()
    with tvm_target, tvm.transform.PassContext(opt_level=3):
        scheduled = tvm.transform.Sequential(schedule_passes(tvm_target))(fused_module(mod, tvm_target))
    kernels = {gv.name_hint: f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)}
    unscheduled = [n for n, f in kernels.items() if not (f.attrs and f.attrs.get("tirx.is_scheduled", False))]
    assert len(kernels) > 10 and not unscheduled


def test_search_and_adapt_say_which_knobs_an_efficientvit_has(tiny_efficientvit):
    """Window sparsity has nothing to prune here (its `depths` must not pass for a Swin's)."""
    from edgevit.errors import ConfigError
    from edgevit.sparsity import SparsityConfig

    with pytest.raises(ConfigError, match="no windows to prune.*size and input resolution"):
        SparsityConfig.for_model(tiny_efficientvit)


@pytest.mark.tvm
@pytest.mark.parametrize("settings", [dict(calib_images=64), dict(scheme="kmeans", bits=4)])
def test_quantized_pointwise_convs_compile_compressed(settings, tiny_efficientvit, tmp_path):
    """int8 and codebook quantization take EfficientViT's 1x1 convs (and its head's linears):
    they reach the artifact compressed and it matches the quantized PyTorch model."""
    import tvm

    from edgevit.checkpoint import Checkpoint
    from edgevit.compile import CompileConfig, compile_model
    from edgevit.data import load_data
    from edgevit.quantize import QuantizeConfig, quantize
    from edgevit.targets import load_target

    data = load_data("digits", 32)
    ckpt = Checkpoint.from_model(tiny_efficientvit, data={"spec": "digits", "mean": data.mean, "std": data.std})
    q = quantize(ckpt, data, tmp_path / "q", None, QuantizeConfig(**settings), log=lambda _: None)
    layers = q.checkpoint.quantization["layers"]
    assert sum(".conv" in name for name in layers) >= 15
    art = compile_model(q.checkpoint, load_target("host"), tmp_path / "art", None, CompileConfig(images=8),
                        log=lambda _: None)
    assert art.manifest.validation["random"]["max_abs_error"] <= 1e-3
    params = tvm.runtime.load_param_dict(art.weights.read_bytes())
    coded = [p for p in params.values() if p.dtype in ("int8", "uint8")]
    assert len(coded) == len(layers)


def test_the_normalisers_epsilon_survives_onnx_export(tmp_path):
    """torch.onnx's graph optimizer drops `x + 1e-15` (a float constant that small counts as 0):
    the exported model must still give a silenced head zeros, not NaN, in ONNX Runtime."""
    import numpy as np
    import onnxruntime as ort

    attention = LiteMLA(16, 8, (5,), 1e-15).eval()
    with torch.no_grad():
        attention.qkv.conv.weight.zero_()             # every head silenced: q = k = 0
    x = torch.randn(1, 16, 6, 6)
    path = tmp_path / "mla.onnx"
    torch.onnx.export(attention, (x,), str(path), input_names=["x"], dynamo=True)
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.isfinite(out).all()
