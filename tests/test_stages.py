"""The stage registry: every stage resolves, recipes and the README's reference derive from it."""

import dataclasses
import re
from pathlib import Path

import pytest

from edgevit.errors import ConfigError
from edgevit.recipes import load_recipe
from edgevit.stages import STAGES, get_stage, reference_markdown, stage_names

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.name)
def test_every_stage_resolves_its_config_and_runner(stage):
    cls = stage.config_class()
    assert dataclasses.is_dataclass(cls)
    cls()   # every recipe table may be left out: all keys have defaults
    assert callable(stage.runner())
    assert all(not p.startswith("/") for p in stage.inputs + stage.outputs)


def test_recipes_accept_every_registered_stage_and_nothing_else(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(f'stages = {list(stage_names())!r}\n[model]\nname = "swin_micro"\n'.replace("'", '"'))
    recipe = load_recipe(p)
    assert recipe.stages == tuple(stage_names()) and set(recipe.sections) == set(stage_names())
    with pytest.raises(ConfigError, match="unknown stage 'quantise'"):
        get_stage("quantise")


def test_readme_recipe_reference_is_the_generated_one():
    """README's 'Recipe stages' block is `edgevit stages` output: regenerate it when a stage changes."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- stages:begin -->\n(.*?)<!-- stages:end -->", readme, re.S)
    assert block, "README lacks the <!-- stages:begin --> ... <!-- stages:end --> block"
    assert block.group(1) == reference_markdown(), "README's recipe reference is stale: paste `edgevit stages`"
