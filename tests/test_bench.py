"""jobs.bench: the table code in-process on tiny real inputs (timing mechanics, ratios, the
breakdown), and ``--gpu-check --smoke`` end to end as CI's one real benchmark run (no speed is
asserted: this machine is shared)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from resnet.config import make_config
from resnet.data import load_splits
from resnet.bench.compare import VAL_SHARE, compare, interleaved
from tests.conftest import run_job


def test_interleaved_times_the_sides_in_turn_and_takes_medians():
    calls = []
    sides = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    rates = interleaved(sides, items=10, rounds=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b"] * 4  # warm-up, then A, B, A, B, A, B
    assert set(rates) == {"a", "b"} and all(r > 0 for r in rates.values())


def test_table_1_and_its_breakdown_on_real_images(cifar, shared_archive):
    batch, steps = 16, 2
    _, splits = load_splits(str(shared_archive), max(10, round(batch * steps * VAL_SHARE)),
                            batch * steps, 0)
    config = make_config("fast", model="tiny", batch_size=batch)
    out = compare(config, splits, steps=1, rounds=2, device=torch.device("cpu"))
    step, epoch = out["rows"]
    assert step["compare"] == "training step" and epoch["compare"].startswith("whole epoch")
    for row in out["rows"]:
        assert row["ratio"] == row["project_samples_per_s"] / row["bare_samples_per_s"] > 0
    parts = {p["part"]: p for p in out["breakdown"]}
    assert set(parts) == {"bare step (forward, backward, SGD step)", "gather + augmentation",
                          "LR schedule", "EMA update", "accumulators",
                          "epoch plan (order, shifts, flips)", "evaluation (EMA, TTA), per step",
                          "checkpoint, per step"}
    assert parts["bare step (forward, backward, SGD step)"]["share_of_bare_step"] == 1.0
    assert all(p["ms_per_step"] > 0 for p in out["breakdown"])  # the fast preset has every extra


@pytest.mark.e2e
def test_gpu_check_smoke_runs_every_part(shared_archive, tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = run_job("jobs.bench", "--gpu-check", "--smoke", "--data", str(shared_archive),
                   "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tables = json.loads(out.read_text())["tables"]
    assert [title.split(".")[0] for title in tables] == ["1", "2", "3", "4", "5"]
    for title in tables:
        assert title in proc.stdout
    by_number = {title.split(".")[0]: rows for title, rows in tables.items()}
    epochs = by_number["1"]
    assert [(r["model"], r["compile"]) for r in epochs] == [("resnet20", False), ("resnet20", True)]
    assert all(r["epoch_s"] > 0 and math.isfinite(r["ratio"]) for r in epochs)
    [target] = by_number["2"]
    assert target["model"] == "resnet20" and target["wall_s"] > 0
    assert (target["reached_at_epoch"] is None) == ("best_val_acc" in target)
    packed = by_number["3"]
    assert [r["trials"] for r in packed] == [1, 2] and packed[0]["vs_one_trial"] == 1.0
    assert all(r["aggregate_samples_per_s"] > 0 for r in packed)
    startup = {row["run"]: row for row in by_number["4"]}
    assert set(startup) == {"jobs.train, cold cache", "jobs.train, warm cache",
                            "no-op TorchTrainer"}
    assert all(row["to_first_step_s"] > row["worker_group_start_s"] > 0
               for row in startup.values())
    [predict] = by_number["5"]  # jobs.predict's pipeline (on this CPU) against the plain loop
    assert predict["images"] == 512 and predict["pipeline"].startswith("1 replica(s) x ")
    assert predict["ratio"] == predict["pipeline_images_per_s"] / predict["plain_images_per_s"] > 0
