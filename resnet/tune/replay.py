"""A sweep's winning schedule as a file anyone can rerun without Tune: ``best/schedule.json``.

Format ``resnet-lr-schedule/1``: the winner's recipe (``config``: every TrainConfig key that is
part of a run's identity, from the winning checkpoint's own config) and, per epoch of the
weights' actual path (under PBT a clone carries its donor's earlier epochs), what its workers
logged: the LR of every step (``lr_steps``), the peak LR, momentum and weight decay, and who
trained it::

    {"format": "resnet-lr-schedule/1", "sweep": ..., "trial_id": ..., "config": {...},
     "epochs": [{"epoch": 1, "lr_peak": 0.2, "momentum": 0.9, "weight_decay": 0.0005,
                 "lr_end": 0.19, "lr_steps": [0.0011, ...], "trained_by": "a1b2c_00003"}, ...]}

``python -m jobs.train --lr-schedule FILE`` runs it as one deterministic run (the recipe from the
file, data and hardware from the flags): every step's LR as recorded, momentum and weight decay
epoch by epoch. It replays the schedule, not PBT's cloning of weights. Files written before the
steps were logged (no ``lr_steps``) replay each epoch as the recipe's shape times its peak.
"""

from __future__ import annotations

import json
from typing import Any

from resnet.config import TrainConfig
from resnet.errors import UsageError
from resnet.infra import storage

FORMAT = "resnet-lr-schedule/1"
# Where and how a run trains, not what: taken from the replaying command, not from the file.
NOT_RECIPE = ("data", "storage", "name", "preset", "use_gpu", "gpus_per_worker",
              "cpus_per_worker", "placement", "amp", "channels_last", "compile", "max_failures",
              "eval_variants", "lr_by_epoch", "lr_by_step")


def schedule_document(config: TrainConfig, history: list[dict[str, Any]],
                      source: dict[str, Any]) -> dict[str, Any]:
    """The document for a run's epochs (``history``: a checkpoint's, the weights' own path)."""
    recipe = {k: v for k, v in config.to_dict().items() if k not in NOT_RECIPE}
    epochs = [{"epoch": m["epoch"], "lr_peak": m.get("lr_peak", config.lr),
               "momentum": m.get("momentum", config.momentum),
               "weight_decay": m.get("weight_decay", config.weight_decay), "lr_end": m["lr"],
               **({"lr_steps": list(m["lr_steps"])} if m.get("lr_steps") is not None else {}),
               "trained_by": m.get("trained_by")} for m in history]
    return {"format": FORMAT, **source, "config": recipe, "epochs": epochs}


def read_schedule(path: str) -> dict[str, Any]:
    """TrainConfig values of a schedule file: its recipe plus ``lr_by_epoch``."""
    try:
        data = storage.read_bytes(path)
    except OSError as exc:
        raise UsageError(f"--lr-schedule {path}: cannot read it ({exc.strerror or exc})") from None
    if data is None:
        raise UsageError(f"--lr-schedule {path}: cannot read it (No such file or directory)")
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise UsageError(f"--lr-schedule {path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or \
            not document.get("epochs"):
        raise UsageError(f"--lr-schedule {path}: not a schedule file ({FORMAT}); pass the "
                         "best/schedule.json a sweep wrote")
    values = dict(document["config"])
    epochs = sorted(document["epochs"], key=lambda e: e["epoch"])
    values["lr_by_epoch"] = [(e["lr_peak"], e["momentum"], e["weight_decay"]) for e in epochs]
    if all(e.get("lr_steps") for e in epochs):  # logged step by step: replayed step by step
        values["lr_by_step"] = [e["lr_steps"] for e in epochs]
    return values
