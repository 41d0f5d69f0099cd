"""Shared fixtures. Tiers: fast unit tests; Ray integration (real local cluster on loopback, tiny
real subsets); end-to-end jobs as subprocesses. Tests that need the shared CIFAR-10 archive fail,
not skip, when CI is set and the archive is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Before Ray is imported anywhere: no usage stats, every Ray process on 127.0.0.1.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("CIFAR10_DATA", None)

ROOT = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-train-jpeg.tar.xz"


@pytest.fixture(scope="session", autouse=True)
def isolated_caches(tmp_path_factory):
    """Each test session decodes into its own Parquet cache and download folder."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["RESNET_CACHE_DIR"] = str(root / "parquet")
    os.environ["XDG_CACHE_HOME"] = str(root / "xdg")
    yield root


@pytest.fixture(scope="session")
def shared_archive() -> Path:
    if not SHARED_ARCHIVE.is_file():
        message = f"the shared CIFAR-10 archive is missing: {SHARED_ARCHIVE}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_ARCHIVE


@pytest.fixture(scope="session")
def cifar(shared_archive):
    """The shared archive, decoded once per session (later loads hit the Parquet cache)."""
    from resnet.data import load_dataset
    return load_dataset(str(shared_archive))


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster on loopback, shared by the integration tests."""
    import ray
    from resnet.driver import connect_ray
    connect_ray()
    yield ray
    ray.shutdown()


def run_job(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` from the repository root, capturing its output."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


# The test sweep's space: two trials by grid, a sane learning rate and one that must diverge.
SWEEP_SPACE = {"lr": {"grid": [0.1, 1e6]}, "schedule": "onecycle", "batch_size": 64}


@pytest.fixture(scope="session")
def sweep(shared_archive, tmp_path_factory):
    """One real sweep (2 grid trials + the Keras trial x 2 epochs, 1 CPU worker each, 2,000
    images), shared by the Tune and analysis tests. While it runs, once the first epoch is
    reported, ``jobs.analyze`` reads it (``partial``: partial results of a running sweep)."""
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "space.json").write_text(json.dumps(SWEEP_SPACE))
    args = ["jobs.tune", "--data", str(shared_archive), "--samples", "1", "--epochs", "2",
            "--subset", "2000", "--num-workers", "1", "--cpus-per-worker", "1",
            "--val-size", "500", "--keras-trial", "--eval-variants",
            "--scheduler", "asha", "--space", str(tmp / "space.json"),
            "--storage", str(tmp), "--name", "sweep"]
    exp = tmp / "sweep"
    logs = {name: open(tmp / f"{name}.log", "w+") for name in ("stdout", "stderr")}
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, text=True,
                            stdout=logs["stdout"], stderr=logs["stderr"])
    partial, deadline = None, time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline:  # waits on reported progress
        reported = any(p.stat().st_size for p in exp.glob("trial_*/result.json"))
        if reported and list(exp.glob("experiment_state-*.json")):
            partial = run_job("jobs.analyze", str(exp), "--out", str(tmp / "partial"))
            break
        time.sleep(1)
    proc.wait(timeout=max(1, deadline - time.monotonic()))
    output = {name: (tmp / f"{name}.log").read_text() for name in logs}
    for f in logs.values():
        f.close()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, output["stdout"], output["stderr"])
    return {"args": args, "proc": done, "dir": exp, "partial": partial, "partial_dir": tmp / "partial"}
