"""What happened in a sweep that ``jobs.tune`` wrote, finished or still running: per-trial tables,
plots, Parquet/CSV and a self-contained HTML report.

For notebooks: ``load_trials(path)`` (one row per trial and epoch) and ``best_trial(path)`` (the
winner's row), both pandas DataFrames. Trials are read through Ray Tune's ``ExperimentAnalysis``, so
a sweep that is still running reads too (its trials show as running or pending).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from ray import tune

from resnet.config import TARGET_ACC, TrainConfig
from resnet.errors import UsageError
from resnet.infra import storage
from resnet.tune.results import SweepResults, collect_results, per_trial, time_split
from resnet.tune.settings import SWEEP_FILE

UNFINISHED = ("running", "pending", "paused")


@dataclass
class Analysis:
    """A sweep's results plus what the report needs."""

    exp_dir: str
    settings: dict[str, Any]  # {"sweep": SweepConfig as a dict, "provenance": ...}
    results: SweepResults
    table: pd.DataFrame  # one row per trial, best first
    metric: str
    partial: bool  # some trial is unfinished, or the sweep has not written summary.json yet

    @property
    def winner(self) -> pd.Series | None:
        scored = self.table[self.table[f"best_{self.metric}"].notna()
                            & (self.table["status"] != "diverged")]
        return scored.iloc[0] if len(scored) else None


def open_experiment(path: str, metric: str = "val_acc") -> Analysis:
    """Read a sweep directory (local path or URI); bad input is a UsageError."""
    exp_dir = storage.absolute(path)
    if not tune.Tuner.can_restore(exp_dir):
        raise UsageError(f"{path} is not a Tune experiment (no experiment_state-*.json in it); "
                         "pass the folder jobs.tune wrote, <storage>/<name>")
    settings = read_settings(exp_dir)
    base = TrainConfig.from_dict(settings["sweep"]["base"])
    target = settings["sweep"].get("target", TARGET_ACC)
    results = collect_results(exp_dir, base, target)
    reported = results.trials.dropna(axis=1, how="all").columns
    if results.trials.empty or results.trials["epoch"].isna().all():
        raise UsageError(f"{path}: no trial has reported an epoch yet; wait for the first epoch, "
                         "or read the trial errors in that folder")
    if metric not in reported:
        known = sorted(c for c in reported if c.startswith(("val_", "loss", "acc")))
        raise UsageError(f"--metric {metric}: no trial reported it; reported: {', '.join(known)}")
    table = per_trial(results.trials, target, results.configs, metric)
    partial = bool(table["status"].isin(UNFINISHED).any()) or \
        storage.read_bytes(storage.join(exp_dir, "summary.json")) is None
    return Analysis(exp_dir, settings, results, table, metric, partial)


def read_settings(exp_dir: str) -> dict[str, Any]:
    """sweep.json; for sweeps written before it existed, trials.parquet's metadata."""
    data = storage.read_bytes(storage.join(exp_dir, SWEEP_FILE))
    if data is not None:
        return json.loads(data)
    parquet = storage.read_bytes(storage.join(exp_dir, "trials.parquet"))
    if parquet is not None:
        import pyarrow.parquet as pq
        meta = pq.read_schema(io.BytesIO(parquet)).metadata or {}
        if b"resnet" in meta:
            return json.loads(meta[b"resnet"])
    raise UsageError(f"{exp_dir} has no {SWEEP_FILE}: it is a Tune experiment, but not one "
                     "written by jobs.tune")


def load_trials(path: str) -> pd.DataFrame:
    """One row per (trial, epoch): trial_id, status, recipe, every metric, config/<key>."""
    return open_experiment(path).results.trials


def best_trial(path: str, metric: str = "val_acc") -> pd.DataFrame:
    """The per-trial table's best row (highest ``metric``, lowest for a loss), as a DataFrame."""
    return open_experiment(path, metric).table.head(1)


def print_analysis(analysis: Analysis, written: dict[str, Any], out: str,
                   top: int | None = None) -> None:
    """The console's account of ``jobs.analyze``: the per-trial table (best first, the best
    ``top``), where trial time went, whether the sweep is partial, and what was written."""
    table = analysis.table.head(top) if top else analysis.table
    with pd.option_context("display.width", 200, "display.max_columns", 30,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False))
    split = time_split(analysis.table)
    if split["train_share"] is not None:
        print(f"trial time: {split['trial_s']:.0f}s, of which {split['train_s']:.0f}s in epochs "
              f"({split['train_share']:.0%}) and {split['startup_s']:.0f}s in start-up and "
              "reporting")
    if analysis.partial:
        print("partial results: the sweep is still running (or was interrupted)")
    if "confusion.png" not in written["files"]:
        print(f"no confusion matrix: {written['notes']['confusion.png']}")
    print(f"wrote {', '.join(sorted(written['files']))} to {out}")


def winner_confusion(analysis: Analysis) -> tuple[bytes | None, str]:
    """The winner's confusion matrix on the held-out split (test when the source has one,
    else validation); (None, reason) when its checkpoint or data cannot be read."""
    import ray.train
    import torch

    from resnet.data import load_splits
    from resnet.train.checkpoint import inference_model, load_state

    best = analysis.results.best
    if best is None:
        return None, "no checkpoint of a trial that did not diverge"
    try:
        state = load_state(ray.train.Checkpoint(best["checkpoint_path"]))
        config = TrainConfig.from_dict(state["config"])
        _, splits = load_splits(config.data, config.val_size, config.subset, config.seed)
    except UsageError as exc:
        return None, str(exc)
    held_out = "test" if splits.test_x is not None else "validation"
    x, y = (splits.test_x, splits.test_y) if splits.test_x is not None else (splits.val_x,
                                                                             splits.val_y)
    model = inference_model(state)
    with torch.no_grad():  # N x 3 x 32 x 32 uint8 -> N predicted class ids, 1,000 at a time
        predicted = np.concatenate([
            model(torch.from_numpy(x[i:i + 1000]).float().div_(255)).argmax(1).numpy()
            for i in range(0, len(y), 1000)])
    classes = list(state.get("classes", splits.classes))
    matrix = np.zeros((len(classes), len(classes)), np.int64)
    np.add.at(matrix, (y.astype(np.int64), predicted), 1)
    accuracy = float(np.trace(matrix) / max(matrix.sum(), 1))
    title = (f"trial {best['trial_id']} epoch {best['epoch']}: {held_out} split, "
             f"{len(y)} images, accuracy {accuracy:.4f}")
    from resnet.report.plots import plot_confusion
    return plot_confusion(matrix, classes, title), title
