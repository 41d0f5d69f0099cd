"""Fault injection: killed workers and drivers, storage that goes away, Ctrl-C. Each test waits
on reported progress (Ray Train's checkpoint snapshot), never on a sleep of a guessed length, and
ends every process it started. docs/reliability.md has the outcome of each as a table row."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pandas as pd
import pytest

from resnet.checkpoint import load_state
from resnet.config import make_config
from resnet.driver import train_driver_fn
from tests.conftest import ROOT, descendants, reap, reported_epoch, wait_for


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
        seen["checkpointed"] = snapshot["latest_checkpoint_result"]["metrics"]["epoch"]
        seen["epoch_1_s"] = snapshot["latest_checkpoint_result"]["metrics"]["epoch_s"]
        os.kill(worker.pid, signal.SIGKILL)
        seen["pid"] = worker.pid

    killer = in_background(kill_the_worker_in_epoch_2)
    summary = train_driver_fn(config)
    killer["thread"].join()
    with capsys.disabled():  # for the record
        print(f"\nkilled worker {killer.get('pid')} after epoch {killer.get('checkpointed')}; "
              f"the run took {summary['wall_s']}s")
    assert "error" not in killer, killer.get("error")
    assert killer["checkpointed"] == 1  # the kill landed in epoch 2, after epoch 1's checkpoint
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["epoch"].tolist() == [1, 2]  # one row per epoch
    assert metrics["epoch_s"][0] == killer["epoch_1_s"]  # epoch 1 as before the kill: not redone
    # The run finished on a new worker: the killed one stayed dead.
    dead = list_actors(cluster, filters=[("class_name", "=", "RayTrainWorker"),
                                         ("state", "=", "DEAD")], limit=1000)
    assert killer["pid"] in {actor.pid for actor in dead}


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
    resumed = capsys.readouterr()
    assert "Epoch 1/2" not in resumed.out + resumed.err


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
    assert "resuming sweep" in proc.stdout
    epochs = killed["epochs"]  # trial id -> epoch it had checkpointed when the driver died
    first, second = list(epochs)[:2]
    assert epochs[first] == 2 and epochs[second] >= 1  # one trial done, one under way

    log = proc.stdout + proc.stderr
    for trial, done in epochs.items():
        trained = [int(e) for e in re.findall(rf"\[{trial}\] Epoch (\d+)/2 ", log)]
        assert all(e > done for e in trained), (trial, done, trained)  # nothing trained twice
        if trained and done:
            assert f"[{trial}] Resuming from epoch {done} " in log
        with capsys.disabled():  # for the record: what each trial had, and trained afterwards
            print(f"\n{trial}: epoch {done} checkpointed when the driver died; trained after "
                  f"--resume: {trained}")
    for path, mtime in killed["checkpoints"].items():  # kept (or replaced by a better one)
        assert not path.exists() or path.stat().st_mtime_ns == mtime

    # One row per (trial, epoch), none lost: epochs reported before the crash come back from
    # the trials' checkpoints (Tune's logs of a restarted trial start again at the restart).
    trials = pd.read_parquet(exp / "trials.parquet")
    assert not trials.duplicated(["trial_id", "epoch"]).any()
    for trial, rows in trials.groupby("trial_id"):
        assert rows["epoch"].tolist() == list(range(1, len(rows) + 1)), trial
    assert trials["trial_id"].nunique() == 3
    assert set(trials["status"]) <= {"completed", "early-stopped", "diverged"}
