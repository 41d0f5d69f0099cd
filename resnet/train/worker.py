"""Ray Train's entry point on every worker: ``train_fn_per_worker`` runs this rank's
``resnet/train/loop.py`` loop epoch by epoch, resumes it from a checkpoint, records where each rank
runs, and reports each epoch (rank 0 with the checkpoint) in a Keras-like log line.

BatchNorm normalises over each rank's local batch, so N workers do not compute one worker's
update (they do for a model without BatchNorm); the worker count is part of a run's identity.
Before each evaluation every rank takes rank 0's BatchNorm statistics, the ones checkpointed and
exported, so val_acc is the accuracy of the saved model.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch.distributed as dist

from resnet.config import TrainConfig
from resnet.data import Splits
from resnet.infra import timing
from resnet.train.checkpoint import load_state, save_state
from resnet.train.loop import (build_loop, epoch_hyperparameters, load_state_dict, prepare_device,
                               state_dict, train_epoch, validate)

# Through logging, not print: Ray Train forwards worker log records to the driver's console.
log = logging.getLogger("resnet.train.worker")


def placement(rank: int, world: int) -> list[dict[str, Any]]:
    """Where every rank runs, in rank order: its Ray node id, node IP and process id (each rank
    gets the whole list). A restarted worker group may land elsewhere, so each epoch records it."""
    mine = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
    if world == 1:
        return [mine]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def placement_columns(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """Flat columns for the epoch rows (Tune and Parquet keep scalars): rank order, comma-joined;
    with 2+ ranks also where torch.distributed's rendezvous store listens (rank 0)."""
    rendezvous = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
    return {"world_size": len(ranks), "node_ids": ",".join(r["node_id"] for r in ranks),
            "node_ips": ",".join(r["ip"] for r in ranks),
            "pids": ",".join(str(r["pid"]) for r in ranks),
            "rendezvous": rendezvous if len(ranks) > 1 else ""}


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: {"config": TrainConfig dict, "data": ObjectRef
    of the Splits, "log_prefix": text before each log line (the trial id under Tune)}."""
    timing.mark("worker_start")
    quiet_ray_train_reports()
    config = TrainConfig.from_dict(loop_config["config"])
    prefix = loop_config.get("log_prefix", "")
    splits: Splits = ray.get(loop_config["data"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    where = placement_columns(placement(rank, world))
    prepare_device(device, config.cpus_per_worker)
    if config.compile and loop_config.get("compile_cache"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = loop_config["compile_cache"]
    # prepare_model moves the model to the device, and wraps it in DDP when world > 1.
    loop = build_loop(config, splits, device, rank, world, wrap=ray.train.torch.prepare_model)

    start_epoch, best_acc, best_epoch, history = 0, -math.inf, 0, []
    # This run's own latest checkpoint (a restarted worker group or a re-run), else the one it
    # was told to start from (a PBT clone starts from its donor's): continue at its epoch, step.
    checkpoint = ray.train.get_checkpoint() or loop_config.get("start_from")
    if checkpoint:
        state = load_state(checkpoint, map_location=device)
        load_state_dict(loop, state)
        start_epoch = state["epoch"]
        best_acc, best_epoch, history = state["best_val_acc"], state["best_epoch"], state["history"]
        if rank == 0:
            log.info(f"{prefix}Resuming from epoch {start_epoch} (step {loop.step}) of "
                     f"{config.epochs}")
        if history and history[-1].get("diverged"):
            return

    marked = []

    def first_step() -> None:  # this worker's first step, for jobs.bench's start-up table
        if rank == 0 and not marked:
            timing.mark("first_step", device)
            marked.append(True)

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        trained = train_epoch(loop, epoch, first_step)
        lr_steps = trained.pop("lr_steps")  # kept in the history, not in every report
        lr_peak, momentum, decay = epoch_hyperparameters(config, epoch)
        metrics = {"epoch": epoch + 1, **trained, **validate(loop),
                   "epoch_s": time.perf_counter() - started, "step": loop.step, **where,
                   # What the epoch ran with, and who trained it (a PBT clone carries its
                   # donor's earlier epochs in its history).
                   "lr_peak": lr_peak, "momentum": momentum, "weight_decay": decay,
                   "trained_by": loop_config.get("trial_id")}
        history.append({**metrics, "lr_steps": lr_steps})
        previous_best = best_acc
        # Ties go to the later epoch, as Ray Train's checkpoint manager keeps the latest of
        # equally scored checkpoints: the best epoch named here is the one kept on disk.
        if metrics["val_acc"] >= best_acc:
            best_acc, best_epoch = metrics["val_acc"], epoch + 1
        if rank == 0:
            log_epoch(metrics, config.epochs, previous_best, prefix)
        state = {**state_dict(loop), "epoch": epoch + 1, "best_val_acc": best_acc,
                 "best_epoch": best_epoch, "history": history, "config": config.to_dict(),
                 "classes": list(splits.classes)}
        report(metrics, rank, state)
        if metrics["diverged"]:
            return


def report(metrics: dict[str, Any], rank: int, state: dict[str, Any]) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"epoch_{metrics['epoch']:04d}")


def log_epoch(m: dict[str, Any], epochs: int, previous_best: float, prefix: str = "") -> None:
    variants = [f"{k[len('val_acc_'):]} {v:.4f}" for k, v in m.items() if k.startswith("val_acc_")]
    log.info(prefix + epoch_line(m, epochs) + (f" (val_acc {', '.join(variants)})" if variants else ""))
    if m["diverged"]:
        log.info(f"{prefix}loss is {m['loss']} at epoch {m['epoch']}: the run diverged and stops "
                 "here (try a lower --lr)")
    elif m["val_acc"] > previous_best:
        log.info(f"{prefix}val_acc improved from {previous_best:.5f} to {m['val_acc']:.5f}, "
                 "saving checkpoint")
    elif m["val_acc"] == previous_best:
        log.info(f"{prefix}val_acc equals the best {previous_best:.5f}; this later checkpoint "
                 "replaces it as the best")
    else:
        log.info(f"{prefix}val_acc did not improve from {previous_best:.5f}")


def quiet_ray_train_reports() -> None:
    # Ray Train logs every report at INFO under a logger named after its source file, which
    # LoggingConfig(log_level) does not filter; it would print each metrics dict once per rank.
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """One line per epoch, as the Keras log prints it."""
    return (f"Epoch {m['epoch']}/{epochs} - {m['epoch_s']:.0f}s - loss: {m['loss']:.4f} - "
            f"acc: {m['acc']:.4f} - val_loss: {m['val_loss']:.4f} - val_acc: {m['val_acc']:.4f} - "
            f"lr: {m['lr']:.6f} - {m['samples_per_s']:.0f} samples/s")
