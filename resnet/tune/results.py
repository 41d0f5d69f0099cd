"""A sweep's results as tables: one row per trial and epoch, read through Ray Tune's own
``ExperimentAnalysis`` (so a sweep that is still running reads too), the winner, the console table."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.tune import ExperimentAnalysis

from resnet.config import TrainConfig
from resnet.infra import storage
from resnet.train.checkpoint import CHECKPOINT_FILE
from resnet.tune.space import RECIPE_KEY, TUNABLE, trial_config

TRAIN_RUNS = "train_runs"  # <sweep>/train_runs/<trial id>/: each trial's Ray Train run
METRICS = ("epoch", "lr", "loss", "acc", "val_loss", "val_acc", "epoch_s", "samples_per_s",
           "step", "diverged", "world_size", "node_ids", "node_ips", "pids", "rendezvous", "gpu_mem_mb",
           "start_weights", "lr_peak", "momentum", "weight_decay", "trained_by", "cloned_from",
           "cloned_at_epoch", "checkpoint_path", "train_run", "trial_node_id", "time_total_s")
TABLE_KEYS = ("schedule", "lr", "batch_size", "weight_decay", "label_smoothing", "warmup_frac",
              "final_lr_ratio")


@dataclass
class SweepResults:
    """``trials``: one row per (trial, epoch) with ``trial_id``, ``status``, ``config/<key>`` and
    every metric; ``best``: the row with the highest val_acc of any trial that did not diverge."""

    trials: pd.DataFrame
    configs: dict[str, TrainConfig]  # by trial id
    best: dict[str, Any] | None
    first_epoch_per_trial: dict[str, int | None]
    first_at_target: dict[str, Any] | None


def diverged(rows: pd.DataFrame) -> pd.Series:
    """Per row: the epoch's loss was NaN or inf."""
    return rows["diverged"].astype("boolean").fillna(False).astype(bool)


def trial_status(tune_status: str, rows: pd.DataFrame, epochs: int) -> str:
    """completed, early-stopped (ASHA), diverged (NaN/inf loss at its last epoch), failed, or
    running/pending. Per row: a PBT trial that diverged and was then rescued by an exploit is
    judged by where it ended, not by the epoch that diverged."""
    if len(rows) and diverged(rows.sort_values("epoch", kind="stable")).iloc[-1]:
        return "diverged"
    if tune_status == "ERROR":
        return "failed"
    if tune_status == "TERMINATED":
        return "completed" if len(rows) and rows["epoch"].max() >= epochs else "early-stopped"
    return tune_status.lower()  # RUNNING, PENDING, PAUSED: the sweep is still going


def with_checkpointed_epochs(rows: pd.DataFrame, exp_dir: str, trial_id: str) -> pd.DataFrame:
    """Fill epochs missing from Tune's rows from the trial's Ray Train checkpoints.

    After a driver crash, ``--resume`` restarts a trial's Tune logs from the restart: the epochs
    reported before the crash live on only in the histories its runs' latest checkpoints carry:
    ``train_runs/<trial>`` and, under PBT, each clone's ``train_runs/<trial>-from-...`` (of a
    clone's history, the epochs this trial trained, not its donor's). Where two runs hold the same
    epoch, the later run's (as Tune's rows keep the last report).
    """
    reported = set(rows["epoch"].dropna().astype(int)) if len(rows) else set()
    if reported == set(range(1, max(reported, default=0) + 1)) and len(reported):
        return rows  # nothing missing (the usual case): no checkpoint is read
    recovered: dict[int, dict[str, Any]] = {}
    for name, run in trial_train_runs(exp_dir, trial_id):  # oldest first: later ones win
        for m in checkpointed_history(run):
            if m.get("trained_by") in (trial_id, None) and m["epoch"] not in reported:
                folder = storage.join(run, f"epoch_{m['epoch']:04d}")
                recovered[m["epoch"]] = {**m, "train_run": name,
                                         "checkpoint_path": folder if storage.exists(
                                             storage.join(folder, CHECKPOINT_FILE)) else None}
    if not recovered:
        return rows
    restored = pd.DataFrame([recovered[e] for e in sorted(recovered)]).reindex(columns=rows.columns)
    return pd.concat([restored, rows] if len(rows) else [restored], ignore_index=True)


def trial_train_runs(exp_dir: str, trial_id: str) -> list[tuple[str, str]]:
    """A trial's Ray Train runs (its own and its PBT clones'), (name, location), oldest first."""
    root = storage.join(exp_dir, TRAIN_RUNS)
    runs = [(n, storage.join(root, n)) for n in storage.listdir(root)
            if n == trial_id or n.startswith(f"{trial_id}-from-")]
    return sorted(runs, key=lambda run: storage.mtime_ns(
        storage.join(run[1], "checkpoint_manager_snapshot.json")) or 0)


def checkpointed_history(run: str) -> list[dict[str, Any]]:
    """The per-epoch metrics in a Ray Train run's latest checkpoint ([] when it has none)."""
    snapshot = storage.read_bytes(storage.join(run, "checkpoint_manager_snapshot.json"))
    latest = (json.loads(snapshot).get("latest_checkpoint_result") or {}) if snapshot else {}
    data = latest and storage.read_bytes(
        storage.join(run, latest["checkpoint_dir_name"], CHECKPOINT_FILE))
    if not data:
        return []
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["history"]


def located(exp_dir: str, recorded: Any) -> str | None:
    """Where a checkpoint recorded in a trial's rows is now: its place under this sweep's
    ``train_runs/``. The sweep may have been copied or moved since (a local folder, a bucket
    behind another endpoint), and rows written before 2026-12 hold local paths."""
    if not isinstance(recorded, str) or not recorded:
        return None
    _, sep, tail = storage.resolve(recorded)[1].rpartition(f"/{TRAIN_RUNS}/")
    return storage.join(exp_dir, TRAIN_RUNS, *tail.split("/")) if sep else recorded


def collect_results(exp_dir: str, base: TrainConfig, target: float) -> SweepResults:
    """Every trial of the experiment in ``exp_dir``, as rows, plus the winner."""
    analysis = ExperimentAnalysis(exp_dir)
    frames, configs = [], {}
    for trial in analysis.trials:
        rows = analysis.trial_dataframes.get(trial.trial_id)
        rows = pd.DataFrame(columns=list(METRICS)) if rows is None or rows.empty else rows
        variants = [c for c in rows.columns if c.startswith("val_acc_")]  # --eval-variants
        rows = rows.reindex(columns=[*METRICS, *variants]).copy()
        rows = with_checkpointed_epochs(rows, exp_dir, trial.trial_id)
        rows["checkpoint_path"] = [located(exp_dir, p) for p in rows["checkpoint_path"]]
        if "epoch" in rows and len(rows):  # a resumed trial may re-report an epoch: keep the last
            rows = rows.drop_duplicates("epoch", keep="last")
        config = configs[trial.trial_id] = trial_config(base, trial.config, check=False)
        status = trial_status(trial.status, rows, config.epochs)
        if rows.empty:  # a trial without a single epoch still gets its row
            rows = pd.DataFrame([{key: None for key in METRICS}])
        meta = {"trial_id": trial.trial_id, "status": status,
                RECIPE_KEY: trial.config.get(RECIPE_KEY, "search"),
                **{f"config/{k}": json.dumps(v) if isinstance(v, list) else v
                   for k, v in config.to_dict().items()}}
        frames.append(rows.assign(**meta))
    columns = ["trial_id", "status", RECIPE_KEY, *METRICS]
    trials = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    trials = trials[columns + [c for c in trials.columns if c not in columns]]
    trials["epoch"] = trials["epoch"].astype("Int64")
    # Restored experiments list their trials in another order: sort, so files compare equal.
    trials = trials.sort_values(["trial_id", "epoch"], kind="stable").reset_index(drop=True)
    return SweepResults(trials=trials, configs=configs, best=best_row(trials),
                        first_epoch_per_trial=first_epochs(trials, target),
                        first_at_target=first_at_target(trials, target))


def best_row(trials: pd.DataFrame) -> dict[str, Any] | None:
    """Max val_acc over every epoch that did not diverge, whose checkpoint exists.

    Ties go to the later epoch, as Ray Train's checkpoint manager keeps the latest of equally
    scored checkpoints and deletes the others, then to the lower trial id. A row whose
    checkpoint is gone anyway (deleted, lost with its storage) is passed over, never returned.
    """
    ok = trials[~diverged(trials) & trials["val_acc"].notna() & trials["checkpoint_path"].notna()]
    ok = ok[ok["val_acc"].map(lambda v: math.isfinite(float(v)))]
    if ok.empty:
        return None
    ranked = ok.sort_values(["val_acc", "epoch", "trial_id"], ascending=[False, False, True],
                            kind="stable")
    for _, row in ranked.iterrows():  # the first row's checkpoint exists unless Ray changes
        if storage.exists(storage.join(row["checkpoint_path"], CHECKPOINT_FILE)):
            return {key: _plain(row[key])
                    for key in ("trial_id", "epoch", "val_acc", "checkpoint_path")}
    return None


def first_epochs(trials: pd.DataFrame, target: float) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for trial_id, rows in trials.groupby("trial_id", sort=False):
        hit = rows[rows["val_acc"].astype(float) >= target]
        out[trial_id] = int(hit["epoch"].min()) if len(hit) else None
    return out


def first_at_target(trials: pd.DataFrame, target: float) -> dict[str, Any] | None:
    hits = [(epoch, trial) for trial, epoch in first_epochs(trials, target).items()
            if epoch is not None]
    if not hits:
        return None
    epoch, trial = min(hits)
    return {"trial_id": trial, "epoch": epoch}


def per_trial(trials: pd.DataFrame, target: float, configs: dict[str, TrainConfig] | None = None,
              metric: str = "val_acc") -> pd.DataFrame:
    """One row per trial: key hyperparameters, best ``metric`` (lowest for a loss), its epoch and
    the last epoch's value, first epoch at the val_acc target, wall time and CPU/GPU-seconds;
    best first."""
    lower = metric_mode(metric) == "min"
    rows = []
    first = first_epochs(trials, target)
    for trial_id, group in trials.groupby("trial_id", sort=False):
        scored = group[pd.to_numeric(group[metric], errors="coerce").notna() & ~diverged(group)] \
            if metric in group else group.iloc[:0]
        # The best value's last epoch: ties go to the later epoch, as for the winner.
        values = scored[metric].astype(float)[::-1] if len(scored) else None
        top = scored.loc[values.idxmin() if lower else values.idxmax()] if len(scored) else None
        head = group.iloc[0]
        wall = pd.to_numeric(group["time_total_s"], errors="coerce").max()
        wall = float(wall) if pd.notna(wall) else 0.0
        config = (configs or {}).get(trial_id)
        workers = config.num_workers if config else 1
        rows.append({
            "trial": trial_id, "status": head["status"],
            "recipe": head[RECIPE_KEY] if head[RECIPE_KEY] != "search" else head["config/schedule"],
            **{key: head[f"config/{key}"] for key in TABLE_KEYS if key != "schedule"},
            f"best_{metric}": float(top[metric]) if top is not None else math.nan,
            "best_epoch": int(top["epoch"]) if top is not None else None,
            # Beside the best: a trial that ends at its best is the one to trust (issue 17).
            f"final_{metric}": float(scored.sort_values("epoch", kind="stable")[metric].iloc[-1])
            if len(scored) else math.nan,
            "first_at_target": first[trial_id],
            "epochs": int(scored["epoch"].max()) if len(scored) else 0,
            "wall_s": round(wall, 1),
            # Of the wall time Tune measured, the epochs' own (training and evaluation); the rest
            # is the trial's start-up (Ray Train's workers, data to the device) and reporting.
            "train_s": round(train_seconds(group), 1),
            "startup_s": round(max(0.0, wall - train_seconds(group)), 1),
            # Reserved, not measured use: wall time x the trial's workers x their share.
            "cpu_s": round(wall * workers * ((config.cpus_per_worker or 1) if config else 1), 1),
            "gpu_s": round(wall * workers * config.gpus_per_worker, 1)
            if config and config.use_gpu else 0.0,
        })
    table = pd.DataFrame(rows)
    if not len(table):
        return table
    # The other keys the searched trials varied (a --space grid over cutout, say) get columns too.
    firsts = trials.drop_duplicates("trial_id").set_index("trial_id")
    searched = firsts[firsts[RECIPE_KEY] == "search"]  # the Keras trial differs in everything
    for key in TUNABLE:
        column = f"config/{key}"
        if key not in TABLE_KEYS and column in firsts and searched[column].nunique() > 1:
            table.insert(table.columns.get_loc(f"best_{metric}"), key,
                         firsts.loc[table["trial"], column].to_numpy())
    # Best first; a diverged trial never ranks above one that trained (it is never the winner).
    table = table.sort_values(f"best_{metric}", ascending=lower, na_position="last", kind="stable")
    return table.sort_values("status", key=lambda s: s == "diverged",
                             kind="stable").reset_index(drop=True)


def train_seconds(rows: pd.DataFrame) -> float:
    """Seconds of the epochs that Tune timed (rows with a time_total_s): training and evaluation."""
    if "epoch_s" not in rows or "time_total_s" not in rows:
        return 0.0
    timed = rows[pd.to_numeric(rows["time_total_s"], errors="coerce").notna()]
    return float(pd.to_numeric(timed["epoch_s"], errors="coerce").fillna(0).sum())


def time_split(table: pd.DataFrame) -> dict[str, float]:
    """The whole sweep's trial-seconds: in epochs, in start-up and reporting, and the share."""
    train, wall = float(table["train_s"].sum()), float(table["wall_s"].sum())
    return {"trial_s": round(wall, 1), "train_s": round(train, 1),
            "startup_s": round(max(0.0, wall - train), 1),
            "train_share": round(train / wall, 3) if wall else None}


def metric_mode(metric: str) -> str:
    """Losses are minimised, everything else (accuracies) maximised."""
    return "min" if metric.endswith("loss") else "max"


def print_table(results: SweepResults, target: float) -> None:
    table = per_trial(results.trials, target, results.configs)
    with pd.option_context("display.width", 200, "display.max_columns", 30,
                           "display.float_format", "{:.4g}".format):
        print(table.to_string(index=False), flush=True)
    hit = results.first_at_target
    best = results.best
    if hit:
        print(f"target val_acc {target:.2f} reached by trial {hit['trial_id']} at epoch "
              f"{hit['epoch']}; best {best['val_acc']:.4f} (trial {best['trial_id']}, epoch "
              f"{best['epoch']})", flush=True)
    elif best:
        print(f"target val_acc {target:.2f} not reached; best {best['val_acc']:.4f} "
              f"(trial {best['trial_id']}, epoch {best['epoch']})", flush=True)
    if best:  # the winner's own passage of the target and its last epoch, beside its best
        row = table.set_index("trial").loc[best["trial_id"]]
        passed = results.first_epoch_per_trial.get(best["trial_id"])
        print(f"winner {best['trial_id']}: "
              f"{f'passed {target:.2f} at epoch {passed}' if passed else f'never passed {target:.2f}'}"
              f", val_acc {row['final_val_acc']:.4f} at its last epoch ({row['epochs']})",
              flush=True)


def _plain(value: Any) -> Any:
    """numpy/pandas scalars to plain Python (for JSON)."""
    return value.item() if hasattr(value, "item") else value


def write_parquet(path: str, frame: pd.DataFrame, meta: dict[str, Any]) -> None:
    """The trial rows, with ``meta`` (sweep settings, provenance) in the file's metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({"resnet": json.dumps(meta, default=str)})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(path, buffer.getvalue())
