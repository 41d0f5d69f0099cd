"""A sweep's own settings: flags plus the hardware profile, the resources each trial takes, and
what ``--resume`` may change (nothing that would mix two sweeps into one).

``sweep.json`` in the sweep's folder holds the settings a sweep started with; ``--resume`` reads
them back, so a resumed sweep is the same sweep whatever today's defaults or hardware are.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from typing import Any, Mapping

import ray

from resnet.config import ALL_IMAGES, TARGET_ACC, TrainConfig, make_config
from resnet.errors import MLFLOW_MISSING, UsageError
from resnet.infra import storage
from resnet.infra.cluster import connect_ray
from resnet.tune.search import SCHEDULERS, SEARCHERS, check_search, fix_for_pbt
from resnet.tune.space import PROFILE_SPACE, keras_config, load_space, read_space_file

SWEEP_PRESET = "fast"  # every searched trial starts from the fast recipe: the search's centre
SWEEP_FILE = "sweep.json"  # the settings a sweep started with (jobs.analyze and --resume read it)
# What a resumed sweep may take from today's flags: where and on what it runs, and what is done
# after it. Everything else (epochs, space, data, scheduler, ...) must equal what it started with.
RESUME_MAY_CHANGE = {"use_gpu", "gpus_per_worker", "cpus_per_worker", "placement", "amp",
                     "channels_last",
                     "compile", "data", "max_failures", "eval_variants", "storage", "name",
                     "gradcam_images", "gradcam_method"}
# Not --max-concurrent: Tune restores the search algorithm with the limit it started with.


@dataclass(frozen=True)
class SweepConfig:
    """The sweep's own settings; ``base`` is the TrainConfig every trial starts from."""

    base: TrainConfig
    samples: int
    target: float = TARGET_ACC
    scheduler: str = "asha"  # asha, fifo or pbt
    search: str = "random"  # random (and grid) or optuna
    grace_period: int | None = None  # ASHA: epochs every trial runs before it may be stopped
    perturbation_interval: int | None = None  # PBT: epochs between exploits (default: a tenth)
    max_concurrent: int | None = None  # None: as many as the cluster's resources hold
    space: str | None = None
    keras_trial: bool = False
    gradcam_images: int = 10
    gradcam_method: str = "gradcam"
    resume: bool = False
    profile: str = "custom"
    # Experiment tracking: the MLflow tracking URI (--mlflow, else $MLFLOW_TRACKING_URI when the
    # sweep starts; it stays the sweep's) and the name the winner is registered under.
    mlflow: str | None = None
    mlflow_model_name: str = "resnet-cifar10"

    @property
    def grace(self) -> int:
        """ASHA's grace period: a fifth of the epochs (at least 1) unless given."""
        return self.grace_period or max(1, self.base.epochs // 5)

    @property
    def interval(self) -> int:
        """PBT's perturbation interval: a tenth of the epochs (at least 1) unless given."""
        return self.perturbation_interval or max(1, self.base.epochs // 10)

    def validated(self) -> "SweepConfig":
        checks = [(self.samples >= 1, f"--samples must be at least 1, got {self.samples}"),
                  (0 < self.target <= 1, f"--target must be in (0, 1], got {self.target}"),
                  (self.scheduler in SCHEDULERS, f"unknown --scheduler {self.scheduler!r}"),
                  (self.search in SEARCHERS, f"unknown --search {self.search!r}"),
                  (self.perturbation_interval is None or self.perturbation_interval >= 1,
                   "--perturbation-interval must be at least 1 epoch"),
                  (self.grace_period is None or 1 <= self.grace_period <= self.base.epochs,
                   f"--grace-period must be between 1 and --epochs {self.base.epochs}"),
                  (self.max_concurrent is None or self.max_concurrent >= 1,
                   "--max-concurrent must be at least 1"),
                  (self.gradcam_images >= 0, "--gradcam-images must be >= 0")]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.keras_trial:  # the Keras recipe's batch of 32 must split over the workers too
            keras_config(self.base)
        check_search(self.scheduler, self.search, self.keras_trial, {})  # the space's: later
        return self

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["base"] = self.base.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "SweepConfig":
        """From ``to_dict``'s output; keys added since the sweep started take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"{SWEEP_FILE}: unknown setting(s) {', '.join(unknown)} (written by "
                             "a newer version of this project?)")
        return cls(**{**values, "base": TrainConfig.from_dict(values["base"])})


# Defaults that fit the hardware: the full sweep with GPUs, a few minutes' worth on CPUs only.
# Flags given on the command line win over the profile.
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": {"samples": 16, "epochs": 50, "subset": None, "val_size": 5000, "keras_trial": True},
    "cpu": {"samples": 1, "epochs": 3, "subset": 4000, "val_size": 2000, "keras_trial": False},
}


def default_name(model: str, profile: str, seed: int) -> str:
    return f"tune-{model}-{profile}-seed{seed}"


def make_sweep(train_flags: dict[str, Any], sweep_flags: dict[str, Any],
               resources: Mapping[str, float] | None = None) -> SweepConfig:
    """Flags (None = not given) plus the hardware profile -> a validated SweepConfig; with
    ``resume``, the stored settings of the sweep to resume (see ``resume_sweep``).

    The profile depends on whether the cluster has GPUs: ``resources`` (Ray's
    ``cluster_resources()``), read after the flags and the --space file are checked, from a
    Ray it connects to then unless given.
    """
    all_images = train_flags.get("subset") == ALL_IMAGES
    if all_images:  # the config's subset None (all); not "not given", which takes the profile's
        train_flags = {**train_flags, "subset": None}
    given = {k: v for k, v in train_flags.items() if v is not None}
    make_config(SWEEP_PRESET, **given)  # bad flags fail here, before Ray starts
    storage.check_writable(storage.absolute(given.get("storage", TrainConfig.storage)))
    if sweep_flags.get("resume"):
        return resume_sweep(train_flags, sweep_flags)
    if sweep_flags.get("mlflow") is None and os.environ.get("MLFLOW_TRACKING_URI"):
        sweep_flags = {**sweep_flags, "mlflow": os.environ["MLFLOW_TRACKING_URI"]}
    if sweep_flags.get("mlflow"):
        try:  # an optional extra: say how to install it, before Ray starts
            import mlflow  # noqa: F401
        except ImportError:
            raise UsageError(MLFLOW_MISSING) from None
    scheduler, search = sweep_flags.get("scheduler") or "asha", sweep_flags.get("search") or "random"
    check_search(scheduler, search, bool(sweep_flags.get("keras_trial")), {})  # before Ray
    if sweep_flags.get("space"):  # a bad file or combination fails before Ray starts
        space = load_space(sweep_flags["space"], given.get("optimizer", "sgd"), "cpu",
                           given.get("num_workers", 1), given.get("model", "resnet20"))
        check_search(scheduler, search, bool(sweep_flags.get("keras_trial")), space,
                     read_space_file(sweep_flags["space"]))
    if resources is None:
        connect_ray()
        resources = ray.cluster_resources()
    has_gpu = resources.get("GPU", 0) > 0
    use_gpu = train_flags.get("use_gpu")
    profile = "gpu" if (has_gpu if use_gpu is None else use_gpu) else "cpu"
    chosen = {k: v for k, v in PROFILES[profile].items()
              if {**train_flags, **sweep_flags}.get(k) is None
              and not (all_images and k == "subset")}
    train = {**{k: v for k, v in chosen.items() if k in ("epochs", "subset", "val_size")},
             **given}
    train.setdefault("name", default_name(train.get("model", "resnet20"), profile,
                                          train.get("seed", 0)))
    sweep = {**{k: v for k, v in chosen.items() if k in ("samples", "keras_trial")},
             **{k: v for k, v in sweep_flags.items() if v is not None}}
    if "keras_trial" in chosen and (sweep.get("scheduler") == "pbt"
                                    or sweep.get("search") == "optuna"):
        sweep["keras_trial"] = False  # a fixed trial of another recipe: for random search only
    if chosen:
        filled = ", ".join(f"{k}={v}" for k, v in chosen.items())
        space = "; ".join(f"{k} {json.dumps(v)}" for k, v in PROFILE_SPACE[profile].items())
        print(f"{'GPUs found' if has_gpu else 'no GPU found'}: {profile.upper()} profile "
              f"({filled}{f'; search space {space}' if space else ''}); flags and --space "
              "override it", flush=True)
    return SweepConfig(base=make_config(SWEEP_PRESET, **train), profile=profile,
                       **sweep).validated()


def resume_sweep(train_flags: dict[str, Any], sweep_flags: dict[str, Any]) -> SweepConfig:
    """The stored settings of the sweep named by the flags, with the changes a resumed sweep
    may take (``RESUME_MAY_CHANGE``); any other flag must equal its stored value. Without
    --name, the default names of both profiles are looked for (``--gpu``/``--cpu`` narrow it)."""
    given = {k: v for k, v in train_flags.items() if v is not None}
    given_sweep = {k: v for k, v in sweep_flags.items() if v is not None and k != "resume"}
    root = storage.absolute(given.get("storage", TrainConfig.storage))
    if "name" in given:
        names = [given["name"]]
    else:
        profiles = {True: ["gpu"], False: ["cpu"]}.get(given.get("use_gpu"), ["gpu", "cpu"])
        names = [default_name(given.get("model", "resnet20"), p, given.get("seed", 0))
                 for p in profiles]
    found = {name: data for name in names
             if (data := storage.read_bytes(storage.join(root, name, SWEEP_FILE))) is not None}
    if not found:
        raise UsageError(f"--resume: there is no sweep {' or '.join(map(repr, names))} in {root} "
                         "to resume; run the same command without --resume to start it")
    if len(found) > 1:  # a GPU and a CPU sweep of the same model and seed: the cluster decides
        connect_ray()
        profile = "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
        found = {n: d for n, d in found.items() if n.split("-")[-2] == profile}
    name, data = next(iter(found.items()))
    settings = json.loads(data)
    stored = SweepConfig.from_dict(settings["sweep"])
    differ = [f"{key} {_shown(getattr(stored.base, key))} (now {_shown(value)})"
              for key, value in given.items()
              if key not in RESUME_MAY_CHANGE and not _same(getattr(stored.base, key), value)]
    differ += [f"{key} {_shown(getattr(stored, key))} (now {_shown(value)}"
               + (": Tune restores its search algorithm with the limit it started with)"
                  if key == "max_concurrent" else ")")
               for key, value in given_sweep.items()
               if key not in RESUME_MAY_CHANGE | {"space"}
               and not _same(getattr(stored, key), value)]
    if "space" in given_sweep:  # compared by content: the file may have moved
        space = load_space(given_sweep["space"], stored.base.optimizer, stored.profile,
                           stored.base.num_workers, stored.base.model)
        if stored.scheduler == "pbt":  # as run_trials fixed it
            space = fix_for_pbt(space, stored.base)[0]
        if "space" in settings and space != settings["space"]:
            differ.append(f"space (the search space of {given_sweep['space']} is not the one "
                          "the sweep started with)")
    path = storage.join(root, name, SWEEP_FILE)
    if differ:
        raise UsageError(f"--resume: sweep {name!r} was started with other settings: "
                         f"{'; '.join(differ)}; resume it without those flags (its settings "
                         f"are in {path}), or pass another --name to start a new sweep")
    base = stored.base.replace(**{**{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE},
                                  "name": name})
    print(f"resuming sweep {name} with the settings it started with ({path})", flush=True)
    return replace(stored, base=base, resume=True,
                   **{k: v for k, v in given_sweep.items() if k in RESUME_MAY_CHANGE}).validated()


def _same(stored: Any, given: Any) -> bool:
    if isinstance(stored, float) or isinstance(given, float):
        return stored is not None and given is not None and math.isclose(stored, given)
    return stored == given


def _shown(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def plan_resources(base: TrainConfig, max_concurrent: int | None,
                   total: Mapping[str, float] | None = None) -> tuple[TrainConfig, int]:
    """Fill GPU use and CPUs per worker from the cluster's resources (``total``, default Ray's
    ``cluster_resources()``); how many trials fit side by side.

    Exact arithmetic: with floats, ``1 // 0.2 == 4.0`` would leave a fifth of each GPU unused.
    """
    total = ray.cluster_resources() if total is None else total
    gpus, cpus = Fraction(total.get("GPU", 0)), Fraction(total.get("CPU", 1))
    use_gpu = base.use_gpu if base.use_gpu is not None else gpus > 0
    per_gpu = Fraction(base.gpus_per_worker).limit_denominator(10_000)  # Ray's 1e-4 resolution
    if use_gpu:  # each trial's share of the CPUs follows its share of the GPUs
        per_worker_cpus = base.cpus_per_worker or (
            max(1, math.floor(cpus / gpus * per_gpu)) if gpus else 1)
        fits = math.floor(gpus / (base.num_workers * per_gpu))
    else:
        per_worker_cpus = base.cpus_per_worker or 1
        fits = math.floor(cpus / (base.num_workers * per_worker_cpus))
    # With --max-concurrent the cluster may be smaller now: an autoscaler adds nodes on demand.
    if fits < 1 and not max_concurrent:
        raise UsageError(f"one trial needs {base.num_workers} worker(s) x {per_worker_cpus} CPU"
                         f"{f' + {base.gpus_per_worker:g} GPU' if use_gpu else ''}; the cluster "
                         f"has {float(cpus):g} CPUs and {float(gpus):g} GPUs: lower --num-workers "
                         "or --cpus-per-worker")
    return base.replace(use_gpu=use_gpu, cpus_per_worker=per_worker_cpus), \
        int(max_concurrent or fits)
