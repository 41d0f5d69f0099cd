"""Run outputs on local disk or any filesystem pyarrow knows (s3://, gs://, ...), one way for all.

A location is a string, as the user gave it: a local path, or a URI that ``pyarrow.fs`` resolves
(``s3://bucket/prefix?endpoint_override=http://127.0.0.1:9000&region=us-east-1``: the query holds
the filesystem's options and stays with every path joined below it). Ray Train and Tune resolve
``storage_path`` the same way (``pyarrow.fs.FileSystem.from_uri``) and hand back paths *inside*
that filesystem, without scheme or query (``bucket/prefix/run/epoch_0001``); ``within`` turns such
a path back into a location.

Local writes go to a temp name first and are renamed into place, so a crash never leaves a
half-written file behind and an earlier complete file is never lost; object stores publish a key
atomically.
"""

from __future__ import annotations

import functools
import os
import posixpath
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from resnet.errors import UsageError


def resolve(where: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it), as Ray resolves a storage path: ``from_uri`` for a URI or an
    absolute path; anything it cannot parse as a URI is a path on local disk."""
    try:
        return _from_uri(where)
    except pa.ArrowInvalid as exc:
        if "empty scheme" not in str(exc) and "Cannot parse URI" not in str(exc):
            raise UsageError(f"{where}: pyarrow cannot open this storage ({exc}); use a local "
                             "path or a URI such as s3://BUCKET/PATH or gs://BUCKET/PATH") from None
        return pafs.LocalFileSystem(), str(Path(where).expanduser().resolve())


@functools.lru_cache(maxsize=256)
def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    # One filesystem object per location: an S3 client is set up once, not per file.
    return pafs.FileSystem.from_uri(uri)


def is_local(where: str) -> bool:
    return local_path(where) is not None


def absolute(where: str) -> str:
    """The location as Ray needs it: an absolute local path, or the URI unchanged."""
    return resolve(where)[1] if _plain_local(where) else where


def local_path(where: str) -> str | None:
    """The path on this machine's disk, or None when the location is remote. Path arithmetic
    only: it asks no remote filesystem anything."""
    if _plain_local(where) or urlsplit(where).scheme == "file":
        return resolve(where)[1]
    return None


def join(where: str, *parts: str) -> str:
    """``where/part/...``; a URI keeps its scheme and query (the filesystem's options)."""
    if _plain_local(where):
        return os.path.join(where, *parts)
    url = urlsplit(where)
    return urlunsplit(url._replace(path=posixpath.join(url.path or "/", *parts)))


def within(where: str, fs_path: str) -> str:
    """The location of ``fs_path``, a path inside ``where``'s filesystem as Ray hands it back
    (``bucket/key`` for s3://, ``/abs/path`` on local disk)."""
    if _plain_local(where):
        return fs_path
    url = urlsplit(where)
    netloc, _, path = fs_path.lstrip("/").partition("/") if url.netloc else ("", "", fs_path)
    return urlunsplit((url.scheme, netloc, "/" + path if url.netloc else path, url.query, ""))


def _plain_local(where: str) -> bool:
    """A local path written as a path: no URI scheme (a file:// URI is joined as a URI)."""
    return len(urlsplit(where).scheme) < 2  # "" (a path), or a Windows drive letter


def write_bytes(dest: str, data: bytes) -> None:
    fs, path = resolve(dest)
    if not isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as f:  # object stores publish a key atomically
            f.write(data)
        return
    target = Path(path)
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
    fs, path = resolve(src)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def exists(path: str) -> bool:
    """Whether a file is there (without reading it)."""
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.File


def mtime_ns(path: str) -> int | None:
    """When a file was last written (None when it is not there)."""
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    return info.mtime_ns if info.type == pafs.FileType.File else None


def is_dir(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def listdir(path: str) -> list[str]:
    """The names directly under a folder ([] when it is not there)."""
    fs, inner = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(info.base_name for info in infos)


def delete(path: str) -> None:
    """Remove a file if it exists."""
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.File:
        fs.delete_file(inner)


def check_writable(root: str, flag: str = "--storage") -> None:
    """Write and delete a marker under ``root`` now, so that a misspelt bucket, missing
    credentials or an unreachable endpoint is one line before anything starts."""
    import uuid
    local = local_path(root)
    if local is not None:
        # Create nothing on local disk: bad input must leave no empty folder behind.
        _check_local_writable(Path(local), root, flag)
        return
    marker = join(root, f".write-check-{uuid.uuid4().hex}")
    try:
        write_bytes(marker, b"")
        delete(marker)
    except OSError as exc:
        detail = " ".join(str(exc).split())[:300]
        hint = ("create the folder or pick another" if is_local(root) else
                "check the bucket name, the credentials (AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or the cloud's own) and the endpoint")
        raise UsageError(f"{flag} {root} cannot be written ({detail}); {hint}") from None


def _check_local_writable(path: Path, root: str, flag: str) -> None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {root} cannot be written ({existing} is not a folder); "
                         "create the folder or pick another")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {root} cannot be written (no write permission on "
                         f"{existing}); create the folder or pick another")
