"""A sweep's trials into MLflow as they run: a Tune callback in the sweep's driver.

Ray ships ``MLflowLoggerCallback``; it is not used here because a resumed sweep would open a
second run for every trial (it keeps run ids in memory only), it steps metrics by Tune's
iteration rather than the epoch, it stops the sweep when the server fails, and it has no parent
run, status or PBT lineage. This callback writes the runs ``sweep_runs.py`` describes instead.
Tune pickles it with the experiment (``Tuner.restore`` brings it back): it holds only the
server's URI and the sweep's folder, and reconnects after a restore.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from resnet.tracking.sweep_runs import SweepTracking


class MLflowTrials(tune.Callback):
    """Each trial a child run of the sweep's parent run, each epoch logged as it is reported."""

    def __init__(self, uri: str, exp_dir: str, settings: dict[str, Any], epochs: int) -> None:
        self.uri, self.exp_dir, self.settings, self.epochs = uri, exp_dir, settings, epochs
        self.runs: SweepTracking | None = None
        self.lineage: dict[str, list[str]] = {}
        self.last: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:  # the MLflow client does not travel
        return {**self.__dict__, "runs": None}

    def tracking(self) -> SweepTracking:
        if self.runs is None:
            self.runs = SweepTracking(self.uri, self.exp_dir)
            self.runs.parent(self.settings)
        return self.runs

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.tracking().trial(trial.trial_id, dict(trial.config))

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        if result.get("cloned_from"):  # PBT: the first epoch after an exploit
            self.lineage.setdefault(trial.trial_id, []).append(
                f"{result['cloned_from']}@{int(result['cloned_at_epoch'])}")
            self.tracking().tracker.tags(self.tracking().trial(trial.trial_id), {
                "resnet.lineage": " ".join(self.lineage[trial.trial_id])})
        self.last[trial.trial_id] = result
        self.tracking().epochs(trial.trial_id, [result])

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = self.last.get(trial.trial_id) or trial.last_result or {}
        if last.get("diverged"):
            status = "diverged"
        else:
            status = "completed" if (last.get("epoch") or 0) >= self.epochs else "early-stopped"
        self.tracking().ended(trial.trial_id, status, self.lineage.get(trial.trial_id, []))

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.tracking().ended(trial.trial_id, "failed", self.lineage.get(trial.trial_id, []))
