"""Parquet cache of decoded images, keyed by the source's content.

The key is a SHA-256 over the bytes of every file that makes up the source, so a changed source
gets a new key and is decoded again; an unchanged one is read back without decoding.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from resnet.data.sources import Decoded, Source

CACHE_VERSION = 1  # bump when the layout of cached tables changes
IMAGE_BYTES = 3 * 32 * 32


def cache_dir() -> Path:
    """``$RESNET_CACHE_DIR``, else ``~/.cache/resnet-cifar10/parquet``."""
    if os.environ.get("RESNET_CACHE_DIR"):
        return Path(os.environ["RESNET_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "resnet-cifar10" / "parquet"


def content_key(source: Source) -> str:
    digest = hashlib.sha256(f"resnet-cache-v{CACHE_VERSION}:{source.kind}".encode())
    for path in source.files():
        rel = path.relative_to(source.path).as_posix() if path != source.path else ""
        digest.update(f"\0{rel}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def cache_path(key: str) -> Path:
    return cache_dir() / f"cifar10-{key}.parquet"


def write_cache(path: Path, decoded: Decoded, source: Source) -> None:
    """Write atomically (temp file, then rename) so a crash never leaves half a cache."""
    images = decoded.images.reshape(len(decoded.images), IMAGE_BYTES)
    table = pa.table({
        "split": pa.array(decoded.splits.tolist()).dictionary_encode(),
        "label": pa.array(decoded.labels, type=pa.int16()),
        "image": pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(IMAGE_BYTES), len(images), [None, pa.py_buffer(np.ascontiguousarray(images))]),
    })
    meta = {"classes": list(decoded.classes), "source": str(source.path), "kind": source.kind,
            "layout": "uint8 N x 3 x 32 x 32, RGB planes"}
    table = table.replace_schema_metadata({"resnet": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd", compression_level=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_counts(path: Path) -> tuple[int, int] | None:
    """(training images, classes) from the cache's small columns, or None when unreadable: enough
    to check the split sizes before anything slow starts."""
    try:
        splits = pq.read_table(path, columns=["split"]).column("split").to_pylist()
        classes = json.loads(pq.read_schema(path).metadata[b"resnet"])["classes"]
    except (OSError, pa.ArrowException, KeyError, ValueError, TypeError):
        return None
    return splits.count("train"), len(classes)


def read_cache(path: Path) -> Decoded | None:
    """The cached arrays, or None when absent or unreadable (then the caller decodes again)."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        image = table.column("image").combine_chunks()
        # A fixed-size-binary column is one contiguous buffer of N * 3072 bytes.
        buffer = np.frombuffer(image.buffers()[1], dtype=np.uint8)
        start = image.offset * IMAGE_BYTES
        images = buffer[start:start + len(image) * IMAGE_BYTES].reshape(-1, 3, 32, 32).copy()
        labels = table.column("label").to_numpy().astype(np.int64)
        splits = np.asarray(table.column("split").to_pylist())
        classes = tuple(json.loads(table.schema.metadata[b"resnet"])["classes"])
    except (OSError, pa.ArrowException, KeyError, ValueError, TypeError):
        return None
    return Decoded(images=images, labels=labels, splits=splits, classes=classes)
