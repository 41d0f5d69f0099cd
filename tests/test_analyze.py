"""``python -m jobs.analyze`` on the session's real sweep: the table, the files, the report in a real
browser, a sweep read while it was running, and bad input."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import run_job

pytestmark = pytest.mark.e2e
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def analysed(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    proc = run_job("jobs.analyze", sweep["uri"], "--out", str(out))  # from the bucket for S3
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"proc": proc, "out": out,
            "summary": json.loads((sweep["dir"] / "summary.json").read_text())}


def test_table_puts_the_sweeps_winner_first(analysed, sweep):
    lines = analysed["proc"].stdout.splitlines()
    header, first = lines[0].split(), lines[1].split()
    assert header[:3] == ["trial", "status", "recipe"]
    assert {"best_val_acc", "best_epoch", "final_val_acc", "first_at_target", "wall_s", "cpu_s",
            "gpu_s"} <= set(header)
    assert first[0] == analysed["summary"]["best_trial"]
    assert len(lines) >= 4 and "partial" not in analysed["proc"].stdout

    from resnet.report.analysis import best_trial, load_trials, open_experiment
    best = best_trial(str(sweep["dir"]))
    assert best.iloc[0]["trial"] == analysed["summary"]["best_trial"]
    assert best.iloc[0]["best_val_acc"] == analysed["summary"]["best_val_acc"]
    assert best.iloc[0]["best_epoch"] == analysed["summary"]["best_epoch"]
    trials = load_trials(str(sweep["dir"]))
    assert trials["trial_id"].nunique() == 4 and (trials["val_acc"].dropna() <= 1).all()

    # Time and reserved resources per trial: the wall time Tune measured holds the epochs it
    # timed (the killed trial's epoch 1 ran before the restart Tune timed from) and fits in the
    # sweep's; the trial reserved 1 worker x 2 CPUs for that long, and no GPU.
    table = open_experiment(str(sweep["dir"])).table.set_index("trial")
    for trial, row in table.iterrows():
        timed = trials[(trials["trial_id"] == trial) & trials["time_total_s"].notna()]
        assert timed["epoch_s"].sum() <= row["wall_s"] <= analysed["summary"]["wall_s"], trial
        assert row["cpu_s"] == pytest.approx(2 * row["wall_s"], abs=0.15)  # both rounded
        assert row["gpu_s"] == 0.0
        # Its seconds split into the epochs it trained (as the epoch rows time them) and the rest.
        assert row["train_s"] == pytest.approx(timed["epoch_s"].sum(), abs=0.06)
        assert row["train_s"] + row["startup_s"] == pytest.approx(row["wall_s"], abs=0.15)
    split = analysed["summary"]["time"]
    assert split["train_s"] == pytest.approx(table["train_s"].sum(), abs=0.5)
    assert 0 < split["train_share"] < 1 and "trial time:" in analysed["proc"].stdout


def test_plots_and_tables_are_real_files(analysed, sweep):
    out = analysed["out"]
    for name in ("curves.png", "lr.png", "confusion.png"):
        image = Image.open(out / name)
        assert image.format == "PNG" and image.width >= 500 and image.height >= 350, name
        pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 10, f"{name} looks blank"
    written = pd.read_parquet(out / "trials.parquet")
    original = pd.read_parquet(sweep["dir"] / "trials.parquet")
    assert written[["trial_id", "epoch", "val_acc"]].equals(original[["trial_id", "epoch", "val_acc"]])
    assert len(pd.read_csv(out / "trials.csv")) == len(written)


def test_report_embeds_every_image(analysed):
    page = (analysed["out"] / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4  # curves, lr, confusion, Grad-CAM
    assert all(base64.b64decode(data).startswith(PNG) for data in images)
    assert not re.search(r"(src|href)=['\"]?(https?:|file:|//)", page)  # nothing fetched
    assert analysed["summary"]["best_trial"] in page and "Winner's config" in page


def test_report_renders_in_headless_chromium(analysed, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        message = "chromium is not installed (make test installs Debian's chromium package)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1800",
         f"--screenshot={shot}", (analysed["out"] / "report.html").as_uri()],
        capture_output=True, text=True, timeout=180)
    assert shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert pixels.std() > 10 and len(np.unique(pixels, axis=0)) > 100  # text, tables and plots


def test_a_running_sweep_reads_as_partial(sweep):
    proc = sweep["partial"]
    assert proc is not None, "the sweep finished before its first epoch was seen"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "partial results" in proc.stdout
    trials = pd.read_parquet(sweep["partial_dir"] / "trials.parquet")
    final = pd.read_parquet(sweep["dir"] / "trials.parquet")
    assert 1 <= trials["val_acc"].notna().sum() < final["val_acc"].notna().sum()
    assert "Partial results" in (sweep["partial_dir"] / "report.html").read_text()


@pytest.mark.parametrize("sweep", ["local"], indirect=True)
def test_bad_input_is_one_line_and_exit_2(sweep, tmp_path, ray_local):
    from ray import tune
    (tmp_path / "plain").mkdir()
    # A real Tune experiment whose only trial never reports, with the sweep's settings beside it.
    tune.Tuner(lambda config: None, run_config=tune.RunConfig(
        storage_path=str(tmp_path), name="empty", verbose=0)).fit()
    shutil.copy(sweep["dir"] / "sweep.json", tmp_path / "empty" / "sweep.json")
    cases = [
        ((str(tmp_path / "missing"),), "is not a Tune experiment"),
        ((str(tmp_path / "plain"),), "is not a Tune experiment"),
        ((str(tmp_path / "empty"),), "no trial has reported an epoch yet"),
        ((str(sweep["dir"]), "--metric", "val_f1"), "--metric val_f1: no trial reported it"),
        ((str(sweep["dir"]), "--top", "0"), "--top must be at least 1"),
    ]
    for args, message in cases:
        proc = run_job("jobs.analyze", *args, "--out", str(tmp_path / "out"))
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
