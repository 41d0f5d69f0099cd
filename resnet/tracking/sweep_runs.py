"""A sweep (or a training run) as MLflow runs: the shape every path writes the same way.

- the sweep: a parent run (tags ``resnet.kind=sweep`` and ``resnet.sweep=<its folder>``) with the
  sweep's settings and search space as params, provenance as tags, and at the end the winner
  (metrics and tags), ``summary.json``, ``trials.parquet``, ``analysis/report.html``, the Grad-CAM
  grid, ``best/model.pt2`` and ``best/schedule.json`` as artifacts, the model registered;
- each trial: a child run (``mlflow.parentRunId``, ``resnet.trial_id``) with its sampled values as
  params, every epoch's metrics at step = epoch, its status and PBT lineage as tags.

Runs are found again by those tags, so a resumed sweep continues its runs and an upload after the
fact (``jobs.analyze SWEEP --mlflow URI``) fills in only what is missing.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from resnet.infra import storage
from resnet.infra.provenance import provenance
from resnet.tracking.mlflow_runs import KIND_TAG, SWEEP_TAG, TRIAL_TAG, Tracker

# What a trial's epochs log: the metrics of a row, not Tune's bookkeeping.
EPOCH_METRICS = ("loss", "acc", "val_loss", "val_acc", "lr", "lr_peak", "momentum",
                 "weight_decay", "epoch_s", "samples_per_s", "step")
ARTIFACTS = ("summary.json", "trials.parquet", "analysis/report.html", "gradcam/gradcam.png",
             "best/model.pt2", "best/schedule.json")
MODEL_ARTIFACT = "best"  # the registered model's files: model.pt2 and schedule.json


def sweep_key(exp_dir: str) -> str:
    """The sweep's identity on the server: its folder inside its filesystem (an S3 endpoint's
    address may change between sessions, the bucket and key do not)."""
    return storage.resolve(exp_dir)[1]


def epoch_row(row: dict[str, Any]) -> dict[str, Any]:
    keep = {k: row.get(k) for k in EPOCH_METRICS if k in row}
    keep.update({k: v for k, v in row.items() if str(k).startswith("val_acc_")})
    return {"epoch": row.get("epoch"), **keep}


class SweepTracking:
    """The MLflow runs of one sweep."""

    def __init__(self, uri: str, exp_dir: str) -> None:
        self.tracker = Tracker(uri)
        self.exp_dir = exp_dir
        self.key = sweep_key(exp_dir)
        self.name = self.key.rstrip("/").rsplit("/", 1)[-1]
        self.parent_id: str | None = None
        self.trials: dict[str, str | None] = {}

    def parent(self, settings: dict[str, Any] | None = None) -> str | None:
        if self.parent_id is None:
            self.parent_id = self.tracker.run({KIND_TAG: "sweep", SWEEP_TAG: self.key},
                                              self.name)
            if settings is not None:
                self.tracker.params(self.parent_id, flat_settings(settings))
                prov = provenance()
                self.tracker.tags(self.parent_id, {
                    "resnet.git_revision": prov["git_revision"] or "unknown",
                    **{f"resnet.version.{k}": v for k, v in prov["versions"].items()}})
        return self.parent_id

    def trial(self, trial_id: str, params: dict[str, Any] | None = None) -> str | None:
        if trial_id not in self.trials:
            run = self.tracker.run({KIND_TAG: "trial", SWEEP_TAG: self.key,
                                    TRIAL_TAG: trial_id}, trial_id, parent=self.parent())
            self.trials[trial_id] = run
            if params:
                self.tracker.params(run, params)
        return self.trials[trial_id]

    def epochs(self, trial_id: str, rows: list[dict[str, Any]]) -> None:
        self.tracker.epochs(self.trial(trial_id), [epoch_row(r) for r in rows])

    def ended(self, trial_id: str, status: str, lineage: list[str]) -> None:
        run = self.trial(trial_id)
        self.tracker.tags(run, {"resnet.status": status,
                                **({"resnet.lineage": " ".join(lineage)} if lineage else {})})
        self.tracker.end(run, failed=status == "failed")

    def finish(self, summary: dict[str, Any], model_name: str) -> None:
        """The winner on the parent run, its files as artifacts, the model registered."""
        parent = self.parent()
        self.tracker.tags(parent, {"resnet.best_trial": summary["best_trial"],
                                   "resnet.target_reached": summary["target_reached"]})
        self.tracker.epochs(parent, [{"epoch": summary["best_epoch"],
                                      "best_val_acc": summary["best_val_acc"],
                                      "best_trial_final_val_acc":
                                          summary.get("best_trial_final_val_acc"),
                                      "test_acc": summary.get("test_acc")}])
        files = {name: data for name in ARTIFACTS
                 if (data := storage.read_bytes(storage.join(self.exp_dir, name))) is not None}
        self.tracker.artifacts(parent, files)
        version = self.tracker.register(parent, MODEL_ARTIFACT, model_name)
        if version is not None:
            self.tracker.tags(parent, {"resnet.registered_model": f"{model_name}/{version}"})
        self.tracker.end(parent)

    def upload(self, trials: pd.DataFrame, settings: dict[str, Any]) -> None:
        """A sweep's trial rows (trials.parquet) after the fact; only what is missing."""
        self.parent(settings)
        for trial_id, rows in trials.groupby("trial_id", sort=True):
            rows = rows.sort_values("epoch", kind="stable")
            first = rows.iloc[0]
            self.trial(str(trial_id), {k[len("config/"):]: v for k, v in first.items()
                                       if str(k).startswith("config/") and pd.notna(v)})
            self.epochs(str(trial_id), [r for r in rows.to_dict("records")
                                        if pd.notna(r.get("epoch"))])
            clones = rows[rows["cloned_from"].notna()] if "cloned_from" in rows else rows.iloc[:0]
            self.ended(str(trial_id), str(first["status"]),
                       [f"{r['cloned_from']}@{int(r['cloned_at_epoch'])}"
                        for _, r in clones.iterrows()])


def flat_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """sweep.json's settings as MLflow params: the sweep's keys, the base config's, the space."""
    sweep = dict(settings.get("sweep", {}))
    base = sweep.pop("base", {})
    return {**{f"sweep.{k}": v for k, v in sweep.items()},
            **{f"base.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
               for k, v in base.items() if k not in ("lr_by_epoch", "lr_by_step")},
            "space": json.dumps(settings.get("space", {}))}


def upload_sweep(uri: str, analysis: Any, model_name: str) -> str | None:
    """``jobs.analyze SWEEP --mlflow URI``: a sweep read by ``resnet/report/analysis.py`` into
    MLflow after the fact (a finished one with its winner and files); returns the run's link."""
    runs = SweepTracking(uri, analysis.exp_dir)
    runs.upload(analysis.results.trials, analysis.settings)
    summary = storage.read_bytes(storage.join(analysis.exp_dir, "summary.json"))
    if summary is not None:
        runs.finish(json.loads(summary), model_name)
    return runs.tracker.link(runs.parent())


def log_train_run(uri: str, summary: dict[str, Any], model_name: str) -> str | None:
    """A jobs.train run as one MLflow run: its config, every epoch, its files, its model."""
    run_dir = summary["run_dir"]
    tracker = Tracker(uri)
    run = tracker.run({KIND_TAG: "run", SWEEP_TAG: sweep_key(run_dir)}, summary["run"])
    config = {k: json.dumps(v) if isinstance(v, (list, dict)) else v
              for k, v in summary["config"].items() if k not in ("lr_by_epoch", "lr_by_step")}
    tracker.params(run, config)
    metrics = storage.read_bytes(storage.join(run_dir, "metrics.parquet"))
    if metrics is not None:
        import io
        rows = pd.read_parquet(io.BytesIO(metrics)).to_dict("records")
        tracker.epochs(run, [epoch_row(r) for r in rows])
    tracker.tags(run, {"resnet.status": summary["status"],
                       "resnet.git_revision": summary["provenance"]["git_revision"] or "unknown"})
    files = {name: data for name in ("summary.json", "metrics.parquet", "best/model.pt2")
             if (data := storage.read_bytes(storage.join(run_dir, name))) is not None}
    tracker.artifacts(run, files)
    tracker.register(run, MODEL_ARTIFACT, model_name)
    tracker.end(run)
    return tracker.link(run)
