import hashlib
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import write_idx
from edgevit.data import batches, load_data, load_split, parse_spec, read_idx
from edgevit.errors import DataError


def image_hashes(images: torch.Tensor) -> list[bytes]:
    """One digest per image (its raw uint8 bytes)."""
    return [hashlib.sha256(img.contiguous().numpy().tobytes()).digest() for img in images]


def assert_partition(splits: dict[str, torch.Tensor], source: torch.Tensor) -> None:
    """The splits together hold every source image exactly as often as the source does (a
    permutation of it, nothing dropped or drawn twice), and no image that occurs once in the
    source is in two splits."""
    counts = {name: Counter(image_hashes(images)) for name, images in splits.items()}
    assert sum(counts.values(), Counter()) == Counter(image_hashes(source))
    once = {h for h, n in Counter(image_hashes(source)).items() if n == 1}
    names = sorted(counts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = set(counts[a]) & set(counts[b]) & once
            assert not shared, f"{len(shared)} images in both {a} and {b}"


def test_digits_split_is_seeded_disjoint_and_normalised():
    a = load_data("digits", 16, seed=3)
    b = load_data("digits", 16, seed=3)
    c = load_data("digits", 16, seed=4)
    assert (len(a.train), len(a.val), len(a.test)) == (1294, 144, 359)
    assert torch.equal(a.val.labels, b.val.labels) and not torch.equal(a.val.labels, c.val.labels)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.test.images, b.test.images)
    assert a.train.images.shape[1:] == (1, 16, 16) and a.num_classes == 10
    x, _ = next(batches(a.train, a.mean, a.std, 2000))
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_load_split_is_the_same_images_as_load_data(split):
    """compile takes a few validation images at the model's size without resizing the whole set:
    they must be exactly the images (and labels) load_data's split starts with."""
    whole = load_data("digits", 24, seed=5).split(split)
    part = load_split("digits", split, 24, 40, seed=5)
    assert torch.equal(part.images, whole.images[:40]) and torch.equal(part.labels, whole.labels[:40])
    assert len(load_split("digits", split, 24, 10**6, seed=5)) == len(whole)


@pytest.mark.parametrize("seed", [3, 4])
def test_digits_splits_are_disjoint_sets_of_images(seed):
    """At the native 8x8 (no resize) every split image is a source image byte for byte; the
    source's images are all distinct, so disjoint splits share no image at all."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    source = torch.from_numpy(np.round(raw.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    assert len(set(image_hashes(source))) == len(source)     # no duplicates in the source to account for
    d = load_data("digits", 8, seed=seed)
    assert_partition({"train": d.train.images, "val": d.val.images, "test": d.test.images}, source)
    by_image = dict(zip(image_hashes(source), raw.target.tolist()))
    for split in (d.train, d.val, d.test):                   # each image keeps its own label
        assert [by_image[h] for h in image_hashes(split.images)] == split.labels.tolist()


def test_idx_val_is_carved_from_train_and_test_stays_apart(idx_dir):
    """Noise makes every fixture image distinct: val and train partition the train file, the
    test split is exactly the t10k file, and no image is in two splits."""
    d = load_data(f"idx:{idx_dir}", 12, val_fraction=0.25)
    train_file = torch.from_numpy(read_idx(idx_dir / "train-images-idx3-ubyte.gz").copy())[:, None]
    test_file = torch.from_numpy(read_idx(idx_dir / "t10k-images-idx3-ubyte").copy())[:, None]
    assert len(set(image_hashes(torch.cat([train_file, test_file])))) == len(train_file) + len(test_file)
    assert len(d.val) == 20 and len(d.train) == 60
    assert_partition({"train": d.train.images, "val": d.val.images}, train_file)
    assert Counter(image_hashes(d.test.images)) == Counter(image_hashes(test_file))
    assert_partition({"train": d.train.images, "val": d.val.images, "test": d.test.images},
                     torch.cat([train_file, test_file]))


def test_idx_reads_gz_and_plain(idx_dir):
    d = load_data(f"idx:{idx_dir}", 12, val_fraction=0.25)
    assert len(d.train) + len(d.val) == 80 and len(d.test) == 20
    assert d.num_classes == 4
    raw = read_idx(idx_dir / "t10k-images-idx3-ubyte")
    assert raw.shape == (20, 12, 12) and raw.dtype == np.uint8


def test_fashion_dir_override_uses_fashion_classes(idx_dir):
    d = load_data(f"fashion-mnist:{idx_dir}", 16)
    assert d.train.classes[0] == "T-shirt/top" and d.train.hflip


def test_cifar10_batches_read_without_arbitrary_unpickling(cifar_dir, tmp_path):
    d = load_data(f"cifar10:{cifar_dir}", 16, val_fraction=0.2)
    assert d.channels == 3 and d.train.classes == ["a", "b", "c"] and len(d.test) == 6
    evil = cifar_dir / "data_batch_9"
    import os
    import pickle

    evil.write_bytes(pickle.dumps({b"data": os.system}))
    with pytest.raises(DataError, match="refusing to load"):
        load_data(f"cifar10:{cifar_dir}", 16)


def test_imagefolder_resizes_mixed_sizes(folder_dir):
    d = load_data(f"imagefolder:{folder_dir}", 8)
    assert d.train.images.shape[1:] == (3, 8, 8)
    assert d.train.classes == ["class0", "class1", "class2"]


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "unknown data spec 'nonsense'"),
    ("idx", "needs a directory"),
    ("idx:/no/such/dir", "/no/such/dir: no such directory"),
    ("fashion-mnist:/no/such/dir", "expects IDX files"),
])
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(DataError, match=message):
        load_data(spec, 16)


def test_truncated_and_non_idx_files(tmp_path):
    arr = np.zeros((4, 5, 5), dtype=np.uint8)
    write_idx(tmp_path / "a", arr)
    (tmp_path / "b").write_bytes((tmp_path / "a").read_bytes()[:-7])
    (tmp_path / "c").write_bytes(b"hello world")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "b")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "c")


def test_missing_idx_file_names_the_layout(idx_dir):
    (idx_dir / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_data(f"idx:{idx_dir}", 12)


def test_empty_class_folder(folder_dir):
    (folder_dir / "empty").mkdir()
    with pytest.raises(DataError, match="empty class folder"):
        load_data(f"imagefolder:{folder_dir}", 8)


def test_corrupt_image_named(folder_dir):
    (folder_dir / "class0" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png: cannot read image"):
        load_data(f"imagefolder:{folder_dir}", 8)


def test_ddp_shards_are_disjoint_and_equal():
    d = load_data("digits", 8)    # 8x8: the source's own images, all distinct
    assert len(set(image_hashes(d.train.images))) == len(d.train)
    shards = [torch.cat([x for x, _ in batches(d.train, d.mean, d.std, 100, shuffle=True, rank=r, world=2)])
              for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(d.train) // 2
    whole = set(image_hashes(torch.cat([x for x, _ in batches(d.train, d.mean, d.std, 100)])))
    hashed = [image_hashes(shard) for shard in shards]
    assert all(len(set(h)) == len(h) for h in hashed)           # no image twice within a shard
    assert not set(hashed[0]) & set(hashed[1])                  # nor in both shards
    assert set(hashed[0]) | set(hashed[1]) <= whole             # and all of them from the train split


def test_augmentation_keeps_shape_and_changes_pixels():
    d = load_data("digits", 16)
    x0, _ = next(batches(d.train, d.mean, d.std, 32, shuffle=True, seed=1))
    x1, _ = next(batches(d.train, d.mean, d.std, 32, shuffle=True, augment_data=True, seed=1))
    assert x0.shape == x1.shape and not torch.allclose(x0, x1)


def test_parse_spec_defaults():
    assert parse_spec("fashion-mnist") == ("fashion-mnist", None)
    assert parse_spec("imagefolder:/x") == ("imagefolder", "/x")
