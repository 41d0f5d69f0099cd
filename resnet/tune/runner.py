"""Ray Tune's part of the sweep: one ``TorchTrainer`` per trial (Train V2: a function trainable,
``resnet/tune/trial.py``), scheduled by ASHA, FIFO or PBT, resumable; the results as
``trials.parquet``. The winner's export, Grad-CAM and report come after, in ``resnet/report/``.

Under ``<storage>/<name>/``: Tune's experiment (trial folders, restorable), ``train_runs/<trial id>/``
(each trial's Ray Train run and checkpoints), ``sweep.json`` and ``trials.parquet``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Callable

import ray
from ray import tune

from resnet.config import TrainConfig
from resnet.data import Splits, load_splits
from resnet.errors import TrainingFailed, UsageError
from resnet.infra import storage
from resnet.infra.cluster import check_shared_storage, connect_ray, ray_cluster
from resnet.infra.provenance import provenance
from resnet.train.driver import check_batch_fits
from resnet.tune import trial_dirname
from resnet.tune.results import TRAIN_RUNS, SweepResults, collect_results, write_parquet
from resnet.tune.search import (check_search, fix_for_pbt, make_scheduler, make_searcher,
                                param_space, trials_planned)
from resnet.tune.settings import SWEEP_FILE, SweepConfig, plan_resources
from resnet.tune.space import keras_point, largest, load_space, read_space_file
from resnet.tune.trial import train_trial

# What each trial's own process reserves: it only drives its TorchTrainer (the Train workers
# reserve the CPUs and GPUs), so memory, not a CPU (which would leave a core idle per trial), on
# the head node, as Ray pins its own Train state actor: a trial's process and its Train
# controller (which Ray starts on the same node) never sit on a worker node that may be lost.
# Losing a worker node then costs a restart of the trial's workers from its latest checkpoint
# (Ray Train's FailureConfig), not the trial (Tune's FailureConfig stays at 0: a trial that
# fails for its own reasons is not run again).
TRIAL_DRIVER = {"CPU": 0, "memory": 256 * 2**20, "node:__internal_head__": 0.001}
UNFINISHED = ("running", "pending", "paused")  # trial statuses after an interrupted fit()


@dataclass
class SweepRun:
    """A sweep's trials, run to their end: what the post-job step needs."""

    sweep: SweepConfig  # as started (summary.json records it)
    base: TrainConfig  # sweep.base with the hardware the trials ran on
    splits: Splits
    results: SweepResults
    exp_dir: str
    cluster: dict[str, Any]


def run_trials(sweep: SweepConfig, callbacks: Callable[[str, dict], list] | None = None
               ) -> SweepRun:
    """Run (or resume) the sweep's trials with Ray Tune; write trials.parquet. ``callbacks``:
    Tune callbacks for the sweep's folder and settings (experiment tracking), made once when
    the sweep starts (Tune keeps them with the experiment for a resume). Raises when a trial is
    unfinished (interrupted) or no trial has a checkpoint to export."""
    base = sweep.base
    started = stored_space(sweep) if sweep.resume else None
    if started is not None:  # the space it ran with (its --space file may be gone by now)
        space = started
    else:
        space = load_space(sweep.space, base.optimizer, sweep.profile, base.num_workers,
                           base.model)
        check_search(sweep.scheduler, sweep.search, sweep.keras_trial, space,
                     read_space_file(sweep.space) if sweep.space else None)
    if sweep.scheduler == "pbt" and started is None:
        space, fixed = fix_for_pbt(space, base)
        if fixed:
            shown = ", ".join(f"{k} {v}" for k, v in fixed.items())
            print(f"PBT: {shown} fixed for the whole population (a clone takes its donor's "
                  "weights and optimizer state, so they cannot differ between trials); choose "
                  f"others with --space, e.g. {json.dumps({k: v for k, v in fixed.items()})}",
                  flush=True)
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
    trainable = tune.with_resources(trainable, TRIAL_DRIVER)
    settings = {"sweep": replace(sweep, base=base, resume=False).to_dict(), "space": space,
                "data_key": dataset.key, "provenance": provenance()}
    tuner = make_tuner(sweep, trainable, space, root, name, concurrent, exp_dir,
                       callbacks(exp_dir, settings) if callbacks else [])
    # The settings before any trial (jobs.analyze reads a running sweep with them, --resume
    # compares with them); a resumed sweep keeps the ones it started with. After make_tuner,
    # which refuses a clash of names.
    settings_file = storage.join(exp_dir, SWEEP_FILE)
    if not (sweep.resume and storage.exists(settings_file)):
        storage.write_bytes(settings_file, json.dumps(settings, default=str).encode())
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
    return SweepRun(sweep, base, splits, results, exp_dir, cluster)


def make_tuner(sweep: SweepConfig, trainable, space: dict[str, Any], root: str, name: str,
               concurrent: int, exp_dir: str, callbacks: list) -> tune.Tuner:
    """A new Tuner, or with --resume the restored one (finished trials are not run again)."""
    exists = tune.Tuner.can_restore(exp_dir)
    if exists and not sweep.resume:
        raise UsageError(f"sweep {name!r} already exists in {root}; pass --resume to continue it, "
                         "or another --name")
    if exists:
        try:
            return tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True,
                                      resume_errored=True)
        except (AttributeError, ModuleNotFoundError) as exc:
            # Tune pickles the functions it was given (trial_dirname) by their module path:
            # a sweep started before resnet/ moved into sub-packages names resnet.tune.* paths
            # that no longer exist.
            raise UsageError(f"--resume: sweep {name!r} was started by an older version of this "
                             f"project whose modules have moved (Tune cannot unpickle it: {exc}); "
                             "finish it with that version, or start a new sweep with another "
                             "--name (jobs.analyze and jobs.gradcam still read it)") from None
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
            # A trial's last epoch ends it before any scheduler sees the result: PBT would
            # otherwise exploit a trial after its last epoch, into a clone with nothing to train.
            stop={"epoch": sweep.base.epochs},
            # Tune adds its own loggers (CSV, JSON and TensorBoard event files per trial).
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=0),
            # Tune's copy of each trial's latest epoch (resnet/tune/trial.py); PBT clones from any
            # trial's latest, which may be older than the donor's newest by then: keep them all.
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=None if sweep.scheduler == "pbt" else 1)))


def stored_space(sweep: SweepConfig) -> dict[str, Any] | None:
    """The search space a sweep started with, from its sweep.json (None before it had one)."""
    exp_dir = storage.join(storage.absolute(sweep.base.storage), sweep.base.run_name)
    stored = storage.read_bytes(storage.join(exp_dir, SWEEP_FILE))
    return json.loads(stored).get("space") if stored else None


def check_same_data(exp_dir: str, data_key: str) -> None:
    """A resumed sweep trains on the data it started with (compared by content, not path)."""
    stored = storage.read_bytes(storage.join(exp_dir, SWEEP_FILE))
    started = json.loads(stored).get("data_key") if stored else None
    if started is not None and started != data_key:
        raise UsageError(f"--resume: the data is not the data sweep {exp_dir} started with "
                         f"(content key {data_key[:12]} now, {started[:12]} then); pass the same "
                         "--data, or another --name to start a new sweep")
