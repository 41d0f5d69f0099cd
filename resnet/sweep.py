"""The main job's engine (``jobs.tune``): the sweep's trials on Ray Tune, then the post-job step
(the winner's export, schedule, Grad-CAM and report)."""

from __future__ import annotations

import json
import time
from typing import Any

from resnet.infra import storage
from resnet.report.winner import finish, print_next_steps
from resnet.tracking.sweep_runs import SweepTracking
from resnet.tracking.tune_callback import MLflowTrials
from resnet.tune.results import print_table
from resnet.tune.runner import run_trials
from resnet.tune.settings import SWEEP_FILE, SweepConfig


def run_sweep(sweep: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep, then export and explain the winner; returns the summary."""
    started = time.time()
    tracking = None
    if sweep.mlflow:  # each trial a child run of the sweep's, as it runs
        def tracking(exp_dir: str, settings: dict) -> list:
            return [MLflowTrials(sweep.mlflow, exp_dir, settings, sweep.base.epochs)]
    run = run_trials(sweep, tracking)
    summary = finish(run)
    summary["ray_cluster"] = run.cluster
    summary["wall_s"] = round(time.time() - started, 1)
    storage.write_bytes(storage.join(run.exp_dir, "summary.json"),
                        json.dumps(summary, indent=2).encode())
    print_table(run.results, sweep.target)
    print_next_steps(run.exp_dir, summary)
    if sweep.mlflow:
        # What the trials reported live, completed from trials.parquet: epochs reported before
        # a driver was killed come back from checkpoints only (nothing logged twice).
        runs = SweepTracking(sweep.mlflow, run.exp_dir)
        settings = json.loads(storage.read_bytes(storage.join(run.exp_dir, SWEEP_FILE)))
        runs.upload(run.results.trials, settings)
        runs.finish(summary, sweep.mlflow_model_name)
        print(f"MLflow: {runs.tracker.link(runs.parent()) or sweep.mlflow} (the sweep's run, a "
              f"child run per trial; model {sweep.mlflow_model_name!r} registered)", flush=True)
    return summary
