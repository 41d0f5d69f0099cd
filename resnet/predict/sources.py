"""What SOURCE names, its files, and reading them as a Ray Dataset of (path, bytes) rows.

SOURCE is a folder (searched recursively), an ``s3://`` (or any pyarrow) prefix, a .tar
(.gz/.bz2/.xz) archive, a list file (one path or URI per line; relative paths are relative to the
list's folder; blank lines and ``#`` comments are ignored) or a single file, on local disk or any
filesystem ``resnet/infra/storage.py`` resolves. Hidden files and folders (``.name``) are left
out, as the training data's reader leaves them out; so is the output folder when it lies inside
the source. Files are read with ``ray.data.read_binary_files``; an archive, which only reads from
start to end, by one read task that streams it in blocks (``TarImages``).
"""

from __future__ import annotations

import os
import posixpath
import tarfile
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from resnet.errors import UsageError
from resnet.infra import storage

KINDS = "a folder, an s3:// (or other pyarrow) prefix, a .tar/.tar.gz/.tar.xz archive or a list file"
_TAR_MAGIC = (b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh")  # gzip, xz, bzip2; a plain tar says ustar


@dataclass(frozen=True)
class FileGroup:
    """Files on one filesystem: their paths inside it, and the prefix that makes a path a
    location again (``s3://`` for ``bucket/key``; nothing on local disk)."""

    fs: pafs.FileSystem
    paths: tuple[str, ...]
    prefix: str = ""


@dataclass(frozen=True)
class Source:
    kind: str  # folder | prefix | list | archive | file
    shown: str  # SOURCE as given
    groups: tuple[FileGroup, ...] = ()
    archive: tuple[pafs.FileSystem, str, str] | None = None  # (fs, path inside, location)
    skipped: tuple[tuple[str, str], ...] = field(default=())  # (location, reason), known early

    @property
    def files(self) -> int | None:
        """Files to read (None for an archive: counted while it streams)."""
        return None if self.archive else sum(len(g.paths) for g in self.groups)


def resolve_source(shown: str, exclude: str | None = None) -> Source:
    """Find SOURCE's files now, before Ray starts: a missing or empty source, an unreadable
    store or a broken archive is a UsageError. ``exclude``: a folder to leave out (--out)."""
    fs, path = storage.resolve(shown)
    info = _info(fs, path, shown)
    prefix = _prefix(shown)
    if info.type == pafs.FileType.NotFound:
        raise UsageError(f"SOURCE {shown}: no such file, folder or prefix; pass {KINDS}")
    skip = _excluded(fs, exclude)
    if info.type == pafs.FileType.Directory:
        paths = _walk(fs, path, shown, skip)
        if not paths:
            raise UsageError(f"SOURCE {shown} holds no files; pass {KINDS}")
        kind = "folder" if isinstance(fs, pafs.LocalFileSystem) else "prefix"
        return _checked(Source(kind, shown, (FileGroup(fs, paths, prefix),)))
    head = _head(fs, path, shown)
    if head.startswith(_TAR_MAGIC) or head[257:262] == b"ustar":
        _first_member(fs, path, shown)  # empty or broken: one line now, not in a Ray task
        return Source("archive", shown, archive=(fs, path, _location(shown)))
    if b"\x00" not in head and _is_text(head):
        return _checked(_read_list(fs, path, shown))
    return _checked(Source("file", shown, (FileGroup(fs, (path,), prefix),)))


def read_dataset(source: Source, files_per_block: int, num_cpus: float,
                 concurrency: int | None) -> ray.data.Dataset:
    """A Dataset of rows {path: location, bytes}: ``read_binary_files`` per filesystem
    (``files_per_block`` files per block), or the archive streamed by one read task."""
    args = {"num_cpus": num_cpus, "concurrency": concurrency}
    if source.archive:
        return ray.data.read_datasource(TarImages(*source.archive, files_per_block),
                                        override_num_blocks=1, **args)
    datasets = []
    for group in source.groups:
        ds = ray.data.read_binary_files(
            list(group.paths), include_paths=True, filesystem=group.fs,
            override_num_blocks=max(1, -(-len(group.paths) // files_per_block)), **args)
        if group.prefix:  # bucket/key -> s3://bucket/key (fused into the read tasks)
            ds = ds.map_batches(_prefixed, fn_kwargs={"prefix": group.prefix},
                                batch_format="pyarrow", batch_size=None, num_cpus=num_cpus,
                                compute=ray.data.TaskPoolStrategy(size=concurrency),
                                udf_modifying_row_count=False)
        datasets.append(ds)
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _prefixed(table: pa.Table, prefix: str) -> pa.Table:
    import pyarrow.compute as pc
    index = table.schema.get_field_index("path")
    return table.set_column(index, "path", pc.binary_join_element_wise(prefix, table["path"], ""))


def read_files(source: Source, locations: list[str]) -> dict[str, bytes]:
    """The bytes of a few files by the location the outputs show (the gallery's images): from
    their filesystem, or by streaming the archive once more."""
    wanted, found = set(locations), {}
    if source.archive:
        fs, path, location = source.archive
        members = {where[len(location) + 1:]: where for where in wanted
                   if where.startswith(location + "/")}
        with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and member.name in members:
                    found[members[member.name]] = tar.extractfile(member).read()
                    if len(found) == len(members):
                        break
        return found
    for group in source.groups:
        paths = set(group.paths)
        for where in sorted(wanted - set(found)):
            path = where[len(group.prefix):]
            if not where.startswith(group.prefix) or path not in paths:
                continue
            try:
                with group.fs.open_input_stream(path) as f:
                    found[where] = f.read()
            except OSError:  # gone since: the gallery shows the others
                continue
    return found


class TarImages(ray.data.Datasource):
    """An archive's files as (path, bytes, error) rows, ``rows`` per block, from one read task:
    a compressed archive can only be read from its start. ``path`` is ``<archive>/<member>``.
    A break in the archive ends it with one row whose ``error`` says where it broke: what was
    read before stays."""

    def __init__(self, fs: pafs.FileSystem, path: str, location: str, rows: int) -> None:
        super().__init__()
        self.fs, self.path, self.location, self.rows = fs, path, location, rows

    def estimate_inmemory_data_size(self) -> int | None:
        return self.fs.get_file_info(self.path).size

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        from ray.data.block import BlockMetadata
        meta = BlockMetadata(num_rows=None, size_bytes=self.estimate_inmemory_data_size(),
                             exec_stats=None, input_files=(self.location,))
        return [ray.data.ReadTask(self._read, meta, per_task_row_limit=per_task_row_limit)]

    def _read(self):
        rows: dict[str, list] = {"path": [], "bytes": [], "error": []}
        done = 0
        try:
            with self.fs.open_input_stream(self.path) as raw, \
                    tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile() or _hidden(member.name):
                        continue
                    data = tar.extractfile(member).read()
                    for key, value in (("path", f"{self.location}/{member.name}"),
                                       ("bytes", data), ("error", None)):
                        rows[key].append(value)
                    done += 1
                    if len(rows["path"]) >= self.rows:
                        yield _block(rows)
                        rows = {"path": [], "bytes": [], "error": []}
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            rows["path"].append(self.location)
            rows["bytes"].append(None)
            rows["error"].append(f"archive corrupt or truncated after {done} file(s) "
                                 f"({type(exc).__name__}: {str(exc)[:120]})")
        if rows["path"]:
            yield _block(rows)


def _block(rows: dict[str, list]) -> pa.Table:
    return pa.table({"path": pa.array(rows["path"], pa.string()),
                     "bytes": pa.array(rows["bytes"], pa.binary()),
                     "error": pa.array(rows["error"], pa.string())})


# --- listing -----------------------------------------------------------------------------------

def _info(fs: pafs.FileSystem, path: str, shown: str) -> pafs.FileInfo:
    try:
        return fs.get_file_info(path)
    except OSError as exc:
        raise UsageError(f"SOURCE {shown} cannot be read ({_detail(exc)}); check the path, the "
                         "bucket, the credentials and the endpoint") from None


def _walk(fs: pafs.FileSystem, path: str, shown: str, skip) -> tuple[str, ...]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise UsageError(f"SOURCE {shown} cannot be listed ({_detail(exc)})") from None
    base = path.rstrip("/")
    return tuple(sorted(info.path for info in infos if info.type == pafs.FileType.File
                        and not _hidden(info.path[len(base):]) and not skip(info.path)))


def _read_list(fs: pafs.FileSystem, path: str, shown: str) -> Source:
    """A list file: its lines as files (a listed folder is walked), grouped by filesystem;
    a listed file that is not there is skipped with its reason."""
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"SOURCE {shown}: a list file must be UTF-8 text ({_detail(exc)})") from None
    base = _parent(shown) if _prefix(shown) else os.path.dirname(path)
    groups: list[tuple[pafs.FileSystem, str, list[str]]] = []
    skipped: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = line if _prefix(line) or os.path.isabs(line) else \
            (storage.join(base, line) if _prefix(shown) else os.path.join(base, line))
        if where in seen:
            continue
        seen.add(where)
        try:
            line_fs, inner = storage.resolve(where)
            info = line_fs.get_file_info(inner)
        except (OSError, UsageError) as exc:
            skipped.append((_location(where), f"cannot be read ({_detail(exc)}), line {number}"))
            continue
        if info.type == pafs.FileType.Directory:
            found = list(_walk(line_fs, inner, where, lambda p: False))
        elif info.type == pafs.FileType.File:
            found = [inner]
        else:
            skipped.append((_location(where), f"not found (line {number} of the list)"))
            continue
        group = next((g for g in groups if g[0].equals(line_fs) and g[1] == _prefix(where)), None)
        if group is None:
            group = (line_fs, _prefix(where), [])
            groups.append(group)
        group[2].extend(found)
    if not groups:
        reason = f"none of its {len(skipped)} file(s) exists" if skipped else "it names no files"
        raise UsageError(f"SOURCE {shown} is a list file, but {reason}; pass {KINDS}")
    return Source("list", shown, tuple(FileGroup(f, tuple(dict.fromkeys(p)), pre)
                                       for f, pre, p in groups), skipped=tuple(skipped))


def _checked(source: Source) -> Source:
    """Local files this user cannot read are skipped now, with the reason (read_binary_files
    would stop the whole run on them)."""
    groups, skipped = [], list(source.skipped)
    for group in source.groups:
        if not isinstance(group.fs, pafs.LocalFileSystem):
            groups.append(group)
            continue
        readable = tuple(p for p in group.paths if os.access(p, os.R_OK))
        skipped += [(p, "permission denied") for p in group.paths if p not in set(readable)]
        if readable:
            groups.append(FileGroup(group.fs, readable, group.prefix))
    if not groups:
        raise UsageError(f"SOURCE {source.shown}: none of its files can be read (permission "
                         "denied); make them readable by this user")
    return Source(source.kind, source.shown, tuple(groups), source.archive, tuple(skipped))


def _first_member(fs: pafs.FileSystem, path: str, shown: str) -> None:
    try:
        with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            if any(m.isfile() and not _hidden(m.name) for m in tar):
                return
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise UsageError(f"SOURCE {shown}: archive is corrupt or not a tar archive "
                         f"({_detail(exc)}); pack it again or pass the folder") from None
    raise UsageError(f"SOURCE {shown}: the archive holds no files; pass {KINDS}")


def _head(fs: pafs.FileSystem, path: str, shown: str) -> bytes:
    try:
        with fs.open_input_stream(path) as f:
            return f.read(512)
    except OSError as exc:
        raise UsageError(f"SOURCE {shown} cannot be read ({_detail(exc)})") from None


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut at 512 bytes is still text
        return exc.start >= len(head) - 3
    return True


def _excluded(fs: pafs.FileSystem, exclude: str | None):
    """A predicate: the path lies in ``exclude`` (a folder on the same filesystem)."""
    if not exclude:
        return lambda path: False
    out_fs, out_path = storage.resolve(exclude)
    if not out_fs.equals(fs):
        return lambda path: False
    root = out_path.rstrip("/") + "/"
    return lambda path: path.startswith(root)


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/") if part not in ("", "."))


def _prefix(where: str) -> str:
    """``s3://`` for a URI (its paths inside the filesystem are bucket/key), else nothing."""
    scheme = where.split("://", 1)[0] if "://" in where else ""
    return f"{scheme}://" if len(scheme) >= 2 and scheme != "file" else ""


def _location(where: str) -> str:
    """A location as the outputs show it: an absolute local path, or the URI without its
    query (the query holds the filesystem's options, such as the endpoint)."""
    if not _prefix(where):
        return storage.resolve(where)[1]
    return where.split("?", 1)[0]


def _parent(where: str) -> str:
    url, _, query = where.partition("?")
    return posixpath.dirname(url) + (f"?{query}" if query else "")


def _detail(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
