"""How a sweep searches: the trial scheduler (ASHA, FIFO or Population Based Training) and the
search algorithm (random/grid sampling or Optuna's TPE), built from the sweep's settings.

- random + ASHA: independent trials; weak ones stop at the rungs. Cheapest per good result when
  the space is wide.
- PBT: a population trained side by side; every ``perturbation_interval`` epochs the bottom
  quarter clones the top quarter's latest checkpoint and perturbs its LR (x0.8 or x1.2, or a
  fresh draw), so the LR itself is searched during training. Keeps every trial's checkpoints.
  Its draws follow --seed; what a clone cannot change (batch, schedule family, optimizer) is
  fixed for the population.
- Optuna (TPE): each new trial's values are proposed from the results so far; with ASHA.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
from ray import tune
from ray.tune.schedulers import (ASHAScheduler, FIFOScheduler, PopulationBasedTraining,
                                 TrialScheduler)
from ray.tune.schedulers.pbt import _explore  # the explore step of Ray's own exploit
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.basic_variant import BasicVariantGenerator

from resnet.errors import UsageError
from resnet.tune.space import RECIPE_KEY, grid_size, to_tune

SCHEDULERS = ("asha", "fifo", "pbt")
SEARCHERS = ("random", "optuna")
PBT_MUTATED = ("lr", "momentum", "weight_decay")  # lr always; the others when searched
# What a clone cannot change: it takes its donor's weights and optimizer state.
PBT_FIXED = ("optimizer", "batch_size", "schedule")


def check_search(scheduler: str, search: str, keras_trial: bool, space: dict[str, Any],
                 space_file: dict[str, Any] | None = None) -> None:
    """Combinations that cannot work, refused before the sweep starts. ``space_file``: the
    keys the user's --space file set (a grid there is refused with Optuna; a profile's grid
    becomes a choice, see ``param_space``)."""
    if search == "optuna":
        grids = sorted(k for k, v in (space_file or {}).items() if isinstance(v, dict) and "grid" in v)
        if grids:
            raise UsageError(f"--search optuna: {', '.join(grids)} use grid, which Optuna has no "
                             "notion of; write them as choice: [...] in --space, or use --search "
                             "random")
        if scheduler == "pbt":
            raise UsageError("--search optuna with --scheduler pbt: PBT changes the values of "
                             "running trials, Optuna proposes new trials; pick one")
    if keras_trial and (scheduler == "pbt" or search == "optuna"):
        how = "--scheduler pbt" if scheduler == "pbt" else "--search optuna"
        raise UsageError(f"--keras-trial with {how}: the Keras recipe is a fixed trial of another "
                         "optimizer (PBT would clone it, Optuna cannot propose it); pass "
                         "--no-keras-trial")
    if scheduler == "pbt":  # the user's own --space may not vary them; defaults are fixed
        varied = [k for k in PBT_FIXED if isinstance((space_file or {}).get(k), dict)
                  and not _single(space_file[k])]
        if varied:
            raise UsageError(f"--scheduler pbt: {', '.join(varied)} must be fixed in --space (a "
                             "clone takes the donor's weights and optimizer state, so the "
                             "population shares the optimizer, batch and schedule family)")


def fix_for_pbt(space: dict[str, Any], base: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The space with what PBT cannot vary within a population (``PBT_FIXED``) fixed: the base
    config's value (the preset's) when the space offers it, else the space's first. Returns the
    space and the values fixed."""
    fixed = {}
    for key in PBT_FIXED:
        spec = space.get(key)
        if isinstance(spec, dict) and not _single(spec):
            kind, values = next(iter(spec.items()))
            if kind in ("choice", "grid"):
                fixed[key] = getattr(base, key) if getattr(base, key) in values else values[0]
            else:  # a numeric range: the preset's value
                fixed[key] = getattr(base, key)
    return {**space, **fixed}, fixed


def _single(spec: dict[str, Any]) -> bool:
    kind, args = next(iter(spec.items()))
    return kind in ("choice", "grid") and len(args) == 1


def make_scheduler(scheduler: str, epochs: int, grace: int, interval: int,
                   space: dict[str, Any], seed: int) -> TrialScheduler:
    if scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=grace,
                             reduction_factor=2)
    if scheduler == "fifo":
        return FIFOScheduler()
    return SeededPBT(
        time_attr="epoch", perturbation_interval=interval, quantile_fraction=0.25,
        resample_probability=0.25, hyperparam_mutations=mutations(space),
        custom_explore_fn=None, log_config=True, require_attrs=True, seed=seed)


class SeededPBT(PopulationBasedTraining):
    """Ray's PBT with its draws (which trial to clone, how to perturb or resample) from its own
    generators, seeded by the sweep's --seed: Ray's PBT draws from the process-wide ``random``
    and NumPy generators, which nothing seeds. Given the same results in the same order, two
    sweeps with one seed take the same decisions; the generators' state is part of the
    scheduler's, so a resumed sweep continues the sequence."""

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._draws = (random.Random(seed).getstate(), np.random.RandomState(seed).get_state())

    @contextlib.contextmanager
    def _own_draws(self):
        outside = random.getstate(), np.random.get_state()
        random.setstate(self._draws[0])
        np.random.set_state(self._draws[1])
        try:
            yield
        finally:
            self._draws = random.getstate(), np.random.get_state()
            random.setstate(outside[0])
            np.random.set_state(outside[1])

    def on_trial_add(self, tune_controller, trial) -> None:
        with self._own_draws():
            super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        with self._own_draws():
            return super().on_trial_result(tune_controller, trial, result)

    def explore(self, config: dict[str, Any]) -> dict[str, Any]:
        """A perturbed copy of ``config``, as an exploit makes one (the same draws)."""
        with self._own_draws():
            return _explore(config, self._hyperparam_mutations, self._resample_probability,
                            self._perturbation_factors, self._custom_explore_fn)[0]


def mutations(space: dict[str, Any]) -> dict[str, Any]:
    """What PBT perturbs: the LR always (within its searched range, or 4x either way of a fixed
    LR), momentum and weight decay when the space searches them."""
    domains = to_tune(space)
    out = {}
    for key in PBT_MUTATED:
        spec = space.get(key)
        if isinstance(spec, dict) and ("grid" in spec or "choice" in spec):
            # A list: PBT perturbs to a neighbouring value (a grid_search is no distribution).
            out[key] = sorted(next(iter(spec.values())))
        elif isinstance(spec, dict):
            out[key] = domains[key]
        elif key == "lr":
            out[key] = tune.loguniform(spec / 4, spec * 4)
    return out


def make_searcher(search: str, space: dict[str, Any], points: list[dict[str, Any]],
                  concurrent: int, seed: int, samples: int) -> tuple[Searcher, int]:
    """The search algorithm, limited to ``concurrent`` trials at a time, and the number of
    trials Tune must sample (``num_samples``)."""
    if search == "optuna":
        from ray.tune.search.optuna import OptunaSearch
        searcher = OptunaSearch(seed=seed)  # the space comes from the Tuner's param_space
        return ConcurrencyLimiter(searcher, max_concurrent=concurrent), samples
    # The generator limits concurrency itself (Tune ignores max_concurrent_trials with it);
    # Tune's points replace samples, so the Keras trial comes on top of --samples.
    return (BasicVariantGenerator(points_to_evaluate=points, max_concurrent=concurrent,
                                  random_state=seed), samples + len(points))


def param_space(space: dict[str, Any], search: str) -> dict[str, Any]:
    """Tune's param_space. Optuna needs every key to be a domain (it has no constants in its
    space): fixed values become a single choice there."""
    if search != "optuna":
        return to_tune(space)
    as_choices = {k: {"choice": v["grid"]} if isinstance(v, dict) and "grid" in v else v
                  for k, v in space.items()}  # a profile's grid (the user's was refused)
    return {k: v if hasattr(v, "sample") else tune.choice([v])
            for k, v in to_tune(as_choices).items() if k != RECIPE_KEY}


def trials_planned(samples: int, space: dict[str, Any], keras_trial: bool, search: str) -> int:
    return samples * (grid_size(space) if search != "optuna" else 1) + keras_trial
