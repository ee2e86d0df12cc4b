"""Property-based fuzzing of what users type and write: recipe and target TOML files, sparsity
JSON, `--budget` and `--set`. Every input either loads or raises ConfigError with a one-line
message (the CLI prints it as the single line on stderr); no other exception may escape.

The structured strategies draw keys from the real dataclasses (stage configs, Target, model
configs) so the fuzz reaches validation, not only the parser; the raw strategies feed text."""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevit.config import tomllib
from edgevit.errors import ConfigError

# database=None: no .hypothesis folder is written into the checkout
# derandomize: every run tries the same inputs, so a failure reproduces and a pass means the same
FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def config_error_or(fn, *args, **kwargs):
    """fn's result, or None when it raised ConfigError with a one-line message; any other
    exception propagates (hypothesis reports it with the minimal input)."""
    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        message = str(e)
        assert message.strip(), "ConfigError with an empty message"
        assert "\n" not in message and "\r" not in message, f"ConfigError message is not one line: {message!r}"
        return None


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory(prefix="edgevit-fuzz-") as d:
        yield Path(d)


# ---------------------------------------------------------------------------- a tiny TOML writer


def toml_str(s: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    special = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}
    out = []
    for ch in s:
        if ch in special:
            out.append(special[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_str(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {type(v).__name__}")


def dump_toml(doc: dict) -> str:
    """Top-level scalars and lists first, then each top-level table as [table] (deeper tables inline)."""
    lines = [f"{toml_str(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{toml_str(k)}]")
            lines.extend(f"{toml_str(kk)} = {toml_value(vv)}" for kk, vv in v.items())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- strategies

INT64 = st.integers(-(2 ** 63), 2 ** 63 - 1)
# short text, often with the characters messages trip on (line breaks, quotes, backslashes)
texts = st.text(max_size=6) | st.sampled_from(["", "a\nb", "\n", "x\r", "'", '"', "\\", "\u2028"])
keys = st.text(max_size=10) | texts
scalars = st.one_of(st.text(max_size=12), INT64, st.floats(), st.booleans())
toml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=3),
                           max_leaves=10)
# values a user plausibly writes (and the edges of each type), for keys that exist
plausible = st.one_of(
    st.integers(-3, 300), st.sampled_from([0, 1, 2, 4, 7, 16, 32, 2 ** 63 - 1, -(2 ** 63)]),
    st.floats(), st.sampled_from([0.0, -0.0, 0.1, 0.5, 0.8, 1.0, 1e-9, 1e308]), st.booleans(),
    st.sampled_from(["", "digits", "host", "rasp4b", "test", "val", "1ms", "500us", "0.02s", "search", "dense", "0.5",
                     "llvm", "cuda", "cpu", "x86_64", "aarch64", "swin_micro", "a\nb"]),
    texts,
    st.lists(st.integers(-1, 8), max_size=4), st.lists(st.floats(-1, 1), max_size=4),
    st.lists(st.sampled_from(["train", "adapt", "eval", "host", "x"]), max_size=3),
)


def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def table_of(names: list[str], values=plausible, size: int = 4, known: bool = False):
    """A table whose keys come from `names` (and, unless `known`, from anywhere)."""
    if known:
        return st.dictionaries(st.sampled_from(names), values, max_size=size) if names else st.just({})
    return st.dictionaries(st.sampled_from(names) | keys if names else keys, values, max_size=size)


# Two families per file kind: any keys at all, and only keys that exist (a misspelled key is
# refused first, so only the second family reaches the validation of values).
KEY_FAMILIES = ["any-keys", "known-keys"]
values = plausible | toml_values | texts


def with_value(base: dict, path: tuple[str, ...], value) -> dict:
    """A deep copy of `base` with the value at `path` replaced."""
    doc = json.loads(json.dumps(base))
    table = doc
    for part in path[:-1]:
        table = table.setdefault(part, {})
    table[path[-1]] = value
    return doc


def one_value_changed(base: dict, paths: list[tuple[str, ...]]):
    """`base` (a document that loads) with one value, at a path that exists, replaced by anything:
    every example reaches the validation of that value."""
    return st.tuples(st.sampled_from(paths), values).map(lambda pv: with_value(base, *pv))


RECIPE_BASE = {"name": "fuzz", "stages": ["train", "eval"], "data": {"spec": "digits"}, "model": {"name": "swin_micro"}}


def recipe_paths() -> list[tuple[str, ...]]:
    from edgevit.models import list_models, resolve_model
    from edgevit.recipes import DataConfig
    from edgevit.stages import STAGES

    model_fields = sorted({n for m in list_models() for n in field_names(resolve_model(m)[1])})
    return ([("name",), ("stages",), ("out",), ("model", "name")] + [("data", f) for f in field_names(DataConfig)]
            + [("model", f) for f in model_fields]
            + [(s.name, f) for s in STAGES for f in field_names(s.config_class())])


def recipe_docs(known: bool = False):
    from edgevit.models import list_models, resolve_model
    from edgevit.recipes import DataConfig
    from edgevit.stages import STAGES, stage_names

    model_fields = sorted({n for m in list_models() for n in field_names(resolve_model(m)[1])})
    model = st.fixed_dictionaries({"name": st.sampled_from(list_models()) | st.text(max_size=6)}) \
        .flatmap(lambda head: table_of(model_fields, known=known).map(lambda rest: {**rest, **head}))
    optional = {
        "name": plausible, "out": plausible,
        "stages": st.lists(st.sampled_from(stage_names()) | st.text(max_size=6), max_size=4) | plausible,
        "data": table_of(field_names(DataConfig), known=known) | plausible,
        "model": model | table_of(model_fields, known=known) | plausible,
        **{s.name: table_of(field_names(s.config_class()), known=known) | plausible for s in STAGES},
    }
    structured = st.fixed_dictionaries({}, optional=optional)
    if known:
        return structured
    return structured | structured.flatmap(lambda d: st.dictionaries(keys, toml_values, max_size=2)
                                           .map(lambda extra: {**extra, **d})) | st.dictionaries(keys, toml_values)


# "TOML-ish" text: lines of headers and assignments, values from valid and broken fragments
fragments = st.sampled_from(["1", "-1", "0", "1.5", "inf", "nan", "true", '"x"', "'y'", "[1, 2]", "[", "]", "{a = 1}",
                             '"""', "=", "[[x]]", "1e400", "0x10", "1979-05-27", "# c", ""])
toml_lines = st.one_of(
    st.builds(lambda k: f"[{k}]", st.sampled_from(["train", "adapt", "model", "data", "search", "tvm", "profile"])
              | st.text(max_size=6)),
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(["name", "stages", "epochs", "lr", "spec", "device", "kind",
                                                          "img_size", "budget"]) | st.text(max_size=6),
              fragments | st.text(max_size=8)),
    st.text(max_size=20),
)
# digit strings of every length, and often just around 4300: Python refuses int() of more digits
long_ints = st.one_of(st.integers(1, 4400), st.integers(4290, 4310)).map(lambda n: "9" * n)
# raw file contents in three families, each its own test case so one bug does not hide another
RAW = {
    "text": st.lists(toml_lines, max_size=8).map("\n".join) | st.text(),
    "not-utf8": st.binary(min_size=1, max_size=40).filter(lambda b: not _utf8(b)),
    "long-int": st.builds(lambda k, v: f"{k} = {v}\n", st.sampled_from(["name", "x", "epochs"]), long_ints),
}


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def write_any(path: Path, content) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")


finite_toml_values = st.recursive(st.one_of(st.text(max_size=12), INT64, st.floats(allow_nan=False), st.booleans()),
                                  lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=3),
                                  max_leaves=10)


@FUZZ
@given(doc=st.dictionaries(keys, finite_toml_values))
def test_toml_writer_round_trips(doc):
    """The writer itself is sound: what it writes parses back to the same document."""
    assert tomllib.loads(dump_toml(doc)) == doc


# ---------------------------------------------------------------------------- (a) recipes


@pytest.mark.parametrize("family", KEY_FAMILIES)
@FUZZ
@given(data=st.data())
def test_recipe_mapping_loads_or_config_error(folder, family, data):
    from edgevit.recipes import Recipe, load_recipe

    doc = data.draw(recipe_docs(known=family == "known-keys"), label="doc")
    path = folder / "fuzz.toml"
    path.write_text(dump_toml(doc), encoding="utf-8")
    recipe = config_error_or(load_recipe, path)
    assert recipe is None or isinstance(recipe, Recipe)


@settings(FUZZ, max_examples=500)
@given(doc=st.deferred(lambda: one_value_changed(RECIPE_BASE, recipe_paths())))
def test_recipe_with_one_value_changed_loads_or_config_error(folder, doc):
    from edgevit.recipes import Recipe, load_recipe

    path = folder / "one.toml"
    path.write_text(dump_toml(doc), encoding="utf-8")
    recipe = config_error_or(load_recipe, path)
    assert recipe is None or isinstance(recipe, Recipe)


@pytest.mark.parametrize("family", RAW)
@FUZZ
@given(data=st.data())
def test_recipe_text_loads_or_config_error(folder, family, data):
    from edgevit.recipes import Recipe, load_recipe

    text = data.draw(RAW[family], label="file")
    path = folder / "text.toml"
    write_any(path, text)
    recipe = config_error_or(load_recipe, path)
    assert recipe is None or isinstance(recipe, Recipe)


# ---------------------------------------------------------------------------- (b) targets


TARGET_BASE = {"description": "fuzz", "device": "cpu", "arch": "x86_64", "tvm": {"kind": "llvm", "mcpu": "native"}}
TARGET_PATHS = [("description",), ("device",), ("arch",), ("tvm",), ("rpc_key",), ("cross_compiler",),
                ("cross_package",), ("aliases",), ("notes",), ("tvm", "kind"), ("tvm", "mcpu"), ("tvm", "mtriple"),
                ("tvm", "mattr"), ("tvm", "host")]


def test_fuzz_bases_load(folder):
    """The documents the one-value family starts from are valid, so each change is what fails."""
    from edgevit.recipes import load_recipe
    from edgevit.targets import load_target

    (folder / "base.toml").write_text(dump_toml(RECIPE_BASE))
    (folder / "base-target.toml").write_text(dump_toml(TARGET_BASE))
    assert load_recipe(folder / "base.toml").name == "fuzz"
    assert load_target(str(folder / "base-target.toml")).device == "cpu"


def target_docs(known: bool = False):
    """Mostly complete targets (so validation past the required keys is reached), some partial."""
    from edgevit.targets import Target

    tvm = st.fixed_dictionaries({"kind": st.sampled_from(["llvm", "cuda"]) | texts | plausible},
                                optional={"mtriple": plausible, "mcpu": plausible, "mattr": plausible,
                                          "host": table_of(["kind", "mcpu"], known=known) | plausible})
    required = {"description": texts | plausible,
                "device": st.sampled_from(["cpu", "cuda"]) | texts | plausible,
                "arch": st.sampled_from(["x86_64", "aarch64"]) | texts | plausible,
                "tvm": tvm | table_of(["kind", "mtriple", "mcpu", "mattr", "host"], known=known) | plausible}
    optional = {name: plausible for name in field_names(Target) if name not in required and name != "name"}
    if known:
        return st.fixed_dictionaries(required, optional=optional) | st.fixed_dictionaries({}, optional=required)
    return st.one_of(st.fixed_dictionaries(required, optional=optional),
                     st.fixed_dictionaries({}, optional={**required, **optional}),
                     st.dictionaries(keys, toml_values))


@pytest.mark.parametrize("family", KEY_FAMILIES)
@FUZZ
@given(data=st.data())
def test_target_mapping_loads_or_config_error(folder, family, data):
    from edgevit.targets import Target, load_target

    doc = data.draw(target_docs(known=family == "known-keys"), label="doc")
    path = folder / "device.toml"
    path.write_text(dump_toml(doc), encoding="utf-8")
    target = config_error_or(load_target, str(path))
    assert target is None or isinstance(target, Target)


@settings(FUZZ, max_examples=300)
@given(doc=one_value_changed(TARGET_BASE, TARGET_PATHS))
def test_target_with_one_value_changed_loads_or_config_error(folder, doc):
    from edgevit.targets import Target, load_target

    path = folder / "one-device.toml"
    path.write_text(dump_toml(doc), encoding="utf-8")
    target = config_error_or(load_target, str(path))
    assert target is None or isinstance(target, Target)


@pytest.mark.parametrize("family", RAW)
@FUZZ
@given(data=st.data())
def test_target_text_loads_or_config_error(folder, family, data):
    from edgevit.targets import Target, load_target

    text = data.draw(RAW[family], label="file")
    path = folder / "text-device.toml"
    write_any(path, text)
    target = config_error_or(load_target, str(path))
    assert target is None or isinstance(target, Target)


# ---------------------------------------------------------------------------- (c) sparsity JSON

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
ratio_lists = st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.8, 0.05, 1.0, -0.1]) | json_values, max_size=4) | json_values
sparsity_docs = st.fixed_dictionaries(
    {"ratios": ratio_lists, "stage_knobs": st.lists(st.integers(-2, 4) | json_values, max_size=3) | json_values},
    optional={"levels": ratio_lists, "extra": json_values})


@FUZZ
@given(doc=json_values | sparsity_docs | sparsity_docs.map(lambda d: {"sparsity": d}))
def test_sparsity_json_loads_or_config_error(folder, doc):
    from edgevit.sparsity import SparsityConfig

    path = folder / "sparsity.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    config = config_error_or(SparsityConfig.load, path)
    assert config is None or isinstance(config, SparsityConfig)


RAW_JSON = {
    "text": st.text(),
    "not-utf8": RAW["not-utf8"],
    "long-int": st.builds(lambda n: '{"ratios": [' + n + '], "stage_knobs": [1]}', long_ints),
    "huge-int": st.builds(lambda n: '{"ratios": [' + "9" * n + '], "stage_knobs": [1]}', st.integers(4301, 4400)),
}


@pytest.mark.parametrize("family", RAW_JSON)
@FUZZ
@given(data=st.data())
def test_sparsity_json_text_loads_or_config_error(folder, family, data):
    from edgevit.sparsity import SparsityConfig

    text = data.draw(RAW_JSON[family], label="file")
    path = folder / "sparsity-text.json"
    write_any(path, text)
    config = config_error_or(SparsityConfig.load, path)
    assert config is None or isinstance(config, SparsityConfig)


# ---------------------------------------------------------------------------- (d) --budget

BUDGET_TEXTS = {
    "text": st.one_of(st.text(), st.text(alphabet=" \t\n\r0123456789.msuµ", max_size=8),
                      st.from_regex(r"\s*[0-9]{0,6}\.?[0-9]{1,6}\s*(ms|us|µs|s)?\s*", fullmatch=True)),
    # numbers past float's range: float("9" * 400) is inf, not an error
    "long-number": st.builds(lambda digits, unit: digits + unit, st.integers(1, 500).map(lambda n: "9" * n),
                             st.sampled_from(["", "ms", "us", "s"])),
}


@pytest.mark.parametrize("family", BUDGET_TEXTS)
@FUZZ
@given(data=st.data())
def test_budget_text_is_a_positive_finite_latency_or_config_error(family, data):
    from edgevit.search import parse_budget

    text = data.draw(BUDGET_TEXTS[family], label="text")
    ms = config_error_or(parse_budget, text)
    assert ms is None or (isinstance(ms, float) and math.isfinite(ms) and ms > 0), (text, ms)


@FUZZ
@given(x=st.floats())
def test_budget_number_is_taken_as_ms_or_config_error(x):
    from edgevit.search import parse_budget

    ms = config_error_or(parse_budget, x)
    if math.isfinite(x) and x > 0:
        assert ms == x
    else:
        assert ms is None, (x, ms)


def positional(x: float) -> str:
    """x written without an exponent, exactly (float() of it gives x back)."""
    text = format(Decimal(repr(x)), "f")
    assert float(text) == x and "e" not in text.lower()
    return text


@FUZZ
@given(x=st.floats(min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False))
def test_budget_round_trips_and_units_scale(x):
    from edgevit.search import parse_budget

    text = positional(x)
    assert parse_budget(f"{text}ms") == x
    assert parse_budget(text) == x            # a bare number is ms
    for unit, scale in (("us", 1e-3), ("µs", 1e-3), ("s", 1e3)):
        expected = x * scale
        got = config_error_or(parse_budget, f"{text}{unit}")
        if math.isfinite(expected) and expected > 0:
            assert got is not None and math.isclose(got, expected, rel_tol=1e-12), (text, unit, got, expected)
        else:   # underflows to 0 or overflows to inf: not a latency
            assert got is None, (text, unit, got)


# ---------------------------------------------------------------------------- (e) --set

SWIN_FIELDS = ["img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depths", "num_heads", "window_size",
               "mlp_ratio", "drop_path"]
set_values = st.one_of(
    st.text(max_size=10),
    st.integers(-5, 300).map(str),
    st.floats().map(repr),
    st.sampled_from(["0", "-1", "abc", "[2,2]", "[2, 2, 2]", "[]", "[0]", "[0, 0]", "true", "1e309", "inf", "-inf", "nan",
                     "{a = 1}", '"x"', "'%d'", "0.5", "[1.5, 2]", "[[2]]"]),
    long_ints,
    st.lists(st.integers(-2, 8), max_size=4).map(lambda xs: "[" + ", ".join(map(str, xs)) + "]"),
)
set_items = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SWIN_FIELDS) | st.text(max_size=8).filter(lambda k: "=" not in k),
              set_values),
    st.text(max_size=12),
)


@FUZZ
@given(items=st.lists(set_items, min_size=1, max_size=4))
def test_set_overrides_resolve_or_config_error(items):
    from edgevit.cli import _parse_sets
    from edgevit.models import resolve_model

    def resolve():
        return resolve_model("swin_micro", **_parse_sets(tuple(items)))

    resolved = config_error_or(resolve)
    if resolved is not None:
        cls, cfg = resolved
        assert dataclasses.is_dataclass(cfg) and cls.__name__ == "SwinTransformer"


small_set_values = st.one_of(st.integers(-1, 9).map(str), st.sampled_from(["0.0", "0.5", "1.5", "[1]", "[2]", "[1, 1]",
                                                                          "[2, 2]", "[0, 2]", "[1, 2]", "[4, 2]"]))


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(items=st.lists(st.builds(lambda k, v: f"{k}={v}", st.sampled_from(SWIN_FIELDS[:2] + SWIN_FIELDS[4:]),
                                small_set_values), min_size=1, max_size=3))
def test_accepted_small_set_overrides_build_a_working_model(items):
    """What resolve_model accepts (small values only, so nothing big is built), create_model builds
    and the model runs: validation is where a bad --set must stop."""
    import torch

    from edgevit.cli import _parse_sets
    from edgevit.models import create_model, resolve_model

    overrides = config_error_or(_parse_sets, tuple(items))
    if overrides is None or config_error_or(resolve_model, "swin_micro", **overrides) is None:
        return
    model = create_model("swin_micro", **overrides).eval()
    c = model.cfg
    with torch.no_grad():
        out = model(torch.zeros(1, c.in_chans, c.img_size, c.img_size))
    assert out.shape == (1, c.num_classes)
