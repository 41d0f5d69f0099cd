"""Shared fixtures. Tiers: fast unit tests; Ray integration (real local cluster on loopback, tiny
real subsets); end-to-end jobs as subprocesses. Tests that need the shared CIFAR-10 archive fail,
not skip, when CI is set and the archive is missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Before Ray is imported anywhere: no usage stats, every Ray process on 127.0.0.1.
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Ray merges log lines that differ only in digits ("Epoch 1/2" of two processes); tests that read
# the console need every line.
os.environ["RAY_DEDUP_LOGS"] = "0"
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.pop("RAY_ADDRESS", None)
os.environ.pop("CIFAR10_DATA", None)
# Credentials for the tests' own S3 server (moto takes any), in the environment before any Ray
# starts: Ray's workers, which write checkpoints to the bucket, inherit it. No instance metadata
# lookups (the AWS SDK would otherwise ask a cloud's metadata address for credentials).
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                  AWS_EC2_METADATA_DISABLED="true")

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

    from resnet.infra.cluster import connect_ray
    connect_ray()
    yield ray
    ray.shutdown()


def run_job(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python -m <args>`` from the repository root, capturing its output."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def reported_epoch(run_dir: Path | str) -> int:
    """The last epoch a Ray Train run (a local folder or a URI) has checkpointed, from its own
    snapshot file (0: none)."""
    from resnet.infra import storage
    try:
        data = storage.read_bytes(storage.join(str(run_dir), "checkpoint_manager_snapshot.json"))
        return int(json.loads(data)["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or being written
        return 0


# --- Experiment tracking: a real MLflow server (SQLite store) on loopback, one per session ------

@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 and a free port, its runs in SQLite and its artifacts in a
    local folder (served through the server); stopped with its workers at the end. Yields its
    URI."""
    import urllib.request

    from resnet.infra.cluster import free_port
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = open(root / "server.log", "w")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, server, timeout=180)
        yield uri
    finally:
        processes = [server.pid, *descendants(server.pid)]
        os.killpg(server.pid, signal.SIGTERM)
        reap(processes, timeout=30)
        log.close()


# --- Object storage: a real S3 API (moto's server mode) on loopback, one per test session ------

S3_BUCKET = "runs"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 and a free port, with a bucket (the credentials are set
    above, for every process the tests start). Yields the query every s3:// location of this
    server carries."""
    from moto.server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    query = f"endpoint_override=http://{host}:{port}&region=us-east-1"
    import pyarrow.fs as pafs
    fs, _ = pafs.FileSystem.from_uri(f"s3://{S3_BUCKET}?{query}&allow_bucket_creation=true")
    fs.create_dir(S3_BUCKET)
    yield query
    server.stop()


@pytest.fixture(params=["local", "s3"])
def storage_root(request, tmp_path):
    """A root for runs and sweeps: a local folder, or a fresh prefix in the session's bucket."""
    if request.param == "local":
        return str(tmp_path / "storage")
    return s3_location(request.getfixturevalue("s3_server"), tmp_path.name)


def s3_location(query: str, prefix: str) -> str:
    return f"s3://{S3_BUCKET}/{prefix}?{query}"


def download(location: str, dest: Path) -> Path:
    """A copy of a folder (local or in the bucket) on local disk, to read with pathlib."""
    import pyarrow.fs as pafs

    from resnet.infra import storage
    fs, path = storage.resolve(location)
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return dest


def files_under(location: str) -> dict[str, tuple[int, int]]:
    """Every file under a folder (local or in the bucket): relative path -> (size, mtime ns)."""
    import pyarrow.fs as pafs

    from resnet.infra import storage
    fs, path = storage.resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return {info.path[len(path):].lstrip("/"): (info.size, info.mtime_ns) for info in infos
            if info.type == pafs.FileType.File}


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 600) -> None:
    """Poll ``predicate`` (reported progress, not a sleep of a guessed length)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before the wait was over")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s")
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): Ray's processes started by a job."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pid_alive(pid: int) -> bool:
    """The process runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def reap(pids: list[int], timeout: float = 60) -> list[str]:
    """Wait for processes to end; SIGKILL what is left after ``timeout``. Returns the leftovers'
    command lines."""
    def alive() -> list[int]:
        return [pid for pid in pids if pid_alive(pid)]

    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = []
    for pid in alive():
        try:
            left.append(Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip())
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    return left


# Loopback as /proc/net/tcp* writes it: 127.0.0.1, and IPv4-mapped or plain ::1 in tcp6.
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_sockets(pids: list[int]) -> set[tuple[str, str]]:
    """(local address, port), hex as /proc/net/tcp* writes them, of the TCP sockets ``pids``
    listen on (Linux)."""
    inodes = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # ended meanwhile
            continue
        inodes |= {link[len("socket:["):-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(tuple(fields[1].rsplit(":", 1)))
    return found


# The test sweep's space: three trials by grid, a sane learning rate (val_acc about 0.14 after
# epoch 1, 0.29 after epoch 2), one too small to learn anything (ASHA must stop it at its first
# rung: it stays at chance, 0.10) and one that must diverge. No EMA: it would lag in 31 steps.
SWEEP_SPACE = {"lr": {"grid": [0.05, 1e-6, 1e6]}, "schedule": "onecycle", "batch_size": 32,
               "ema": 0.0}
SWEEP_TARGET = 0.2  # low enough that a trial reaches it: the "target reached" branches run


@pytest.fixture(scope="session", params=["local", "s3"])
def sweep(request, shared_archive, tmp_path_factory):
    """One real sweep per storage (a local folder, the session's S3 server), shared by the Tune,
    analysis and fault tests: the Keras trial, then the 3 grid trials, one at a time (1 worker x
    2 CPUs) x 2 epochs on 1,000 images, ASHA with a grace period of 1 epoch, target 0.2. On the
    way, each step waiting on reported progress:

    - once the first trial (the Keras one, which ASHA cannot stop: it is alone at its rung) has
      reported and checkpointed epoch 1, so that it is certainly in epoch 2, the driver is
      SIGKILLed (``killed``: the time, the epoch each trial had checkpointed, the first trial's
      epoch-1 metrics and the bytes of every checkpoint at that moment, by location);
    - ``jobs.analyze`` reads the interrupted sweep (``partial``);
    - the same command with ``--resume`` completes the sweep (``proc``: its output).

    ``uri``: the sweep's location as the jobs saw it; ``dir``: a local copy to read with pathlib
    (the folder itself for local storage, a download from the bucket for S3). The sweep logs to
    the session's MLflow server (``mlflow``: its URI) all along, kill and resume included.
    """
    from resnet.infra import storage
    tmp = tmp_path_factory.mktemp(f"sweep-{request.param}")
    root = str(tmp) if request.param == "local" else \
        s3_location(request.getfixturevalue("s3_server"), tmp.name)
    (tmp / "space.json").write_text(json.dumps(SWEEP_SPACE))
    mlflow = request.getfixturevalue("mlflow_server")  # each trial a child run, as it runs
    args = ["jobs.tune", "--data", str(shared_archive), "--samples", "1", "--epochs", "2",
            "--subset", "1000", "--num-workers", "1", "--cpus-per-worker", "2",
            "--max-concurrent", "1", "--val-size", "500", "--keras-trial", "--eval-variants",
            "--scheduler", "asha", "--grace-period", "1", "--target", str(SWEEP_TARGET),
            "--space", str(tmp / "space.json"), "--storage", root, "--name", "sweep",
            "--mlflow", mlflow, "--mlflow-model-name", f"sweep-{request.param}"]
    exp = storage.join(root, "sweep")
    runs = storage.join(exp, "train_runs")
    with open(tmp / "killed.log", "w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, text=True, stdout=log,
                                stderr=subprocess.STDOUT)
        try:
            # (Tune's own result.json of a trial is flushed late, so it is no signal.)
            wait_for(lambda: trial_runs(runs) and reported_epoch(trial_runs(runs)[0]) >= 1, proc)
            ray_processes = descendants(proc.pid)
            first = trial_runs(runs)[0]
            snapshot = storage.read_bytes(storage.join(first, "checkpoint_manager_snapshot.json"))
            killed = {"time_ns": time.time_ns(), "first": storage.resolve(first)[1].rsplit("/", 1)[1],
                      "epochs": {storage.resolve(run)[1].rsplit("/", 1)[1]: reported_epoch(run)
                                 for run in trial_runs(runs)},
                      "first_epoch_1": json.loads(snapshot)["latest_checkpoint_result"]["metrics"],
                      "checkpoints": {storage.join(runs, name): storage.read_bytes(storage.join(runs, name))
                                      for name in files_under(runs) if name.endswith("checkpoint.pt")}}
            proc.kill()  # SIGKILL: no handler runs, as when a machine dies
        finally:
            proc.kill()
            proc.wait()
        killed["leftover_processes"] = reap(ray_processes, timeout=10)  # Ray's fate sharing
        log.seek(0)
        killed["output"] = log.read()
    partial = storage.join(root, "partial")
    analysed = run_job("jobs.analyze", exp, "--out", partial)
    done = run_job(*args, "--resume")
    local = request.param == "local"
    return {"args": args, "proc": done, "uri": exp, "storage": request.param, "mlflow": mlflow,
            "dir": tmp / "sweep" if local else download(exp, tmp / "copy" / "sweep"),
            "partial": analysed,
            "partial_dir": tmp / "partial" if local else download(partial, tmp / "copy" / "partial"),
            "killed": killed}


def trial_runs(runs: str) -> list[str]:
    """The trials' Ray Train run folders (locations), in the order the trials were created."""
    from resnet.infra import storage
    return [storage.join(runs, name) for name in storage.listdir(runs)
            if storage.is_dir(storage.join(runs, name))]
