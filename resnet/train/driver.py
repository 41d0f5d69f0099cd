"""The driver of one training run: Ray, the ``TorchTrainer``, and the run's outputs.

Under ``<storage>/<name>/`` it leaves Ray Train's run directory (checkpoints), ``metrics.parquet``
(one row per epoch), ``summary.json`` (config, results, provenance) and ``best/model.pt2``.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from resnet.config import TARGET_ACC, TrainConfig
from resnet.data import Dataset, Splits, check_split_sizes, make_splits, open_dataset
from resnet.errors import TrainingFailed, UsageError
from resnet.infra import storage, timing
from resnet.infra.cluster import (check_shared_storage, connect_ray, ray_cluster, resolve_hardware)
from resnet.infra.provenance import provenance
from resnet.models import trainable_param_count
from resnet.train.checkpoint import export_model, inference_model, load_state
from resnet.train.loop import EVAL_PRECISION, evaluate, train_precision
from resnet.train.rendezvous import LoopbackTorchConfig
from resnet.train.worker import train_fn_per_worker

# Keys that may change between a run and its resumption: where and on what it runs. Not
# num_workers: BatchNorm normalises over each worker's local batch, so it changes training.
NON_IDENTITY_KEYS = {"use_gpu", "gpus_per_worker", "cpus_per_worker", "placement", "amp",
                     "channels_last", "compile", "storage", "name", "data", "max_failures",
                     "eval_variants"}
# Why a changed identity key cannot change, where it is not obvious.
WHY_IDENTITY = {"num_workers": "BatchNorm normalises over each worker's local batch, so the "
                               "worker count changes what is trained"}


def check_resumable(run_dir: str, config: TrainConfig, dataset: Dataset) -> None:
    """A run name is reused only by the same run: same training config and same data."""
    identity = {k: v for k, v in config.to_dict().items() if k not in NON_IDENTITY_KEYS}
    identity["data_key"] = dataset.key
    path = storage.join(run_dir, "run.json")
    previous = storage.read_bytes(path)
    if previous is not None:
        old = json.loads(previous)
        # A key added to TrainConfig after the run started counts as its default there.
        defaults = TrainConfig().to_dict()
        changed = sorted(k for k in identity.keys() | old.keys()
                         if identity.get(k) != old.get(k, defaults.get(k)))
        if changed:
            why = "".join(f"; {WHY_IDENTITY[k]}" for k in changed if k in WHY_IDENTITY)
            raise UsageError(f"run {config.run_name!r} in {config.storage} was started with other "
                             f"settings ({', '.join(changed)}){why}; pass another --name, or "
                             f"delete {run_dir} to start over")
        return
    storage.write_bytes(path, json.dumps(identity, indent=2).encode())


@ray.remote
def finalize_best(checkpoint: ray.train.Checkpoint, config: TrainConfig,
                  test_x, test_y) -> dict[str, Any]:
    """On a worker (with a GPU when there is one): test accuracy of the best model, and its
    torch.export as bytes for the driver to write into storage."""
    state = load_state(checkpoint)
    model = inference_model(state)  # as evaluated: flip TTA included when the run used it
    out: dict[str, Any] = {"test_acc": None, "test_loss": None}
    if test_x is not None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        out["test_loss"], out["test_acc"] = evaluate(
            model, torch.tensor(test_x, device=device), torch.tensor(test_y, device=device),
            device, config)
    out["model_pt2"] = export_model(model, state.get("classes"))
    out["trainable_params"] = trainable_param_count(model)
    # Which arithmetic produced which number (the export itself is fp32).
    out["precision"] = {"train": train_precision(device_of(config), config),
                        "val_acc": EVAL_PRECISION, "test_acc": EVAL_PRECISION, "export": "fp32"}
    return out


def device_of(config: TrainConfig) -> torch.device:
    """The device type the run's workers trained on."""
    return torch.device("cuda" if config.use_gpu else "cpu")


def make_trainer(config: TrainConfig, data_ref: ray.ObjectRef, name: str, storage_path: str,
                 callbacks: list | None = None, trial_id: str | None = None,
                 start_from: ray.train.Checkpoint | None = None) -> TorchTrainer:
    """The ``TorchTrainer`` of one run: ``config.num_workers`` DDP workers running
    ``train_fn_per_worker``, keeping the best checkpoint by val_acc plus the latest. A new run
    may start from ``start_from``, another run's checkpoint (in any filesystem), at its epoch and step
    (Ray Train V2 refuses ``resume_from_checkpoint``: the worker loads it, as Ray advises)."""
    resources = {"CPU": config.cpus_per_worker,
                 **({"GPU": config.gpus_per_worker} if config.use_gpu else {})}
    return TorchTrainer(
        train_fn_per_worker,
        torch_config=LoopbackTorchConfig(),  # one node: the DDP rendezvous stays on 127.0.0.1
        train_loop_config={"config": config.to_dict(), "data": data_ref, "trial_id": trial_id,
                           "log_prefix": f"[{trial_id}] " if trial_id else "",
                           "compile_cache": compile_cache(storage_path),
                           "start_from": start_from},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker=resources,
            placement_strategy=config.placement.upper().replace("-", "_")),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            # num_to_keep=1 with a score keeps the best by val_acc; Ray always keeps the latest too.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            # Ray Train's own INFO lines would drown the one-line-per-epoch log.
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )


def compile_cache(storage_root: str) -> str | None:
    """Where torch.compile (Inductor) keeps its cache: $TORCHINDUCTOR_CACHE_DIR when set, else
    beside the runs under a local storage root, so a node's later runs and trials reuse it
    (None for a URI: each node then uses Inductor's default)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    local = storage.local_path(storage_root)
    return os.path.join(local, ".inductor-cache") if local else None


def export_best(checkpoint: ray.train.Checkpoint, config: TrainConfig, splits: Splits,
                out_dir: str) -> dict[str, Any]:
    """Write ``<out_dir>/best/model.pt2`` from a checkpoint; return test accuracy and size."""
    final = ray.get(finalize_best.options(num_cpus=1, num_gpus=1 if config.use_gpu else 0)
                    .remote(checkpoint, config, splits.test_x, splits.test_y))
    storage.write_bytes(storage.join(out_dir, "best", "model.pt2"), final.pop("model_pt2"))
    return final


def train_driver_fn(config: TrainConfig) -> dict[str, Any]:
    """Run one training run end to end and return its summary."""
    started = time.time()
    storage.check_writable(storage.absolute(config.storage))  # a bad --storage fails first
    timing.mark("data_start")
    counts, load = open_dataset(config.data)
    if counts is not None:  # sizes are checked from the cache's labels before Ray starts
        check_batch_within(config, check_split_sizes(*counts, config.val_size, config.subset))
    with ThreadPoolExecutor(1) as background:
        # A source in the Parquet cache is read while Ray starts; one to decode is decoded
        # first, so that bad input fails before Ray is up.
        loading = background.submit(load) if counts is not None else None
        dataset = load() if loading is None else None
        if loading is None:
            splits = checked_splits(config, dataset)
        timing.mark("ray_start")
        embedded = connect_ray()
        timing.mark("ray_ready")
        if loading is not None:
            dataset = loading.result()
            splits = checked_splits(config, dataset)
    timing.mark("data_done")
    print(f"data: {dataset.source.path} ({dataset.source.kind}, "
          f"{'Parquet cache' if dataset.from_cache else 'decoded'} in {dataset.load_s:.1f}s); "
          f"split {splits.sizes()}", flush=True)
    config = resolve_hardware(config, embedded)
    storage_root = storage.absolute(config.storage)
    if not embedded:  # a cluster: every node must reach the storage
        check_shared_storage(storage_root)
    cluster = ray_cluster(embedded)
    run_dir = storage.join(storage_root, config.run_name)
    check_resumable(run_dir, config, dataset)
    print(f"run {config.run_name}: {config.model}, {config.epochs} epochs, {config.num_workers} "
          f"worker(s) x {config.cpus_per_worker} CPU"
          f"{f' + {config.gpus_per_worker:g} GPU' if config.use_gpu else ''}, "
          f"writing to {run_dir}", flush=True)

    trainer = make_trainer(config, ray.put(splits), config.run_name, storage_root)
    timing.mark("fit_start")
    try:
        result = trainer.fit()
    except SystemExit as exc:
        # Ray Train's SIGINT handler aborts the run gracefully, then exits from inside fit().
        raise KeyboardInterrupt(f"interrupted; checkpoints are kept in {run_dir}") from exc
    except ray.train.TrainingFailedError as exc:
        problem = storage_problem(run_dir)
        if problem:
            raise TrainingFailed(f"training failed: {run_dir} is not writable ({problem}); the "
                                 "checkpoints written before are kept: once it is writable, run "
                                 "the same command to resume") from exc
        raise TrainingFailed(f"training failed ({str(exc).strip().splitlines()[-1]}); checkpoints "
                             f"are kept in {run_dir}: run the same command to resume") from exc
    if result.checkpoint is None:
        raise TrainingFailed(f"no epoch completed, so {run_dir} has no checkpoint")
    summary = write_outputs(config, dataset, splits, result, run_dir)
    summary["ray_cluster"] = cluster
    summary["wall_s"] = round(time.time() - started, 1)
    storage.write_bytes(storage.join(run_dir, "summary.json"),
                        json.dumps(summary, indent=2).encode())
    print_summary(summary)
    return summary


def checked_splits(config: TrainConfig, dataset: Dataset) -> Splits:
    splits = make_splits(dataset, config.val_size, config.subset, config.seed)
    check_batch_fits(config, splits)
    return splits


def storage_problem(run_dir: str) -> str | None:
    """Why the run folder cannot be written to now (None when it can): a failed run checks
    this first, since a vanished mount surfaces in Ray Train as some worker's I/O error."""
    local = storage.local_path(run_dir)
    if local and not os.path.isdir(local):  # run.json made it before
        return "it is no longer a directory" if os.path.exists(local) else "it is gone"
    probe = storage.join(run_dir, f".write-check-{uuid.uuid4().hex}")
    try:
        storage.write_bytes(probe, b"")
        storage.delete(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def check_batch_fits(config: TrainConfig, splits: Splits) -> None:
    check_batch_within(config, len(splits.train_y))


def check_batch_within(config: TrainConfig, train_images: int) -> None:
    if config.batch_size > train_images:
        raise UsageError(f"--batch-size {config.batch_size} exceeds the {train_images} "
                         "training images; lower it or train on more images")


def write_outputs(config: TrainConfig, dataset: Dataset, splits: Splits,
                  result: ray.train.Result, run_dir: str) -> dict[str, Any]:
    """metrics.parquet and best/model.pt2; returns the summary (written last, by the caller)."""
    history = load_state(result.checkpoint)["history"]
    best = result.get_best_checkpoint("val_acc", "max")
    # The best epoch is the exported checkpoint's own, never recomputed from the history: with
    # tied val_acc the history's first maximum is an epoch whose checkpoint Ray deleted.
    best_metrics = load_state(best)["history"][-1]
    final = export_best(best, config, splits, run_dir)

    prov = provenance()
    table = pa.Table.from_pandas(pd.DataFrame(history), preserve_index=False)
    table = table.replace_schema_metadata(
        {"resnet": json.dumps({"config": config.to_dict(), "provenance": prov})})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(storage.join(run_dir, "metrics.parquet"), buffer.getvalue())

    at_target = [m["epoch"] for m in history if m["val_acc"] >= TARGET_ACC]
    return {
        "run": config.run_name,
        "run_dir": run_dir,
        "status": "diverged" if history[-1]["diverged"] else (
            "completed" if history[-1]["epoch"] == config.epochs else "stopped"),
        "epochs_completed": len(history),
        "best_val_acc": best_metrics["val_acc"],
        "best_epoch": best_metrics["epoch"],
        "final_val_acc": history[-1]["val_acc"],  # the last epoch's, beside the best
        "target_acc": TARGET_ACC,
        "first_epoch_at_target": at_target[0] if at_target else None,
        "test_acc": final["test_acc"],
        "test_loss": final["test_loss"],
        "precision": final["precision"],
        "final_metrics": history[-1],
        "placement": ranks_of(history[-1]),
        "best_checkpoint": best.path,
        "model_export": storage.join(run_dir, "best", "model.pt2"),
        "trainable_params": final["trainable_params"],
        "classes": list(splits.classes),
        "data": {"source": str(dataset.source.path), "kind": dataset.source.kind,
                 "content_key": dataset.key, "from_cache": dataset.from_cache,
                 "sizes": splits.sizes()},
        "config": config.to_dict(),
        "provenance": prov,
    }


def ranks_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """Where each rank of an epoch ran (the row's comma-joined placement columns); [] for rows
    written before runs recorded it."""
    if not row.get("node_ids"):
        return []
    columns = zip(row["node_ids"].split(","), row["node_ips"].split(","), row["pids"].split(","))
    return [{"rank": rank, "node_id": node, "ip": ip, "pid": int(pid)}
            for rank, (node, ip, pid) in enumerate(columns)]


def print_summary(summary: dict[str, Any]) -> None:
    target = summary["first_epoch_at_target"]
    print(f"best val_acc {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']} of "
          f"{summary['epochs_completed']}, final {summary['final_val_acc']:.4f} "
          f"({summary['status']}); "
          + (f"passed {summary['target_acc']:.2f} at epoch {target}" if target else
             f"did not reach {summary['target_acc']:.2f}")
          + (f"; test_acc {summary['test_acc']:.4f}" if summary["test_acc"] is not None else ""),
          flush=True)
    print(f"outputs: {summary['run_dir']}/{{metrics.parquet,summary.json,best/model.pt2}}", flush=True)
