"""Experiment tracking (issue 33): the session's sweep (killed and resumed) in a real MLflow server
with a SQLite store, read back through ``MlflowClient``; TensorBoard event files read back with
TensorBoard's own reader; a server that is down or refuses costs the training nothing; an upload
after the fact; MLflow missing; the sweep in MLflow's UI, in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from resnet.tracking.sweep_runs import sweep_key
from tests.conftest import ROOT, run_job

pytestmark = pytest.mark.e2e


def runs_of(uri: str, exp_dir: str, experiment: str = "resnet-cifar10"):
    """(parent run, child runs) of a sweep in the server."""
    from mlflow import MlflowClient
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    everything = client.search_runs([found.experiment_id],
                                    f"tags.`resnet.sweep` = '{sweep_key(exp_dir)}'")
    parents = [r for r in everything if r.data.tags.get("resnet.kind") == "sweep"]
    children = [r for r in everything if r.data.tags.get("resnet.kind") == "trial"]
    assert len(parents) == 1, [r.info.run_name for r in parents]  # never made twice
    return client, parents[0], children


def test_the_sweep_is_in_mlflow_run_by_run_and_epoch_by_epoch(sweep, shared_archive, tmp_path):
    client, parent, children = runs_of(sweep["mlflow"], sweep["uri"])
    trials = pd.read_parquet(sweep["dir"] / "trials.parquet")
    summary = json.loads((sweep["dir"] / "summary.json").read_text())
    # One child per trial, after the kill and the resume too; each under the sweep's run.
    assert sorted(r.data.tags["resnet.trial_id"] for r in children) == \
        sorted(trials["trial_id"].unique())
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    status = trials.drop_duplicates("trial_id").set_index("trial_id")["status"]
    for run in children:
        trial = run.data.tags["resnet.trial_id"]
        rows = trials[trials["trial_id"] == trial]
        assert run.data.tags["resnet.status"] == status[trial]
        assert run.data.params["lr"] == str(rows["config/lr"].iloc[0])  # its sampled value
        history = client.get_metric_history(run.info.run_id, "val_acc")
        # As many points as epochs, step = epoch, none twice (the killed trial's epoch 1 was
        # logged before the kill, epoch 2 after the resume).
        assert sorted(int(m.step) for m in history) == sorted(rows["epoch"].dropna().astype(int))
        by_epoch = rows.set_index("epoch")["val_acc"]
        assert all(m.value == pytest.approx(by_epoch[m.step]) for m in history)
    # The sweep's run: its settings, the winner, the files, the model registered.
    assert parent.data.params["sweep.scheduler"] == "asha" and "space" in parent.data.params
    assert parent.data.tags["resnet.best_trial"] == summary["best_trial"]
    assert parent.data.metrics["best_val_acc"] == pytest.approx(summary["best_val_acc"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for folder in ("analysis", "best", "gradcam")
        for a in client.list_artifacts(parent.info.run_id, folder)}
    assert {"summary.json", "trials.parquet", "analysis/report.html", "gradcam/gradcam.png",
            "best/model.pt2", "best/schedule.json"} <= artifacts
    name = f"sweep-{sweep['storage']}"
    [version] = client.search_model_versions(f"name='{name}'")
    import mlflow.artifacts
    source = client.get_model_version_download_uri(name, version.version)  # from the registry
    folder = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path),
                                                 tracking_uri=sweep["mlflow"])
    model = torch.export.load(os.path.join(folder, "model.pt2")).module()
    from resnet.data import load_splits
    _, splits = load_splits(str(shared_archive), 500, 1000, 0)
    with torch.no_grad():
        predicted = model(torch.tensor(splits.val_x).float() / 255).argmax(1).numpy()
    assert (predicted == splits.val_y).mean() == pytest.approx(summary["best_val_acc"], abs=1e-9)
    # The console said where to look.
    assert f"MLflow: {sweep['mlflow']}/#/experiments/" in sweep["proc"].stdout
    assert "TensorBoard: tensorboard --logdir " in sweep["proc"].stdout


@pytest.mark.parametrize("sweep", ["local"], indirect=True)
def test_tensorboard_shows_each_trials_epochs_side_by_side(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    trials = pd.read_parquet(sweep["dir"] / "trials.parquet")
    seen = {}
    for folder in sorted(sweep["dir"].glob("trial_*")):
        events = EventAccumulator(str(folder))
        events.Reload()
        if "ray/tune/val_acc" in events.Tags()["scalars"]:
            seen[folder.name[len("trial_"):]] = [(e.step, e.value) for e in
                                                 events.Scalars("ray/tune/val_acc")]
    assert set(seen) == set(trials["trial_id"])
    for trial, points in seen.items():  # stepped by epoch: a resumed trial goes on, not back
        rows = trials[trials["trial_id"] == trial].set_index("epoch")["val_acc"]
        assert {step for step, _ in points} <= set(rows.index)
        assert all(value == pytest.approx(rows[step]) for step, value in points)


@pytest.mark.parametrize("sweep", ["local"], indirect=True)
def test_a_sweep_uploads_after_the_fact_once(sweep, mlflow_server):
    """jobs.analyze SWEEP --mlflow URI into a fresh experiment; run again, nothing doubles."""
    env = {"MLFLOW_EXPERIMENT_NAME": "uploaded"}
    for _ in range(2):
        proc = run_job("jobs.analyze", str(sweep["dir"]), "--out", str(sweep["dir"] / "up"),
                       "--mlflow", mlflow_server, "--mlflow-model-name", "uploaded", env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "mlflow:" not in proc.stderr
    client, parent, children = runs_of(mlflow_server, str(sweep["dir"]), "uploaded")
    trials = pd.read_parquet(sweep["dir"] / "trials.parquet")
    assert len(children) == trials["trial_id"].nunique()
    for run in children:
        rows = trials[trials["trial_id"] == run.data.tags["resnet.trial_id"]]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert sorted(steps) == sorted(rows["epoch"].dropna().astype(int))
    assert len(client.search_model_versions("name='uploaded'")) == 2  # a version per upload


def test_a_tracking_server_that_is_down_or_refuses_costs_the_training_nothing(
        shared_archive, tmp_path, s3_server):
    from resnet.infra.cluster import free_port
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    refusing = s3_server.split("endpoint_override=")[1].split("&")[0]  # an HTTP server, not MLflow
    for name, uri in (("down", down), ("refusing", refusing)):
        proc = run_job("jobs.train", "--data", str(shared_archive), "--model", "tiny",
                       "--subset", "300", "--val-size", "100", "--epochs", "1", "--batch-size",
                       "32", "--cpu", "--storage", str(tmp_path), "--name", name,
                       "--mlflow", uri)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (tmp_path / name / "summary.json").is_file()
        assert (tmp_path / name / "best" / "model.pt2").is_file()
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("mlflow: ")]
        assert warnings and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert all("training goes on" in line for line in warnings)


def test_without_mlflow_installed_the_flag_says_how_to_install_it(tmp_path, shared_archive):
    code = ("import sys; sys.modules['mlflow'] = None\n"  # as if it were not installed
            "from jobs.tune import main\n"
            f"sys.exit(main(['--data', {str(shared_archive)!r}, '--storage', {str(tmp_path)!r},"
            " '--mlflow', 'http://127.0.0.1:1']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("jobs.tune: error: --mlflow needs MLflow, an optional extra: "
                                   "pip install -e '.[mlflow]' (or pip install mlflow)")


@pytest.mark.parametrize("sweep", ["local"], indirect=True)
def test_a_screenshot_of_the_sweep_in_mlflows_ui(sweep, tmp_path):
    """Headless Chromium on the sweep's run page. With RESNET_DOCS_SCREENSHOT=1 it also
    replaces docs/mlflow.png, the picture docs/outputs.md shows."""
    from PIL import Image
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.fail("chromium is not installed (make test installs Debian's chromium package)")
    _, parent, _ = runs_of(sweep["mlflow"], sweep["uri"])
    page = (f"{sweep['mlflow']}/#/experiments/{parent.info.experiment_id}/runs/"
            f"{parent.info.run_id}/child-runs")
    shot = tmp_path / "mlflow.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars",
         "--window-size=1400,900", "--virtual-time-budget=20000", f"--screenshot={shot}", page],
        capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert pixels.std() > 10 and len(np.unique(pixels, axis=0)) > 100  # a rendered page
    if os.environ.get("RESNET_DOCS_SCREENSHOT"):
        shutil.copy(shot, ROOT / "docs" / "mlflow.png")
