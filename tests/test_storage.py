"""Storage on local paths and pyarrow URIs (file:// and the session's S3 server on loopback), the
paths Ray hands back, and what a sweep on S3 costs beside the same sweep on local disk."""

from __future__ import annotations

import os

import pytest

from resnet.errors import UsageError
from resnet.infra import storage
from tests.conftest import s3_location


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


def test_locations_joins_and_the_paths_ray_hands_back():
    assert storage.absolute("results") == os.path.join(os.getcwd(), "results")
    assert storage.absolute("s3://bucket/x") == "s3://bucket/x"
    assert storage.join("s3://bucket/", "sweep/", "trials.parquet") == "s3://bucket/sweep/trials.parquet"
    # The query is the filesystem's options: it stays on every location below.
    s3 = "s3://runs/sweeps?endpoint_override=http://127.0.0.1:9000&region=us-east-1"
    assert storage.join(s3, "a", "b.json") == \
        "s3://runs/sweeps/a/b.json?endpoint_override=http://127.0.0.1:9000&region=us-east-1"
    # Ray resolves a storage path with pyarrow and hands back paths inside the filesystem.
    fs, inner = storage.resolve(storage.join(s3, "run", "epoch_0001"))
    assert type(fs).__name__ == "S3FileSystem" and inner == "runs/sweeps/run/epoch_0001"
    assert storage.within(s3, inner) == storage.join(s3, "run", "epoch_0001")
    assert storage.within("/tmp/x", "/tmp/x/run") == "/tmp/x/run"
    assert storage.within("file:///tmp/x", "/tmp/x/run") == "file:///tmp/x/run"
    assert storage.local_path(s3) is None and storage.local_path("file:///tmp/x") == "/tmp/x"
    with pytest.raises(UsageError, match="pyarrow cannot open this storage"):
        storage.resolve("nosuchfs://bucket/x")


def test_a_recorded_checkpoint_is_found_where_its_sweep_now_is():
    """Rows keep the location a checkpoint had when it was written; a sweep copied elsewhere
    (or a bucket behind another endpoint) finds it under its own train_runs/."""
    from resnet.tune.results import located
    assert located("/new/sweep", "/old/place/sweep/train_runs/t1/epoch_0002") == \
        "/new/sweep/train_runs/t1/epoch_0002"
    moved = "s3://b/sweep?endpoint_override=http://127.0.0.1:2&region=us-east-1"
    assert located(moved, "s3://b/sweep/train_runs/t1/epoch_0002?endpoint_override="
                   "http://127.0.0.1:1&region=us-east-1") == \
        storage.join(moved, "train_runs", "t1", "epoch_0002")
    assert located("/x", None) is None


def test_the_same_code_reads_and_writes_the_bucket(s3_server):
    root = s3_location(s3_server, "unit")
    path = storage.join(root, "a", "summary.json")
    assert storage.read_bytes(path) is None and not storage.exists(path)
    storage.write_bytes(path, b"one")
    assert storage.read_bytes(path) == b"one" and storage.is_dir(storage.join(root, "a"))
    assert storage.listdir(storage.join(root, "a")) == ["summary.json"]
    storage.delete(path)
    assert not storage.exists(path)
    storage.check_writable(root)
    with pytest.raises(UsageError, match="check the bucket name"):
        storage.check_writable(f"s3://no-such-bucket/x?{s3_server}")


def test_a_failed_local_write_keeps_the_earlier_file(tmp_path):
    path = tmp_path / "summary.json"
    storage.write_bytes(str(path), b"complete")

    class Unwritable:  # bytes-like in name only: writing it fails halfway
        def __len__(self):
            return 1

    with pytest.raises(TypeError):
        storage.write_bytes(str(path), Unwritable())
    assert path.read_bytes() == b"complete" and os.listdir(tmp_path) == ["summary.json"]


@pytest.mark.e2e
def test_what_a_sweep_on_s3_costs_beside_local_disk(shared_archive, s3_server, tmp_path, capsys):
    """The same small sweep (resnet20, so checkpoints of the real size) on local disk and on
    the S3 server, one after the other, timed alike (the whole job, as a user waits for it);
    and one epoch's checkpoint uploads (Ray Train's checkpoint and the trial's Tune copy),
    written to each. docs/cluster.md quotes a quiet run of this test."""
    import json
    import statistics
    import time

    from tests.conftest import run_job
    (tmp_path / "space.json").write_text(json.dumps({"schedule": "onecycle", "lr": 0.05,
                                                     "batch_size": 64}))
    roots = {"local": str(tmp_path / "local"), "s3": s3_location(s3_server, tmp_path.name)}
    wall = {}
    for name, root in roots.items():
        started = time.monotonic()
        proc = run_job("jobs.tune", "--data", str(shared_archive), "--model", "resnet20",
                       "--samples", "1", "--epochs", "3", "--subset", "500", "--val-size", "200",
                       "--cpu", "--cpus-per-worker", "2", "--scheduler", "fifo",
                       "--gradcam-images", "0", "--space", str(tmp_path / "space.json"),
                       "--storage", root, "--name", "cost")
        wall[name] = time.monotonic() - started
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert storage.exists(storage.join(root, "cost", "best", "model.pt2"))
    checkpoint = next((tmp_path / "local" / "cost" / "train_runs").rglob("checkpoint.pt"))
    data = checkpoint.read_bytes()
    upload = {}
    for name, root in roots.items():
        seconds = []
        for i in range(5):
            started = time.monotonic()
            for copy in ("train", "tune"):  # an epoch writes the checkpoint twice
                storage.write_bytes(storage.join(root, "upload", f"{copy}-{i}.pt"), data)
            seconds.append(time.monotonic() - started)
        upload[name] = statistics.median(seconds)
    with capsys.disabled():
        print(f"\nsweep of 1 trial x 3 epochs (resnet20, 500 images): local {wall['local']:.1f} s, "
              f"S3 {wall['s3']:.1f} s, ratio S3/local {wall['s3'] / wall['local']:.2f}; one "
              f"epoch's two checkpoint writes ({len(data) / 2**20:.1f} MiB each): local "
              f"{upload['local'] * 1000:.0f} ms, S3 {upload['s3'] * 1000:.0f} ms")
