"""A sweep's winning schedule as a file anyone can rerun without Tune: ``best/schedule.json``.

Format ``resnet-lr-schedule/1``: the winner's recipe (``config``: every TrainConfig key that is
part of a run's identity) and, per epoch of the weights' actual path, the peak LR, momentum and
weight decay it ran with and who trained it (under PBT a clone carries its donor's earlier
epochs). The LR within an epoch is the schedule family's shape (``config["schedule"]``, warm-up,
final ratio, over ``config["epochs"]``) scaled by that epoch's peak, so a replay follows the
recorded LR step by step::

    {"format": "resnet-lr-schedule/1", "sweep": ..., "trial_id": ..., "config": {...},
     "epochs": [{"epoch": 1, "lr_peak": 0.2, "momentum": 0.9, "weight_decay": 0.0005,
                 "lr_end": 0.19, "trained_by": "a1b2c_00003"}, ...]}

``python -m jobs.train --lr-schedule FILE`` runs it as one deterministic run (the recipe from the
file, data and hardware from the flags). It replays the schedule, not PBT's cloning of weights.
"""

from __future__ import annotations

import json
from typing import Any

from resnet.config import TrainConfig
from resnet.errors import UsageError

FORMAT = "resnet-lr-schedule/1"
# Where and how a run trains, not what: taken from the replaying command, not from the file.
NOT_RECIPE = ("data", "storage", "name", "preset", "use_gpu", "gpus_per_worker",
              "cpus_per_worker", "placement", "amp", "channels_last", "compile", "max_failures",
              "eval_variants", "lr_by_epoch")


def schedule_document(config: TrainConfig, history: list[dict[str, Any]],
                      source: dict[str, Any]) -> dict[str, Any]:
    """The document for a run's epochs (``history``: a checkpoint's, the weights' own path)."""
    recipe = {k: v for k, v in config.to_dict().items() if k not in NOT_RECIPE}
    epochs = [{"epoch": m["epoch"], "lr_peak": m.get("lr_peak", config.lr),
               "momentum": m.get("momentum", config.momentum),
               "weight_decay": m.get("weight_decay", config.weight_decay), "lr_end": m["lr"],
               "trained_by": m.get("trained_by")} for m in history]
    return {"format": FORMAT, **source, "config": recipe, "epochs": epochs}


def read_schedule(path: str) -> dict[str, Any]:
    """TrainConfig values of a schedule file: its recipe plus ``lr_by_epoch``."""
    try:
        with open(path) as f:
            document = json.load(f)
    except OSError as exc:
        raise UsageError(f"--lr-schedule {path}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise UsageError(f"--lr-schedule {path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or \
            not document.get("epochs"):
        raise UsageError(f"--lr-schedule {path}: not a schedule file ({FORMAT}); pass the "
                         "best/schedule.json a sweep wrote")
    values = dict(document["config"])
    values["lr_by_epoch"] = [(e["lr_peak"], e["momentum"], e["weight_decay"])
                             for e in sorted(document["epochs"], key=lambda e: e["epoch"])]
    return values
