"""Storage on local paths and pyarrow URIs (file:// here: the same code path as s3:// or gs://)."""

from __future__ import annotations

import os

import pytest

from resnet.infra import storage


@pytest.mark.parametrize("uri", [False, True])
def test_write_read_exists_delete(tmp_path, uri):
    root = f"file://{tmp_path}" if uri else str(tmp_path)
    path = storage.join(root, "a", "b", "summary.json")
    assert storage.read_bytes(path) is None and not storage.exists(path)
    storage.write_bytes(path, b"one")
    storage.write_bytes(path, b"two")  # replaced, folders made on the way
    assert storage.read_bytes(path) == b"two" and storage.exists(path)
    assert (tmp_path / "a" / "b" / "summary.json").read_bytes() == b"two"
    assert not storage.exists(storage.join(root, "a", "b"))  # a folder is not a file
    storage.delete(path)
    storage.delete(path)  # deleting what is gone is no error
    assert not storage.exists(path)
    assert os.listdir(tmp_path / "a" / "b") == []  # no temp file left behind


def test_paths_uris_and_joins():
    assert storage.is_uri("s3://bucket/x") and storage.is_uri("file:///tmp/x")
    assert not storage.is_uri("/tmp/x") and not storage.is_uri("results")
    assert storage.absolute("s3://bucket/x") == "s3://bucket/x"
    assert storage.absolute("results") == os.path.join(os.getcwd(), "results")
    assert storage.join("s3://bucket/", "sweep/", "trials.parquet") == "s3://bucket/sweep/trials.parquet"


def test_a_failed_local_write_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "summary.json"
    storage.write_bytes(str(path), b"complete")

    class Unwritable:  # bytes-like in name only: writing it fails halfway
        def __len__(self):
            return 1

    with pytest.raises(TypeError):
        storage.write_bytes(str(path), Unwritable())
    assert path.read_bytes() == b"complete" and os.listdir(tmp_path) == ["summary.json"]
