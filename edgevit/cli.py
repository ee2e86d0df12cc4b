"""The `edgevit` command: a thin layer that parses, calls the library and prints a summary.

Errors from the library (EdgeVitError) become one line on stderr and a non-zero exit code;
figures can also be written as JSON with --json PATH.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgevit import __version__
from edgevit.errors import ConfigError, EdgeVitError

JSON_HELP = "Also write the figures as JSON to this path."


def _write_json(path: str | None, data: Any) -> None:
    if path:
        from edgevit.fileio import write_json

        write_json(path, data)
        click.echo(f"wrote {path}")


def _parse_sets(values: tuple[str, ...]) -> dict[str, Any]:
    """--set key=value model overrides; values parsed as TOML scalars/arrays (e.g. depths=[2,2])."""
    from edgevit.config import tomllib
    from edgevit.errors import ConfigError

    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set img_size=32")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
        except ValueError:   # an integer past Python's 4300-digit conversion limit
            raise ConfigError(f"--set {key.strip()}: the value is not a usable number") from None
    return out


class CliError(click.ClickException):
    """A library error shown as one line, with the error family's exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        # one line, whatever the message quotes back (a value holding a newline included)
        click.echo("error: " + " ".join(self.message.splitlines()), err=True)


# What Ctrl-C leaves behind, per command (every artifact is written atomically, so never half a file)
INTERRUPTED = {
    "train": "run the same command with --resume to continue",
    "adapt": "run the same command with --resume to continue",
    "tune": "the records measured so far are kept; run the same command to continue",
    "profile": "the configs measured so far are kept; run the same command to continue",
    "search": "its progress is kept; run the same command to continue",
    "run": "finished stages are kept; run the same command to continue",
}


class EdgeVitGroup(click.Group):
    """Maps EdgeVitError to CliError, so no user error ever prints a traceback; click's usage
    errors (a missing option, a value of the wrong type or range) become one line too (exit 2)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _usage_error(e) from None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            raise _usage_error(e) from None
        except EdgeVitError as e:
            raise CliError(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            fix = INTERRUPTED.get(ctx.invoked_subcommand or "", "nothing was written; run the command again")
            raise CliError(f"interrupted; {fix}", 130) from None


def _usage_error(e: click.UsageError) -> CliError:
    where = e.ctx.command_path if e.ctx is not None else "edgevit"
    return CliError(f"{e.format_message().rstrip('.')}; see `{where} --help`", 2)


class OutputFile(click.Path):
    """An output file option, checked before any work: never a folder, never a file edgevit did
    not write (for JSON figures: a file that is not JSON; for an artifact: one of another kind)."""

    def __init__(self, kind: str | None = None):
        super().__init__(dir_okay=False)
        self.kind = kind

    def convert(self, value, param, ctx):
        from edgevit.fileio import check_output_file

        if value is None:
            return None
        option = param.opts[-1] if param is not None and param.opts else "-o"
        return str(check_output_file(value, self.kind, option))


JSON_OUT = OutputFile()


def _count(minimum: int = 1):
    return click.IntRange(min=minimum)


class BatchSizes(click.ParamType):
    """'1' or '1,8': batch sizes, the first the artifact's own."""

    name = "N[,N...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            sizes = tuple(int(v) for v in str(value).split(","))
        except ValueError:
            sizes = ()
        if not sizes or min(sizes) < 1:
            self.fail(f"{value!r} is not a batch size or a comma-separated list of them (e.g. 1 or 1,8)", param, ctx)
        return sizes


class Numbers(click.ParamType):
    """'0.5,0.5,0.5' or '1,3,224,224': a comma-separated list of numbers of one type."""

    def __init__(self, kind=float):
        self.kind, self.name = kind, f"{kind.__name__.upper()}[,...]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(self.kind(v) for v in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.kind.__name__}s", param, ctx)


def _config(cls, command: str, **given):
    """A stage's config dataclass from the options given (None: the default), one-line errors."""
    from edgevit.errors import ConfigError

    try:
        return cls(**{k: v for k, v in given.items() if v is not None})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{command}: {e}") from None


@click.group(cls=EdgeVitGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--img-size", type=click.IntRange(1, 4096), default=32, show_default=True, help="Resize images to this size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def data_cmd(spec: str, img_size: int, seed: int, json_path) -> None:
    """Check a data SPEC (digits, fashion-mnist[:DIR], idx:DIR, cifar10:DIR, imagefolder:DIR)."""
    from edgevit.data import load_data

    d = load_data(spec, img_size, seed)
    click.echo(f"{spec}: {d.num_classes} classes, {d.channels} channel(s), "
               f"train {len(d.train)} / val {len(d.val)} / test {len(d.test)}, "
               f"mean {[round(m, 4) for m in d.mean]} std {[round(s, 4) for s in d.std]}")
    _write_json(json_path, {"spec": spec, "classes": d.train.classes, "channels": d.channels,
                            "sizes": {s: len(d.split(s)) for s in ("train", "val", "test")},
                            "mean": d.mean, "std": d.std})


@cli.command("train")
@click.option("--data", "spec", default="digits", show_default=True, help="Data spec (see `edgevit data`).")
@click.option("--model", "model_name", default="swin_quickstart", show_default=True,
              help="Registered model (see `edgevit models`).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a model setting.")
@click.option("--epochs", type=_count(), default=None)
@click.option("--batch-size", type=_count(), default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--teacher", type=click.Path(), default=None, help="DeiT distillation teacher checkpoint.")
@click.option("--no-augment", is_flag=True, help="Train without random shifts, scaling and flips.")
@click.option("--out", "out_dir", type=click.Path(), default="runs/train", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def train_cmd(spec, model_name, sets, epochs, batch_size, lr, seed, teacher, no_augment, out_dir, resume,
              json_path) -> None:
    """Train a model; writes OUT/last.pt every epoch and OUT/model.pt at the end."""
    from edgevit.data import load_data
    from edgevit.models import create_model, resolve_model
    from edgevit.train import FINAL, TrainConfig, train

    overrides = _parse_sets(sets)
    _, cfg = resolve_model(model_name, **overrides)
    data = load_data(spec, cfg.img_size, seed or 0)
    import torch

    torch.manual_seed(seed or 0)  # reproducible weight init
    model = create_model(model_name, **{"num_classes": data.num_classes, "in_chans": data.channels, **overrides})
    tcfg = _config(TrainConfig, "train", epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, teacher=teacher,
                   augment=False if no_augment else None)
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
@click.option("--sparsity", default=None, help="A sparsity config JSON file, or one uniform ratio such as 0.5.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def eval_cmd(ckpt_path, spec, split, model_name, sparsity, json_path) -> None:
    """Print top-1 accuracy of a checkpoint on a split (optionally under a sparsity config)."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.data import check_model_fits
    from edgevit.train import evaluate

    ckpt = Checkpoint.load(ckpt_path, model_name=model_name)
    model = ckpt.build_model().eval()
    data = _checkpoint_data(ckpt, spec, ckpt_path)
    check_model_fits(model.cfg, data)
    config = _sparsity_from(model, sparsity)
    if config is not None:
        model.set_sparsity(config)
    mean, std = ckpt.data.get("mean", data.mean), ckpt.data.get("std", data.std)
    result = evaluate(model, data.split(split), mean, std)
    ratios = list(config.ratios) if config is not None else None
    click.echo(f"{split} top-1 {result['top1']:.2f}% on {result['n']} images ({data.spec}, "
               f"sparsity {ratios or 'dense'})")
    _write_json(json_path, {"checkpoint": str(ckpt_path), "split": split, "data": data.spec,
                            "sparsity": ratios, **result})


@cli.command("adapt")
@click.option("--checkpoint", "ckpt_path", required=True, type=click.Path(), help="Dense swin checkpoint.")
@click.option("--data", "spec", default=None, help="Data spec; defaults to the checkpoint's own.")
@click.option("--epochs", type=_count(), default=None, help="Default 3.")
@click.option("--lr", type=float, default=None, help="Default: 10x below the checkpoint's training lr.")
@click.option("--batch-size", type=_count(), default=None)
@click.option("--out", "out_dir", type=click.Path(), default="runs/adapt", show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def adapt_cmd(ckpt_path, spec, epochs, lr, batch_size, out_dir, resume, json_path) -> None:
    """Sparsity-aware adaptation: fine-tune under a new random sparsity config every step."""
    from edgevit.adapt import AdaptConfig, adapt
    from edgevit.checkpoint import Checkpoint
    from edgevit.train import FINAL

    ckpt = Checkpoint.load(ckpt_path)
    data = _checkpoint_data(ckpt, spec, ckpt_path)
    cfg = _config(AdaptConfig, "adapt", epochs=epochs, lr=lr, batch_size=batch_size)
    out = adapt(ckpt, data, cfg, out_dir, resume=resume)
    click.echo(f"adapted (dense) val top-1 {out.metrics['val']['top1']:.2f}%  "
               f"test top-1 {out.metrics['test']['top1']:.2f}%  -> {Path(out_dir) / FINAL}")
    _write_json(json_path, out.metrics)


@cli.command("quantize")
@click.option("--checkpoint", "ckpt_path", default=None, type=click.Path(), help="fp32 checkpoint to quantize.")
@click.option("--onnx", "onnx_path", default=None, type=click.Path(),
              help="Quantize this fp32 ONNX model instead: -o names the QDQ ONNX file to write (needs --data).")
@click.option("--model", "model_name", default=None, help="Model name, for a plain state dict.")
@click.option("--data", "spec", default=None, help="Calibration and evaluation data; defaults to the checkpoint's own.")
@click.option("--scheme", default="int8", show_default=True, type=click.Choice(["int8", "kmeans", "pq"]),
              help="int8 (calibrated W8A8), kmeans (shared-value codebooks) or pq (product quantization).")
@click.option("--bits", type=click.IntRange(2, 8), default=None, help="kmeans: bits per weight (default 4).")
@click.option("--groups", type=_count(), default=None, help="kmeans: codebooks per layer, over groups of output "
              "channels (default 1).")
@click.option("--subvector", type=click.IntRange(4, 16), default=None, help="pq: inputs per sub-vector D (default 8).")
@click.option("--centroids", type=click.IntRange(2, 256), default=None, help="pq: centroids per codebook (default 256).")
@click.option("--activation-aware", is_flag=True, default=None, help="kmeans/pq: weight the clustering error by "
              "the calibration inputs' mean square.")
@click.option("--finetune", type=click.FloatRange(0, min_open=False), default=None, metavar="EPOCHS",
              help="kmeans/pq: train the centroids (codes fixed) for EPOCHS of the training split (default 0).")
@click.option("--finetune-lr", type=click.FloatRange(0, min_open=True), default=None,
              help="kmeans/pq: fine-tuning learning rate (default 1e-4).")
@click.option("--calib-images", type=_count(), default=None, help="Training images to calibrate on (default 512).")
@click.option("--method", default=None, type=click.Choice(["mse", "percentile", "minmax"]),
              help="Activation range fit (default mse).")
@click.option("--percentile", type=float, default=None, help="For --method percentile (default 99.99).")
@click.option("--keep-fp32", "keep_fp32", multiple=True, metavar="PATTERN",
              help="Layer name pattern left in fp32, e.g. 'head*' (repeatable; see --list-layers).")
@click.option("--no-equalize", is_flag=True, help="Do not fold per-channel scales of LayerNorm outputs.")
@click.option("--sparsity", default=None, help="Calibrate under this sparsity config (JSON or SearchResult) or ratio.")
@click.option("--list-layers", is_flag=True, help="Print the quantizable layers and exit.")
@click.option("--input-shape", type=Numbers(int), default=None, help="With --onnx: N,C,H,W where the file leaves "
              "sizes open.")
@click.option("--mean", type=Numbers(), default=None, help="With --onnx: per-channel input mean the model expects.")
@click.option("--std", type=Numbers(), default=None, help="With --onnx: per-channel input std the model expects.")
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(),
              help="Folder to write (model.pt, quantization.json); with --onnx, the .onnx file.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def quantize_cmd(ckpt_path, onnx_path, model_name, spec, scheme, bits, groups, subvector, centroids, activation_aware,
                 finetune, finetune_lr, calib_images, method, percentile, keep_fp32, no_equalize, sparsity, list_layers,
                 input_shape, mean, std, out_dir, json_path) -> None:
    """Quantize a checkpoint to int8 (calibrated), k-means codebooks or product quantization (or an
    ONNX model to int8), reporting top-1 before and after."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.data import check_model_fits
    from edgevit.quantization import quantizable_layers
    from edgevit.quantize import QuantizeConfig, quantize

    codebook = dict(bits=bits, groups=groups, subvector=subvector, centroids=centroids,
                    activation_aware=activation_aware, finetune=finetune, finetune_lr=finetune_lr)
    _check_scheme_options(scheme, codebook, method=method, percentile=percentile, no_equalize=no_equalize or None)
    if scheme != "int8" and calib_images is not None and not activation_aware:
        raise ConfigError(f"quantize: --calib-images calibrates --activation-aware {scheme}; add that flag or drop it")
    if onnx_path is not None:
        if scheme != "int8":
            raise ConfigError(f"quantize --onnx writes int8 QDQ files; --scheme {scheme} takes a --checkpoint")
        return _quantize_onnx(onnx_path, spec, out_dir, input_shape, mean, std, list_layers, json_path,
                              clashes={"--checkpoint": ckpt_path, "--model": model_name, "--sparsity": sparsity,
                                       "--no-equalize": no_equalize or None},
                              settings=dict(calib_images=calib_images, method=method, percentile=percentile,
                                            keep_fp32=keep_fp32 or None))
    if any(v is not None for v in (input_shape, mean, std)):
        raise ConfigError("quantize: --input-shape, --mean and --std go with --onnx; a checkpoint carries them")
    if ckpt_path is None:
        raise ConfigError("quantize: pass --checkpoint CKPT (or --onnx MODEL.onnx)")
    ckpt = Checkpoint.load(ckpt_path, model_name=model_name)
    model = ckpt.build_model(quantized=False)
    if list_layers:
        for name, layer in quantizable_layers(model).items():
            click.echo(f"{name:40s} {type(layer).__name__} {tuple(layer.weight.shape)}")
        return
    if out_dir is None:
        raise ConfigError("quantize: pass -o/--out DIR, the folder to write")
    cfg = _config(QuantizeConfig, "quantize", scheme=scheme, calib_images=calib_images, method=method,
                  percentile=percentile, keep_fp32=keep_fp32 or None, equalize=False if no_equalize else None,
                  **codebook)
    data = _checkpoint_data(ckpt, spec, ckpt_path)
    check_model_fits(model.cfg, data)
    _json_outside(json_path, out_dir)
    result = quantize(ckpt, data, out_dir, _sparsity_from(model, sparsity), cfg, log=click.echo)
    r = result.record
    key = "sqnr_db" if scheme == "int8" else "weight_sqnr_db"
    worst = sorted(r["layers"].items(), key=lambda kv: kv[1][key])[:3]
    click.echo(f"lowest {'' if scheme == 'int8' else 'weight '}SQNR: " + ", ".join(f"{n} {v[key]:.1f} dB" for n, v in worst))
    b = r["weight_bytes"]
    whole = r.get("model_bytes")
    overall = f"; the whole model {whole['fp32'] / max(whole[scheme], 1):.2f}x" if whole else ""
    click.echo(f"quantized {len(r['layers'])} layers ({b['fp32'] / max(b[scheme], 1):.2f}x fewer weight bytes{overall}) "
               f"-> {Path(out_dir) / 'model.pt'} (compile it like any checkpoint)")
    _write_json(json_path, {"out": str(out_dir), "top1": r["top1"], "weight_bytes": b, "model_bytes": whole,
                            "layers": {n: v[key] for n, v in r["layers"].items()}})


def _check_scheme_options(scheme: str, codebook: dict, **int8_only) -> None:
    """Options of another scheme are an error, not silently ignored."""
    own = {"kmeans": ("bits", "groups", "activation_aware", "finetune", "finetune_lr"),
           "pq": ("subvector", "centroids", "activation_aware", "finetune", "finetune_lr"), "int8": ()}[scheme]
    foreign = [k for k, v in codebook.items() if v is not None and k not in own]
    if scheme != "int8":
        foreign += [k for k, v in int8_only.items() if v is not None]
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise ConfigError(f"quantize: {flags} do(es) not apply to --scheme {scheme}; drop them or pick the scheme "
                          "they belong to")


def _quantize_onnx(path, spec, out, input_shape, mean, std, list_layers, json_path, clashes: dict, settings: dict):
    from edgevit.onnx_model import OnnxModel, linear_nodes
    from edgevit.quantize import QuantizeConfig, quantize_onnx

    given = [name for name, v in clashes.items() if v is not None]
    if given:
        raise ConfigError(f"quantize: --onnx takes the model from the file; drop {', '.join(given)}")
    model = OnnxModel.load(path, input_shape)
    if list_layers:
        for name, (node, weight) in linear_nodes(model.proto).items():
            click.echo(f"{name:40s} {node.op_type} {tuple(weight.shape)}")
        return
    if out is None or spec is None:
        raise ConfigError("quantize --onnx: pass --data SPEC (calibration images) and -o FILE.onnx (the QDQ model)")
    channels = model.input_shape[1]
    for name, v in (("--mean", mean), ("--std", std)):
        if v is not None and len(v) != channels:
            raise ConfigError(f"quantize: {name} has {len(v)} values; the model takes {channels} channels")
    if std is not None and min(std) <= 0:
        raise ConfigError("quantize: --std values must be positive")
    cfg = _config(QuantizeConfig, "quantize", **settings)
    result = quantize_onnx(model, spec, out, cfg, mean, std, log=click.echo)
    top1 = result.get("top1")
    if top1:
        click.echo(f"top-1 on {result['val_images']} {spec} val images: fp32 {top1['fp32']:.2f}% -> int8 "
                   f"{top1['int8']:.2f}%")
    click.echo(f"wrote {out} ({result['layers']} int8 layers as QDQ; compile it with `edgevit compile --onnx`)")
    _write_json(json_path, result)


@cli.command("flops")
@click.option("--checkpoint", "ckpt_path", default=None, type=click.Path(), help="Checkpoint (or use --model).")
@click.option("--model", "model_name", default=None, help="Registered model, with random weights.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a model setting.")
@click.option("--sparsity", "sparsity", default=None,
              help="A sparsity config JSON file, or one uniform ratio such as 0.5.")
@click.option("--batch", type=_count(), default=1, show_default=True)
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def flops_cmd(ckpt_path, model_name, sets, sparsity, batch, json_path) -> None:
    """FLOPs of a model under a sparsity config, against the dense model."""
    from edgevit.flops import count_flops

    model = _model_from(ckpt_path, model_name, sets)
    dense = count_flops(model, batch)["total"]
    config = _sparsity_from(model, sparsity)
    if config is not None:
        model.set_sparsity(config)
    total = count_flops(model, batch)["total"]
    ratios = list(config.ratios) if config is not None else None
    click.echo(f"{model.model_name}: {total / 1e9:.4f} GFLOPs at sparsity {ratios or 'dense'} "
               f"({dense / 1e9:.4f} dense, {dense / total:.2f}x fewer)")
    _write_json(json_path, {"model": model.model_name, "batch": batch, "sparsity": ratios,
                            "flops": total, "dense_flops": dense, "ratio": dense / total})


def _model_from(ckpt_path, model_name, sets):
    from edgevit.checkpoint import Checkpoint
    from edgevit.models import create_model

    if ckpt_path:
        return Checkpoint.load(ckpt_path, model_name=model_name, **_parse_sets(sets)).build_model().eval()
    if not model_name:
        raise ConfigError("pass --checkpoint CKPT or --model NAME (see `edgevit models`)")
    return create_model(model_name, **_parse_sets(sets)).eval()


def _sparsity_from(model, value: str | None):
    from edgevit.sparsity import SparsityConfig

    if value is None:
        return None
    try:
        ratio = float(value)
    except ValueError:
        return SparsityConfig.load(value)
    return SparsityConfig.uniform(model, ratio)


def _json_outside(json_path: str | None, out_dir: str) -> None:
    """--json may not be the -o folder or a file inside it (the artifact replaces that folder)."""
    if json_path:
        j, o = Path(json_path).resolve(), Path(out_dir).resolve()
        if j == o or o in j.parents:
            raise ConfigError(f"--json {json_path} is the -o folder or inside it; write the figures elsewhere")


def _device(target, rpc: str | None, key: str | None):
    """The device behind --rpc/--key (the target's rpc_key by default); None: this machine."""
    from edgevit.backend.runtime import Device

    return Device(target.device, rpc, key or target.rpc_key) if rpc else None


def _checkpoint_data(ckpt, spec: str | None, ckpt_path):
    from edgevit.data import load_data

    spec = spec or ckpt.data.get("spec")
    if not spec:
        raise ConfigError(f"{ckpt_path}: the checkpoint names no data set; pass --data SPEC")
    return load_data(spec, ckpt.model_config["img_size"], ckpt.data.get("seed", 0), ckpt.data.get("val_fraction", 0.1))


@cli.command("targets")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def targets_cmd(json_path) -> None:
    """List the deployment targets (targets/*.toml) and their aliases."""
    from edgevit.targets import list_targets

    rows = list_targets()
    for t in rows:
        alias = f" (alias {', '.join(t.aliases)})" if t.aliases else ""
        kernels = f"CUDA {t.cuda} " if t.cuda else ""
        click.echo(f"{t.name:18s} {t.device:4s} {t.arch:7s} {kernels}{t.description}{alias}")
    _write_json(json_path, [{"name": t.name, "device": t.device, "arch": t.arch, "aliases": t.aliases,
                             "tvm": t.tvm, "rpc_key": t.rpc_key, "cuda": t.cuda or None} for t in rows])


@cli.command("compile")
@click.option("--target", "target_name", required=True, help="Target name, alias or .toml path (see `edgevit targets`).")
@click.option("--checkpoint", "ckpt_path", default=None, type=click.Path(),
              help="Checkpoint to compile; default: the latest `edgevit run` here (.edgevit.json).")
@click.option("--model", "model_name", default=None, help="Model name, for a plain state dict.")
@click.option("--sparsity", default=None, help="Sparsity config JSON (or SearchResult), or one uniform ratio; "
              "default with the run's checkpoint: its latest search result.")
@click.option("--batch", "batches", type=BatchSizes(), default="1", show_default=True,
              help="Batch size; several (1,8): one library function each, weights stored once, the first the "
              "artifact's own (verify, package), the others for `bench --batch`.")
@click.option("--no-validate", is_flag=True, help="Skip the comparison against PyTorch.")
@click.option("--database", default=None, type=click.Path(), help="Tuning database folder; default: the target's.")
@click.option("--no-tuning", is_flag=True, help="Ignore tuning records: default schedules only.")
@click.option("--max-abs-error", type=float, default=None, help="The artifact's tolerance on logits against "
              "its reference (default by encoding: fp32 1e-3, fp16 5e-2, int8 0.1, kmeans and pq 1e-3).")
@click.option("--min-fp32-agreement", type=click.FloatRange(0, 100), default=None,
              help="Quantized checkpoints: % of validation images whose top-1 must match the fp32 model's (default 95).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16 (CUDA targets): matmuls take fp16 operands and weights, accumulate in fp32; validated by "
              "compiling the same graph for this CPU.")
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(),
              help="Artifact folder to write; default with the run's checkpoint: OUT/compile/<target>.")
@click.option("--onnx", "onnx_path", default=None, type=click.Path(),
              help="Compile this ONNX model instead of a checkpoint (validated against ONNX Runtime; QDQ int8 "
              "layers become int8 kernels).")
@click.option("--input-shape", type=Numbers(int), default=None, help="With --onnx: N,C,H,W where the file leaves "
              "sizes open.")
@click.option("--mean", type=Numbers(), default=None, help="With --onnx: per-channel input mean the model expects.")
@click.option("--std", type=Numbers(), default=None, help="With --onnx: per-channel input std the model expects.")
@click.option("--data", "data_spec", default=None, help="With --onnx: data set whose images validate the artifact "
              "(default: seeded noise).")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def compile_cmd(target_name, ckpt_path, model_name, sparsity, batches, no_validate, database, no_tuning, max_abs_error,
                min_fp32_agreement, precision, out_dir, onnx_path, input_shape, mean, std, data_spec, json_path) -> None:
    """Compile a checkpoint (or an ONNX model) with TVM for a target into a validated artifact folder."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.compile import CompileConfig, check_search_scheme, compile_model
    from edgevit.targets import load_target

    cfg = _config(CompileConfig, "compile", batch=batches[0], extra_batches=batches[1:], validate=not no_validate,
                  tuning=not no_tuning, database=database, precision=precision, max_abs_error=max_abs_error,
                  min_fp32_agreement=min_fp32_agreement)
    target = load_target(target_name)
    if onnx_path is not None:
        return _compile_onnx(onnx_path, target, cfg, out_dir, input_shape, mean, std, data_spec,
                             clashes={"--checkpoint": ckpt_path, "--model": model_name, "--sparsity": sparsity},
                             json_path=json_path)
    if any(v is not None for v in (input_shape, mean, std, data_spec)):
        raise ConfigError("compile: --input-shape, --mean, --std and --data go with --onnx; a checkpoint carries them")
    if ckpt_path is None:
        ckpt_path, sparsity, out_dir = _compile_inputs_from_project(target.name, sparsity, out_dir)
    elif out_dir is None:
        raise ConfigError("compile: pass -o/--out DIR, the artifact folder to write")
    ckpt = Checkpoint.load(ckpt_path, model_name=model_name)
    check_search_scheme(sparsity, ckpt)
    config = _sparsity_from(ckpt.build_model(), sparsity)
    _json_outside(json_path, out_dir)
    artifact = compile_model(ckpt, target, out_dir, config, cfg, log=click.echo)
    m = artifact.manifest
    click.echo(f"compiled {m.model['name']} for {target.name} in {m.compile_seconds:.1f} s "
               f"-> {out_dir} ({artifact.bytes / 1e6:.2f} MB)")
    _write_json(json_path, {"artifact": str(out_dir), "target": target.name, "compile_seconds": m.compile_seconds,
                            "bytes": artifact.bytes, "validation": m.validation, "sparsity": m.sparsity,
                            "tolerance": m.tolerance.__dict__, "cuda": m.cuda})


def _compile_onnx(path, target, cfg, out_dir, input_shape, mean, std, data_spec, clashes: dict, json_path) -> None:
    from edgevit.compile import compile_onnx
    from edgevit.onnx_model import OnnxModel

    given = [name for name, v in clashes.items() if v is not None]
    if given:
        raise ConfigError(f"compile: --onnx takes the model from the file; drop {', '.join(given)}")
    if out_dir is None:
        raise ConfigError("compile: pass -o/--out DIR, the artifact folder to write")
    model = OnnxModel.load(path, input_shape)
    channels = model.input_shape[1]
    for name, v in (("--mean", mean), ("--std", std)):
        if v is not None and len(v) != channels:
            raise ConfigError(f"compile: {name} has {len(v)} values; the model takes {channels} channels")
    if std is not None and min(std) <= 0:
        raise ConfigError("compile: --std values must be positive")
    _json_outside(json_path, out_dir)
    artifact = compile_onnx(model, target, out_dir, cfg, data_spec, mean, std, log=click.echo)
    m = artifact.manifest
    click.echo(f"compiled {path} ({m.encoding}) for {target.name} in {m.compile_seconds:.1f} s "
               f"-> {out_dir} ({artifact.bytes / 1e6:.2f} MB)")
    _write_json(json_path, {"artifact": str(out_dir), "target": target.name, "onnx": str(path),
                            "encoding": m.encoding, "compile_seconds": m.compile_seconds, "bytes": artifact.bytes,
                            "validation": m.validation, "tolerance": m.tolerance.__dict__})


def _compile_inputs_from_project(target: str, sparsity: str | None, out_dir: str | None):
    """(checkpoint, sparsity, out) of the latest run here, said out loud."""
    from edgevit.project import PROJECT_FILE, project_or_fail

    project = project_or_fail("--checkpoint")
    sparsity = sparsity or project.search
    out_dir = out_dir or str(Path(project.out) / "compile" / target)
    click.echo(f"from {PROJECT_FILE} (the run of {project.recipe}): checkpoint {project.checkpoint}, sparsity "
               f"{sparsity or 'dense'}, output {out_dir}")
    return project.checkpoint, sparsity, out_dir


@cli.command("export")
@click.option("--checkpoint", "ckpt_path", required=True, type=click.Path(), help="Checkpoint to export.")
@click.option("--model", "model_name", default=None, help="Model name, for a plain state dict.")
@click.option("--sparsity", default=None, help="Sparsity config JSON (or SearchResult), or one uniform ratio.")
@click.option("--onnx", "onnx_path", required=True, type=click.Path(), help="ONNX file to write.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="The file's batch size.")
@click.option("--images", type=click.IntRange(min=0), default=None, help="Images the check runs (default 64).")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def export_cmd(ckpt_path, model_name, sparsity, onnx_path, batch, images, json_path) -> None:
    """Export a checkpoint (with its sparsity and int8 scheme, as QDQ) to ONNX, checked with ONNX Runtime."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.export import ExportConfig, check_onnx_output, export_onnx

    cfg = _config(ExportConfig, "export", batch=batch, images=images)
    check_onnx_output(onnx_path)
    ckpt = Checkpoint.load(ckpt_path, model_name=model_name)
    config = _sparsity_from(ckpt.build_model(), sparsity)
    result = export_onnx(ckpt, onnx_path, config, cfg, log=click.echo)
    qdq = f", {result['qdq_layers']} int8 layers as QDQ" if result["scheme"] != "fp32" else ""
    click.echo(f"exported {ckpt.model_name} ({result['scheme']}{qdq}, sparsity "
               f"{list(config.ratios) if config else 'dense'}) -> {onnx_path} ({result['bytes'] / 1e6:.2f} MB)")
    _write_json(json_path, result)


@cli.command("tune")
@click.option("--target", "target_name", required=True, help="Target name, alias or .toml path (see `edgevit targets`).")
@click.option("--checkpoint", "ckpt_path", required=True, type=click.Path(), help="Checkpoint whose kernels to tune.")
@click.option("--model", "model_name", default=None, help="Model name, for a plain state dict.")
@click.option("--sparsity", default=None, help="Sparsity config JSON (or SearchResult), or one uniform ratio.")
@click.option("--batch", type=_count(), default=1, show_default=True)
@click.option("--trials", type=_count(), default=64, show_default=True, help="Candidates measured per kernel.")
@click.option("--database", default=None, type=click.Path(), help="Tuning database folder; default: the target's.")
@click.option("--rpc", default=None, metavar="HOST:PORT", help="TVM RPC tracker of the device; default: tune here.")
@click.option("--key", default=None, help="Tracker key; default: the target's rpc_key.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def tune_cmd(target_name, ckpt_path, model_name, sparsity, batch, trials, database, rpc, key, json_path) -> None:
    """MetaSchedule-tune a model's kernels into the database `compile` uses (resumable)."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.targets import load_target
    from edgevit.tune import TuneConfig, tune_model

    cfg = _config(TuneConfig, "tune", trials_per_kernel=trials, batch=batch, database=database)
    target = load_target(target_name)
    ckpt = Checkpoint.load(ckpt_path, model_name=model_name)
    config = _sparsity_from(ckpt.build_model(), sparsity)
    report = tune_model(ckpt, target, config, cfg, _device(target, rpc, key), log=click.echo)
    click.echo(f"tuned {len(report.kernels)} kernels in {report.seconds:.0f} s: kernel time "
               f"{report.estimate_ms('default_ms'):.3f} ms (default rules) -> {report.estimate_ms('best_ms'):.3f} ms; "
               f"database {report.database}")
    _write_json(json_path, report.to_dict())


@cli.command("profile")
@click.option("--target", "target_name", required=True, help="Target name, alias or .toml path (see `edgevit targets`).")
@click.option("--checkpoint", "ckpt_path", required=True, type=click.Path(), help="Swin-family checkpoint.")
@click.option("--model", "model_name", default=None, help="Model name, for a plain state dict.")
@click.option("--batch", type=_count(), default=1, show_default=True)
@click.option("--rpc", default=None, metavar="HOST:PORT", help="TVM RPC tracker of the device; default: here.")
@click.option("--key", default=None, help="Tracker key; default: the target's rpc_key.")
@click.option("--validate", "validate_n", type=_count(0), default=0, help="Also measure N random configs end to end.")
@click.option("--calibrate", type=_count(0), default=12, show_default=True,
              help="Random full configs measured besides the single units (all fitted by least squares).")
@click.option("--no-tuning", is_flag=True, help="Ignore tuning records: default schedules only.")
@click.option("-o", "--out", "out_path", default=None, type=OutputFile("edgevit.latency_table"),
              help="Table path; default under runs/latency/.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def profile_cmd(target_name, ckpt_path, model_name, batch, rpc, key, validate_n, calibrate, no_tuning, out_path,
                json_path) -> None:
    """Measure a latency table on the target (each knob at each sparsity level, compiled as deployed)."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.latency import ProfileConfig, ensure_table
    from edgevit.targets import load_target

    cfg = _config(ProfileConfig, "profile", batch=batch, calibrate=calibrate, validate=validate_n,
                  tuning=not no_tuning)
    target = load_target(target_name)
    ckpt = Checkpoint.load(ckpt_path, model_name=model_name)
    _sparsity_from(ckpt.build_model(), "0.0")  # a one-line error for models without windows
    table, path = ensure_table(ckpt, target, _device(target, rpc, key), cfg, out_path, log=click.echo)
    click.echo(f"{path}: dense {table.dense_ms:.3f} ms, {sum(len(d) for d in table.deltas)} units, overhead "
               f"{table.overhead_ms:+.3f} ms")
    _write_json(json_path, table.to_dict())


@cli.command("search")
@click.option("--budget", required=True, help="Latency budget on the target: 20ms, 500us.")
@click.option("--target", "target_name", default=None,
              help="Target name, alias or .toml path (see `edgevit targets`); default: the latest run's.")
@click.option("--checkpoint", "ckpt_path", default=None, type=click.Path(),
              help="Sparsity-adapted checkpoint; default: the latest `edgevit run` here (.edgevit.json).")
@click.option("--table", "table_path", default=None, type=OutputFile("edgevit.latency_table"),
              help="Latency table; default: the run's (same target) or the target's, profiled now if missing.")
@click.option("--rpc", default=None, metavar="HOST:PORT", help="TVM RPC tracker of the device; default: here.")
@click.option("--key", default=None, help="Tracker key; default: the target's rpc_key.")
@click.option("--evaluations", type=_count(), default=500, show_default=True, help="Distinct accuracy evaluations.")
@click.option("--population", type=click.IntRange(min=4), default=100, show_default=True)
@click.option("--val-images", type=_count(0), default=2000, show_default=True, help="Validation images scoring each config.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--finetune", "finetune_epochs", type=_count(0), default=0, help="Fine-tune the chosen config for N epochs.")
@click.option("--no-tuning", is_flag=True, help="Ignore tuning records: default schedules only.")
@click.option("-o", "--out", "out_path", default=None, type=OutputFile("edgevit.search_result"),
              help="SearchResult JSON to write; default with the run's checkpoint: OUT/search/result-BUDGET.json.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def search_cmd(budget, target_name, ckpt_path, table_path, rpc, key, evaluations, population, val_images, seed,
               finetune_epochs, no_tuning, out_path, json_path) -> None:
    """Find the most accurate per-knob sparsity config whose latency on the target fits the budget."""
    from edgevit.checkpoint import Checkpoint
    from edgevit.search import SearchConfig, parse_budget, run_search
    from edgevit.targets import load_target

    parse_budget(budget)   # the option's own message for a bad budget
    cfg = _config(SearchConfig, "search", budget=budget, population=population, evaluations=evaluations,
                  val_images=val_images, seed=seed, finetune=finetune_epochs, tuning=not no_tuning)
    project = None
    if ckpt_path is None:
        ckpt_path, target_name, table_path, out_path, project = _search_inputs_from_project(
            budget, target_name, table_path, out_path)
    elif target_name is None or out_path is None:
        raise ConfigError("search: with --checkpoint, pass --target T and -o RESULT.json too")
    target = load_target(target_name)
    ckpt = Checkpoint.load(ckpt_path)
    _sparsity_from(ckpt.build_model(), "0.0")
    result = run_search(ckpt, target, cfg, out_path, table_path, _device(target, rpc, key), log=click.echo)
    if project is not None:
        from dataclasses import replace

        replace(project, search=str(out_path)).save()   # `edgevit compile --target T` takes it next
    click.echo(f"chosen {result.sparsity['ratios']}: val top-1 {result.val_top1:.2f}%, test top-1 "
               f"{result.test_top1:.2f}%" + (f" ({result.finetuned_test_top1:.2f}% after fine-tuning)"
                                               if result.finetuned_test_top1 is not None else "")
               + f"; predicted {result.predicted_ms:.3f} ms, measured {result.measured_ms:.3f} ms "
               f"(budget {result.budget_ms:g} ms); {result.evaluations} evaluations in {result.seconds:.0f} s")
    click.echo("pareto front (predicted ms, val top-1): " + ", ".join(
        f"{p['predicted_ms']:.3f}/{p['val_top1']:.2f}" for p in result.pareto))
    click.echo(f"wrote {out_path} (compile it: edgevit compile --sparsity {out_path} ...)")
    _write_json(json_path, result.to_dict())


def _search_inputs_from_project(budget: str, target: str | None, table: str | None, out: str | None):
    """(checkpoint, target, table, out, project) of the latest run here, said out loud."""
    from edgevit.fileio import check_output_file
    from edgevit.project import PROJECT_FILE, project_or_fail
    from edgevit.targets import load_target

    project = project_or_fail("--checkpoint")
    target = target or project.target
    if table is None and project.table and load_target(target).name == load_target(project.target).name:
        table = project.table
    if out is None:
        name = "".join(c if c.isalnum() or c in ".-" else "_" for c in budget.strip())
        out = str(check_output_file(Path(project.out) / "search" / f"result-{name}.json", "edgevit.search_result"))
    click.echo(f"from {PROJECT_FILE} (the run of {project.recipe}): checkpoint {project.checkpoint}, target "
               f"{target}, table {table or 'profiled now'}, output {out}")
    return project.checkpoint, target, table, out, project


@cli.command("verify")
@click.argument("artifact_dir", type=click.Path())
@click.option("--rpc", default=None, metavar="HOST:PORT", help="TVM RPC tracker; default: run here.")
@click.option("--key", default=None, help="Tracker key; default: the target's rpc_key.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True, help="Seconds to wait for the device.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def verify_cmd(artifact_dir, rpc, key, timeout, json_path) -> None:
    """Run an artifact on its device and check it against the PyTorch reference it carries."""
    from edgevit.artifact import CompiledArtifact
    from edgevit.verify import verify

    artifact = CompiledArtifact.load(artifact_dir)
    result = verify(artifact, rpc=rpc, key=key, timeout=timeout)
    click.echo(f"{result['device']}, {result['images']} {result['source']}: max abs error {result['max_abs_error']:.2e}, "
               f"top-1 agreement {result['top1_agreement']:.1f}% -> {'ok' if result['ok'] else 'MISMATCH'}")
    for batch, f in result.get("batches", {}).items():
        click.echo(f"  batch {batch} function: max abs error {f['max_abs_error']:.2e}, top-1 agreement "
                   f"{f['top1_agreement']:.1f}% on {f['images']} images")
    _write_json(json_path, result)
    if not result["ok"]:
        raise EdgeVitError(f"{artifact_dir}: output on {result['device']} differs from the PyTorch reference")


@cli.command("bench")
@click.argument("artifact_dir", type=click.Path())
@click.option("--rpc", default=None, metavar="HOST:PORT", help="TVM RPC tracker of the device; default: run here.")
@click.option("--key", default=None, help="Tracker key; default: the target's rpc_key.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds to wait for the device.")
@click.option("--duration", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Timed seconds after warm-up.")
@click.option("--min-runs", type=_count(), default=100, show_default=True, help="At least this many timed calls.")
@click.option("--warmup", type=click.FloatRange(min=0), default=2.0, show_default=True, help="Warm-up seconds (not timed).")
@click.option("--data", "spec", default=None, help="Also run the artifact over this data set's test split: top-1.")
@click.option("--batch", "batches", type=BatchSizes(), default=None,
              help="Batch size(s) to measure, each for --duration (1,8); default: the artifact's own. The artifact "
              "must have been compiled with them (compile --batch 1,8).")
@click.option("--baseline", "baseline_path", type=click.Path(), default=None,
              help="Gate: compare with a stored bench result JSON (latency, accuracy).")
@click.option("--against", "against_dir", type=click.Path(), default=None,
              help="Gate: measure this baseline artifact interleaved with ARTIFACT in one run (cancels drift).")
@click.option("--factor", type=click.FloatRange(min=1.0), default=1.10, show_default=True,
              help="Gate: median latency ratio counted as a regression (with p < --alpha).")
@click.option("--alpha", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=0.002,
              show_default=True, help="Gate: significance of the one-sided Mann-Whitney U test.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Gate: top-1 points the artifact may lose against the baseline (needs --data).")
@click.option("--budget", default=None, help='Gate: a latency budget such as "p90<=20ms".')
@click.option("--markdown", is_flag=True, help="Print a Markdown table (for CI job summaries) instead of text.")
@click.option("-o", "--out", "out_path", type=OutputFile("edgevit.bench_result"), default=None,
              help="Result JSON; default ARTIFACT.bench.json beside the artifact.")
def bench_cmd(artifact_dir, rpc, key, timeout, duration, min_runs, warmup, spec, batches, baseline_path, against_dir,
              factor, alpha, max_accuracy_drop, budget, markdown, out_path) -> None:
    """Measure an artifact's latency on its device: percentiles, throughput, size, environment; with
    --baseline/--against/--budget, gate it (exit 10 latency, 11 accuracy, 12 budget)."""
    from dataclasses import replace

    from edgevit.artifact import CompiledArtifact
    from edgevit.bench import (
        BenchConfig,
        BenchResult,
        GateConfig,
        bench,
        bench_pair,
        default_out,
        describe_check,
        gate,
        gate_error,
    )
    from edgevit.fileio import check_output_file

    cfg = _config(BenchConfig, "bench", duration_s=duration, min_runs=min_runs, warmup_s=warmup, data=spec,
                  batches=batches)
    gate_cfg = _config(GateConfig, "bench", factor=factor, alpha=alpha, max_accuracy_drop=max_accuracy_drop,
                       budget=budget)
    if baseline_path and against_dir:
        raise ConfigError("pass --baseline (a stored result) or --against (an artifact measured alongside), not both")
    out_path = out_path or str(check_output_file(default_out(artifact_dir), "edgevit.bench_result"))
    baseline = BenchResult.load(baseline_path) if baseline_path else None
    artifact = CompiledArtifact.load(artifact_dir)
    measured = batches[0] if batches else artifact.manifest.batch
    if baseline is not None and baseline.batch != measured:
        raise ConfigError(f"{baseline_path} was measured at batch {baseline.batch}, this run would measure batch "
                          f"{measured}; pass --batch {baseline.batch} (compiled into the artifact) or another baseline")
    log = lambda s: click.echo(s, err=markdown)  # noqa: E731
    if against_dir:
        result, baseline = bench_pair(artifact, CompiledArtifact.load(against_dir), cfg, rpc, key, timeout, log)
    else:
        result = bench(artifact, cfg, rpc=rpc, key=key, timeout=timeout, log=log)
    if baseline is not None or budget:
        result = replace(result, gate=gate(result, baseline, gate_cfg))
    result.save(out_path)
    failed = gate_error(result)
    if markdown:
        click.echo(result.markdown(), nl=False)
        if failed:
            raise failed
        return
    lat = result.latency_ms
    p = " ".join(f"{k} {lat[k]:.3f}" for k in ("p90", "p95", "p99") if lat[k] is not None)
    click.echo(f"{result.environment['device']}: {lat['n']} calls, median {lat['median']:.3f} ms, mean "
               f"{lat['mean']:.3f} ms, min {lat['min']:.3f}, {p}, CoV {lat['cov']:.1%}; "
               f"{result.throughput_ips:.1f} img/s at batch {result.batch}")
    for row in result.by_batch[1:]:
        lat = row["latency_ms"]
        click.echo(f"  batch {row['batch']}: {lat['n']} calls, median {lat['median']:.3f} ms, min {lat['min']:.3f}, "
                   f"CoV {lat['cov']:.1%}; {row['throughput_ips']:.1f} img/s")
    for w in result.warnings:
        click.echo(f"warning: {w}")
    click.echo(f"wrote {out_path}")
    if result.gate is not None:
        click.echo("gate: " + ("pass" if result.gate["pass"] else "FAIL"))
        for name, check in result.gate["checks"].items():
            click.echo(f"  {name}: {describe_check(name, check)}")
    if failed:
        raise failed


@cli.command("package")
@click.argument("artifact_dir", type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Bundle folder to write.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def package_cmd(artifact_dir, out_dir, json_path) -> None:
    """Make a deploy bundle: library, weights, manifest and a loader needing only the TVM runtime."""
    from edgevit.artifact import CompiledArtifact
    from edgevit.package import package

    _json_outside(json_path, out_dir)
    result = package(CompiledArtifact.load(artifact_dir), out_dir)
    click.echo(f"bundle {out_dir}: {result['total_bytes'] / 1e6:.2f} MB "
               f"({', '.join(f'{k} {v / 1e3:.0f} kB' for k, v in result['files'].items())})")
    _write_json(json_path, result)


@cli.command("report")
@click.argument("run_dir", type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Report folder to write.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def report_cmd(run_dir, out_dir, json_path) -> None:
    """Report on a run folder: Markdown tables, JSON figures, plots and one self-contained HTML page."""
    from edgevit.report import INDEX, report

    _json_outside(json_path, out_dir)
    result = report(run_dir, out_dir)
    click.echo(f"report of {run_dir}: {len(result.models)} models, {len(result.targets)} targets, plots: "
               f"{', '.join(result.plots()) or 'none'} -> {Path(out_dir) / INDEX}")
    if result.missing:
        click.echo("missing: " + ", ".join(m["path"] for m in result.missing))
    for p in result.problems:
        click.echo(f"warning: unreadable {p['path']}: {p['error']}")
    _write_json(json_path, result.to_dict())


@cli.group("emulator")
def emulator_grp() -> None:
    """An emulated aarch64 board (qemu + TVM RPC on loopback) standing in for rasp4b."""


@emulator_grp.command("setup")
def emulator_setup() -> None:
    """Download the arm64 sysroot and aarch64 wheels (once; needs apt/dpkg as root)."""
    from edgevit.backend.emulator import Emulator, setup

    setup(Emulator.default(), log=click.echo)


@emulator_grp.command("start")
def emulator_start() -> None:
    """Start the tracker (127.0.0.1:9190) and the emulated server (key rasp4b)."""
    from edgevit.backend.emulator import Emulator, start

    start(Emulator.default(), log=click.echo)


@emulator_grp.command("status")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def emulator_status(json_path) -> None:
    """Show whether the tracker and server run and which keys are free."""
    from edgevit.backend.emulator import Emulator, status

    s = status(Emulator.default())
    click.echo(f"set up: {s['set_up']}  tracker {s['tracker']}: {'up' if s['tracker_running'] else 'down'}  "
               f"server: {'up' if s['server_running'] else 'down'}  keys: {s['keys'] or 'none'}")
    _write_json(json_path, s)


@emulator_grp.command("stop")
def emulator_stop() -> None:
    """Stop the emulated server and the tracker."""
    from edgevit.backend.emulator import Emulator, stop

    stop(Emulator.default(), log=click.echo)


@cli.group("cuda")
def cuda_grp() -> None:
    """The CUDA compilers GPU targets' kernels are built with ahead of time (NVIDIA's PyPI wheels)."""


@cuda_grp.command("setup")
@click.option("--cuda", "majors", type=click.IntRange(11, 13), multiple=True,
              help="CUDA major version to install (repeatable); default: every version targets/ declares. "
              "CUDA 13's is always installed too (its fatbinary packages every version's kernels).")
def cuda_setup(majors) -> None:
    """pip-install NVRTC, ptxas and fatbinary per CUDA major version into the cache (EDGEVIT_HOME)."""
    from edgevit.backend.cuda import FATBINARY_MAJOR, setup
    from edgevit.targets import list_targets

    wanted = set(majors) or {t.cuda for t in list_targets() if t.device == "cuda"}
    for major in sorted(wanted | {FATBINARY_MAJOR}):
        setup(major, log=click.echo)


@cuda_grp.command("status")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def cuda_status(json_path) -> None:
    """Which CUDA compiler versions are installed, and which targets they build for."""
    from edgevit.backend.cuda import TOOLCHAIN_WHEELS, Toolchain
    from edgevit.targets import list_targets

    rows = []
    for major in TOOLCHAIN_WHEELS:
        tc = Toolchain.of(major)
        ok = tc.installed()
        targets = [t.name for t in list_targets() if t.device == "cuda" and t.cuda == major]
        rows.append({"cuda": major, "installed": ok, "version": tc.version() if ok else None, "path": str(tc.root),
                     "targets": targets})
        click.echo(f"CUDA {major}: {('NVRTC ' + rows[-1]['version']) if ok else 'not installed'}  "
                   f"targets: {', '.join(targets) or 'none'}")
    _write_json(json_path, rows)


@cli.command("stages")
def stages_cmd() -> None:
    """Print the recipe reference: every stage, what it reads and writes, its table's keys."""
    from edgevit.stages import reference_markdown

    click.echo(reference_markdown(), nl=False)


@cli.command("run")
@click.argument("recipe", type=click.Path())
@click.option("--force", is_flag=True, help="Redo stages even when their outputs are up to date.")
@click.option("--json", "json_path", type=JSON_OUT, default=None, help=JSON_HELP)
def run_cmd(recipe, force, json_path) -> None:
    """Run the stages a RECIPE (recipes/*.toml) lists."""
    from edgevit.pipeline import run_recipe
    from edgevit.recipes import load_recipe

    results = run_recipe(load_recipe(recipe), log=click.echo, force=force)
    _write_json(json_path, results)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="edgevit")


if __name__ == "__main__":
    main()
