"""One Tune trial: a Ray Train run whose epochs become Tune reports *with* Tune checkpoints, so
that a scheduler such as Population Based Training can clone one trial into another.

Ray's own ``TuneReportCallback`` forwards only the checkpoint's path to Tune (Tune then holds no
trial checkpoint, and PBT has nothing to clone). Here a Ray Train callback (in the Train
controller) hands each epoch's metrics and checkpoint path to the trial's process through a Ray
queue; the trial reports them with ``tune.report`` and a small Tune checkpoint: a copy of the
epoch's ``checkpoint.pt`` plus ``source.json`` (which trial and Train run wrote it, at which
epoch). A trial restored from its own checkpoint (a resumed sweep) continues its Train run; one
restored from another trial's (a PBT exploit) starts a new Train run from that checkpoint, with
its own, mutated config. Public APIs only: ``ray.train.UserCallback``, ``ray.util.queue``,
``tune.report``, ``tune.get_checkpoint``, ``the Train function loading a given checkpoint.
"""

from __future__ import annotations

import json
import os
import queue
import tempfile
import threading
from typing import Any

import ray
import ray.train
from ray import tune
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from resnet.config import TrainConfig
from resnet.infra import storage
from resnet.train.checkpoint import CHECKPOINT_FILE
from resnet.train.driver import make_trainer
from resnet.tune.space import trial_config

SOURCE_FILE = "source.json"  # in a Tune checkpoint: {"trial_id", "run", "epoch"}


class ForwardToTune(ray.train.UserCallback):
    """Runs in the Train controller: puts (metrics of rank 0, the persisted checkpoint) on the
    queue. The checkpoint carries the filesystem Ray Train resolved and a path inside it."""

    def __init__(self, epochs: Queue) -> None:
        self.epochs = epochs

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        self.epochs.put((dict(metrics[0]), checkpoint))


def train_trial(params: dict[str, Any], base: dict[str, Any], data: dict[str, Any],
                train_storage: str) -> None:
    """The function trainable: ``data["ref"]`` is the ObjectRef of the splits."""
    config = trial_config(TrainConfig.from_dict(base), params)
    trial_id = tune.get_context().get_trial_id()
    # Ray Train gives up on a worker group that waits 60 s for resources; a trial may wait
    # longer while an early-stopped trial's workers are released (or the cluster scales up).
    # Ray propagates this variable from here to the trial's Train controller.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    run, resume, clone = trial_id, None, None
    restored = tune.get_checkpoint()  # in Tune's storage: its filesystem and a path inside it
    if restored is not None:
        source = json.loads(read_file(restored, SOURCE_FILE))
        if source["trial_id"] == trial_id:  # our own: the Train run resumes from its snapshot
            run = source["run"]
        else:  # another trial's (PBT): a new Train run of ours, from its weights
            run = clone_run_name(train_storage, trial_id, source["trial_id"], source["epoch"])
            resume = restored
            clone = {"cloned_from": source["trial_id"], "cloned_at_epoch": source["epoch"]}
    # On each row: the Train run that trained it, and where this process (and the Train
    # controller Ray starts beside it) runs.
    node = ray.get_runtime_context().get_node_id()
    where = {"train_run": run, "trial_node_id": node}
    # The queue's actor beside this process (and the controller): not on a node that may go.
    epochs = Queue(actor_options={"num_cpus": 0, "scheduling_strategy":
                                  NodeAffinitySchedulingStrategy(node, soft=False)})
    trainer = make_trainer(config, data["ref"], run, train_storage,
                           callbacks=[ForwardToTune(epochs)], trial_id=trial_id,
                           start_from=resume)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the trial's thread below)
            outcome["error"] = exc

    fitting = threading.Thread(target=fit, daemon=True)
    fitting.start()
    while fitting.is_alive() or not epochs.empty():
        try:
            metrics, checkpoint = epochs.get(timeout=0.5)
        except (Empty, queue.Empty):
            continue
        report({**metrics, **where}, checkpoint, train_storage, trial_id, run, clone)
        clone = None  # the clone is marked on its first epoch only
    fitting.join()
    if "error" in outcome:
        raise outcome["error"]


def clone_run_name(train_storage: str, trial_id: str, donor: str, epoch: int) -> str:
    """A new Train run's name for a clone: ``<trial>-from-<donor>-e<epoch>``, with a count when
    the same exploit happened before (a name Ray Train has seen it would resume, not start)."""
    taken = set(storage.listdir(train_storage))
    name, again = f"{trial_id}-from-{donor}-e{epoch}", 1
    while name in taken:
        again += 1
        name = f"{trial_id}-from-{donor}-e{epoch}-{again}"
    return name


def read_file(checkpoint: ray.train.Checkpoint, name: str) -> bytes:
    """A file of a persisted checkpoint, through the filesystem Ray resolved for it."""
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{name}") as f:
        return f.read()


def report(metrics: dict[str, Any], checkpoint: ray.train.Checkpoint | None, train_storage: str,
           trial_id: str, run: str, clone: dict[str, Any] | None) -> None:
    """One epoch to Tune: metrics (with the Train checkpoint's location, and the clone if it is
    the first epoch after one) and a Tune checkpoint."""
    path = storage.within(train_storage, checkpoint.path) if checkpoint else None
    # timesteps_total: Ray's TensorBoard logger steps its scalars by it (else by Tune's
    # iteration, which a resume or a PBT clone renumbers): the epoch.
    row = {**metrics, "checkpoint_path": path, "timesteps_total": metrics["epoch"],
           **(clone or {})}
    if checkpoint is None:
        tune.report(row)
        return
    with tempfile.TemporaryDirectory() as directory:
        with open(os.path.join(directory, CHECKPOINT_FILE), "wb") as f:
            f.write(read_file(checkpoint, CHECKPOINT_FILE))
        with open(os.path.join(directory, SOURCE_FILE), "w") as f:
            json.dump({"trial_id": trial_id, "run": run, "epoch": metrics["epoch"]}, f)
        tune.report(row, checkpoint=tune.Checkpoint.from_directory(directory))
