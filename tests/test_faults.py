"""Fault injection: killed workers and drivers, storage that goes away, Ctrl-C. Each test waits
on reported progress (Ray Train's checkpoint snapshot), never on a sleep of a guessed length, and
ends every process it started. docs/reliability.md has the outcome of each as a table row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pandas as pd
import pytest

from resnet.train.checkpoint import load_state
from resnet.config import make_config
from resnet.train.driver import train_driver_fn
from resnet.infra import storage
from tests.conftest import ROOT, descendants, files_under, reap, reported_epoch, wait_for


# Ray processes that may outlive a SIGKILLed driver (they are not fate-shared with it).
ORPHANS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "multiprocessing")


def in_background(fn) -> dict:
    """Run ``fn`` in a thread; returns a dict that gets ``error`` if it raised."""
    outcome: dict = {}

    def target() -> None:
        try:
            fn(outcome)
        except BaseException as exc:  # reported to the test, which asserts on it
            outcome["error"] = exc

    outcome["thread"] = threading.Thread(target=target, daemon=True)
    outcome["thread"].start()
    return outcome


@pytest.mark.ray
def test_a_killed_worker_restarts_from_the_latest_checkpoint(ray_local, shared_archive, tmp_path,
                                                             capsys):
    from ray.util.state import list_actors
    cluster = ray_local.get_runtime_context().gcs_address  # this session's Ray, not another one
    config = make_config(data=str(shared_archive), subset=1000, val_size=200, epochs=2,
                         batch_size=64, cpus_per_worker=1, storage=str(tmp_path), name="killed")
    assert config.max_failures == 1  # the default
    run_dir = tmp_path / "killed"

    def kill_the_worker_in_epoch_2(seen: dict) -> None:
        wait_for(lambda: reported_epoch(run_dir) >= 1, timeout=300)
        [worker] = list_actors(cluster, filters=[("class_name", "=", "RayTrainWorker"),
                                                 ("state", "=", "ALIVE")])
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        seen["epoch_1"] = snapshot["latest_checkpoint_result"]["metrics"]
        os.kill(worker.pid, signal.SIGKILL)
        seen["pid"], seen["actor_id"] = worker.pid, worker.actor_id

    killer = in_background(kill_the_worker_in_epoch_2)
    summary = train_driver_fn(config)
    killer["thread"].join()
    assert "error" not in killer, killer.get("error")
    assert killer["epoch_1"]["epoch"] == 1  # the kill landed in epoch 2, after epoch 1's checkpoint
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["epoch"].tolist() == [1, 2]  # one row per epoch
    # A restart happened: epoch 1 ran in the killed process, epoch 2 in a new one, and Ray
    # recorded the killed worker's death as a crash, not as an exit it asked for.
    assert metrics["pids"].tolist()[0] == str(killer["pid"]) != metrics["pids"].tolist()[1]
    [dead] = list_actors(cluster, filters=[("actor_id", "=", killer["actor_id"])], detail=True)
    assert dead.state == "DEAD" and "SYSTEM_ERROR" in str(dead.death_cause), dead.death_cause
    # Epoch 1 was not trained again: its row is the one reported before the kill.
    row = metrics.iloc[0].to_dict()
    assert {k: row[k] for k in killer["epoch_1"]} == killer["epoch_1"]
    with capsys.disabled():  # for the record
        print(f"\nkilled worker {killer['pid']} in epoch 2; epoch 2 ran in "
              f"{metrics['pids'].tolist()[1]}; the run took {summary['wall_s']}s")


@pytest.mark.ray
def test_storage_that_goes_away_fails_clearly_and_keeps_every_checkpoint(
        ray_local, shared_archive, tmp_path, capsys):
    from jobs.train import main
    argv = ["--data", str(shared_archive), "--subset", "1000", "--val-size", "200", "--epochs",
            "2", "--batch-size", "64", "--cpus-per-worker", "1", "--storage", str(tmp_path),
            "--name", "flaky"]
    run_dir, away = tmp_path / "flaky", tmp_path / "away"

    def take_the_storage_away(seen: dict) -> None:
        # Root ignores file modes, so the run folder is replaced by a file: every write under
        # it fails (ENOTDIR) as when a mount disappears; the folder itself survives, moved.
        wait_for(lambda: reported_epoch(run_dir) >= 1, timeout=300)
        seen["epoch_1"] = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text()
                                     )["latest_checkpoint_result"]["metrics"]
        os.rename(run_dir, away)
        run_dir.write_text("the storage is gone")
        seen["checkpoints"] = {p.relative_to(away): p.read_bytes() for p in away.rglob("checkpoint.pt")}

    saboteur = in_background(take_the_storage_away)
    assert main(argv) == 1
    saboteur["thread"].join()
    assert "error" not in saboteur, saboteur.get("error")
    last = capsys.readouterr().err.strip().splitlines()[-1]
    with capsys.disabled():
        print(f"\n{last}")  # the message, for the record
    assert last.startswith("jobs.train: error: training failed: ") and "is not writable" in last
    assert "run the same command to resume" in last
    assert "Traceback" not in last

    # Every checkpoint written before the trouble is still there, byte for byte, and loads.
    assert saboteur["checkpoints"]
    for path, data in saboteur["checkpoints"].items():
        assert (away / path).read_bytes() == data
        load_state(away / path)

    run_dir.unlink()  # the storage comes back; the same command resumes and completes the run
    os.rename(away, run_dir)
    assert main(argv) == 0
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["epoch"].tolist() == [1, 2]
    # Epoch 1 was not trained again: its row is the one reported before the storage went away.
    row = metrics.iloc[0].to_dict()
    assert {k: row[k] for k in saboteur["epoch_1"]} == saboteur["epoch_1"]


def interrupt(args: list[str], run_dirs, tmp_path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Start ``python -m args``, SIGINT it once ``run_dirs()`` has a checkpointed epoch."""
    with open(tmp_path / "out.log", "w+") as out, open(tmp_path / "err.log", "w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, text=True, stdout=out,
                                stderr=err)
        try:
            wait_for(lambda: any(reported_epoch(d) for d in run_dirs()), proc, timeout=300)
            processes = descendants(proc.pid)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=180)
        finally:
            proc.kill()
            proc.wait()
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
    return done, reap(processes)


def latest_checkpoint(run_dir):
    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    return run_dir / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]


@pytest.mark.e2e
def test_ctrl_c_stops_a_training_run_cleanly(shared_archive, tmp_path):
    run_dir = tmp_path / "runs" / "stopped"
    proc, leftovers = interrupt(
        ["jobs.train", "--data", str(shared_archive), "--model", "tiny", "--subset", "512",
         "--val-size", "200", "--epochs", "200", "--batch-size", "64", "--storage",
         str(tmp_path / "runs"), "--name", "stopped"], lambda: [run_dir], tmp_path)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "jobs.train: interrupted; run the same command again to resume from the latest checkpoint")
    state = load_state(latest_checkpoint(run_dir))  # intact
    assert 1 <= state["epoch"] < 200 and state["history"][-1]["epoch"] == state["epoch"]
    assert not (run_dir / "summary.json").exists()
    assert not leftovers


@pytest.mark.e2e
def test_ctrl_c_stops_a_sweep_cleanly(shared_archive, tmp_path):
    (tmp_path / "space.json").write_text(json.dumps({"schedule": "onecycle", "batch_size": 64}))
    runs = tmp_path / "sweeps" / "stopped" / "train_runs"
    proc, leftovers = interrupt(
        ["jobs.tune", "--data", str(shared_archive), "--model", "tiny", "--subset", "512",
         "--val-size", "200", "--epochs", "200", "--samples", "1", "--scheduler", "fifo",
         "--space", str(tmp_path / "space.json"), "--gradcam-images", "0",
         "--storage", str(tmp_path / "sweeps"), "--name", "stopped"],
        lambda: list(runs.glob("*")), tmp_path)
    assert proc.returncode == 130, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "jobs.tune: interrupted; run the same command with --resume to continue from the latest "
        "checkpoints")
    [run_dir] = list(runs.glob("*"))
    state = load_state(latest_checkpoint(run_dir))
    assert 1 <= state["epoch"] < 200
    assert not (runs.parent / "summary.json").exists()
    trials = pd.read_parquet(runs.parent / "trials.parquet")  # what ran so far, marked unfinished
    assert set(trials["status"]) <= {"running", "pending", "paused"}
    assert not leftovers


@pytest.mark.e2e
def test_a_killed_sweep_driver_resumes_without_retraining(sweep, capsys):
    killed, proc, exp = sweep["killed"], sweep["proc"], sweep["dir"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Ray's core (GCS, raylet, workers) shares the driver's fate; its agents and the
    # dashboard's helper processes may outlive it, and the fixture ends them.
    assert all(any(name in cmd for name in ORPHANS) for cmd in killed["leftover_processes"]), \
        killed["leftover_processes"]
    first = killed["first"]
    # The fault landed mid-trial: only the first trial had started, with epoch 1 checkpointed.
    assert killed["epochs"] == {first: 1}

    # From the files: the first trial's epoch 2 was trained after the kill, on top of the epoch
    # 1 checkpointed before it, which was not trained again (its metrics, timing included, are
    # the pre-kill ones in the latest checkpoint's history and in trials.parquet).
    run = exp / "train_runs" / first
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    latest = run / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    state = load_state(latest)
    assert state["epoch"] == 2 and latest.name == "epoch_0002"
    in_storage = files_under(storage.join(sweep["uri"], "train_runs", first))  # not the copy's
    assert in_storage["epoch_0002/checkpoint.pt"][1] > killed["time_ns"]
    before = killed["first_epoch_1"]
    assert {k: state["history"][0][k] for k in before if k in state["history"][0]} == \
        {k: v for k, v in before.items() if k in state["history"][0]}
    trials = pd.read_parquet(exp / "trials.parquet")
    row = trials[(trials["trial_id"] == first) & (trials["epoch"] == 1)].iloc[0]
    for key in ("epoch_s", "loss", "val_acc", "val_loss", "step"):
        assert row[key] == before[key], key
    # Checkpoints written before the kill are untouched (or deleted as no longer the best).
    for path, data in killed["checkpoints"].items():
        now = storage.read_bytes(path)
        assert now is None or now == data, path
    with capsys.disabled():  # for the record
        print(f"\n{sweep['storage']}: killed the sweep's driver in epoch 2 of trial {first} "
              "(epoch 1 checkpointed); "
              f"--resume trained epoch 2 from that checkpoint, epoch 1 was kept as it was")

    # One row per (trial, epoch), none lost: epochs reported before the crash come back from
    # the trials' checkpoints (Tune's logs of a restarted trial start again at the restart).
    assert not trials.duplicated(["trial_id", "epoch"]).any()
    for trial, rows in trials.groupby("trial_id"):
        assert rows["epoch"].tolist() == list(range(1, len(rows) + 1)), trial
    assert trials["trial_id"].nunique() == 4
    assert set(trials["status"]) <= {"completed", "early-stopped", "diverged"}
