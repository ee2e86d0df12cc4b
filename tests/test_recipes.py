from pathlib import Path

import pytest

from edgevit.errors import ConfigError
from edgevit.recipes import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.stages
    assert_resolves_to_registered_model(recipe)


def assert_resolves_to_registered_model(recipe):
    """resolve() gives (class, config): the class registered under the recipe's model name, and
    its default config with exactly the [model] overrides applied."""
    import dataclasses

    from edgevit.models import create_model
    from edgevit.models.registry import _REGISTRY

    resolved = recipe.model.resolve()
    assert isinstance(resolved, tuple) and len(resolved) == 2
    cls, cfg = resolved
    assert recipe.model.name in _REGISTRY
    registered_cls, default = _REGISTRY[recipe.model.name]()
    assert cls is registered_cls and isinstance(cfg, type(default)) and dataclasses.is_dataclass(cfg)
    for f in dataclasses.fields(cfg):
        if f.name in recipe.model.overrides:
            given = recipe.model.overrides[f.name]
            assert getattr(cfg, f.name) == (tuple(given) if isinstance(given, list) else given), f.name
        else:
            assert getattr(cfg, f.name) == getattr(default, f.name), f.name
    model = create_model(recipe.model.name, **recipe.model.overrides)
    assert type(model) is cls and model.cfg == cfg


def test_model_overrides_reach_the_resolved_config(tmp_path):
    recipe = load_recipe(write(tmp_path, 'stages = ["train"]\n[model]\nname = "swin_micro"\nimg_size = 32\n'
                                         'depths = [2, 4]\nwindow_size = 2\ndrop_path = 0.1\n'))
    assert recipe.model.overrides == {"img_size": 32, "depths": [2, 4], "window_size": 2, "drop_path": 0.1}
    assert_resolves_to_registered_model(recipe)
    _, cfg = recipe.model.resolve()
    assert (cfg.img_size, cfg.depths, cfg.window_size, cfg.drop_path, cfg.embed_dim) == (32, (2, 4), 2, 0.1, 16)


def test_fashion_recipe_has_at_least_16_windows_in_stage_one():
    from edgevit.models import create_model

    recipe = load_recipe(ROOT / "recipes" / "fashion.toml")
    model = create_model(recipe.model.name, **recipe.model.overrides)
    assert model.layers[0].blocks[0].num_windows >= 16


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, message", [
    ('stages = ["train"]\n[model]\nname = "swin_micro"\n[train]\nepoch = 3\n', "unknown key 'epoch'; did you mean 'epochs'"),
    ('stage = ["train"]\n[model]\nname = "swin_micro"\n', "unknown key 'stage'; did you mean 'stages'"),
    ('stages = ["trian"]\n[model]\nname = "swin_micro"\n', "unknown stage 'trian'; did you mean 'train'"),
    ('[model]\nname = "swin_micro"\nwindw_size = 4\n', "did you mean 'window_size'"),
    ('[model]\nname = "swin_micro"\n[train]\nepochs = "100"\n', "expected int, got '100'"),
    ('[model]\nname = "swin_micro"\n[train]\nlr = 5\n', "lr 5.0"),
    ('[model]\n', "missing required key 'name'"),
    ('[model\nname = 1', "malformed TOML"),
    ('stages = ["search"]\n[model]\nname = "swin_micro"\n[search]\nbudget = "fast"\n', "budget 'fast' is not a latency"),
    ('[model]\nname = "swin_micro"\n[profile]\ntarget = "host"\nvalidat = 3\n', "did you mean 'validate'"),
])
def test_bad_recipes_name_file_and_fix(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        load_recipe(write(tmp_path, text))
    assert str(tmp_path / "r.toml") in str(e.value) and "\n" not in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe(tmp_path / "nope.toml")


def test_digest_tracks_only_upstream_settings(tmp_path):
    base = '[model]\nname = "swin_micro"\n[train]\nepochs = 2\n'
    a = load_recipe(write(tmp_path, base))
    b = load_recipe(write(tmp_path, base + "[adapt]\nepochs = 5\n"))
    assert a.digest("train") == b.digest("train") and a.digest("adapt") != b.digest("adapt")


def test_profile_and_search_stages_parse(tmp_path):
    recipe = load_recipe(write(tmp_path, 'stages = ["train", "adapt", "profile", "search"]\n[model]\nname = "swin_micro"\n'
                                         '[profile]\ntarget = "rasp4b"\nvalidate = 30\n[search]\nbudget = "500us"\n'))
    assert recipe.sections["profile"].target == "rasp4b" and recipe.sections["profile"].validate == 30
    assert recipe.sections["search"].budget == "500us"
