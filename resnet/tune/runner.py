"""The sweep: Ray Tune runs one ``TorchTrainer`` per trial (Train V2: a function trainable with
``TuneReportCallback``), then the best trial's best checkpoint is exported and explained.

Under ``<storage>/<name>/``: Tune's experiment (trial folders, restorable), ``train_runs/<trial id>/``
(each trial's Ray Train run and checkpoints), ``trials.parquet``, ``summary.json``,
``best/model.pt2`` and ``gradcam/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import ray
from ray import tune

from resnet import storage
from resnet.checkpoint import load_state
from resnet.cluster import check_shared_storage, connect_ray, ray_cluster
from resnet.config import TrainConfig
from resnet.data import Splits, load_splits
from resnet.driver import check_batch_fits, export_best
from resnet.errors import TrainingFailed, UsageError
from resnet.gradcam import gradcam_task
from resnet.provenance import provenance
from resnet.replay import schedule_document
from resnet.results import (TRAIN_RUNS, SweepResults, collect_results, per_trial, print_table,
                            time_split, write_parquet)
from resnet.search import (check_search, make_scheduler, make_searcher, param_space,
                           trials_planned)
from resnet.space import keras_point, largest, load_space, read_space_file
from resnet.sweep import SWEEP_FILE, SweepConfig, plan_resources
from resnet.trial import train_trial

TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes reserved by each trial's driver process
UNFINISHED = ("running", "pending", "paused")  # trial statuses after an interrupted fit()


def run_sweep(sweep: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep, then export and explain the winner; returns the summary."""
    started = time.time()
    base = sweep.base
    space = load_space(sweep.space, base.optimizer, sweep.profile, base.num_workers,
                       base.model)
    check_search(sweep.scheduler, sweep.search, sweep.keras_trial, space,
                 read_space_file(sweep.space) if sweep.space else None)
    dataset, splits = load_splits(base.data, base.val_size, base.subset, base.seed)
    print(f"data: {dataset.source.path} ({dataset.source.kind}, "
          f"{'Parquet cache' if dataset.from_cache else 'decoded'} in {dataset.load_s:.1f}s); "
          f"split {splits.sizes()}", flush=True)
    check_batch_fits(base.replace(batch_size=largest(space, "batch_size", base.batch_size)), splits)
    embedded = connect_ray()
    cluster = ray_cluster(embedded)
    base, concurrent = plan_resources(base, sweep.max_concurrent)
    root = storage.absolute(base.storage)
    if not embedded:  # a cluster: every node must reach the storage
        check_shared_storage(root)
    name = base.run_name
    exp_dir = storage.join(root, name)
    if sweep.resume:
        check_same_data(exp_dir, dataset.key)
    how = {"asha": f"ASHA (grace period {sweep.grace} epochs)", "fifo": "FIFO",
           "pbt": f"PBT (perturbation every {sweep.interval} epochs)"}[sweep.scheduler]
    print(f"sweep {name}: {trials_planned(sweep.samples, space, sweep.keras_trial, sweep.search)} trial(s) x "
          f"{base.epochs} epochs of {base.model}, {base.num_workers} worker(s) x "
          f"{base.cpus_per_worker} CPU{f' + {base.gpus_per_worker:g} GPU' if base.use_gpu else ''}"
          f" per trial, up to {concurrent} at a time, {sweep.search} search, {how}; writing to "
          f"{exp_dir}", flush=True)

    trainable = tune.with_parameters(
        train_trial, base=base.to_dict(), data={"ref": ray.put(splits)},
        train_storage=storage.join(exp_dir, TRAIN_RUNS))
    # A trial's own process only drives its TorchTrainer: the Train workers reserve the CPUs
    # and GPUs. Ray needs a non-empty request, so the trial reserves memory, not a CPU (a CPU
    # here would leave one core idle per trial).
    trainable = tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    tuner = make_tuner(sweep, trainable, space, root, name, concurrent, exp_dir)
    # The settings before any trial (jobs.analyze reads a running sweep with them, --resume
    # compares with them); a resumed sweep keeps the ones it started with. After make_tuner,
    # which refuses a clash of names.
    settings = storage.join(exp_dir, SWEEP_FILE)
    if not (sweep.resume and storage.exists(settings)):
        storage.write_bytes(settings, json.dumps(
            {"sweep": replace(sweep, base=base, resume=False).to_dict(), "space": space,
             "data_key": dataset.key, "provenance": provenance()}, default=str).encode())
    tuner.fit()  # trial errors stay in the results; they do not raise here
    results = collect_results(exp_dir, base, sweep.target)
    write_parquet(storage.join(exp_dir, "trials.parquet"), results.trials,
                  {"sweep": sweep.to_dict(), "provenance": provenance()})
    unfinished = results.trials.loc[results.trials["status"].isin(UNFINISHED), "trial_id"]
    if len(unfinished):
        # Tune's SIGINT handler stops the trials, saves the experiment and returns from fit().
        raise KeyboardInterrupt(f"{unfinished.nunique()} trial(s) unfinished in {exp_dir}")
    if results.best is None:
        statuses = set(results.trials["status"])
        if statuses == {"diverged"}:
            raise TrainingFailed("every trial diverged (its loss became NaN or inf), so there is "
                                 "no model to export; search lower learning rates (--space)")
        raise TrainingFailed(f"no trial completed an epoch; see the trial errors in {exp_dir}")
    summary = finish(sweep, base, splits, results, exp_dir)
    summary["ray_cluster"] = cluster
    summary["wall_s"] = round(time.time() - started, 1)
    storage.write_bytes(storage.join(exp_dir, "summary.json"), json.dumps(summary, indent=2).encode())
    print_table(results, sweep.target)
    print_next_steps(exp_dir, summary)
    return summary


def print_next_steps(exp_dir: str, summary: dict[str, Any]) -> None:
    """The report (written now: it takes seconds), and where the winner's outputs are."""
    from resnet.analysis import open_experiment
    from resnet.report import write_analysis
    out = storage.join(exp_dir, "analysis")
    write_analysis(open_experiment(exp_dir), out)
    print(f"report: {storage.join(out, 'report.html')} (python -m jobs.analyze {exp_dir} "
          "refreshes it)", flush=True)
    print(f"best model: {summary['model_export']}; its schedule: {summary['schedule']}",
          flush=True)
    if summary["gradcam"]:
        print(f"Grad-CAM: {storage.join(exp_dir, 'gradcam', 'gradcam.png')}", flush=True)


def make_tuner(sweep: SweepConfig, trainable, space: dict[str, Any], root: str, name: str,
               concurrent: int, exp_dir: str) -> tune.Tuner:
    """A new Tuner, or with --resume the restored one (finished trials are not run again)."""
    exists = tune.Tuner.can_restore(exp_dir)
    if exists and not sweep.resume:
        raise UsageError(f"sweep {name!r} already exists in {root}; pass --resume to continue it, "
                         "or another --name")
    if exists:
        return tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True)
    if sweep.resume:  # stopped after sweep.json, before Tune saved anything: start it now
        print(f"sweep {name} had not started a trial; starting it", flush=True)
    scheduler = make_scheduler(sweep.scheduler, sweep.base.epochs, sweep.grace, sweep.interval,
                               space, sweep.base.seed)
    points = [keras_point(space, sweep.base)] if sweep.keras_trial else []
    searcher, num_samples = make_searcher(sweep.search, space, points, concurrent,
                                          sweep.base.seed, sweep.samples)
    return tune.Tuner(
        trainable, param_space=param_space(space, sweep.search),
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=scheduler,
                                    num_samples=num_samples, trial_dirname_creator=trial_dirname,
                                    search_alg=searcher),
        run_config=tune.RunConfig(
            name=name, storage_path=root, verbose=1,  # Tune's status table, now and then
            failure_config=tune.FailureConfig(max_failures=0),
            # Tune's copy of each trial's latest epoch (resnet/trial.py); PBT clones from any
            # trial's latest, which may be older than the donor's newest by then: keep them all.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=None if sweep.scheduler == "pbt" else 1)))


def check_same_data(exp_dir: str, data_key: str) -> None:
    """A resumed sweep trains on the data it started with (compared by content, not path)."""
    stored = storage.read_bytes(storage.join(exp_dir, SWEEP_FILE))
    started = json.loads(stored).get("data_key") if stored else None
    if started is not None and started != data_key:
        raise UsageError(f"--resume: the data is not the data sweep {exp_dir} started with "
                         f"(content key {data_key[:12]} now, {started[:12]} then); pass the same "
                         "--data, or another --name to start a new sweep")


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default name spells out every sampled value)."""
    return f"trial_{trial.trial_id}"


def finish(sweep: SweepConfig, base: TrainConfig, splits: Splits, results: SweepResults,
           exp_dir: str) -> dict[str, Any]:
    """Export the winner (and its test accuracy, once), render Grad-CAM, build the summary."""
    best = results.best
    checkpoint = ray.train.Checkpoint(best["checkpoint_path"])
    winner = results.configs[best["trial_id"]]
    final = export_best(checkpoint, winner, splits, exp_dir)
    # The winner's schedule as its weights ran it, epoch by epoch (with a PBT clone's donors).
    history = load_state(checkpoint)["history"]
    storage.write_bytes(storage.join(exp_dir, "best", "schedule.json"), json.dumps(
        schedule_document(winner, history, {"sweep": exp_dir, "trial_id": best["trial_id"],
                                            "checkpoint": best["checkpoint_path"]}),
        indent=2).encode())
    gradcam_files: list[str] = []
    if sweep.gradcam_images:
        # Held-out images: the test split when the source has one, else validation.
        x, y = (splits.test_x, splits.test_y) if splits.test_x is not None else (splits.val_x,
                                                                                 splits.val_y)
        title = f"{winner.model}, trial {best['trial_id']} epoch {best['epoch']}, " \
                f"val_acc {best['val_acc']:.4f}, {sweep.gradcam_method}"
        files = ray.get(gradcam_task.options(num_cpus=1, num_gpus=1 if base.use_gpu else 0)
                        .remote(checkpoint, x, y, sweep.gradcam_images, sweep.gradcam_method, title))
        for filename, data in files.items():
            storage.write_bytes(storage.join(exp_dir, "gradcam", filename), data)
        gradcam_files = sorted(files)
    counts = results.trials.drop_duplicates("trial_id")["status"].value_counts().to_dict()
    table = per_trial(results.trials, sweep.target, results.configs).set_index("trial")
    return {
        "sweep": exp_dir, "profile": sweep.profile,
        "best_trial": best["trial_id"], "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"], "best_checkpoint": best["checkpoint_path"],
        # The best trial's last epoch, beside its best: one that ends at its best is trusted.
        "best_trial_final_val_acc": float(table.loc[best["trial_id"], "final_val_acc"]),
        "best_config": winner.to_dict(),
        "target_acc": sweep.target, "target_reached": results.first_at_target is not None,
        "first_at_target": results.first_at_target,
        "first_epoch_at_target_per_trial": results.first_epoch_per_trial,
        "test_acc": final["test_acc"], "test_loss": final["test_loss"],
        "trials": {status: int(counts.get(status, 0))
                   for status in ("completed", "early-stopped", "diverged", "failed")},
        "time": time_split(table),
        "model_export": storage.join(exp_dir, "best", "model.pt2"),
        "schedule": storage.join(exp_dir, "best", "schedule.json"),
        "gradcam": [storage.join(exp_dir, "gradcam", f) for f in gradcam_files],
        "sweep_config": sweep.to_dict(), "provenance": provenance(),
    }
