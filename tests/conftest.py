"""Shared fixtures: small data sets in each user format, written by the tests themselves."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    raw = header + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def class_images(n_per_class: int, classes: int, size: int, channels: int, seed: int = 0):
    """Synthetic but learnable images: each class is a bright bar at its own position."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        for _ in range(n_per_class):
            img = rng.integers(0, 40, size=(channels, size, size), dtype=np.uint8)
            row = (c * size) // classes
            img[:, row:row + max(1, size // classes), :] = 230
            xs.append(img)
            ys.append(c)
    return np.stack(xs), np.array(ys, dtype=np.uint8)


@pytest.fixture
def idx_dir(tmp_path):
    x, y = class_images(20, 4, 12, 1)
    xt, yt = class_images(5, 4, 12, 1, seed=1)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x[:, 0], gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y, gz=True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", xt[:, 0])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", yt)
    return tmp_path


@pytest.fixture
def cifar_dir(tmp_path):
    x, y = class_images(6, 3, 32, 3)
    for i in range(1, 3):
        part = slice((i - 1) * 9, i * 9)
        batch = {b"data": x[part].reshape(len(x[part]), -1), b"labels": y[part].tolist()}
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    xt, yt = class_images(2, 3, 32, 3, seed=2)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": xt.reshape(len(xt), -1), b"labels": yt.tolist()}))
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b", b"c"]}))
    return tmp_path


@pytest.fixture
def folder_dir(tmp_path):
    from PIL import Image

    x, y = class_images(5, 3, 10, 3)
    for i, (img, label) in enumerate(zip(x, y)):
        d = tmp_path / f"class{label}"
        d.mkdir(exist_ok=True)
        size = 10 if i % 2 else 14  # mixed sizes are resized
        Image.fromarray(img.transpose(1, 2, 0)).resize((size, size)).save(d / f"{i}.png")
    return tmp_path


@pytest.fixture(scope="session")
def swin_micro_digits(tmp_path_factory):
    """swin_micro trained briefly on digits at 32x32 (16 windows in stage 1), shared by the
    compile tests of every target kind."""
    from edgevit.data import load_data
    from edgevit.models import create_model
    from edgevit.train import TrainConfig, train

    model = create_model("swin_micro", img_size=32)
    return train(model, load_data("digits", 32), TrainConfig(epochs=2, batch_size=64, lr=3e-3),
                 tmp_path_factory.mktemp("swin_micro_digits"), show_progress=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _isolated_tuning_databases(tmp_path_factory):
    """Tests never read or write the user's tuning databases (~/.cache/edgevit/tuning)."""
    import os

    old = os.environ.get("EDGEVIT_TUNING_DIR")
    os.environ["EDGEVIT_TUNING_DIR"] = str(tmp_path_factory.mktemp("tuning"))
    yield
    if old is None:
        os.environ.pop("EDGEVIT_TUNING_DIR", None)
    else:
        os.environ["EDGEVIT_TUNING_DIR"] = old


TINY_EFFICIENTVIT = dict(img_size=32, in_chans=1, num_classes=10, widths=(8, 16, 16, 32, 32), depths=(1, 1, 1, 1, 1),
                         head_widths=(32, 40), head_dim=8, stem_stride=1)


@pytest.fixture
def tiny_efficientvit():
    """A test-sized EfficientViT (32x32 grey, every block kind once) in eval mode, with batch-norm
    statistics as training leaves them (not 0 / 1), so folding them is exercised."""
    from edgevit.models import create_model

    torch.manual_seed(0)
    model = create_model("efficientvit_fashion", **TINY_EFFICIENTVIT)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()
