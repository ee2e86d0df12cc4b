"""Data sets named by a short spec string, loaded into memory, split and batched.

Specs a user types:
  digits                 scikit-learn's bundled UCI digits (8x8 grey), the embedded default
  fashion-mnist[:DIR]    IDX files; DIR defaults to where Debian's dataset-fashion-mnist puts them
  idx:DIR                any MNIST-style IDX set (train-/t10k- or train-/test- files, .gz or not)
  cifar10:DIR            CIFAR-10 python batches (data_batch_1..5, test_batch, batches.meta)
  imagefolder:DIR        DIR/<class>/<image>.png|jpg; DIR/train + DIR/test are used when present

Images are kept as uint8 (N, C, H, W) already resized to the model's input, so an epoch is
index shuffling plus a batched affine augmentation: the data pipeline never starves 2 cores.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from edgevit.errors import ConfigError, DataError

FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")
MAX_IMAGE_SIZE = 4096   # a whole split is resized in memory: 65536 px sides asked for terabytes


@dataclass
class ImageSet:
    """One split in memory: uint8 images (N, C, H, W), int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    hflip: bool = False  # horizontal flips preserve the label (not for digits or text)

    def __len__(self) -> int:
        return self.labels.numel()

    @property
    def channels(self) -> int:
        return self.images.shape[1]


@dataclass
class DataBundle:
    """The three splits of one data set, plus the train split's normalisation statistics."""

    spec: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def channels(self) -> int:
        return self.train.channels

    def split(self, name: str) -> ImageSet:
        if name not in SPLITS:
            raise DataError(f"unknown split '{name}'; use one of {', '.join(SPLITS)}")
        return getattr(self, name)


# ---------------------------------------------------------------------------- specs


def parse_spec(spec: str) -> tuple[str, str | None]:
    kind, _, path = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in SOURCES:
        raise DataError(f"unknown data spec '{spec}'; use one of: {', '.join(SOURCE_HELP)}")
    if kind in ("idx", "cifar10", "imagefolder") and not path:
        raise DataError(f"data spec '{spec}' needs a directory: write {kind}:DIR")
    if kind == "digits" and path:
        raise DataError(f"data spec '{spec}': digits is bundled and takes no directory; write digits")
    return kind, path or None


def load_data(spec: str, image_size: int, seed: int = 0, val_fraction: float = 0.1) -> DataBundle:
    """Load `spec`, resize to `image_size`, and split train/val/test with a seeded permutation.

    Sources with an official test set keep it; val is carved from train. Single-pool sources
    (digits, a flat image folder) are split 70/10/20.
    """
    _check_size(image_size)
    train, val, test = (_resize_set(s, image_size) for s in _native_splits(spec, seed, val_fraction))
    scaled = train.images.float().div(255)
    mean = scaled.mean(dim=(0, 2, 3)).tolist()
    std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    return check_splits(DataBundle(spec, train, val, test, mean, std))


def native_statistics(spec: str, seed: int = 0, val_fraction: float = 0.1) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the train split at the source's own size (resizing barely moves
    them, and a 224 model's data need not be resized whole to find them)."""
    train = _native_splits(spec, seed, val_fraction)[0]
    scaled = train.images.float().div(255)
    return scaled.mean(dim=(0, 2, 3)).tolist(), scaled.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def load_split(spec: str, split: str, image_size: int, limit: int, seed: int = 0,
               val_fraction: float = 0.1) -> ImageSet:
    """The first `limit` images of one split, the same images load_data gives, resized alone: a
    few validation images of Fashion-MNIST at 224 without resizing all 70,000 (44 GB of pixels)."""
    _check_size(image_size)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; choose one of {', '.join(SPLITS)}")
    native = dict(zip(SPLITS, _native_splits(spec, seed, val_fraction)))[split]
    return _resize_set(_subset(native, np.arange(min(limit, len(native)))), image_size)


def _check_size(image_size) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"image size {image_size!r} must be an integer from 1 to {MAX_IMAGE_SIZE} (pixels)")


def _native_splits(spec: str, seed: int, val_fraction: float) -> tuple[ImageSet, ImageSet, ImageSet]:
    """(train, val, test) at the source's own size, split with the seeded permutation."""
    if not 0 < val_fraction < 0.5:
        raise ConfigError(f"val_fraction {val_fraction} must be in (0, 0.5)")
    kind, path = parse_spec(spec)
    train, test, pooled = SOURCES[kind](path)
    gen = np.random.default_rng(seed)
    if test is None:
        order = gen.permutation(len(pooled))
        n_test = int(round(0.2 * len(pooled)))
        test, pooled = _subset(pooled, order[:n_test]), _subset(pooled, order[n_test:])
        train = pooled
    order = gen.permutation(len(train))
    n_val = max(1, int(round(val_fraction * len(train))))
    return _subset(train, order[n_val:]), _subset(train, order[:n_val]), test


def check_splits(bundle: DataBundle) -> DataBundle:
    """A data set a model can learn and be measured on: two classes or more, no empty split."""
    if bundle.num_classes < 2 or len(torch.unique(bundle.train.labels)) < 2:
        raise DataError(f"{bundle.spec}: fewer than two classes ({bundle.num_classes} named, "
                        f"{len(torch.unique(bundle.train.labels))} in the train split); a classifier needs two or more")
    for name in SPLITS:
        if len(bundle.split(name)) == 0:
            raise DataError(f"{bundle.spec}: the {name} split is empty ({len(bundle.train)} train / {len(bundle.val)} "
                            f"val / {len(bundle.test)} test images); add images or use a larger data set")
    return bundle


def check_model_fits(cfg, data: DataBundle) -> None:
    """A model whose input channels or classes differ from the data set's, named before any work."""
    if cfg.in_chans != data.channels:
        raise DataError(f"{data.spec} has {data.channels}-channel images and the model takes {cfg.in_chans}; "
                        f"use a model with in_chans={data.channels} (--set in_chans={data.channels}) or other data")
    if cfg.num_classes != data.num_classes:
        raise DataError(f"{data.spec} has {data.num_classes} classes and the model predicts {cfg.num_classes}; "
                        f"use a model with num_classes={data.num_classes} or the data set it was trained on")


def _subset(s: ImageSet, idx: np.ndarray) -> ImageSet:
    idx_t = torch.as_tensor(idx, dtype=torch.long)
    return ImageSet(s.images[idx_t], s.labels[idx_t], s.classes, s.hflip)


def _resize_set(s: ImageSet, size: int) -> ImageSet:
    if s.images.shape[-2:] == (size, size):
        return s
    out = []
    for chunk in s.images.split(4096):  # bounded memory for big sets
        x = chunk.float()
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return ImageSet(torch.cat(out), s.labels, s.classes, s.hflip)


# ---------------------------------------------------------------------------- sources
# Each returns (train, test, pool): either train+test with pool None, or pool alone.


def _digits(_: str | None):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))[:, None]  # (N, 1, 8, 8)
    labels = torch.from_numpy(d.target.astype(np.int64))
    return None, None, ImageSet(images, labels, [str(i) for i in range(10)])


def _fashion(path: str | None):
    root = Path(path or FASHION_DEFAULT_DIR)
    if not root.is_dir():
        hint = " (install it: apt-get install dataset-fashion-mnist)" if path is None else ""
        raise DataError(f"{root}: no such directory{hint}; fashion-mnist:DIR expects IDX files "
                        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...")
    train, test, _ = _idx(str(root))
    train.classes = test.classes = FASHION_CLASSES
    train.hflip = test.hflip = True
    return train, test, None


def _idx(path: str | None):
    root = _require_dir(path, "idx:DIR expects train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz] "
                              "and t10k- (or test-) files of the same form")
    sets = []
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        images = _find_one(root, prefixes, "images-idx3-ubyte")
        labels = _find_one(root, prefixes, "labels-idx1-ubyte")
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{images}: {split} images {tuple(x.shape)} do not match labels {tuple(y.shape)}; "
                            "expected (N, H, W) images and (N,) labels")
        if len(y) == 0:
            raise DataError(f"{labels}: the {split} split is empty (0 images); add images or use a larger data set")
        classes = [str(i) for i in range(int(y.max()) + 1)]
        sets.append(ImageSet(torch.from_numpy(x.astype(np.uint8))[:, None],
                             torch.from_numpy(y.astype(np.int64)), classes))
    n = max(len(sets[0].classes), len(sets[1].classes))
    for s in sets:
        s.classes = [str(i) for i in range(n)]
    return sets[0], sets[1], None


def _find_one(root: Path, prefixes: tuple[str, ...], stem: str) -> Path:
    for prefix in prefixes:
        for suffix in ("", ".gz"):
            p = root / f"{prefix}-{stem}{suffix}"
            if p.is_file():
                return p
    raise DataError(f"{root}: missing {prefixes[0]}-{stem}[.gz]; an IDX directory holds "
                    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte")


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 <dtype> <ndim>, big-endian int32 dims."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e}); expected an IDX file, optionally gzipped") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex()}); expected 0000 08 <ndim>")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}i", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    body = raw[4 + 4 * ndim:]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) != expected:
        raise DataError(f"{path}: truncated IDX file ({len(body)} bytes of data, header says {expected}); "
                        "re-download or re-extract it")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what numpy arrays and dicts need, nothing callable."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: not a CIFAR-10 python batch (expected a dict with b'data', b'labels')")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar10(path: str | None):
    root = _require_dir(path, "cifar10:DIR expects data_batch_1..5, test_batch and batches.meta")
    classes = CIFAR10_CLASSES
    if (root / "batches.meta").is_file():
        names = _read_cifar_batch(root / "batches.meta").get("label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    train_files = sorted(root.glob("data_batch_*"))
    if not train_files or not (root / "test_batch").is_file():
        raise DataError(f"{root}: missing data_batch_* or test_batch; cifar10:DIR expects the python "
                        "version of CIFAR-10 (cifar-10-batches-py)")
    return _cifar_set(train_files, classes), _cifar_set([root / "test_batch"], classes), None


def _cifar_set(files: list[Path], classes: list[str]) -> ImageSet:
    xs, ys = [], []
    for f in files:
        d = _read_cifar_batch(f)
        data, labels = np.asarray(d.get("data")), np.asarray(d.get("labels"))
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataError(f"{f}: b'data' must be uint8 (N, 3072) with N labels, got {data.shape}")
        xs.append(data.astype(np.uint8).reshape(-1, 3, 32, 32))  # channel-major rows
        ys.append(labels.astype(np.int64))
    return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), classes, hflip=True)


def _imagefolder(path: str | None):
    root = _require_dir(path, "imagefolder:DIR expects DIR/<class>/<image>.png|jpg")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = _read_folder(root / "train")
        test = _read_folder(root / "test", classes=train.classes)
        return train, test, None
    return None, None, _read_folder(root)


def _read_folder(root: Path, classes: list[str] | None = None) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"{root}: no class folders; imagefolder:DIR expects DIR/<class>/<image>.png|jpg")
    classes = classes or found
    unknown = set(found) - set(classes)
    if unknown:
        raise DataError(f"{root}: class folder '{sorted(unknown)[0]}' is not among the training classes")
    pics, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
            if (root / name).is_dir() else []
        if not files and name in found:
            raise DataError(f"{root / name}: empty class folder; put at least one .png/.jpg image in it or remove it")
        for f in files:
            try:
                with Image.open(f) as im:
                    pics.append(im.copy())
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"{f}: cannot read image ({e}); remove or replace the file") from None
            labels.append(label)
    mode = "L" if all(p.mode in ("L", "1", "I", "I;16") for p in pics) else "RGB"
    size = max((p.size for p in pics), key=lambda s: s[0] * s[1])
    arrays = [np.asarray(p.convert(mode).resize(size, Image.BILINEAR), dtype=np.uint8) for p in pics]
    x = torch.from_numpy(np.stack(arrays))
    x = x[:, None] if mode == "L" else x.permute(0, 3, 1, 2)
    return ImageSet(x.contiguous(), torch.tensor(labels, dtype=torch.long), classes, hflip=True)


def _require_dir(path: str | None, layout: str) -> Path:
    root = Path(path or "")
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; {layout}")
    return root


SOURCES = {"digits": _digits, "fashion-mnist": _fashion, "idx": _idx, "cifar10": _cifar10,
           "imagefolder": _imagefolder}
SOURCE_HELP = ["digits", "fashion-mnist[:DIR]", "idx:DIR", "cifar10:DIR", "imagefolder:DIR"]


# ---------------------------------------------------------------------------- batching


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 or [0,1] float (B, C, H, W) -> normalised float32."""
    x = images.float().div(255) if images.dtype == torch.uint8 else images
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def augment(x: torch.Tensor, gen: torch.Generator, hflip: bool, shift: float = 0.125,
            scale: float = 0.1) -> torch.Tensor:
    """Light augmentation on a [0,1] batch (B, C, H, W): random translate/scale, optional flip."""
    b = x.shape[0]
    s = 1 + (torch.rand(b, generator=gen) * 2 - 1) * scale            # (B,)
    t = (torch.rand(b, 2, generator=gen) * 2 - 1) * shift * 2          # (B, 2) in [-1,1] grid units
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if hflip else torch.ones(b)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = s * flip
    theta[:, 1, 1] = s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def batches(data: ImageSet, mean: list[float], std: list[float], batch_size: int, *,
            shuffle: bool = False, augment_data: bool = False, seed: int = 0, epoch: int = 0,
            rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised (x, y) batches; with world > 1 each rank gets a disjoint equal-size shard."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(data), generator=gen) if shuffle else torch.arange(len(data))
    if world > 1:
        per_rank = len(order) // world
        order = order[rank * per_rank:(rank + 1) * per_rank]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = data.images[idx].float().div(255)
        if augment_data:
            x = augment(x, gen, data.hflip)
        yield normalize(x, mean, std), data.labels[idx]
