"""A sweep's results on synthetic trial tables (no Ray): the winner, ties, diverged trials, metric
and mode. Checkpoints are real folders on disk, written or left out as Ray Train leaves them."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from resnet.train.checkpoint import CHECKPOINT_FILE
from resnet.tune.results import (SweepResults, best_row, first_at_target, first_epochs, metric_mode,
                                 per_trial, print_table)


def table(tmp_path, rows, kept=None):
    """Trial rows ``(trial, epoch, val_acc, status)``; a checkpoint folder per row, with its
    ``checkpoint.pt`` only for the (trial, epoch) pairs in ``kept`` (default: all)."""
    records = []
    for trial, epoch, val_acc, status in rows:
        folder = tmp_path / trial / f"epoch_{epoch:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        if kept is None or (trial, epoch) in kept:
            (folder / CHECKPOINT_FILE).write_bytes(b"a checkpoint")
        records.append({"trial_id": trial, "epoch": epoch, "val_acc": val_acc, "status": status,
                        "recipe": "search", "checkpoint_path": str(folder), "lr": 0.1,
                        "diverged": status == "diverged", "time_total_s": 10.0 * epoch,
                        "config/schedule": "onecycle", "config/lr": 0.1,
                        "config/batch_size": 64, "config/weight_decay": 5e-4,
                        "config/label_smoothing": 0.1, "config/warmup_frac": 0.15,
                        "config/final_lr_ratio": 0.0})
    frame = pd.DataFrame(records)
    frame["epoch"] = frame["epoch"].astype("Int64")
    return frame


def test_a_tie_goes_to_the_later_epoch_whose_checkpoint_ray_kept(tmp_path):
    # val_acc 0.1 at every epoch (the lr=1e-6 reproduction): Ray Train kept only epoch 3.
    trials = table(tmp_path, [("a", e, 0.1, "completed") for e in (1, 2, 3)], kept={("a", 3)})
    best = best_row(trials)
    assert (best["trial_id"], best["epoch"], best["val_acc"]) == ("a", 3, 0.1)
    assert best["checkpoint_path"].endswith("epoch_0003")
    # The per-trial table names the same epoch.
    assert per_trial(trials, 0.88).iloc[0]["best_epoch"] == 3


def test_each_trial_reports_its_final_epoch_beside_its_best(tmp_path):
    # A trial that peaked at epoch 2 and ended lower, its rows out of order (as a resume leaves
    # them): the final value is the last epoch's, not the last row's nor the best.
    trials = table(tmp_path, [("a", 1, 0.5, "completed"), ("a", 3, 0.6, "completed"),
                              ("a", 2, 0.7, "completed"), ("b", 1, 0.4, "completed")])
    rows = per_trial(trials, 0.88).set_index("trial")
    assert (rows.loc["a", "best_val_acc"], rows.loc["a", "best_epoch"]) == (0.7, 2)
    assert rows.loc["a", "final_val_acc"] == 0.6 and rows.loc["b", "final_val_acc"] == 0.4
    loss = per_trial(trials.assign(val_loss=[0.9, 0.8, 0.7, 1.0]), 0.88, metric="val_loss")
    assert loss.set_index("trial").loc["a", "final_val_loss"] == 0.8  # epoch 3's row


def test_the_winner_is_never_a_checkpoint_that_is_gone(tmp_path):
    # The highest val_acc's checkpoint was lost: the best one that exists wins instead.
    trials = table(tmp_path, [("a", 1, 0.5, "completed"), ("a", 2, 0.4, "completed"),
                              ("b", 1, 0.45, "completed")], kept={("a", 2), ("b", 1)})
    assert (best_row(trials)["trial_id"], best_row(trials)["epoch"]) == ("b", 1)
    none_left = table(tmp_path / "gone", [("a", 1, 0.5, "completed")], kept=set())
    assert best_row(none_left) is None


def test_diverged_and_unscored_rows_never_win(tmp_path):
    trials = table(tmp_path, [("a", 1, 0.3, "completed"), ("b", 1, 0.9, "diverged"),
                              ("c", 1, math.nan, "completed"), ("d", 1, math.inf, "completed")])
    assert best_row(trials)["trial_id"] == "a"
    table_rows = per_trial(trials, 0.88)
    assert table_rows.iloc[-1]["status"] == "diverged"  # ranked last despite its 0.9


def test_ties_between_trials_go_to_the_later_epoch_then_the_lower_trial_id(tmp_path):
    trials = table(tmp_path, [("b", 1, 0.6, "completed"), ("a", 2, 0.6, "completed"),
                              ("c", 2, 0.6, "completed")])
    assert (best_row(trials)["trial_id"], best_row(trials)["epoch"]) == ("a", 2)


def test_first_epoch_at_target_per_trial_and_overall(tmp_path):
    trials = table(tmp_path, [("a", 1, 0.5, "completed"), ("a", 2, 0.89, "completed"),
                              ("b", 1, 0.87, "completed"), ("b", 2, 0.88, "completed"),
                              ("c", 1, 0.2, "early-stopped")])
    assert first_epochs(trials, 0.88) == {"a": 2, "b": 2, "c": None}
    assert first_at_target(trials, 0.88) == {"trial_id": "a", "epoch": 2}
    assert first_at_target(trials, 0.95) is None


def test_the_console_names_the_winners_own_passage_of_the_target_and_its_last_epoch(
        tmp_path, capsys):
    # b passes first (epoch 1) but a wins (0.91 at epoch 3), passing at epoch 2 and ending lower.
    trials = table(tmp_path, [("a", 1, 0.5, "completed"), ("a", 2, 0.885, "completed"),
                              ("a", 3, 0.91, "completed"), ("a", 4, 0.9, "completed"),
                              ("b", 1, 0.881, "completed"), ("c", 1, 0.3, "early-stopped")])
    results = SweepResults(trials=trials, configs={}, best=best_row(trials),
                           first_epoch_per_trial=first_epochs(trials, 0.88),
                           first_at_target=first_at_target(trials, 0.88))
    print_table(results, 0.88)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2] == ("target val_acc 0.88 reached by trial b at epoch 1; best 0.9100 "
                         "(trial a, epoch 3)")
    assert lines[-1] == "winner a: passed 0.88 at epoch 2, val_acc 0.9000 at its last epoch (4)"
    print_table(SweepResults(trials=trials, configs={}, best=best_row(trials),
                             first_epoch_per_trial=first_epochs(trials, 0.95),
                             first_at_target=None), 0.95)
    assert capsys.readouterr().out.strip().splitlines()[-1] == \
        "winner a: never passed 0.95, val_acc 0.9000 at its last epoch (4)"


@pytest.mark.parametrize("metric, mode", [("val_acc", "max"), ("val_loss", "min"),
                                          ("loss", "min"), ("val_acc_plain", "max")])
def test_losses_are_minimised_everything_else_maximised(metric, mode):
    assert metric_mode(metric) == mode


def test_per_trial_ranks_by_a_loss_lowest_first(tmp_path):
    trials = table(tmp_path, [("a", 1, 0.5, "completed"), ("b", 1, 0.6, "completed")])
    trials["val_loss"] = [0.9, 1.2]
    ranked = per_trial(trials, 0.88, metric="val_loss")
    assert ranked["trial"].tolist() == ["a", "b"] and ranked["best_val_loss"].tolist() == [0.9, 1.2]
    by_acc = per_trial(trials, 0.88)
    assert by_acc["trial"].tolist() == ["b", "a"]


def test_a_trial_rescued_after_diverging_can_win_at_an_epoch_after_the_rescue(tmp_path):
    """PBT: trial b diverged at epoch 2, then cloned a donor at epoch 2 and went on; its status
    and its best epoch are per row: the diverged row never wins, the rows after the rescue do."""
    from resnet.tune.results import trial_status
    rows = [("a", 1, 0.30, "completed"), ("a", 2, 0.40, "completed"), ("a", 3, 0.45, "completed"),
            ("b", 1, 0.20, "completed"), ("b", 2, 0.95, "completed"), ("b", 3, 0.50, "completed")]
    trials = table(tmp_path, rows)
    trials.loc[(trials["trial_id"] == "b") & (trials["epoch"] == 2), "diverged"] = True
    b = trials[trials["trial_id"] == "b"]
    assert trial_status("TERMINATED", b, epochs=3) == "completed"  # rescued: it ended training
    assert trial_status("TERMINATED", b[b["epoch"] <= 2], epochs=3) == "diverged"  # ended there
    trials["status"] = trials["trial_id"].map({"a": "completed", "b": "completed"})
    best = best_row(trials)
    assert (best["trial_id"], best["epoch"]) == ("b", 3)  # not the diverged row's 0.95
    table_rows = per_trial(trials, 0.88).set_index("trial")
    assert table_rows.loc["b", "best_epoch"] == 3 and table_rows.loc["b", "best_val_acc"] == 0.5
