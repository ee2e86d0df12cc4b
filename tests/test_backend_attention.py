"""Attention as one CPU kernel (backend/attention.py): the kernel against numpy, the graph
rewrite on the models' own attention modules against PyTorch, and what it must leave alone."""

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from edgevit.backend.attention import FusedAttention, attention_kernel, tile_rows_for  # noqa: E402
from edgevit.targets import load_target  # noqa: E402

pytestmark = pytest.mark.tvm


def host():
    return load_target("host").tvm_target()


def softmax_rows(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def pad_last(a: np.ndarray, to: int) -> np.ndarray:
    out = np.zeros((*a.shape[:-1], to), np.float32)
    out[..., :a.shape[-1]] = a
    return out


@pytest.mark.parametrize("groups,tokens,dim,windows", [(3, 197, 64, 0), (12, 49, 32, 4), (2, 13, 16, 0)])
def test_fused_kernel_matches_numpy_with_bias_mask_and_scale(groups, tokens, dim, windows):
    """Ragged tokens (197: rows padded to 200, keys to 208; 13) and Swin's 49-token windows with
    a per-head bias and a per-window mask added at a 5-D stage, then a scale."""
    rng = np.random.default_rng(0)
    lanes, heads = 16, groups // max(windows, 1)
    chain, addends = [], []
    if windows:
        bias = rng.standard_normal((heads, tokens, tokens), dtype=np.float32)
        mask = np.where(rng.random((1, windows, 1, tokens, tokens)) < 0.3, -100.0, 0.0).astype(np.float32)
        chain = [("add", (windows, heads, tokens, tokens), bias.shape),
                 ("add", (1, windows, heads, tokens, tokens), mask.shape), ("mul", 0.5)]
        addends = [bias, mask]
    rows_tile = tile_rows_for(tokens, 8)
    cols = -(-tokens // lanes) * lanes
    rows = -(-tokens // rows_tile) * rows_tile
    func = attention_kernel(groups, tokens, dim, dim, chain, rows_tile, lanes)
    sch = FusedAttention().apply(func, host(), False)
    assert sch is not None and "T.vectorized" in sch.mod["main"].script()
    lib = tvm.compile(sch.mod["main"].with_attr("global_symbol", "main"), target=host()).mod
    q, k, v = (rng.standard_normal(s, dtype=np.float32) for s in
               [(groups, tokens, dim), (groups, dim, tokens), (groups, tokens, dim)])
    out = tvm.runtime.tensor(np.zeros((groups, rows, dim), np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in [q, pad_last(k, cols), v, *[pad_last(a, cols) for a in addends]]], out)
    s = q @ k
    if windows:
        s = ((s.reshape(windows, heads, tokens, tokens) + addends[0]).reshape(1, windows, heads, tokens, tokens)
             + addends[1]).reshape(groups, tokens, tokens) * 0.5
    np.testing.assert_allclose(out.numpy()[:, :tokens], softmax_rows(s) @ v, rtol=1e-4, atol=1e-5)


def compiled(model: torch.nn.Module, *inputs: torch.Tensor):
    """(the module as `compile` lowers it for the host, a function running it)."""
    from edgevit.backend.build import build
    from edgevit.backend.frontend import to_relax

    class Wrapped(torch.nn.Module):   # to_relax takes one input
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            return self.inner(x, *inputs[1:])

    target = load_target("host")
    mod, weights = to_relax(Wrapped().eval(), inputs[0], target=target)
    vm = tvm.relax.VirtualMachine(build(mod, target, None), tvm.cpu())
    return mod, lambda: vm["main"](tvm.runtime.tensor(inputs[0].numpy()), *[tvm.runtime.tensor(w) for w in weights]).numpy()


def kernels(mod) -> list[str]:
    return [gv.name_hint for gv in mod.functions]


def ops(mod) -> str:
    return mod["main"].script()


def test_vit_attention_becomes_one_kernel_and_matches_pytorch():
    from edgevit.models.vit import Attention

    torch.manual_seed(0)
    attn = Attention(64, 2).eval()
    x = torch.randn(1, 65, 64)
    mod, run = compiled(attn, x)
    assert any(n.startswith("fused_attention") for n in kernels(mod))
    assert "softmax" not in ops(mod)
    with torch.no_grad():
        np.testing.assert_allclose(run(), attn(x).numpy(), rtol=1e-4, atol=1e-5)


def test_shifted_window_attention_keeps_its_bias_and_mask():
    from edgevit.models.swin import SwinBlock

    torch.manual_seed(0)
    block = SwinBlock(32, 2, resolution=14, ws=7, shifted=True, mlp_ratio=2.0, drop_path=0.0).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_(0, 1.0)   # a bias that matters
    x = torch.randn(2, 14, 14, 32)
    mod, run = compiled(block, x)
    assert any(n.startswith("fused_attention") for n in kernels(mod))
    assert "softmax" not in ops(mod)
    with torch.no_grad():
        np.testing.assert_allclose(run(), block(x).numpy(), rtol=1e-4, atol=1e-4)


class NotAttention(torch.nn.Module):
    """A softmax over the query axis between two matmuls: not attention, must stay as it is."""

    def forward(self, x):
        return (x @ x.transpose(-2, -1)).softmax(dim=-2) @ x


def test_a_softmax_over_another_axis_is_left_alone():
    x = torch.randn(2, 20, 16)
    mod, run = compiled(NotAttention(), x)
    assert not any(n.startswith("fused_attention") for n in kernels(mod))
    np.testing.assert_allclose(run(), NotAttention()(x).numpy(), rtol=1e-4, atol=1e-5)


def test_tune_keeps_edgevit_schedule_for_fused_attention_and_searches_the_rest():
    """MetaSchedule's tiling rules fail on the fused kernel (several reductions per row tile):
    `tune` keeps edgevit's schedule for it instead of aborting the whole model."""
    from edgevit.backend.metaschedule import unsearchable
    from edgevit.backend.packed_fp32 import panel_matmul

    class Task:
        def __init__(self, func):
            self.dispatched = [tvm.IRModule({"main": func})]

    assert "attention" in unsearchable(Task(attention_kernel(3, 17, 16, 16, [], 8, 16)))
    assert unsearchable(Task(panel_matmul([1, 17], 32, 64, 32, 8))) is None
