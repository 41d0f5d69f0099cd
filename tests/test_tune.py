"""The Tune sweep: profiles (integration), and ``python -m jobs.tune`` end to end on real images."""

from __future__ import annotations

import io
import json
import shlex

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from resnet.train.checkpoint import inference_model, load_state
from resnet.infra import storage
from tests.conftest import files_under, run_job


@pytest.mark.ray
def test_cpu_profile_fills_only_what_was_not_given(ray_local):
    from resnet.tune.settings import make_sweep
    sweep = make_sweep({"model": "resnet20"}, {})
    assert sweep.profile == "cpu" and (sweep.samples, sweep.keras_trial) == (1, False)
    assert (sweep.base.epochs, sweep.base.subset, sweep.base.val_size) == (3, 4000, 2000)
    assert sweep.base.run_name == "tune-resnet20-cpu-seed0" and sweep.grace == 1
    given = make_sweep({"epochs": 10, "subset": 500}, {"samples": 2, "scheduler": "fifo"})
    assert (given.base.epochs, given.base.subset, given.samples, given.scheduler) == \
        (10, 500, 2, "fifo")
    assert given.grace == 2  # a fifth of the epochs


@pytest.mark.e2e
def test_sweep_finds_the_best_trial_and_explains_it(sweep, shared_archive):
    proc, exp = sweep["proc"], sweep["dir"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_parquet(exp / "trials.parquet")
    summary = json.loads((exp / "summary.json").read_text())
    # The Keras trial comes on top of the grid's three (Tune's points replace samples).
    assert trials["trial_id"].nunique() == 4 and "4 trial(s)" in proc.stdout
    assert trials.drop_duplicates("trial_id")["recipe"].value_counts().to_dict() == \
        {"search": 3, "keras": 1}
    assert not trials.duplicated(["trial_id", "epoch"]).any()
    assert {"config/lr", "config/schedule", "val_acc", "loss", "lr", "epoch"} <= set(trials.columns)
    # Where each epoch ran: one rank per trial, a Ray node of this machine's cluster.
    assert (trials["world_size"] == 1).all() and trials["node_ids"].str.len().gt(20).all()
    # --eval-variants: the fast recipe's trials (EMA off here) also report val_acc without TTA.
    searched = trials[(trials["recipe"] == "search") & (trials["status"] != "diverged")]
    for column in ("val_acc_plain", "val_acc_tta_only"):
        assert searched[column].between(0, 1).all()
    assert "val_acc_ema_only" not in trials

    # The huge LR diverged and stopped itself; ASHA stopped the LR that learns nothing after
    # its grace period of one epoch; the Keras trial (first, alone at its rung) ran to the end.
    status = trials.drop_duplicates("trial_id").set_index("config/lr")["status"]
    epochs = trials.groupby("config/lr")["epoch"].max()
    assert status[1e6] == "diverged"
    assert status[1e-6] == "early-stopped" and epochs[1e-6] == 1
    assert status[0.003] == "completed" and epochs[0.003] == 2  # the Keras recipe's LR
    assert status[0.05] == "completed"  # above the Keras trial at the rung, or alone there
    assert summary["trials"] == {"completed": int((status == "completed").sum()),
                                 "early-stopped": int((status == "early-stopped").sum()),
                                 "diverged": 1, "failed": 0}

    # The winner: no epoch of a trial that trained scored higher, and its checkpoint, the
    # exported model and summary.json describe the same weights.
    sane = trials[trials["status"] != "diverged"]
    assert summary["best_val_acc"] >= sane["val_acc"].max()
    state = load_state(summary["best_checkpoint"])
    assert state["epoch"] == summary["best_epoch"]
    assert state["history"][-1]["val_acc"] == summary["best_val_acc"]
    # Beside the best, the winner's last epoch (its final val_acc).
    last = trials[trials["trial_id"] == summary["best_trial"]].sort_values("epoch").iloc[-1]
    assert summary["best_trial_final_val_acc"] == last["val_acc"]
    assert summary["best_trial_last_epoch"] == last["epoch"]
    own = trials[(trials["trial_id"] == summary["best_trial"]) & (trials["val_acc"] >= 0.2)]
    assert summary["best_trial_first_epoch_at_target"] == (own["epoch"].min() if len(own) else None)
    from resnet.data import load_splits
    _, splits = load_splits(str(shared_archive), 500, 1000, 0)
    x = torch.tensor(splits.val_x[:16]).float() / 255
    exported = torch.export.load(exp / "best" / "model.pt2").module()
    with torch.no_grad():
        assert torch.allclose(exported(x), inference_model(state)(x), atol=1e-5)
    assert summary["test_acc"] is None  # the training split only: no test images

    # The target (0.2 here): reached, and first at the earliest epoch any trial passed it.
    hit = summary["first_at_target"]
    assert summary["target_reached"] is True and summary["target_acc"] == 0.2
    passed = sane[sane["val_acc"] >= 0.2]
    assert hit["epoch"] == passed["epoch"].min()
    assert ((passed["trial_id"] == hit["trial_id"]) & (passed["epoch"] == hit["epoch"])).any()

    # Grad-CAM: a readable grid, one PNG per image, CAMs that are neither flat nor all alike.
    grid = Image.open(io.BytesIO((exp / "gradcam" / "gradcam.png").read_bytes()))
    assert grid.format == "PNG" and grid.width >= 1000 and grid.height >= 300
    assert len(list((exp / "gradcam").glob("[0-9][0-9]_*.png"))) == 10
    cams = np.load(exp / "gradcam" / "cams.npz")
    assert cams["cams"].shape == (10, 32, 32) and sorted(cams["labels"]) == list(range(10))
    assert all(cam.std() > 0.01 for cam in cams["cams"])
    assert all(not np.allclose(cams["cams"][i], cams["cams"][j], atol=0.05)
               for i in range(10) for j in range(i + 1, 10))

    # The console: one line per epoch per trial without Ray's process prefix, none of Ray's
    # known noise, and it ends with the per-trial table, the target line, the winner's line
    # and what to look at.
    from resnet.infra.console import NOISE
    console = proc.stdout + proc.stderr
    assert not [line for line in console.splitlines() if any(p.search(line) for p in NOISE)]
    assert any(line.startswith(f"[{hit['trial_id']}] Epoch 2/2 - ") for line in console.splitlines())
    tail = proc.stdout.strip().splitlines()
    target_line = next(i for i, line in enumerate(tail) if line.startswith("target val_acc"))
    assert tail[target_line].startswith(f"target val_acc 0.20 reached by trial "
                                        f"{hit['trial_id']} at epoch {hit['epoch']}; best")
    assert any("diverged" in line for line in tail[target_line - 5:target_line])
    uri = sweep["uri"]  # what the jobs were told: a folder, or s3://... with its endpoint
    report, command = storage.join(uri, "analysis", "report.html"), shlex.join(
        ["python", "-m", "jobs.analyze", uri])
    passed = summary["best_trial_first_epoch_at_target"]
    assert tail[target_line + 1] == (
        f"winner {summary['best_trial']}: "
        + (f"passed 0.20 at epoch {passed}" if passed else "never passed 0.20")
        + f", val_acc {summary['best_trial_final_val_acc']:.4f} at its last epoch "
        f"({summary['best_trial_last_epoch']})")
    assert tail[target_line + 2] == f"report: {report} ({command} refreshes it)"
    assert (exp / "analysis" / "report.html").is_file()
    assert f"Grad-CAM: {storage.join(uri, 'gradcam', 'gradcam.png')}" in tail
    assert "of Ray's own logging were not shown here; Ray keeps all of it in" in proc.stderr


@pytest.mark.ray
def test_a_sweep_whose_val_acc_ties_exports_the_checkpoint_ray_kept(ray_local, shared_archive,
                                                                     tmp_path, capsys):
    """The reproduction of a tie: LR 1e-6 leaves val_acc at the same value every epoch; Ray
    Train keeps only the latest of the tied checkpoints, which must be the winner."""
    from jobs.tune import main
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"schedule": "onecycle", "lr": 1.0e-6, "batch_size": 64,
                                 "ema": 0.0, "tta": False}))
    code = main(["--data", str(shared_archive), "--space", str(space), "--samples", "1",
                 "--epochs", "3", "--subset", "200", "--val-size", "10", "--cpu", "--scheduler",
                 "fifo", "--gradcam-images", "2", "--storage", str(tmp_path), "--name", "tied"])
    assert code == 0, capsys.readouterr().err[-3000:]
    exp = tmp_path / "tied"
    trials = pd.read_parquet(exp / "trials.parquet")
    assert trials["epoch"].tolist() == [1, 2, 3] and trials["val_acc"].nunique() == 1
    summary = json.loads((exp / "summary.json").read_text())
    state = load_state(summary["best_checkpoint"])
    assert summary["best_epoch"] == state["epoch"] == 3
    exported = torch.export.load(exp / "best" / "model.pt2").module()
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(exported(x), inference_model(state)(x), atol=1e-5)
    assert len(summary["gradcam"]) == 4  # grid, 2 images, cams.npz


@pytest.mark.ray
def test_a_sweep_where_every_trial_diverges_exits_1_and_says_why(ray_local, shared_archive,
                                                                  tmp_path, capsys):
    from jobs.tune import main
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"schedule": "onecycle", "lr": 1.0e6, "batch_size": 64}))
    code = main(["--data", str(shared_archive), "--space", str(space), "--model", "tiny",
                 "--samples", "1", "--epochs", "2", "--subset", "200", "--val-size", "50",
                 "--cpu", "--scheduler", "fifo", "--storage", str(tmp_path), "--name", "nan"])
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "jobs.tune: error: every trial diverged (its loss became NaN or inf), so there is no "
        "model to export; search lower learning rates (--space)")
    trials = pd.read_parquet(tmp_path / "nan" / "trials.parquet")
    assert set(trials["status"]) == {"diverged"}
    # Stopped at its first epoch with a NaN or inf loss (which epoch that is depends on the recipe).
    assert trials["diverged"].tolist() == [False] * (len(trials) - 1) + [True]
    assert not (tmp_path / "nan" / "summary.json").exists()
    assert not (tmp_path / "nan" / "best").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("sweep", ["local"], indirect=True)
def test_resume_with_other_settings_or_nothing_to_resume_is_refused(sweep, capsys):
    from jobs.tune import main
    args = sweep["args"][1:]
    written = files_under(sweep["uri"])
    assert main([*args, "--epochs", "3", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: sweep 'sweep' was started with other settings: epochs 2 (now 3)" in err
    assert err.count("\n") == 1
    name = args.index("--name") + 1
    assert main([*args[:name], "elsewhere", *args[name + 1:], "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: there is no sweep 'elsewhere' in" in err and err.count("\n") == 1
    assert files_under(sweep["uri"]) == written


@pytest.mark.e2e
@pytest.mark.parametrize("sweep", ["local"], indirect=True)
def test_an_existing_sweep_is_not_touched_without_resume(sweep):
    # Resuming itself: tests/test_faults.py (the fixture's driver is killed, then resumed).
    written = files_under(sweep["uri"])
    again = run_job(*sweep["args"])
    assert again.returncode == 2 and "already exists" in again.stderr and "--resume" in again.stderr
    assert files_under(sweep["uri"]) == written  # sweep.json included


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
