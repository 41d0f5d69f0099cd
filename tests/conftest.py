"""Shared fixtures. Tiers: fast unit tests; Ray integration (real local cluster on loopback, tiny
real subsets); end-to-end jobs as subprocesses. Tests that need the shared CIFAR-10 archive fail,
not skip, when CI is set and the archive is missing."""

from __future__ import annotations

import os
import subprocess
import sys
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
