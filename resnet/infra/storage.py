"""Run outputs on local disk or any filesystem pyarrow knows (s3://, gs://, ...).

Local writes go to a temp name first and are renamed into place, so a crash never leaves a
half-written file behind and an earlier complete file is never lost.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(storage: str) -> str:
    """Ray Train needs an absolute local path (or a URI)."""
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def write_bytes(dest: str, data: bytes) -> None:
    if is_uri(dest):
        fs, path = pafs.FileSystem.from_uri(dest)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:  # object stores publish a key atomically
            f.write(data)
        return
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_bytes(src: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    if is_uri(src):
        fs, path = pafs.FileSystem.from_uri(src)
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read()
    path = Path(src)
    return path.read_bytes() if path.is_file() else None


def exists(path: str) -> bool:
    """Whether a file is there (without reading it)."""
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs.get_file_info(inner).type == pafs.FileType.File
    return Path(path).is_file()


def delete(path: str) -> None:
    """Remove a file if it exists."""
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        if fs.get_file_info(inner).type == pafs.FileType.File:
            fs.delete_file(inner)
        return
    Path(path).unlink(missing_ok=True)
