"""The Tune sweep: profiles (integration), and ``python -m jobs.tune`` end to end on real images."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from resnet.checkpoint import load_state
from tests.conftest import run_job


@pytest.mark.ray
def test_cpu_profile_fills_only_what_was_not_given(ray_local):
    from resnet.tune import make_sweep
    sweep = make_sweep({"model": "resnet20"}, {})
    assert sweep.profile == "cpu" and (sweep.samples, sweep.keras_trial) == (1, False)
    assert (sweep.base.epochs, sweep.base.subset, sweep.base.val_size) == (3, 4000, 2000)
    assert sweep.base.run_name == "tune-resnet20-cpu-seed0" and sweep.grace == 1
    given = make_sweep({"epochs": 10, "subset": 500}, {"samples": 2, "scheduler": "fifo"})
    assert (given.base.epochs, given.base.subset, given.samples, given.scheduler) == \
        (10, 500, 2, "fifo")
    assert given.grace == 2  # a fifth of the epochs


@pytest.mark.e2e
def test_sweep_finds_the_best_trial_and_explains_it(sweep):
    proc, exp = sweep["proc"], sweep["dir"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_parquet(exp / "trials.parquet")
    summary = json.loads((exp / "summary.json").read_text())
    # The Keras trial comes on top of the grid's two (Tune's points replace samples).
    assert trials["trial_id"].nunique() == 3 and "3 trial(s)" in proc.stdout
    assert trials.drop_duplicates("trial_id")["recipe"].value_counts().to_dict() == \
        {"search": 2, "keras": 1}
    assert not trials.duplicated(["trial_id", "epoch"]).any()
    assert {"config/lr", "config/schedule", "val_acc", "loss", "lr", "epoch"} <= set(trials.columns)
    # --eval-variants: the fast recipe's trials also report val_acc without EMA and TTA.
    searched = trials[(trials["recipe"] == "search") & (trials["status"] != "diverged")]
    for column in ("val_acc_plain", "val_acc_tta_only", "val_acc_ema_only"):
        assert searched[column].between(0, 1).all()

    # The huge LR diverged and stopped itself; the others ran.
    status = trials.drop_duplicates("trial_id").set_index("config/lr")["status"]
    assert status[1e6] == "diverged"
    assert set(status[[0.1, 0.003]]) <= {"completed", "early-stopped"} and "completed" in set(status)
    assert summary["trials"]["diverged"] == 1

    # The winner is the highest val_acc in trials.parquet, and its checkpoint is that epoch's.
    sane = trials[trials["status"] != "diverged"]
    top = sane.loc[sane["val_acc"].idxmax()]
    assert (summary["best_trial"], summary["best_epoch"]) == (top["trial_id"], top["epoch"])
    assert summary["best_val_acc"] == top["val_acc"] == sane["val_acc"].max()
    assert summary["best_checkpoint"] == top["checkpoint_path"]
    state = load_state(summary["best_checkpoint"])
    assert state["history"][-1]["val_acc"] == top["val_acc"] and state["epoch"] == top["epoch"]
    assert summary["target_reached"] is False and summary["test_acc"] is None
    assert (exp / "best" / "model.pt2").stat().st_size > 100_000

    # Grad-CAM: a readable grid, one PNG per image, CAMs that are neither flat nor all alike.
    grid = Image.open(io.BytesIO((exp / "gradcam" / "gradcam.png").read_bytes()))
    assert grid.format == "PNG" and grid.width >= 1000 and grid.height >= 300
    assert len(list((exp / "gradcam").glob("[0-9][0-9]_*.png"))) == 10
    cams = np.load(exp / "gradcam" / "cams.npz")
    assert cams["cams"].shape == (10, 32, 32) and sorted(cams["labels"]) == list(range(10))
    assert all(cam.std() > 0.01 for cam in cams["cams"])
    assert all(not np.allclose(cams["cams"][i], cams["cams"][j], atol=0.05)
               for i in range(10) for j in range(i + 1, 10))

    # The console ends with the per-trial table and the target line.
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("target val_acc 0.88 not reached; best")
    assert any("diverged" in line for line in tail[-5:])


@pytest.mark.e2e
def test_an_existing_sweep_is_not_touched_without_resume(sweep):
    # Resuming itself: tests/test_faults.py (the fixture's driver is killed, then resumed).
    exp = sweep["dir"]
    written = {p: p.stat().st_mtime_ns for p in exp.rglob("*") if p.is_file()}
    again = run_job(*sweep["args"])
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in written} == written  # sweep.json included


@pytest.mark.e2e
def test_gradcam_job_on_the_winner(sweep, shared_archive, tmp_path):
    summary = json.loads((sweep["dir"] / "summary.json").read_text())
    proc = run_job("jobs.gradcam", "--checkpoint", summary["best_checkpoint"], "--data",
                   str(shared_archive), "--images", "3", "--out", str(tmp_path / "cam"),
                   "--method", "gradcam++")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cam").iterdir()) == \
        ["00_airplane.png", "01_automobile.png", "02_bird.png", "cams.npz", "gradcam.png"]

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    proc = run_job("jobs.gradcam", "--checkpoint", str(bad), "--data", str(shared_archive),
                   "--out", str(tmp_path / "none"))
    assert proc.returncode == 2 and "corrupt or not a checkpoint" in proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "none").exists()
