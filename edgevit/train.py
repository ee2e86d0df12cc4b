"""Training and evaluation: AdamW, warm-up + cosine, label smoothing, gradient clipping,
optional DeiT hard distillation; DistributedDataParallel under torchrun.

Each epoch writes `last.pt` (weights + optimizer + schedule) atomically, so a killed run
continues with `resume=True`; the finished run writes `model.pt` with val and test top-1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from edgevit.checkpoint import Checkpoint
from edgevit.data import DataBundle, ImageSet, batches, check_model_fits
from edgevit.errors import ConfigError, DataError, EdgeVitError, OutputError
from edgevit.stages import FINAL, LAST, StageRun


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    augment: bool = True
    seed: int = 0
    teacher: str | None = None      # DeiT: checkpoint whose argmax supervises the distillation head

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not (0 < self.lr < 1) or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"lr {self.lr} / min_lr {self.min_lr}: need 0 <= min_lr <= lr < 1")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1)")


# ---------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    return Dist(dist.get_rank(), dist.get_world_size())


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if d.world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def device_for(d: Dist) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", d.rank % torch.cuda.device_count())
    return torch.device("cpu")


# ---------------------------------------------------------------------------- schedule & loss


def warmup_cosine(total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> Callable[[int], float]:
    """Multiplier of the base lr at each step: linear warm-up then cosine decay to min_lr."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return (min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))) / lr
    return factor


def classification_loss(output, y: torch.Tensor, smoothing: float, teacher_logits: torch.Tensor | None):
    """Cross-entropy; for DeiT (cls, dist) outputs, half against labels and half against the
    teacher's hard decisions (DeiT's hard distillation)."""
    if isinstance(output, tuple):
        cls_out, dist_out = output
        if teacher_logits is None:
            return F.cross_entropy(cls_out, y, label_smoothing=smoothing) / 2 + \
                F.cross_entropy(dist_out, y, label_smoothing=smoothing) / 2, cls_out
        return F.cross_entropy(cls_out, y, label_smoothing=smoothing) / 2 + \
            F.cross_entropy(dist_out, teacher_logits.argmax(dim=1)) / 2, (cls_out + dist_out) / 2
    return F.cross_entropy(output, y, label_smoothing=smoothing), output


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageSet, mean: list[float], std: list[float],
             batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy on one split, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss, n = 0, 0.0, 0
    for x, y in batches(data, mean, std, batch_size):
        logits = model(x.to(device))
        y = y.to(device)
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=1) == y).sum().item()
        n += y.numel()
    model.train(was_training)
    return {"top1": 100.0 * correct / max(n, 1), "loss": loss / max(n, 1), "n": n}


# ---------------------------------------------------------------------------- training


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: bars only on a terminal (a log file or CI capture gets the epoch lines alone)
    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, disable=None if enabled else True,
                dynamic_ncols=True, leave=False, mininterval=1.0)


def train(model: nn.Module, data: DataBundle, cfg: TrainConfig, out_dir: str | Path, *,
          resume: bool = False, stage: str = "train", show_progress: bool = True,
          before_step: Callable[[nn.Module, torch.Generator], None] | None = None,
          before_eval: Callable[[nn.Module], None] | None = None,
          extra_meta: dict | None = None) -> Checkpoint:
    """Train `model` on `data` and return the final checkpoint (also written to out_dir/model.pt).

    `before_step` is called before every training forward pass (sparsity-aware adaptation
    samples a new config there) and `before_eval` before every evaluation and before the final
    weights are saved (adaptation restores the dense config there); `stage` names the verb in
    the checkpoint metadata.
    """
    from edgevit.quantization import quantized_layers

    if quantized_layers(model):
        raise ConfigError("training a quantized (int8, k-means or PQ) model is not supported: train or adapt its fp32 source "
                          "and quantize the result with `edgevit quantize`")
    out_dir = check_training_out(out_dir)
    check_model_fits(model.cfg, data)
    d = setup_distributed()
    device = device_for(d)
    torch.manual_seed(cfg.seed)
    model.to(device)
    teacher = _load_teacher(cfg, model, device)
    steps_per_epoch = math.ceil(len(data.train) // d.world / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    decay, no_decay = _param_groups(model)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, int(cfg.warmup_epochs * steps_per_epoch), cfg.lr, cfg.min_lr))
    data_meta = {"spec": data.spec, "image_size": model.cfg.img_size, "mean": data.mean, "std": data.std,
                 "classes": data.train.classes, **(extra_meta or {}).get("data", {})}
    meta = {"data": data_meta, "stage": stage, "config": {**asdict(cfg), **(extra_meta or {}).get("config", {})}}
    run_id = _run_digest(model, meta)
    start_epoch = _resume_or_start(out_dir, run_id, model, optimizer, scheduler, resume)
    net = _wrap_ddp(model, d, device)
    sample_gen = torch.Generator().manual_seed(cfg.seed + 7919 * (d.rank + 1))
    for epoch in range(start_epoch, cfg.epochs):
        if before_step is not None:
            sample_gen.manual_seed(cfg.seed + 7919 * (d.rank + 1) + 104729 * epoch)
        stats = _train_epoch(net, model, data, cfg, d, device, optimizer, scheduler, epoch, teacher,
                             sample_gen, before_step, show_progress)
        if before_eval is not None:
            before_eval(model)
        if d.main:
            stats["val_top1"] = evaluate(model, data.val, data.mean, data.std)["top1"]
            if show_progress:
                _print_epoch(epoch, cfg.epochs, stats)
            train_state = {"epoch": epoch, "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "run_digest": run_id,
                           "torch_rng": torch.get_rng_state()}  # drop-path draws continue on resume
            Checkpoint.from_model(model, metrics={"epoch": epoch, **stats}, train_state=train_state,
                                  **meta).save(out_dir / LAST)
        barrier(d)
    return _finish(model, data, out_dir, meta, d)


def check_training_out(out_dir: str | Path) -> Path:
    """Refuse, before any training, an --out edgevit must not write into: a file, an unwritable
    place, or a folder whose model.pt / last.pt are not edgevit checkpoints."""
    from edgevit.fileio import writable_parent

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} is a file; training writes a folder (last.pt, model.pt): pass a folder")
    writable_parent(out_dir / FINAL, "--out")
    for name in (LAST, FINAL):
        if (out_dir / name).exists():
            try:
                Checkpoint.load(out_dir / name)
            except EdgeVitError:
                raise OutputError(f"--out {out_dir}: {name} there is not an edgevit checkpoint; edgevit does not "
                                  "replace files it did not write: pass another --out") from None
    return out_dir


def _print_epoch(epoch: int, epochs: int, stats: dict) -> None:
    from tqdm import tqdm

    tqdm.write(f"epoch {epoch + 1}/{epochs}: loss {stats['train_loss']:.3f}  train top-1 {stats['train_top1']:.1f}%  "
               f"val top-1 {stats['val_top1']:.2f}%  {stats['images_per_s']:.0f} img/s  {stats['seconds']:.0f} s")


def _finish(model: nn.Module, data: DataBundle, out_dir: Path, meta: dict, d: Dist) -> Checkpoint:
    model.eval()
    metrics = {}
    if d.main:
        for split in ("val", "test"):
            metrics[split] = evaluate(model, data.split(split), data.mean, data.std)
    ckpt = Checkpoint.from_model(model, metrics=metrics, **meta)
    if d.main:
        ckpt.save(out_dir / FINAL)
    barrier(d)
    return ckpt


def _train_epoch(net, model, data, cfg, d, device, optimizer, scheduler, epoch, teacher,
                 sample_gen, before_step, show_progress) -> dict[str, float]:
    net.train()
    seen, correct, loss_sum = 0, 0, 0.0
    start = time.perf_counter()
    shard = len(data.train) // d.world
    bar = progress_bar(shard, f"epoch {epoch + 1}/{cfg.epochs}", show_progress and d.main)
    for x, y in batches(data.train, data.mean, data.std, cfg.batch_size, shuffle=True,
                        augment_data=cfg.augment, seed=cfg.seed, epoch=epoch, rank=d.rank, world=d.world):
        x, y = x.to(device), y.to(device)
        if before_step is not None:
            before_step(model, sample_gen)
        teacher_logits = _teacher_logits(teacher, x)
        loss, logits = classification_loss(net(x), y, cfg.label_smoothing, teacher_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        scheduler.step()
        seen += y.numel()
        correct += (logits.argmax(dim=1) == y).sum().item()
        loss_sum += loss.item() * y.numel()
        bar.update(y.numel())
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                        lr=f"{scheduler.get_last_lr()[0]:.1e}", refresh=False)
    bar.close()
    seen, correct, loss_sum = all_reduce_sum([seen, correct, loss_sum], d)
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / seen, "train_top1": 100 * correct / seen,
            "images_per_s": seen / elapsed, "seconds": elapsed}


def _param_groups(model: nn.Module) -> tuple[list, list]:
    """No weight decay on biases, norms, tokens, position embeddings and bias tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("token", "pos_embed", "relative_position_bias_table"))
        (no_decay if skip else decay).append(p)
    return decay, no_decay


def _run_digest(model: nn.Module, meta: dict) -> str:
    """What must match for a run to be resumed: model, data and training settings."""
    key = {"model": model.model_name, "model_config": asdict(model.cfg), "data": meta["data"]["spec"],
           "config": meta["config"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _resume_or_start(out_dir: Path, run_id: str, model, optimizer, scheduler, resume: bool) -> int:
    last = out_dir / LAST
    if not last.exists():
        return 0
    if not resume:
        raise EdgeVitError(f"{last} exists from an earlier run; pass --resume to continue it "
                           "or choose another --out directory")
    ckpt = Checkpoint.load(last)
    ts = ckpt.train_state or {}
    if ts.get("run_digest") != run_id:
        raise ConfigError(f"{last} is a run with other model, data or training settings; resume needs the "
                          "same settings (or choose another --out directory)")
    from edgevit.checkpoint import load_weights

    load_weights(model, ckpt.state_dict, where=str(last))
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    if "torch_rng" in ts:
        torch.set_rng_state(ts["torch_rng"])
    return int(ts["epoch"]) + 1


def _wrap_ddp(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    if d.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _load_teacher(cfg: TrainConfig, student: nn.Module, device: torch.device) -> nn.Module | None:
    if cfg.teacher is None:
        return None
    if not getattr(student.cfg, "distilled", False):
        raise ConfigError(f"teacher {cfg.teacher} given but model '{student.model_name}' has no distillation "
                          "token; use a *_distilled model (e.g. deit_tiny_distilled)")
    teacher = Checkpoint.load(cfg.teacher).build_model(quantized=False).to(device).eval()
    for key in ("in_chans", "num_classes", "img_size"):
        if getattr(teacher.cfg, key) != getattr(student.cfg, key):
            raise DataError(f"teacher {cfg.teacher} has {key}={getattr(teacher.cfg, key)}, the student "
                            f"{getattr(student.cfg, key)}; a teacher must see the same images and classes")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def _teacher_logits(teacher: nn.Module | None, x: torch.Tensor) -> torch.Tensor | None:
    if teacher is None:
        return None
    size = teacher.cfg.img_size
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return teacher(x)


def run_stage(run: StageRun) -> dict:
    """The `train` recipe stage: [model] trained on [data] with [train], weight init seeded."""
    from edgevit.models import create_model

    recipe, data, cfg = run.recipe, run.data, run.config("train")

    def make() -> Checkpoint:
        torch.manual_seed(cfg.seed)  # weight init is part of the recipe
        model = create_model(recipe.model.name, num_classes=data.num_classes, in_chans=data.channels,
                             **recipe.model.overrides)
        return train(model, data, cfg, run.dir("train"), resume=True, extra_meta=run.meta("train"))
    return run.cached("train", make).metrics
