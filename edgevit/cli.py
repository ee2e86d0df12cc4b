"""The `edgevit` command: a thin layer that parses, calls the library and prints a summary.

Errors from the library (EdgeVitError) become one line on stderr and a non-zero exit code;
figures can also be written as JSON with --json PATH.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from edgevit import __version__
from edgevit.errors import EdgeVitError

JSON_HELP = "Also write the figures as JSON to this path."


def _write_json(path: str | None, data: Any) -> None:
    if path:
        from edgevit.fileio import write_json

        write_json(path, data)
        click.echo(f"wrote {path}")


def _parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    """--set key=value model overrides; values parsed as TOML scalars/arrays (e.g. depths=[2,2])."""
    from edgevit.config import tomllib

    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise EdgeVitError(f"--set {item!r}: expected key=value, e.g. --set img_size=32")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgevit")
def cli() -> None:
    """edgevit: train, sparsify, search, quantize, compile and benchmark Vision Transformers for
    edge devices."""


@cli.command("models")
def models_cmd() -> None:
    """List the registered model families and sizes."""
    from edgevit.models import list_models, resolve_model

    for name in list_models():
        cls, cfg = resolve_model(name)
        click.echo(f"{name:24s} {cls.__name__:18s} img {cfg.img_size}")


@cli.command("data")
@click.argument("spec")
@click.option("--img-size", type=int, default=32, show_default=True, help="Resize images to this size.")
@click.option("--seed", type=int, default=0, show_default=True)
def data_cmd(spec: str, img_size: int, seed: int) -> None:
    """Check a data SPEC (digits, fashion-mnist[:DIR], idx:DIR, cifar10:DIR, imagefolder:DIR)."""
    from edgevit.data import load_data

    d = load_data(spec, img_size, seed)
    click.echo(f"{spec}: {d.num_classes} classes, {d.channels} channel(s), "
               f"train {len(d.train)} / val {len(d.val)} / test {len(d.test)}, "
               f"mean {[round(m, 4) for m in d.mean]} std {[round(s, 4) for s in d.std]}")


@cli.command("train")
@click.option("--data", "spec", default="digits", show_default=True, help="Data spec (see `edgevit data`).")
@click.option("--model", "model_name", default="swin_quickstart", show_default=True,
              help="Registered model (see `edgevit models`).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a model setting.")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--teacher", type=click.Path(), default=None, help="DeiT distillation teacher checkpoint.")
@click.option("--out", "out_dir", type=click.Path(), default="runs/train", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--json", "json_path", type=click.Path(), default=None, help=JSON_HELP)
def train_cmd(spec, model_name, sets, epochs, batch_size, lr, seed, teacher, out_dir, resume, json_path) -> None:
    """Train a model; writes OUT/last.pt every epoch and OUT/model.pt at the end."""
    from edgevit.data import load_data
    from edgevit.models import create_model, resolve_model
    from edgevit.train import FINAL, TrainConfig, train

    overrides = _parse_sets(sets)
    _, cfg = resolve_model(model_name, **overrides)
    data = load_data(spec, cfg.img_size, seed or 0)
    model = create_model(model_name, **{"num_classes": data.num_classes, "in_chans": data.channels, **overrides})
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "teacher": teacher}
    try:
        tcfg = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise EdgeVitError(f"train: {e}") from None
    ckpt = train(model, data, tcfg, out_dir, resume=resume, extra_meta={"data": {"seed": seed or 0}})
    if ckpt.metrics:
        click.echo(f"val top-1 {ckpt.metrics['val']['top1']:.2f}%  test top-1 {ckpt.metrics['test']['top1']:.2f}%"
                   f"  -> {Path(out_dir) / FINAL}")
    _write_json(json_path, ckpt.metrics)


@cli.command("eval")
@click.option("--checkpoint", "ckpt_path", required=True, type=click.Path(), help="Checkpoint to evaluate.")
@click.option("--data", "spec", default=None, help="Data spec; defaults to the checkpoint's own.")
@click.option("--split", default="test", type=click.Choice(["train", "val", "test"]), show_default=True)
@click.option("--model", "model_name", default=None, help="Model name, for a plain state dict.")
@click.option("--json", "json_path", type=click.Path(), default=None, help=JSON_HELP)
def eval_cmd(ckpt_path, spec, split, model_name, json_path) -> None:
    """Print top-1 accuracy of a checkpoint on a split."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.data import load_data
    from edgevit.train import evaluate

    ckpt = Checkpoint.load(ckpt_path, model_name=model_name)
    model = ckpt.build_model().eval()
    spec = spec or ckpt.data.get("spec")
    if not spec:
        raise EdgeVitError(f"{ckpt_path}: the checkpoint names no data set; pass --data SPEC")
    data = load_data(spec, model.cfg.img_size, ckpt.data.get("seed", 0), ckpt.data.get("val_fraction", 0.1))
    mean, std = ckpt.data.get("mean", data.mean), ckpt.data.get("std", data.std)
    result = evaluate(model, data.split(split), mean, std)
    click.echo(f"{split} top-1 {result['top1']:.2f}% on {result['n']} images ({spec})")
    _write_json(json_path, {"checkpoint": str(ckpt_path), "split": split, "data": spec, **result})


@cli.command("run")
@click.argument("recipe", type=click.Path())
@click.option("--force", is_flag=True, help="Redo stages even when their outputs are up to date.")
@click.option("--json", "json_path", type=click.Path(), default=None, help=JSON_HELP)
def run_cmd(recipe, force, json_path) -> None:
    """Run the stages a RECIPE (recipes/*.toml) lists."""
    from edgevit.pipeline import run_recipe
    from edgevit.recipes import load_recipe

    results = run_recipe(load_recipe(recipe), log=click.echo, force=force)
    _write_json(json_path, results)


def main(argv: list[str] | None = None) -> None:
    """Entry point: map library errors to one-line messages and exit codes, never tracebacks."""
    try:
        cli.main(args=argv, prog_name="edgevit", standalone_mode=False)
    except EdgeVitError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; run again with --resume to continue from the last epoch", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
