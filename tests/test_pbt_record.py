"""PBT records what ran (issue 29), without Ray: the per-epoch hyperparameters every optimizer
applies, the step-by-step replay, seeded draws, unique clone runs, clone epochs recovered, and the
values PBT fixes for its population."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from resnet.config import make_config
from resnet.data import Splits
from resnet.errors import UsageError
from resnet.train.checkpoint import save_state
from resnet.train.loop import build_loop, train_epoch
from resnet.train.schedules import make_schedule
from resnet.tune.search import check_search, fix_for_pbt, make_scheduler, mutations
from resnet.tune.space import load_space


def splits(n: int = 64) -> Splits:
    rng = np.random.default_rng(0)
    return Splits(("a", "b"), rng.integers(0, 255, (n, 3, 32, 32), dtype=np.uint8),
                  rng.integers(0, 2, n), rng.integers(0, 255, (8, 3, 32, 32), dtype=np.uint8),
                  rng.integers(0, 2, 8))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "rmsprop"])
def test_a_replayed_weight_decay_is_applied_per_epoch_by_every_optimizer(optimizer):
    """Recorded [1e-3, 5e-5]: epoch 1 trains with 1e-3, epoch 2 with 5e-5 (Adam and RMSprop
    kept the config's value before)."""
    config = make_config(model="tiny", optimizer=optimizer, epochs=2, batch_size=32,
                         weight_decay=2e-4, lr_by_epoch=((1e-3, 0.9, 1e-3), (1e-3, 0.9, 5e-5)))
    loop = build_loop(config, splits(), torch.device("cpu"))
    seen = []
    for epoch in range(2):
        train_epoch(loop, epoch)
        seen.append(loop.optimizer.param_groups[0]["weight_decay"])
    assert seen == [1e-3, 5e-5]


def test_every_steps_lr_is_logged_and_a_replay_sets_it_step_by_step():
    config = make_config(model="tiny", epochs=2, batch_size=16, lr=0.1, warmup_frac=0.3)
    loop = build_loop(config, splits(), torch.device("cpu"))
    logged = [train_epoch(loop, epoch)["lr_steps"] for epoch in range(2)]
    assert [len(steps) for steps in logged] == [4, 4] and logged[0][0] < logged[0][-1]
    # A record from another shape (a donor's, say) is followed exactly, then the fallback.
    other = ((0.5, 0.4, 0.3, 0.2), (0.1, 0.05, 0.02, 0.01))
    replay = config.replace(epochs=3, lr_by_epoch=((0.5, 0.9, 5e-4), (0.1, 0.9, 5e-4)),
                            lr_by_step=other)
    loop = build_loop(replay, splits(), torch.device("cpu"))
    assert [train_epoch(loop, e)["lr_steps"] for e in range(2)] == [list(r) for r in other]
    with pytest.raises(UsageError, match="recorded with 4 steps an epoch; this run takes 2"):
        make_schedule(replay.replace(batch_size=32), 2)


def test_pbt_draws_follow_the_seed_and_leave_the_processs_generators_alone():
    space = {"lr": {"loguniform": [0.01, 1.0]}, "weight_decay": {"choice": [1e-4, 5e-4, 1e-3]}}

    def decisions(seed: int) -> list[dict]:
        scheduler = make_scheduler("pbt", 10, 1, 1, space, seed)
        config = {"lr": 0.1, "weight_decay": 5e-4}
        return [scheduler.explore(config) for _ in range(20)]

    random.seed(123)
    outside = random.random()
    random.seed(123)
    first = decisions(3)
    assert random.random() == outside  # the process's generator was not drawn from
    assert decisions(3) == first
    assert decisions(4) != first


def test_a_second_exploit_of_the_same_donor_at_the_same_epoch_gets_a_new_run(tmp_path):
    from resnet.tune.trial import clone_run_name
    runs = tmp_path / "train_runs"
    runs.mkdir()
    first = clone_run_name(str(runs), "t1", "t2", 3)
    assert first == "t1-from-t2-e3"
    (runs / first).mkdir()  # Ray Train would resume this run instead of starting the clone
    second = clone_run_name(str(runs), "t1", "t2", 3)
    assert second != first and second.startswith("t1-from-t2-e3")


def test_a_clones_epochs_come_back_from_its_runs_after_a_resume(tmp_path):
    """Trial t trained epochs 1-2 itself, then cloned donor d at epoch 2 and trained 3-4 in a
    new run; after a resume Tune's rows hold only epoch 5. Epochs 1-4 of t come back: 1-2 from
    its own run, 3-4 from the clone's (not d's epochs 1-2, which the clone's history carries)."""
    import pandas as pd

    from resnet.tune.results import METRICS, with_checkpointed_epochs
    exp = tmp_path / "sweep"

    def run(name: str, history: list[dict], when: int) -> None:
        folder = exp / "train_runs" / name
        last = folder / f"epoch_{history[-1]['epoch']:04d}"
        last.mkdir(parents=True)
        save_state(last, {"model": {}, "config": {}, "history": history})
        snapshot = folder / "checkpoint_manager_snapshot.json"
        snapshot.write_text(json.dumps({"latest_checkpoint_result": {
            "checkpoint_dir_name": last.name, "metrics": history[-1]}}))
        os.utime(snapshot, ns=(when, when))

    def epoch(e: int, by: str, val_acc: float) -> dict:
        return {"epoch": e, "val_acc": val_acc, "trained_by": by, "diverged": False}

    run("t", [epoch(1, "t", 0.1), epoch(2, "t", 0.2)], when=10**18)
    run("t-from-d-e2", [epoch(1, "d", 0.5), epoch(2, "d", 0.6), epoch(3, "t", 0.7),
                        epoch(4, "t", 0.8)], when=2 * 10**18)
    rows = pd.DataFrame([{**dict.fromkeys(METRICS), "epoch": 5, "val_acc": 0.9}])
    filled = with_checkpointed_epochs(rows, str(exp), "t").sort_values("epoch")
    assert filled["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert filled["val_acc"].tolist() == [0.1, 0.2, 0.7, 0.8, 0.9]
    assert filled["train_run"].tolist()[:4] == ["t", "t", "t-from-d-e2", "t-from-d-e2"]


def test_pbt_runs_on_the_default_space_with_what_it_cannot_vary_fixed():
    base = make_config("fast")
    for profile in ("gpu", "cpu"):
        space = load_space(None, "sgd", profile)
        check_search("pbt", "random", False, space, None)  # the defaults: no refusal
        fixed_space, fixed = fix_for_pbt(space, base)
        assert set(fixed) == {"batch_size", "schedule"}
        assert fixed["schedule"] == "onecycle"
        assert fixed["batch_size"] == base.batch_size == 128  # the preset's, as both offer it
        # A preset value the space does not offer: the space's first.
        first = space["batch_size"]["choice"][0]
        assert fix_for_pbt(space, base.replace(batch_size=1024))[1]["batch_size"] == first
        assert "lr" in mutations(fixed_space)
    # The user's own --space that varies one is still refused, naming it.
    with pytest.raises(UsageError, match="batch_size must be fixed in --space"):
        check_search("pbt", "random", False, {}, {"batch_size": {"choice": [64, 128]}})


def test_resume_with_another_max_concurrent_is_refused_in_one_line(tmp_path):
    from tests.test_sweep import flags, stored_sweep

    from resnet.tune.settings import resume_sweep
    stored_sweep(tmp_path)
    with pytest.raises(UsageError, match="max_concurrent null \\(now 3: Tune restores its "
                                         "search algorithm") as info:
        resume_sweep(*flags(tmp_path, max_concurrent=3))
    assert "\n" not in str(info.value)
