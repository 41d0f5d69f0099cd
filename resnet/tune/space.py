"""The Tune search space over the learning-rate schedule, and how a sample becomes a TrainConfig.

A space maps ``TrainConfig`` keys to a constant or to one distribution::

    schedule: {choice: [onecycle, cosine, step]}
    lr: {loguniform: {sgd: [0.05, 0.8], adam: [0.0003, 0.003], rmsprop: [0.0003, 0.003]}}
    warmup_frac: {uniform: [0.0, 0.3]}
    batch_size: {grid: [128, 256]}

``--space FILE`` (YAML or JSON) overrides the default per key; a constant fixes a key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from ray import tune

from resnet.config import TrainConfig, follow_switches, make_config
from resnet.errors import UsageError

# What a sweep may vary: optimisation and augmentation, never data, hardware or storage.
TUNABLE = ("schedule", "lr", "warmup_frac", "final_lr_ratio", "weight_decay", "label_smoothing",
           "batch_size", "momentum", "crop_pad", "cutout", "augment", "optimizer", "bn_momentum",
           "ema", "tta", "bn_bias_decay", "bn_lr_scale", "lookahead_k", "lookahead_alpha", "flip",
           "tta_shift", "dirac_init")
# grid: every value, each combined with every other grid key (x --samples); the rest are sampled.
DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")

DEFAULT_SPACE: dict[str, Any] = {
    "schedule": {"choice": ["onecycle", "cosine", "step"]},
    # Peak LR, log-uniform; the range follows the optimizer of the sweep.
    "lr": {"loguniform": {"sgd": [0.05, 0.8], "adam": [3e-4, 3e-3], "rmsprop": [3e-4, 3e-3]}},
    "warmup_frac": {"uniform": [0.0, 0.3]},
    "final_lr_ratio": {"choice": [0.0, 0.01, 0.05]},
    "weight_decay": {"loguniform": [1e-4, 2e-3]},
    "label_smoothing": {"uniform": [0.0, 0.2]},
    "batch_size": {"choice": [128, 256, 512]},
}
# The CPU profile trains a few epochs on a few thousand images: smaller batches give it enough
# steps, and the top of the full-data LR range would only diverge there.
PROFILE_SPACE: dict[str, dict[str, Any]] = {
    "gpu": {},
    # One trial per schedule family, so that the few trials a CPU affords compare the families.
    "cpu": {"schedule": {"grid": ["onecycle", "cosine", "step"]},
            "batch_size": {"choice": [64, 128]},
            "lr": {"loguniform": {"sgd": [0.01, 0.1], "adam": [3e-4, 3e-3],
                                  "rmsprop": [3e-4, 3e-3]}}},
}
RECIPE_KEY = "recipe"  # "search" for sampled trials, "keras" for the fixed Keras trial
STEP_DROPS = ((0.5, 0.1), (0.75, 0.1))  # step family: x0.1 at 50% and 75% of the epochs


def load_space(path: str | None, optimizer: str, profile: str = "gpu",
               num_workers: int = 1, model: str = "resnet20") -> dict[str, Any]:
    """The default space, the profile's keys, then the file's keys laid over it; validated
    (every value, and the constants together, must make a config of ``model`` that trains on
    ``num_workers`` workers), per-optimizer ranges resolved."""
    space = {**DEFAULT_SPACE, **PROFILE_SPACE.get(profile, {})}
    if path:
        space.update(read_space_file(path))
    resolved = {}
    for key, spec in space.items():
        if key not in TUNABLE:
            raise UsageError(f"--space: unknown key {key!r}; tunable keys: {', '.join(TUNABLE)}")
        resolved[key] = _resolve(key, spec, optimizer, {"num_workers": num_workers, "model": model})
    constants = {k: v for k, v in resolved.items() if not isinstance(v, Mapping)}
    if len(constants) > 1:  # each is possible alone; together they must be too
        _check_value("", constants, {"num_workers": num_workers, "model": model})
    return resolved


def read_space_file(path: str) -> dict[str, Any]:
    file = Path(path)
    try:
        text = file.read_text()
    except OSError as exc:
        raise UsageError(f"--space {path}: cannot read it ({exc.strerror})") from None
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different types for the same mistake
        kind = "YAML" if file.suffix in (".yaml", ".yml") else "JSON"
        raise UsageError(f"--space {path}: not valid {kind} ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--space {path}: must be a mapping of config keys to values or "
                         "{choice|uniform|loguniform|randint: ...}")
    return data


def _resolve(key: str, spec: Any, optimizer: str, check: Mapping[str, Any]) -> Any:
    """A constant, or {"<distribution>": args} with per-optimizer ranges picked; checked in the
    sweep's ``check`` context (its worker count splits the batch, its model has its own flags)."""
    num_workers = check["num_workers"]
    if not isinstance(spec, Mapping):
        _check_value(key, spec, check)
        return spec
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise UsageError(f"--space: {key} must be a constant or one of "
                         f"{{{'|'.join(DISTRIBUTIONS)}: ...}}, got {dict(spec)}")
    kind, args = next(iter(spec.items()))
    if isinstance(args, Mapping):  # per-optimizer ranges
        if optimizer not in args:
            raise UsageError(f"--space: {key} has no range for optimizer {optimizer!r}")
        args = args[optimizer]
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise UsageError(f"--space: {key} choice needs a non-empty list, got {args!r}")
        for value in args:
            _check_value(key, value, check)
        return {kind: list(args)}
    if not (isinstance(args, list) and len(args) == 2
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in args)):
        raise UsageError(f"--space: {key} {kind} needs [low, high], got {args!r}")
    low, high = args
    if low >= high or (kind == "loguniform" and low <= 0):
        raise UsageError(f"--space: {key} {kind} range [{low}, {high}] is impossible "
                         f"(need low < high{', low > 0' if kind == 'loguniform' else ''})")
    if key == "batch_size" and num_workers > 1:  # a sampled batch must split over the workers
        raise UsageError(f"--space: batch_size {kind} [{low}, {high}] may sample a batch that "
                         f"{num_workers} workers cannot split evenly; use choice or grid with "
                         f"multiples of {num_workers}")
    _check_value(key, low, check)
    _check_value(key, high if kind != "randint" else high - 1, check)  # randint excludes high
    return {kind: [low, high]}


def _check_value(key: str, value: Any, context: Mapping[str, Any] | None = None) -> None:
    """A value is possible when a TrainConfig accepts it (same checks as the command line), with
    the sweep's ``context`` (worker count, model) around it. ``value`` may be a dict of several
    keys' constants, checked together (``key`` is then unused)."""
    try:
        values = value if isinstance(value, dict) else {key: value}
        overrides = {**(context or {}), **values}
        if overrides.get("schedule") == "step":
            overrides["milestones"] = ((2, 0.1),)
        make_config("fast", **overrides)  # the preset every searched trial starts from
    except (UsageError, TypeError) as exc:
        what = (", ".join(f"{k}={v!r}" for k, v in value.items()) + " are impossible together"
                if isinstance(value, dict) else f"{key}={value!r} is impossible")
        raise UsageError(f"--space: {what} ({exc})") from None


def grid_size(space: dict[str, Any]) -> int:
    """Combinations of the grid keys: each sample of the space runs every one of them."""
    return math.prod(len(spec["grid"]) for spec in space.values()
                     if isinstance(spec, dict) and "grid" in spec)


def largest(space: dict[str, Any], key: str, default: Any) -> Any:
    """The largest value a key can take in the space (its constant, or the top of its range)."""
    spec = space.get(key, default)
    return max(next(iter(spec.values()))) if isinstance(spec, dict) else spec


def to_tune(space: dict[str, Any]) -> dict[str, Any]:
    """Ray Tune's param_space: distributions become Tune domains."""
    domains = {"choice": tune.choice, "grid": tune.grid_search, "uniform": tune.uniform,
               "loguniform": tune.loguniform, "randint": tune.randint}
    out: dict[str, Any] = {RECIPE_KEY: "search"}
    for key, spec in space.items():
        if isinstance(spec, dict):
            kind, args = next(iter(spec.items()))
            out[key] = domains[kind](args) if kind in ("choice", "grid") else domains[kind](*args)
        else:
            out[key] = spec
    return out


def keras_point(space: dict[str, Any], base: TrainConfig) -> dict[str, Any]:
    """The Keras recipe as a fixed trial, with its own values for every searched key."""
    keras = keras_config(base)
    return {RECIPE_KEY: "keras", **{key: getattr(keras, key) for key in space}}


def keras_config(base: TrainConfig) -> TrainConfig:
    """The keras preset, with the sweep's data, epochs, hardware and storage."""
    keep = ("data", "val_size", "subset", "seed", "epochs", "eval_variants", "num_workers",
            "use_gpu", "gpus_per_worker", "cpus_per_worker", "placement", "amp", "channels_last",
            "compile",
            "max_failures", "storage", "name")
    return make_config("keras", **{key: getattr(base, key) for key in keep})


def trial_config(base: TrainConfig, params: Mapping[str, Any], check: bool = True) -> TrainConfig:
    """The TrainConfig of one trial: the sweep's base config with the sampled values. ``check``
    off: as sampled, even if impossible (a trial that failed on it still gets its row)."""
    params = dict(params)
    if params.pop(RECIPE_KEY, "search") == "keras":
        return keras_config(base)
    values = follow_switches({**base.to_dict(), **params, "preset": "search"}, params)
    if values["schedule"] == "step" and not values["milestones"]:
        values["milestones"] = [(math.floor(base.epochs * at) + 1, factor)
                                for at, factor in STEP_DROPS]
    return TrainConfig.from_dict(values, check)
