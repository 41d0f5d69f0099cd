"""The data layer: locate a source, decode it once (Parquet cache), carve stratified splits.

``load_splits(config)`` is what the driver calls; the result goes into Ray's object store once and
every worker copies it onto its device as a single tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from resnet.data.cache import cache_path, cached_counts, content_key, read_cache, write_cache
from resnet.data.sources import CIFAR10_CLASSES, Source, decode, resolve_source
from resnet.errors import UsageError

__all__ = ["CIFAR10_CLASSES", "Dataset", "Splits", "load_dataset", "load_splits", "make_splits",
           "open_dataset", "check_split_sizes", "stratified_take"]


@dataclass
class Dataset:
    """Every image of a source, decoded: uint8 N x 3 x 32 x 32 and int64 labels."""

    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray | None
    test_y: np.ndarray | None
    source: Source
    key: str  # content key of the source (names the cache file)
    from_cache: bool
    load_s: float


@dataclass
class Splits:
    """What training sees: train (maybe a subset), validation carved from train, optional test."""

    classes: tuple[str, ...]
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train_y), "val": len(self.val_y),
                "test": 0 if self.test_y is None else len(self.test_y)}


def load_dataset(data: str | None) -> Dataset:
    """Decode ``data`` (see ``resolve_source``), or read it back from the Parquet cache."""
    return open_dataset(data)[1]()


def open_dataset(data: str | None) -> tuple[tuple[int, int] | None, Callable[[], Dataset]]:
    """Locate ``data`` now (bad paths fail here) and return ((training images, classes) when the
    Parquet cache holds it, else None; the function that loads it). A cached source cannot fail
    to decode any more, so a caller may check sizes from the counts and read it while it does
    something else (the driver starts Ray meanwhile)."""
    start = time.perf_counter()
    source = resolve_source(data)
    key = content_key(source)
    path = cache_path(key)
    counts = cached_counts(path) if path.is_file() else None
    return counts, lambda: _load(source, key, path, start)


def _load(source: Source, key: str, path, start: float) -> Dataset:
    decoded = read_cache(path)
    from_cache = decoded is not None
    if decoded is None:
        decoded = decode(source)
        write_cache(path, decoded, source)
    train, test = decoded.splits == "train", decoded.splits == "test"
    return Dataset(
        classes=decoded.classes, train_x=decoded.images[train], train_y=decoded.labels[train],
        test_x=decoded.images[test] if test.any() else None,
        test_y=decoded.labels[test] if test.any() else None,
        source=source, key=key, from_cache=from_cache, load_s=time.perf_counter() - start)


def stratified_take(labels: np.ndarray, n: int, rng: np.random.Generator,
                    num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``n`` samples with class shares as in ``labels``, and of the rest (both sorted).

    Each class gets floor(n * share); the remaining slots go to the largest fractional parts
    (ties to the lower class index), so the result depends only on the labels, n and the rng.
    """
    counts = np.bincount(labels, minlength=num_classes)
    exact = n * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    short = n - quota.sum()
    order = sorted(range(num_classes), key=lambda c: (-(exact[c] - quota[c]), c))
    for c in order[:short]:
        quota[c] += 1
    take = [rng.permutation(np.flatnonzero(labels == c))[:quota[c]] for c in range(num_classes)]
    taken = np.sort(np.concatenate(take))
    rest = np.setdiff1d(np.arange(len(labels)), taken, assume_unique=True)
    return taken, rest


def check_split_sizes(n: int, k: int, val_size: int, subset: int | None) -> int:
    """The number of training images that ``n`` source images of ``k`` classes leave; a usage
    error when --val-size or --subset cannot be carved from them."""
    if val_size < k or val_size >= n:
        raise UsageError(f"--val-size {val_size} must be between {k} (one image per class) and "
                         f"{n - 1} (the source has {n} training images)")
    if subset is not None and (subset < k or subset > n - val_size):
        raise UsageError(f"--subset {subset} must be between {k} (one image per class) and "
                         f"{n - val_size} (training images left after --val-size {val_size})")
    return n - val_size if subset is None else subset


def make_splits(dataset: Dataset, val_size: int, subset: int | None, seed: int) -> Splits:
    """Validation first (stratified, seeded), then an optional stratified training subset."""
    k = len(dataset.classes)
    check_split_sizes(len(dataset.train_y), k, val_size, subset)
    # Separate random streams per purpose, so --subset never changes which images validate.
    val_idx, rest = stratified_take(dataset.train_y, val_size,
                                    np.random.default_rng([seed, 0]), k)
    if subset is not None:
        pick, _ = stratified_take(dataset.train_y[rest], subset, np.random.default_rng([seed, 1]), k)
        rest = rest[pick]
    return Splits(classes=dataset.classes,
                  train_x=dataset.train_x[rest], train_y=dataset.train_y[rest],
                  val_x=dataset.train_x[val_idx], val_y=dataset.train_y[val_idx],
                  test_x=dataset.test_x, test_y=dataset.test_y)


def load_splits(data: str | None, val_size: int, subset: int | None, seed: int) -> tuple[Dataset, Splits]:
    dataset = load_dataset(data)
    return dataset, make_splits(dataset, val_size, subset, seed)
