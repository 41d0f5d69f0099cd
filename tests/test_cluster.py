"""Cluster use: `ray job submit` against a real head node on loopback with token authentication,
and cluster.yaml against Ray's own cluster-config validator."""

from __future__ import annotations

import copy
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def processes_of(*markers: str) -> set[int]:
    """PIDs whose command line names any marker, and all their descendants (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
            table[int(entry.name)] = (cmd, ppid)
    found = {pid for pid, (cmd, _) in table.items() if any(m in cmd for m in markers)}
    while more := {pid for pid, (_, ppid) in table.items() if ppid in found} - found:
        found |= more
    return found


def stop_head(*markers: str) -> None:
    """Kill this head's processes only (`ray stop` would stop every Ray on the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_of(*markers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while processes_of(*markers) and time.time() < deadline:
            time.sleep(0.5)


@pytest.fixture
def head_node():
    """`ray start --head` on 127.0.0.1 with a fresh token; stopped whatever happens.

    Its own short --temp-dir (Unix socket paths are short) and its GCS address mark its
    processes for stop_head (the Ray client server names only the address).
    """
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "RAY_USAGE_STATS_ENABLED": "0",
           # The job's `python` is this environment's, as on a node set up by cluster.yaml.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard, gcs = free_port(), free_port()
    markers = (temp_dir, f"127.0.0.1:{gcs} ")  # the space: not a prefix of another port
    started = ray_cli("start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host",
                      "127.0.0.1", "--port", str(gcs), "--dashboard-port", str(dashboard),
                      "--ray-client-server-port", str(free_port()),
                      # Free ports, not the defaults: another Ray on this machine may hold them.
                      "--dashboard-agent-listen-port", str(free_port()),
                      "--metrics-export-port", str(free_port()), "--num-cpus", "4",
                      "--temp-dir", temp_dir, "--disable-usage-stats", env=env, timeout=300)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        address = f"http://127.0.0.1:{dashboard}"
        # The job API answers "no available agent" until the node's dashboard agent is up.
        deadline = time.time() + 180
        while True:
            ready = ray_cli("job", "submit", "--address", address, "--submission-id", "ready",
                            "--no-wait", "--", "python", "-c", "pass", env=env, timeout=120)
            if ready.returncode == 0 or time.time() > deadline:
                break
            time.sleep(3)
        assert ready.returncode == 0, ready.stderr[-2000:]
        yield {"env": env, "address": address, "token": token, "gcs": f"127.0.0.1:{gcs}"}
    finally:
        stop_head(*markers)
        assert not processes_of(*markers), "the head node outlived the test"


@pytest.mark.e2e
def test_ray_job_submit_runs_the_tune_job_on_a_head_node(head_node, shared_archive, tmp_path):
    env, address = head_node["env"], head_node["address"]
    space = tmp_path / "space.json"  # one trial: the CPU profile would run one per schedule family
    space.write_text('{"schedule": "onecycle"}')
    runtime_env = subprocess.run([sys.executable, "-m", "jobs.runtime_env"], cwd=ROOT, env=env,
                                 capture_output=True, text=True, check=True).stdout
    submit = ray_cli(
        "job", "submit", "--address", address, "--submission-id", "tune-ci",
        "--runtime-env-json", runtime_env, "--",
        "python", "-m", "jobs.tune", "--data", str(shared_archive), "--samples", "1",
        "--epochs", "1", "--subset", "500", "--val-size", "500", "--cpus-per-worker", "1",
        "--space", str(space), "--gradcam-images", "3", "--storage", str(tmp_path),
        "--name", "submitted", env=env)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    status = ray_cli("job", "status", "--address", address, "tune-ci", env=env, timeout=120)
    assert "Job 'tune-ci' succeeded" in status.stdout, status.stdout[-2000:]
    print(submit.stdout)  # shown with pytest -s: the console of a real submission

    run = tmp_path / "submitted"
    for artifact in ("summary.json", "trials.parquet", "best/model.pt2", "gradcam/gradcam.png"):
        assert (run / artifact).is_file(), artifact
    # It ran on the head node's cluster, not on an embedded Ray of its own, from this checkout.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ray_cluster"]["embedded"] is False
    assert summary["ray_cluster"]["gcs_address"] == head_node["gcs"]
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    assert summary["provenance"]["git_revision"].startswith(revision)
    assert summary["provenance"]["versions"]["ray"] and summary["provenance"]["host"]
    logs = ray_cli("job", "logs", "--address", address, "tune-ci", env=env, timeout=120)
    assert "Epoch 1/1 - " in logs.stdout and "target val_acc 0.88 not reached" in logs.stdout

    # The same submission with a wrong token is refused, and nothing runs.
    wrong = {**env, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    refused = ray_cli("job", "submit", "--address", address, "--submission-id", "intruder",
                      "--", "python", "-c", "print('ran')", env=wrong, timeout=120)
    assert refused.returncode != 0
    assert "ran" not in refused.stdout
    listed = ray_cli("job", "list", "--address", address, env=env, timeout=120)
    assert "intruder" not in listed.stdout and "tune-ci" in listed.stdout


def test_cluster_yaml_passes_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first

    # The validator is strict: it would catch a misspelt field.
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1
    with pytest.raises(Exception, match="min_worker"):
        validate_config(prepare_config(broken))

    # Token authentication on every node, the token shipped, the dashboard on loopback only.
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    # Every node installs this project from the synced checkout.
    checkout = next(k for k, v in config["file_mounts"].items() if v == ".")
    assert f"pip install -e {checkout}" in config["setup_commands"]
    assert config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"].startswith("g")


def test_runtime_env_ships_code_not_data_and_names_the_revision():
    env = yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".git", ".venv", "results", "*.parquet"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_USAGE_STATS_ENABLED"] == "0"
    # What `ray job submit --runtime-env-json "$(python -m jobs.runtime_env)"` sends: the same,
    # plus this checkout's git revision (the working_dir carries no .git to read it from).
    proc = subprocess.run([sys.executable, "-m", "jobs.runtime_env"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    sent = json.loads(proc.stdout)
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    assert sent["env_vars"].pop("RESNET_GIT_REVISION").startswith(revision)
    assert sent == env
