"""SparseViT window pruning: the invariants of SPARSEVIT.md, checked against references."""

import numpy as np
import pytest
import torch

from edgevit.errors import ConfigError
from edgevit.models import create_model
from edgevit.models.swin import keep_windows, window_partition, window_scores
from edgevit.sparsity import (
    SparsityConfig,
    enumerate_space,
    keep_count,
    knobs_per_stage,
    sample_config,
    set_sparsity,
    space_size,
)


def micro(**kw):
    # 32x32 input, patch 2, window 4: 16 windows in stage 1, 4 in stage 2
    return create_model("swin_micro", img_size=32, **kw).eval()


def test_all_zero_ratios_equal_dense_exactly():
    model = micro()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        dense = model(x)
        model.set_sparsity(SparsityConfig.for_model(model, [0.0, 0.0]))
        assert (model(x) - dense).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shifted", [False, True])
def test_gathering_every_window_equals_dense_block(shifted):
    """The gather -> compute -> scatter path itself reproduces the dense block."""
    block = micro().layers[0].blocks[int(shifted)]
    x = torch.randn(2, 16, 16, 16)
    keep = torch.stack([torch.randperm(16) for _ in range(2)])      # every window, shuffled
    with torch.no_grad():
        assert (block(x, keep=keep) - block(x)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shifted", [False, True])
def test_kept_windows_match_dense_and_pruned_windows_pass_through(shifted):
    block = micro().layers[0].blocks[int(shifted)]
    x = torch.randn(2, 16, 16, 16)
    keep = torch.tensor([[3, 0, 9, 12, 5], [15, 1, 2, 8, 7]])
    with torch.no_grad():
        sparse, dense = block(x, keep=keep), block(x)

    def windows(t):  # the partition the block uses (rolled for SW-MSA)
        if block.shift:
            t = torch.roll(t, (-block.shift, -block.shift), (1, 2))
        return window_partition(t, block.ws)                       # (B, nW, N, C)

    ws, wd, wx = windows(sparse), windows(dense), windows(x)
    for b in range(2):
        kept = set(keep[b].tolist())
        for w in range(16):
            ref = wd[b, w] if w in kept else wx[b, w]
            assert (ws[b, w] - ref).abs().max().item() <= 1e-5, (b, w, w in kept)


def test_window_scores_follow_the_spec():
    """Score = L2 over the window of mean_c |x|, computed here by explicit loops."""
    x = torch.randn(2, 8, 8, 5)
    got = window_scores(x, 4)
    m = x.abs().mean(-1)
    for b in range(2):
        for wi, (r, c) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
            ref = m[b, r:r + 4, c:c + 4].flatten().norm()
            assert torch.isclose(got[b, wi], ref, atol=1e-6)
    shifted = window_scores(x, 4, shift=2)
    assert torch.allclose(shifted, window_scores(torch.roll(x, (-2, -2), (1, 2)), 4))


def test_keep_windows_equals_topk_and_breaks_ties_by_index():
    scores = torch.randn(5, 37)
    for k in (1, 9, 37):
        assert torch.equal(keep_windows(scores, k), torch.topk(scores, k, dim=1, sorted=True).indices)
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0]])
    assert keep_windows(tied, 4).tolist() == [[1, 2, 4, 0]]


def test_keep_count_floor_and_clamp():
    assert keep_count(16, 0.5) == 8 and keep_count(16, 0.3) == 11 and keep_count(10, 0.7) == 3
    assert keep_count(1, 0.8) == 1 and keep_count(4, 0.8) == 1  # never zero windows


def record_keeps(model):
    seen = []

    def hook(module, args, kwargs):
        seen.append((module, kwargs.get("keep")))
    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for s in model.layers for b in s.blocks]
    return seen, handles


def test_nested_sorted_prefixes_within_a_stage():
    model = create_model("swin_micro", img_size=32, depths=(4, 2), num_heads=(1, 2)).eval()
    model.set_sparsity(SparsityConfig.for_model(model, [0.3, 0.6, 0.5]))
    seen, _ = record_keeps(model)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        model(x)
    stage0 = [k for m, k in seen[:4]]
    assert [k.shape[1] for k in stage0] == [11, 11, 6, 6]
    # blocks 0 and 2 (unshifted) share one ranking; 1 and 3 (shifted) the other: nested prefixes
    assert torch.equal(stage0[2], stage0[0][:, :6]) and torch.equal(stage0[3], stage0[1][:, :6])
    # rankings are sorted by score, best first, from the scores of the stage's first pruned block input
    stage_in = model.patch_embed.norm(model.patch_embed.proj(x).permute(0, 2, 3, 1))
    scores = window_scores(stage_in, 4)
    assert torch.equal(stage0[0], keep_windows(scores, 11))
    top = torch.gather(scores, 1, stage0[0])
    assert (top[:, :-1] >= top[:, 1:]).all()
    assert seen[4][1].shape[1] == 2 and seen[5][1].shape[1] == 2   # stage 2: 4 windows at 0.5


def test_one_image_does_not_depend_on_the_batch():
    model = micro()
    model.set_sparsity(SparsityConfig.for_model(model, [0.5, 0.3]))
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    assert (together - alone).abs().max().item() <= 1e-5


def test_sparsity_changes_output_and_model_stays_finite():
    model = micro()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        dense = model(x)
        model.set_sparsity(SparsityConfig.uniform(model, 0.5))
        sparse = model(x)
    assert torch.isfinite(sparse).all() and (sparse - dense).abs().max() > 1e-4


@pytest.mark.parametrize("ratios, message", [
    ([0.85, 0.85], "not one of the levels"),
    ([0.1], "needs 2"),
    ([0.1, 0.2, 0.3], "needs 2"),
])
def test_bad_configs_are_refused(ratios, message):
    with pytest.raises(ConfigError, match=message):
        SparsityConfig.for_model(micro(), ratios)


def test_decreasing_within_a_stage_is_refused():
    model = create_model("swin_micro", depths=(4, 2), num_heads=(1, 2))
    with pytest.raises(ConfigError, match="stage 0 ratios \\[0.5, 0.2\\] decrease"):
        SparsityConfig.for_model(model, [0.5, 0.2, 0.0])
    SparsityConfig.for_model(model, [0.2, 0.5, 0.0])  # increasing is fine


def test_vit_has_no_windows():
    with pytest.raises(ConfigError, match="swin family"):
        set_sparsity(create_model("vit_micro"), None)


def test_json_round_trip(tmp_path):
    model = create_model("swin_t")
    cfg = SparsityConfig.for_model(model, [0.1, 0.2, 0.0, 0.3, 0.3, 0.8])
    cfg.save(tmp_path / "c.json")
    assert SparsityConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text('{"ratios": [0.1], "stage_knobs": [1], "lvls": []}')
    with pytest.raises(ConfigError, match="unknown key 'lvls'"):
        SparsityConfig.load(tmp_path / "bad.json")


def test_swin_t_space_and_sampling():
    knobs = knobs_per_stage((2, 2, 6, 2))
    assert knobs == (1, 1, 3, 1) and space_size(knobs) == 120_285   # SPARSEVIT.md
    small = (1, 2)
    assert len(list(enumerate_space(small))) == space_size(small) == 9 * 45
    gen = torch.Generator().manual_seed(0)
    samples = [sample_config(knobs, gen) for _ in range(300)]
    for s in samples:
        for stage in s.per_stage():
            assert stage == sorted(stage)
    first_knob = np.array([s.ratios[0] for s in samples])
    assert len(set(first_knob.tolist())) == 9                      # every level gets sampled
    again = sample_config(knobs, torch.Generator().manual_seed(0))
    assert again == samples[0]                                     # seeded


@pytest.mark.parametrize("ratios", [[0.5, 0.5], [0.2, 0.7]])
def test_pruned_model_exports_with_static_shapes(ratios, tmp_path):
    import onnxruntime as ort

    model = micro()
    model.set_sparsity(SparsityConfig.for_model(model, ratios))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = model(x)
    exported = torch.export.export(model, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("gather" in o for o in ops) and any("scatter" in o for o in ops)
    assert not any("topk" in o or "sort" in o for o in ops)      # runtime-only TVM devices lack sort
    assert not any("index_put" in o for o in ops)                 # TVM's importer rejects it
    assert (exported.module()(x) - ref).abs().max().item() <= 1e-5
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], dynamo=True)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() <= 1e-4


def test_flops_fall_in_proportion_to_kept_windows():
    from edgevit.flops import count_flops

    model = micro()
    dense = count_flops(model)["per_module"]
    model.set_sparsity(SparsityConfig.for_model(model, [0.5, 0.0]))
    sparse = count_flops(model)["per_module"]
    for b in range(2):
        name = f"SwinTransformer.layers.0.blocks.{b}"
        assert sparse[name] * 16 == dense[name] * 8                # 8 of 16 windows kept
    assert sparse["SwinTransformer.layers.1"] == dense["SwinTransformer.layers.1"]
