"""Runs in an MLflow tracking server: a parent run per sweep, a child run per trial (found again
on ``--resume``, never made twice), metrics stepped by epoch (never logged twice), artifacts and
the registered model. Every call that fails (the server down, a request refused) costs one
warning line and nothing else: the run's own files are the record, MLflow a copy of it.

MLflow is an optional extra (``pip install -e '.[mlflow]'``); ``require_mlflow`` says so in one
line when it is missing.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Any, Callable

import numpy as np

from resnet.errors import MLFLOW_MISSING, UsageError

EXPERIMENT = "resnet-cifar10"  # MLFLOW_EXPERIMENT_NAME wins, as in MLflow itself
SWEEP_TAG, TRIAL_TAG, KIND_TAG = "resnet.sweep", "resnet.trial_id", "resnet.kind"
# A tracking server that does not answer must not hold the training up: a few seconds per call,
# no retries (MLflow's defaults retry for minutes).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# The console has one line for MLflow (the sweep's link), not one per run ended.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def tracking_uri(flag: str | None) -> str | None:
    """--mlflow, else $MLFLOW_TRACKING_URI, else None (no tracking)."""
    return flag or os.environ.get("MLFLOW_TRACKING_URI") or None


def require_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UsageError(MLFLOW_MISSING) from None


def warn(what: str, exc: BaseException) -> None:
    detail = " ".join(str(exc).split())[:200]
    print(f"mlflow: {what} failed ({type(exc).__name__}: {detail}); training goes on, its own "
          "files keep everything (python -m jobs.analyze SWEEP --mlflow URI uploads a finished "
          "sweep later)", file=sys.stderr, flush=True)


class Tracker:
    """One tracking server. Every method returns None instead of raising when MLflow fails."""

    def __init__(self, uri: str) -> None:
        require_mlflow()
        from mlflow import MlflowClient
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment_id: str | None = None
        self.logged: dict[str, set[int]] = {}  # run id -> epochs logged (on the server)

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 (any failure of the server is only a warning)
            warn(what, exc)
            return None

    def experiment(self) -> str | None:
        if self.experiment_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)

            def find_or_create() -> str:
                found = self.client.get_experiment_by_name(name)
                return found.experiment_id if found else self.client.create_experiment(name)
            self.experiment_id = self.call(f"opening experiment {name!r} at {self.uri}",
                                           find_or_create)
        return self.experiment_id

    def run(self, tags: dict[str, str], name: str, parent: str | None = None) -> str | None:
        """The run with these identifying tags (the same sweep or trial after --resume), or a
        new one; returns its id."""
        experiment = self.experiment()
        if experiment is None:
            return None

        def find_or_create() -> str:
            query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
            found = self.client.search_runs([experiment], query, max_results=1)
            if found:
                run_id = found[0].info.run_id
                if found[0].info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                return run_id
            all_tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
            return self.client.create_run(experiment, tags=all_tags, run_name=name).info.run_id
        return self.call(f"starting run {name!r}", find_or_create)

    def params(self, run_id: str | None, values: dict[str, Any]) -> None:
        if run_id is None:
            return
        from mlflow.entities import Param
        have = self.call("reading params", lambda: self.client.get_run(run_id).data.params) or {}
        new = [Param(k, str(v)[:6000]) for k, v in values.items() if k not in have]
        for start in range(0, len(new), 100):  # MLflow takes up to 100 params a batch
            self.call("logging params", lambda chunk=new[start:start + 100]:
                      self.client.log_batch(run_id, params=chunk))

    def tags(self, run_id: str | None, values: dict[str, Any]) -> None:
        if run_id is None:
            return
        from mlflow.entities import RunTag
        self.call("setting tags", lambda: self.client.log_batch(
            run_id, tags=[RunTag(k, str(v)) for k, v in values.items()]))

    def epochs(self, run_id: str | None, rows: list[dict[str, Any]]) -> None:
        """Each row's numeric metrics at step = its epoch; an epoch already on the server (a
        resumed sweep reports it again) is not logged twice."""
        if run_id is None:
            return
        if run_id not in self.logged:
            history = self.call("reading metric history",
                                lambda: self.client.get_metric_history(run_id, "val_acc"))
            if history is None:
                return
            self.logged[run_id] = {int(m.step) for m in history}
        from mlflow.entities import Metric
        fresh = [r for r in rows if r.get("epoch") is not None
                 and int(r["epoch"]) not in self.logged[run_id]]
        metrics = [Metric(key, float(value), int(row.get("timestamp_ms", 0)) or now_ms(),
                          int(row["epoch"]))
                   for row in fresh for key, value in row.items()
                   if key not in ("epoch", "timestamp_ms") and is_number(value)]
        for start in range(0, len(metrics), 1000):  # MLflow takes up to 1,000 a batch
            if self.call("logging metrics", lambda chunk=metrics[start:start + 1000]:
                         self.client.log_batch(run_id, metrics=chunk)) is None and metrics:
                return
        self.logged[run_id] |= {int(r["epoch"]) for r in fresh}

    def artifacts(self, run_id: str | None, files: dict[str, bytes]) -> None:
        """Files by their path in the run's artifacts (``best/model.pt2``: bytes)."""
        if run_id is None:
            return
        import tempfile
        with tempfile.TemporaryDirectory() as folder:
            for name, data in files.items():
                path = os.path.join(folder, name)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            self.call("uploading artifacts", lambda: self.client.log_artifacts(run_id, folder))

    def end(self, run_id: str | None, failed: bool = False) -> None:
        if run_id is not None:
            self.call("ending run", lambda: self.client.set_terminated(
                run_id, "FAILED" if failed else "FINISHED"))

    def register(self, run_id: str | None, artifact: str, name: str) -> str | None:
        """A new version of registered model ``name`` from a run's artifact; its version."""
        if run_id is None:
            return None

        def register() -> str:
            from mlflow.exceptions import MlflowException
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:  # it exists: a new version of it
                if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                    raise
            source = f"{self.client.get_run(run_id).info.artifact_uri}/{artifact}"
            return self.client.create_model_version(name, source, run_id=run_id,
                                                   await_creation_for=0).version
        return self.call(f"registering model {name!r}", register)

    def link(self, run_id: str | None) -> str | None:
        """The run's page in MLflow's UI, when the tracking URI is a web server."""
        if run_id is None or not self.uri.startswith(("http://", "https://")):
            return None
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"


def now_ms() -> int:
    import time
    return int(time.time() * 1000)


def is_number(value: Any) -> bool:
    """A finite real number (numpy's included), not a flag."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and \
        math.isfinite(float(value))
