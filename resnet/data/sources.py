"""Data sources: find out what ``--data`` names, and decode it into uint8 arrays.

Supported: an image-folder tree (``train/<class>/*``, optional ``test/<class>/*``), the same tree
in a .tar/.tar.gz/.tar.xz archive, the official python format (``cifar-10-batches-py/`` or
``cifar-10-python.tar.gz``, read with a restricted unpickler), and torchvision's download.
"""

from __future__ import annotations

import io
import lzma
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from resnet.errors import UsageError

# Class index order of CIFAR-10, whatever the order of folders on disk.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
OFFICIAL_DIR = "cifar-10-batches-py"
OFFICIAL_ARCHIVE = "cifar-10-python.tar.gz"
OFFICIAL_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
OFFICIAL_TEST = "test_batch"
SUPPORTED = ("an image-folder tree (train/<class>/*.jpg), a .tar/.tar.gz/.tar.xz of one, "
             f"a {OFFICIAL_DIR}/ directory or {OFFICIAL_ARCHIVE}")
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError)


@dataclass(frozen=True)
class Source:
    """A located data source. kind: tree | tree-archive | official-dir | official-archive."""

    kind: str
    path: Path

    def files(self) -> list[Path]:
        """The files whose bytes define this source's content (for the cache key)."""
        if self.kind in ("tree-archive", "official-archive"):
            return [self.path]
        if self.kind == "official-dir":
            names = (*OFFICIAL_TRAIN, OFFICIAL_TEST, "batches.meta")
            return [self.path / n for n in names if (self.path / n).is_file()]
        return sorted(p for split in SPLITS if (self.path / split).is_dir()
                      for p in (self.path / split).rglob("*") if p.is_file() and not _hidden(p.name))


@dataclass
class Decoded:
    """Images decoded from a source: uint8 N x 3 x 32 x 32, labels indexing ``classes``."""

    images: np.ndarray
    labels: np.ndarray
    splits: np.ndarray  # "train" or "test" per image
    classes: tuple[str, ...] = CIFAR10_CLASSES


def default_download_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "resnet-cifar10" / "download"


def resolve_source(data: str | None) -> Source:
    """What to read: ``--data``, else ``$CIFAR10_DATA``, else torchvision's download."""
    if data:
        path = Path(data).expanduser()
        if not path.exists():
            raise UsageError(f"--data {data}: no such file or directory; pass {SUPPORTED}")
        if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
            raise UsageError(f"--data {data}: permission denied; make it readable by this "
                             "user or pass another --data")
        return _detect(path, data)
    env = os.environ.get("CIFAR10_DATA")
    if env:
        path = Path(env).expanduser()
        found = _detect(path, env, quiet=True) if path.exists() else None
        if found:
            return found
        if path.exists() and not path.is_dir():
            raise UsageError(f"CIFAR10_DATA={env} is not a supported data source; set it to {SUPPORTED}")
        return download(path)  # a folder (maybe new): the download's cache folder
    return download(default_download_dir())


def _detect(path: Path, shown: str, quiet: bool = False) -> Source | None:
    if path.is_dir():
        if (path / "train").is_dir():
            return Source("tree", path)
        if (path / OFFICIAL_TRAIN[0]).is_file():
            return Source("official-dir", path)
        if (path / OFFICIAL_DIR / OFFICIAL_TRAIN[0]).is_file():
            return Source("official-dir", path / OFFICIAL_DIR)
        if (path / OFFICIAL_ARCHIVE).is_file():
            return Source("official-archive", path / OFFICIAL_ARCHIVE)
    elif path.is_file() and _is_tar(path):
        return Source(_archive_kind(path, shown), path)
    if quiet:
        return None
    raise UsageError(f"--data {shown} is not a supported data source; pass {SUPPORTED}")


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except _ARCHIVE_ERRORS:
        return False


def _archive_kind(path: Path, shown: str) -> str:
    """Decide from the first file members whether an archive holds a tree or official batches."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for i, member in enumerate(tar):
                parts = _parts(member.name)
                if OFFICIAL_DIR in parts:
                    return "official-archive"
                if member.isfile() and _tree_member(parts):
                    return "tree-archive"
                if i > 100:
                    break
    except _ARCHIVE_ERRORS as exc:
        raise UsageError(f"--data {shown}: archive is corrupt or truncated ({exc}); "
                         "download or pack it again") from None
    raise UsageError(f"--data {shown}: archive holds neither train/<class>/* images nor "
                     f"{OFFICIAL_DIR}/; pass {SUPPORTED}")


def download(root: Path) -> Source:
    """torchvision's download of the official archive (checksummed) into ``root``."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity, download_url

    archive = root / CIFAR10.filename
    if not check_integrity(str(archive), CIFAR10.tgz_md5):
        try:
            root.mkdir(parents=True, exist_ok=True)
            download_url(CIFAR10.url, str(root), CIFAR10.filename, CIFAR10.tgz_md5)
        except Exception as exc:  # offline, proxy, disk: all end the same way for the user
            raise UsageError(f"could not download CIFAR-10 into {root} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
                             f"pass --data or set CIFAR10_DATA to {SUPPORTED}") from None
        if not check_integrity(str(archive), CIFAR10.tgz_md5):
            raise UsageError(f"the download {archive} failed its checksum; delete it and retry")
    return Source("official-archive", archive)


# --- Decoding -------------------------------------------------------------------------------------

def decode(source: Source) -> Decoded:
    """Decode every image of a source (the slow path the Parquet cache avoids)."""
    shown = str(source.path)
    if source.kind == "tree":
        files = source.files()
        items = ((p.relative_to(source.path).parts, p.read_bytes()) for p in files)
        return _decode_tree(items, shown, total=len(files))
    if source.kind == "tree-archive":
        return _read_archive(source.path, lambda tar: _decode_tree(_tar_files(tar), shown))
    if source.kind == "official-dir":
        return _decode_official({p.name: p.read_bytes() for p in source.files()}, shown)
    return _read_archive(source.path, lambda tar: _decode_official(
        {_parts(m.name)[-1]: tar.extractfile(m).read() for m in tar
         if m.isfile() and OFFICIAL_DIR in _parts(m.name)}, shown))


def _read_archive(path: Path, read):
    try:
        with tarfile.open(path, "r:*") as tar:
            return read(tar)
    except _ARCHIVE_ERRORS as exc:
        raise UsageError(f"--data {path}: archive is corrupt or truncated ({exc}); "
                         "download or pack it again") from None


def _tar_files(tar: tarfile.TarFile) -> Iterator[tuple[tuple[str, ...], bytes]]:
    # Stream members in archive order: one pass over a compressed archive, no extraction.
    for member in tar:
        parts = _parts(member.name)
        tree = _tree_member(parts) if member.isfile() else None
        if tree:
            yield tree, tar.extractfile(member).read()


def _decode_tree(items: Iterable[tuple[tuple[str, ...], bytes]], shown: str,
                 total: int | None = None) -> Decoded:
    found: dict[str, set[str]] = {split: set() for split in SPLITS}
    records = []
    for parts, data in tqdm(items, total=total, desc="decoding images", unit="img",
                            disable=None, leave=False):
        if len(parts) != 3 or parts[0] not in SPLITS or _hidden(parts[-1]):
            continue
        split, cls, name = parts
        found[split].add(cls)
        records.append((split, cls, name, _decode_image(data, parts)))
    classes = _check_classes(found, shown)
    index = {c: i for i, c in enumerate(classes)}
    records = sorted(((split, index[cls], name, image) for split, cls, name, image in records),
                     key=lambda r: (SPLITS.index(r[0]), r[1], r[2]))  # independent of disk order
    return Decoded(images=np.stack([r[3] for r in records]),
                   labels=np.array([r[1] for r in records], dtype=np.int64),
                   splits=np.array([r[0] for r in records]), classes=classes)


def _decode_image(data: bytes, parts: tuple[str, ...]) -> np.ndarray:
    where = "/".join(parts)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.size != (32, 32):
                raise UsageError(f"{where} is {image.size[0]}x{image.size[1]}, expected 32x32 "
                                 "(CIFAR-10 images); resize the images or fix the tree")
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # 32 x 32 x 3
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UsageError(f"{where} is not a decodable image ({exc}); remove or replace it") from None
    return array.transpose(2, 0, 1)  # 3 x 32 x 32


def _check_classes(found: dict[str, set[str]], shown: str) -> tuple[str, ...]:
    """The tree's class list. Folders named like CIFAR-10's must be exactly CIFAR-10's ten (a
    tree missing one is a broken copy, not a 9-class data set); other names are a data set of
    their own (say, crops from jobs.via_import), classes in sorted order."""
    if not found["train"]:
        raise UsageError(f"--data {shown}: the train split has no images "
                         "(expected train/<class>/<image>)")
    if not found["train"] & set(CIFAR10_CLASSES):
        classes = tuple(sorted(found["train"]))
        if len(classes) < 2:
            raise UsageError(f"--data {shown}: train/ has {len(classes)} class folder; training "
                             "needs at least 2")
        extra = sorted(found["test"] - found["train"])
        if extra:
            raise UsageError(f"--data {shown}: test/ has classes that train/ lacks: "
                             f"{', '.join(extra)}")
        return classes
    for split, classes in found.items():
        if split == "test" and not classes:
            continue  # the test split is optional
        missing = [c for c in CIFAR10_CLASSES if c not in classes]
        extra = sorted(classes - set(CIFAR10_CLASSES))
        if missing or extra:
            detail = "; ".join(filter(None, [
                missing and f"missing or empty: {', '.join(missing)}",
                extra and f"unexpected: {', '.join(extra)}"]))
            raise UsageError(f"--data {shown}: {split}/ must hold exactly the 10 CIFAR-10 class "
                             f"folders ({detail})")
    return CIFAR10_CLASSES


def _decode_official(blobs: dict[str, bytes], shown: str) -> Decoded:
    missing = [n for n in OFFICIAL_TRAIN if n not in blobs]
    if missing:
        raise UsageError(f"--data {shown}: official-format batches missing: {', '.join(missing)}; "
                         "download or extract the archive again")
    if "batches.meta" in blobs:
        names = _field(restricted_loads(blobs["batches.meta"], shown), "label_names", shown)
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        if names != CIFAR10_CLASSES:
            raise UsageError(f"--data {shown}: batches.meta lists classes {names}, "
                             "expected the 10 CIFAR-10 classes")
    images, labels, splits = [], [], []
    batches = [(n, "train") for n in OFFICIAL_TRAIN] + (
        [(OFFICIAL_TEST, "test")] if OFFICIAL_TEST in blobs else [])
    for name, split in tqdm(batches, desc="reading batches", disable=None, leave=False):
        batch = restricted_loads(blobs[name], f"{shown}: {name}")
        data = np.asarray(_field(batch, "data", f"{shown}: {name}"))
        label = np.asarray(_field(batch, "labels", f"{shown}: {name}"), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
                or len(label) != len(data) or label.min(initial=0) < 0 or label.max(initial=0) > 9:
            raise UsageError(f"--data {shown}: {name} is not a CIFAR-10 batch "
                             f"(data {data.dtype} {data.shape}, {len(label)} labels)")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane
        labels.append(label)
        splits.append(np.full(len(label), split))
    return Decoded(np.concatenate(images), np.concatenate(labels), np.concatenate(splits))


def _field(batch: object, key: str, shown: str):
    if isinstance(batch, dict):
        for k in (key, key.encode()):
            if k in batch:
                return batch[k]
    raise UsageError(f"--data {shown}: not a CIFAR-10 pickle (no {key!r} entry)")


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads plain containers and numpy arrays only; any other global is refused, so a
    crafted pickle cannot run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
               ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str):
        if module.startswith("numpy.core"):  # pickles from numpy 1.x name the old package
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load global {module}.{name}")


def restricted_loads(data: bytes, shown: str) -> object:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise UsageError(f"--data {shown}: unsafe or corrupt pickle ({exc}); "
                         "only plain CIFAR-10 batches are accepted") from None
    except Exception as exc:  # truncated or garbage bytes raise many different types
        raise UsageError(f"--data {shown}: corrupt pickle ({type(exc).__name__}); "
                         "download or extract the archive again") from None


def _parts(name: str) -> tuple[str, ...]:
    return tuple(p for p in PurePosixPath(name).parts if p not in (".", "/"))


def _tree_member(parts: tuple[str, ...]) -> tuple[str, ...] | None:
    """('some', 'prefix', 'train', 'cat', '1.jpg') -> ('train', 'cat', '1.jpg')."""
    if len(parts) >= 3 and parts[-3] in SPLITS:
        return parts[-3:]
    return None


def _hidden(name: str) -> bool:
    return name.startswith(".")
