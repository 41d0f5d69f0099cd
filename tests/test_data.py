"""The data layer on real CIFAR-10 images: every source format, the cache, splits, bad input."""

from __future__ import annotations

import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet.data import load_dataset, make_splits
from resnet.data.sources import CIFAR10_CLASSES
from resnet.errors import UsageError


def pick(cifar, per_class: int, offset: int = 0):
    """per_class real images of each class from the shared archive, in class order."""
    idx = np.concatenate([np.flatnonzero(cifar.train_y == c)[offset:offset + per_class]
                          for c in range(10)])
    return cifar.train_x[idx], cifar.train_y[idx]


def write_tree(root: Path, cifar, train: int = 3, test: int = 2, fmt: str = "png") -> Path:
    for split, (x, y) in (("train", pick(cifar, train)), ("test", pick(cifar, test, offset=100))):
        for i, (image, label) in enumerate(zip(x, y)):
            folder = root / split / CIFAR10_CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}.{fmt}")
    return root


def write_official(root: Path, cifar, per_batch_class: int = 2) -> Path:
    """cifar-10-batches-py/ as the original: Python-2 style pickles with bytes keys."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [(f"data_batch_{i}", pick(cifar, per_batch_class, offset=10 * i)) for i in range(1, 6)]
    batches.append(("test_batch", pick(cifar, per_batch_class, offset=200)))
    for name, (x, y) in batches:
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                         b"data": x.reshape(len(x), -1),
                         b"filenames": [b"img.png"] * len(y)}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                     b"num_vis": 3072}, f, protocol=2)
    return folder


def tar(src: Path, dest: Path, mode: str) -> Path:
    with tarfile.open(dest, mode) as archive:
        for item in sorted(src.iterdir()):
            archive.add(item, arcname=item.name)
    return dest


# --- Formats ------------------------------------------------------------------------------------

def test_shared_archive_decodes_then_comes_from_the_cache(cifar, shared_archive):
    assert cifar.train_x.shape == (50_000, 3, 32, 32) and cifar.train_x.dtype == np.uint8
    assert np.bincount(cifar.train_y).tolist() == [5000] * 10
    assert cifar.test_x is None and cifar.source.kind == "tree-archive"
    again = load_dataset(str(shared_archive))
    assert again.from_cache and again.key == cifar.key
    assert np.array_equal(again.train_x, cifar.train_x) and np.array_equal(again.train_y, cifar.train_y)
    assert again.load_s < cifar.load_s or cifar.from_cache  # an earlier job may have decoded it


def test_image_tree_and_its_archives_decode_to_the_same_pixels(cifar, tmp_path):
    tree = write_tree(tmp_path / "tree", cifar)
    expected_x, expected_y = pick(cifar, 3)
    for source in (tree, tar(tree, tmp_path / "t.tar", "w"), tar(tree, tmp_path / "t.tar.gz", "w:gz"),
                   tar(tree, tmp_path / "t.tar.xz", "w:xz")):
        ds = load_dataset(str(source))
        assert np.array_equal(ds.train_x, expected_x) and np.array_equal(ds.train_y, expected_y)
        assert ds.test_x.shape == (20, 3, 32, 32) and np.bincount(ds.test_y).tolist() == [2] * 10
        assert not ds.from_cache


def test_folder_order_does_not_change_class_indices(cifar, tmp_path):
    tree = write_tree(tmp_path / "tree", cifar, test=0)
    # Rename on disk so that alphabetical order differs from CIFAR order, then restore the names
    # through a tar whose member order is reversed.
    archive = tmp_path / "reversed.tar"
    with tarfile.open(archive, "w") as out:
        for path in sorted((tree / "train").rglob("*.png"), reverse=True):
            out.add(path, arcname=str(path.relative_to(tree)))
    ds = load_dataset(str(archive))
    assert np.array_equal(ds.train_y, np.repeat(np.arange(10), 3))
    assert np.array_equal(ds.train_x, pick(cifar, 3)[0])


def test_official_format_directory_and_archive(cifar, tmp_path):
    folder = write_official(tmp_path / "off", cifar)
    archive = tar(folder.parent, tmp_path / "cifar-10-python.tar.gz", "w:gz")
    for source in (folder, folder.parent, archive):
        ds = load_dataset(str(source))
        assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
        assert np.array_equal(ds.train_x[:20], pick(cifar, 2, offset=10)[0])
        assert np.array_equal(ds.train_y[:20], pick(cifar, 2, offset=10)[1])


def test_changed_source_is_decoded_again(cifar, tmp_path):
    tree = write_tree(tmp_path / "tree", cifar, test=0)
    first = load_dataset(str(tree))
    assert load_dataset(str(tree)).from_cache
    png = next((tree / "train" / "cat").glob("*.png"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    changed = load_dataset(str(tree))
    assert not changed.from_cache and changed.key != first.key
    assert (changed.train_x == 0).all(axis=(1, 2, 3)).sum() == 1


def test_cifar10_data_env_names_a_source(cifar, tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "tree", cifar, test=0)
    monkeypatch.setenv("CIFAR10_DATA", str(tree))
    assert len(load_dataset(None).train_y) == 30


def test_offline_download_names_the_other_options(tmp_path, monkeypatch):
    # No --data, no CIFAR10_DATA: torchvision's download into the cache folder, which fails here
    # (no internet in CI) with one line naming the alternatives.
    monkeypatch.delenv("CIFAR10_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        ds = load_dataset(None)
    except UsageError as exc:
        assert "could not download CIFAR-10" in str(exc) and "--data" in str(exc)
        assert "\n" not in str(exc)
    else:  # a machine with internet really downloads the official archive
        assert len(ds.train_y) == 50_000 and len(ds.test_y) == 10_000


# --- Splits -------------------------------------------------------------------------------------

def test_splits_are_stratified_disjoint_and_deterministic(cifar):
    splits = make_splits(cifar, val_size=5000, subset=None, seed=0)
    assert splits.sizes() == {"train": 45_000, "val": 5000, "test": 0}
    assert np.bincount(splits.val_y).tolist() == [500] * 10
    again = make_splits(cifar, val_size=5000, subset=4000, seed=0)
    assert np.array_equal(again.val_x, splits.val_x)  # --subset never changes validation
    assert np.bincount(again.train_y).tolist() == [400] * 10
    # Subset images come from the training part, never from validation.
    val_keys = {x.tobytes() for x in splits.val_x[:500]}
    assert not val_keys & {x.tobytes() for x in again.train_x}
    other = make_splits(cifar, val_size=5000, subset=None, seed=1)
    assert not np.array_equal(other.val_x, splits.val_x)


# --- Bad input: one line, exit 2 ----------------------------------------------------------------

def _bad_sources(tmp: Path, cifar, shared_archive) -> dict[str, tuple[Path, str]]:
    cases = {}
    cases["missing path"] = (tmp / "nope", "no such file or directory")
    (tmp / "notes.txt").write_text("hello")
    cases["unknown format"] = (tmp / "notes.txt", "not a supported data source")
    big = write_tree(tmp / "big", cifar, test=0)
    Image.new("RGB", (64, 64)).save(next((big / "train" / "dog").glob("*.png")))
    cases["wrong image size"] = (big, "is 64x64, expected 32x32")
    broken = write_tree(tmp / "broken", cifar, test=0)
    next((broken / "train" / "dog").glob("*.png")).write_bytes(b"not an image")
    cases["undecodable image"] = (broken, "is not a decodable image")
    nine = write_tree(tmp / "nine", cifar, test=0)
    shutil.rmtree(nine / "train" / "truck")
    cases["missing class folder"] = (nine, "missing or empty: truck")
    eleven = write_tree(tmp / "eleven", cifar, test=0)
    shutil.copytree(eleven / "train" / "cat", eleven / "train" / "lion")
    cases["extra class folder"] = (eleven, "unexpected: lion")
    empty = tmp / "empty"
    for c in CIFAR10_CLASSES:
        (empty / "train" / c).mkdir(parents=True)
    cases["empty split"] = (empty, "the train split has no images")
    truncated = tmp / "truncated.tar.xz"
    truncated.write_bytes(shared_archive.read_bytes()[:2_000_000])
    cases["corrupt archive"] = (truncated, "corrupt or truncated")
    pickled = write_official(tmp / "pickled", cifar)
    (pickled / "data_batch_3").write_bytes((pickled / "data_batch_3").read_bytes()[:500])
    cases["corrupt pickle"] = (pickled, "corrupt pickle")
    return cases


BAD = ["missing path", "unknown format", "wrong image size", "undecodable image",
       "missing class folder", "extra class folder", "empty split", "corrupt archive",
       "corrupt pickle"]


@pytest.fixture(scope="module")
def bad_sources(cifar, shared_archive, tmp_path_factory):
    return _bad_sources(tmp_path_factory.mktemp("bad"), cifar, shared_archive)


@pytest.mark.parametrize("case", BAD)
def test_bad_source_is_a_one_line_usage_error(case, bad_sources):
    path, message = bad_sources[case]
    with pytest.raises(UsageError, match=message) as info:
        load_dataset(str(path))
    assert "\n" not in str(info.value)


def test_pickle_payload_is_refused_and_never_runs(cifar, tmp_path):
    folder = write_official(tmp_path / "evil", cifar)
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": Payload(), b"labels": []}, f, protocol=2)
    with pytest.raises(UsageError, match="unsafe or corrupt pickle.*refused"):
        load_dataset(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("val_size, subset, message", [
    (60_000, None, "--val-size 60000 must be between 10"),
    (5, None, "--val-size 5 must be between 10"),
    (5000, 9, "--subset 9 must be between 10"),
    (5000, 45_001, r"--subset 45001 must be between 10 .* and 45000"),
])
def test_split_sizes_are_checked(cifar, val_size, subset, message):
    with pytest.raises(UsageError, match=message):
        make_splits(cifar, val_size=val_size, subset=subset, seed=0)


def test_second_load_comes_from_the_cache_and_is_faster(cifar, tmp_path, monkeypatch):
    # 2,000 real images as a .tar.xz tree: decoding the whole archive again would take a minute.
    monkeypatch.setenv("RESNET_CACHE_DIR", str(tmp_path / "cache"))
    source = str(tar(write_tree(tmp_path / "tree", cifar, train=200, test=0), tmp_path / "t.tar.xz",
                     "w:xz"))
    cold = load_dataset(source)
    warm = load_dataset(source)
    assert not cold.from_cache and warm.from_cache
    assert list((tmp_path / "cache").glob("*.parquet")) == \
        [tmp_path / "cache" / f"cifar10-{cold.key}.parquet"]
    assert np.array_equal(warm.train_x, cold.train_x) and warm.load_s < cold.load_s
    print(f"cold load {cold.load_s:.2f}s, warm load {warm.load_s:.2f}s")


def test_a_corrupt_cache_file_is_decoded_again_and_replaced(cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_CACHE_DIR", str(tmp_path / "cache"))
    source = str(write_tree(tmp_path / "tree", cifar, train=5, test=1))
    first = load_dataset(source)
    cached = tmp_path / "cache" / f"cifar10-{first.key}.parquet"
    cached.write_bytes(cached.read_bytes()[:500])  # truncated, as by a full disk
    again = load_dataset(source)
    assert not again.from_cache and np.array_equal(again.train_x, first.train_x)
    assert load_dataset(source).from_cache  # the cache was written anew, and reads back
