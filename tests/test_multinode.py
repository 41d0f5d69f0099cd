"""Distributed for real: a head and three worker nodes (2 CPUs each), separate raylets on
127.0.0.1 (tests/multinode_cluster.py). DDP ranks on two nodes train as on one; --placement puts
the ranks where it says; a node that dies mid-run (its raylet and workers SIGKILLed) costs a
restart from the latest checkpoint on the nodes left, for a run and for a sweep's trial (on S3
storage); a sweep submitted with ``ray job submit`` spreads its trials over nodes; every process
binds to loopback only, the drivers too, without single-node mode in their environment; the
fixture ends every process it started, by pid."""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from resnet.train.checkpoint import load_state
from tests.conftest import (LOOPBACK, ROOT, descendants, listening_sockets, pid_alive, reap,
                            reported_epoch, s3_location, trial_runs, wait_for)

pytestmark = pytest.mark.e2e
RAY = str(Path(sys.executable).parent / "ray")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # The drivers (jobs joining the cluster) get no single-node mode from the tests: the project
    # must keep them on loopback by itself (tests/multinode_cluster.py sets it for the cluster).
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    info_file = tmp / "cluster.json"
    helper = subprocess.Popen([sys.executable, str(ROOT / "tests" / "multinode_cluster.py"),
                               str(info_file), "3"], env=env, cwd=tmp,
                              stdout=open(tmp / "cluster.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for(info_file.is_file, helper, timeout=300)
        info = json.loads(info_file.read_text())
        # The job API answers "no available agent" until the head's dashboard agent is up.
        deadline = time.monotonic() + 180
        while True:
            ready = subprocess.run([RAY, "job", "submit", "--address", info["dashboard_url"],
                                    "--no-wait", "--", "true"], env=env, capture_output=True,
                                   text=True, timeout=120)
            if ready.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert ready.returncode == 0, ready.stderr[-2000:]
        yield {**info, "env": env, "tmp": tmp, "helper": helper,
               "job_env": {**env, "RAY_ADDRESS": info["gcs_address"]}}
    finally:
        processes = [helper.pid, *descendants(helper.pid)]
        helper.send_signal(signal.SIGTERM)
        try:
            helper.wait(timeout=120)
        except subprocess.TimeoutExpired:
            helper.kill()
        left = reap(processes, timeout=30)  # by pid: never another Ray of this machine
        assert not left, f"the test cluster left processes behind: {left}"


def train(cluster, name: str, *extra: str, env: dict | None = None, data: str,
          wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    """jobs.train as a driver joining the cluster (RAY_ADDRESS=127.0.0.1:port)."""
    args = [sys.executable, "-m", "jobs.train", "--data", data, "--model", "tiny", "--subset",
            "1000", "--val-size", "200", "--batch-size", "64", "--lr", "0.05",
            "--num-workers", "2", "--cpus-per-worker", "1", "--cpu",
            "--storage", str(cluster["tmp"] / "runs"), "--name", name, *extra]
    env = env if env is not None else cluster["job_env"]
    if wait:
        return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=900)
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("placement", ["pack", "spread"])
def test_placement_puts_the_ranks_where_it_says(cluster, shared_archive, placement):
    """2 ranks x 1 CPU on worker nodes of 2 CPUs: pack fills one node; spread spreads them as
    far as Ray can (recorded); strict-spread (one rank per node) is the next test's run. Where
    each rank ran comes from the run's own summary.json."""
    run = train(cluster, f"placement-{placement}", "--epochs", "1", "--placement", placement,
                data=str(shared_archive))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads((cluster["tmp"] / "runs" / f"placement-{placement}" /
                          "summary.json").read_text())
    nodes = [rank["node_id"] for rank in summary["placement"]]
    assert len(nodes) == 2 and set(nodes) <= {n["node_id"] for n in cluster["nodes"]}
    if placement == "pack":
        assert len(set(nodes)) == 1, nodes
    else:  # SPREAD is best effort; on this idle cluster Ray spreads them
        assert len(set(nodes)) == 2, nodes
    print(f"\n--placement {placement}: ranks on node(s) {[n[:8] for n in nodes]}")


def test_ranks_on_two_nodes_train_as_on_one(cluster, shared_archive):
    spread = train(cluster, "spread", "--epochs", "2", "--placement", "strict-spread",
                   data=str(shared_archive))
    assert spread.returncode == 0, spread.stdout[-3000:] + spread.stderr[-3000:]
    summary = json.loads((cluster["tmp"] / "runs" / "spread" / "summary.json").read_text())
    nodes = {rank["node_id"] for rank in summary["placement"]}
    assert len(summary["placement"]) == 2 and len(nodes) == 2  # one rank per node
    assert nodes <= {n["node_id"] for n in cluster["nodes"]}  # the cluster's, not embedded
    assert summary["ray_cluster"]["embedded"] is False

    # The same run on this machine's one node (its own embedded Ray, 2 CPUs): DDP is DDP. Both
    # runs do the same arithmetic in the same order (1 thread per rank, gloo's sum of 2 ranks),
    # only the processes sit elsewhere: the weights agree to float rounding, val_acc exactly.
    local_env = {**cluster["env"]}
    one = train(cluster, "one-node", "--epochs", "2", env=local_env, data=str(shared_archive))
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    local = json.loads((cluster["tmp"] / "runs" / "one-node" / "summary.json").read_text())
    assert len({rank["node_id"] for rank in local["placement"]}) == 1
    assert local["ray_cluster"]["embedded"] is True
    assert local["final_metrics"]["val_acc"] == summary["final_metrics"]["val_acc"]
    a, b = (load_state(s["best_checkpoint"])["model"] for s in (summary, local))
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7), key


def test_a_node_that_dies_mid_run_costs_a_restart_on_the_nodes_left(cluster, shared_archive):
    run_dir = cluster["tmp"] / "runs" / "node-lost"
    proc = train(cluster, "node-lost", "--epochs", "3", "--placement", "strict-spread",
                 data=str(shared_archive), wait=False)
    try:
        wait_for(lambda: reported_epoch(run_dir) >= 1, proc, timeout=600)
        # The driver joined on loopback (without single-node mode in its environment) and
        # listens on loopback only, as every cluster process does; one known exception: with
        # ranks on two nodes, torch's rendezvous store (TCPStore) on rank 0 listens on every
        # interface at MASTER_PORT (the other node must reach it; a one-node run keeps it on
        # loopback: tests/test_train_ray.py).
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        before = snapshot["latest_checkpoint_result"]["metrics"]
        driver = listening_sockets([proc.pid])
        assert driver and {a for a, _ in driver} <= LOOPBACK, driver
        processes = [proc.pid, *descendants(proc.pid), *descendants(cluster["helper"].pid)]
        store = f"{int(before['rendezvous'].rsplit(':', 1)[1]):04X}"  # rank 0's MASTER_PORT
        addresses = listening_sockets(processes)
        assert addresses and {a for a, port in addresses if port != store} <= LOOPBACK, \
            addresses
        victim = next(n for n in cluster["nodes"]
                      if n["node_id"] == before["node_ids"].split(",")[1])  # rank 1's node
        # As a lost machine: its raylet and every process under it die at once, no goodbye.
        doomed = [victim["raylet_pid"], *descendants(victim["raylet_pid"])]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["epoch"].tolist() == [1, 2, 3]  # one row per epoch
    placed = [set(ids.split(",")) for ids in metrics["node_ids"]]
    assert placed[0] == set(before["node_ids"].split(","))
    assert victim["node_id"] not in placed[-1] and len(placed[-1]) == 2  # moved, still spread
    row = metrics.iloc[0].to_dict()
    assert {k: row[k] for k in before} == before  # epoch 1 kept, not trained again
    print(f"\nnode {victim['node_id'][:8]} killed in epoch 2; ranks moved from "
          f"{sorted(x[:8] for x in placed[0])} to {sorted(x[:8] for x in placed[-1])}")


def test_a_sweep_submitted_to_the_cluster_spreads_its_trials(cluster, shared_archive, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"schedule": "onecycle", "lr": {"grid": [0.05, 0.1]},
                                 "batch_size": 64}))
    # Without the working_dir: every node has the project installed (as cluster.yaml does), and
    # here the nodes share this machine's /tmp/ray, so a worker node's runtime-env agent would
    # delete the shipped copy under the job's feet once its own workers are done with it (the
    # working_dir itself is tested in tests/test_cluster.py, on one node).
    env_vars = json.loads(subprocess.run([sys.executable, "-m", "jobs.runtime_env"], cwd=ROOT,
                                         capture_output=True, text=True, check=True).stdout)
    runtime_env = json.dumps({"env_vars": env_vars["env_vars"]})
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", cluster["dashboard_url"], "--runtime-env-json",
         runtime_env, "--", "python", "-m", "jobs.tune", "--data", str(shared_archive),
         "--model", "tiny", "--samples", "1", "--epochs", "1", "--subset", "500", "--val-size",
         "200", "--cpus-per-worker", "2", "--max-concurrent", "2", "--space", str(space),
         "--gradcam-images", "2", "--storage", str(tmp_path), "--name", "spread"],
        cwd=ROOT, env=cluster["env"], capture_output=True, text=True, timeout=900)
    assert submit.returncode == 0, submit.stdout[-20000:] + submit.stderr[-3000:]
    exp = tmp_path / "spread"
    trials = pd.read_parquet(exp / "trials.parquet")
    assert trials["trial_id"].nunique() == 2
    assert trials["node_ids"].nunique() == 2  # the two trials (a node's 2 CPUs each) ran apart
    assert set(trials["trial_node_id"]) == {cluster["head_node_id"]}  # their own processes
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["ray_cluster"]["gcs_address"] == cluster["gcs_address"]
    # The head and the worker nodes still up (the node-loss test above kills one, and by now
    # Ray has long marked it dead: the sweep ran for minutes after).
    up = [n for n in cluster["nodes"] if pid_alive(n["raylet_pid"])]  # the worker nodes
    assert len(up) >= 2 and summary["ray_cluster"]["nodes"] == 1 + len(up)
    assert (exp / "best" / "model.pt2").stat().st_size > 10_000
    cams = np.load(exp / "gradcam" / "cams.npz")
    assert cams["cams"].shape == (2, 32, 32)


def test_a_node_lost_under_a_sweeps_trial_costs_the_epoch_in_flight(cluster, shared_archive,
                                                                     s3_server, tmp_path):
    """A sweep on S3 storage (every node reaches it), driven from this machine as a job joining
    the cluster: the raylet of the worker node under the running trial is SIGKILLed in its
    second epoch; the trial's workers restart on another node from its epoch-1 checkpoint and it
    finishes. Trials that fail for their own reasons (an impossible sampled mix, a diverging
    LR) are not run again."""
    from resnet.infra import storage
    space = tmp_path / "space.json"
    # 2 x 2 trials: LR 0.05 learns, 1e6 diverges; tta=false with tta_shift=1 is impossible.
    space.write_text(json.dumps({"schedule": "onecycle", "lr": {"grid": [0.05, 1e6]},
                                 "tta": {"grid": [True, False]}, "tta_shift": 1,
                                 "batch_size": 64, "ema": 0.0}))
    root = s3_location(s3_server, "multinode")
    exp = storage.join(root, "lost")
    runs = storage.join(exp, "train_runs")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.tune", "--data", str(shared_archive), "--model", "resnet20",
         "--samples", "1", "--epochs", "3", "--subset", "1000", "--val-size", "200",
         "--cpus-per-worker", "1", "--max-concurrent", "1", "--scheduler", "fifo",
         "--space", str(space), "--gradcam-images", "0", "--storage", root, "--name", "lost"],
        cwd=ROOT, env=cluster["job_env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)

    def learning_run() -> str | None:  # the trial that trains (epoch 1 reported, not diverged)
        for run in trial_runs(runs):
            data = storage.read_bytes(storage.join(run, "checkpoint_manager_snapshot.json"))
            metrics = json.loads(data)["latest_checkpoint_result"]["metrics"] if data else None
            if metrics and not metrics["diverged"]:
                return run
        return None

    try:
        wait_for(lambda: learning_run() is not None, proc, timeout=900)
        run = learning_run()
        snapshot = json.loads(storage.read_bytes(storage.join(run, "checkpoint_manager_snapshot.json")))
        before = snapshot["latest_checkpoint_result"]["metrics"]
        assert before["epoch"] == 1
        victim = next(n for n in cluster["nodes"] if n["node_id"] == before["node_ids"])
        doomed = [victim["raylet_pid"], *descendants(victim["raylet_pid"])]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, _ = proc.communicate(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-6000:]
    trials = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(exp, "trials.parquet"))))
    status = trials.drop_duplicates("trial_id").set_index("trial_id")["status"]
    assert sorted(status) == ["completed", "diverged", "failed", "failed"], status
    good = trials[trials["trial_id"] == before["trained_by"]].sort_values("epoch")
    assert good["epoch"].tolist() == [1, 2, 3]  # no epoch twice: only epoch 2 was in flight
    row = good.iloc[0].to_dict()
    assert {k: row[k] for k in ("loss", "val_acc", "epoch_s", "step")} == \
        {k: before[k] for k in ("loss", "val_acc", "epoch_s", "step")}  # kept, not retrained
    assert good.iloc[0]["node_ids"] == victim["node_id"]
    assert victim["node_id"] not in set(good.iloc[1:]["node_ids"])  # moved to another node
    # The trial's own process never moved: it runs on the head, with its Train controller.
    assert set(trials["trial_node_id"].dropna()) == {cluster["head_node_id"]}
    # Not run again: Tune counts one failure for each impossible trial and none for the others.
    from ray.tune import ExperimentAnalysis
    fs, path = storage.resolve(exp)
    failures = {t.trial_id: t.run_metadata.num_failures
                for t in ExperimentAnalysis(path, storage_filesystem=fs).trials}
    assert sorted(failures[t] for t in status.index) == [0, 0, 1, 1], failures
    assert {failures[t] for t in status[status == "failed"].index} == {1}
    print(f"\nsweep: node {victim['node_id'][:8]} killed in epoch 2 of trial "
          f"{good.iloc[0]['trial_id']}; epochs 2-3 ran on "
          f"{sorted({n[:8] for n in good.iloc[1:]['node_ids']})}")
