"""Searching schedules (issue 18): Population Based Training on real trials (a clone really starts
from its donor's weights), the winner's schedule replayed by jobs.train, and Optuna's TPE with
ASHA, interrupted and resumed. Tiny model, real images, the session's Ray."""

from __future__ import annotations

import contextlib
import io
import json

import pandas as pd
import pytest

from resnet.train.checkpoint import load_state, weights_digest
from resnet.config import make_config
from resnet.tune.replay import read_schedule
from resnet.infra import storage
from tests.conftest import download, run_job, s3_location, trial_runs
from tests.test_faults import interrupt

pytestmark = pytest.mark.ray


def tiny_sweep(tmp_path, archive, space: dict, *flags: str, root: str | None = None) -> list[str]:
    (tmp_path / "space.json").write_text(json.dumps(space))
    return ["--data", str(archive), "--model", "tiny", "--space", str(tmp_path / "space.json"),
            "--subset", "512", "--val-size", "200", "--cpu", "--gradcam-images", "0",
            "--storage", root or str(tmp_path), *flags]


def storage_for(request, tmp) -> str:
    """The storage root of a test parametrised over ``local`` and ``s3``."""
    if request.param == "local":
        return str(tmp)
    return s3_location(request.getfixturevalue("s3_server"), tmp.name)


@pytest.fixture(scope="module", params=["local", "s3"])
def pbt(request, ray_local, shared_archive, tmp_path_factory):
    """4 trials x 4 epochs, a perturbation every epoch, 2 at a time (PBT pauses and resumes
    them in turn): two cannot learn (LR 1e-5) and are the bottom of the population at their
    reports, so one of them clones a trial that learns (LR 0.2) once that one has been top at a
    report of its own (asynchronous PBT checkpoints a donor then). The space leaves batch size
    and schedule family to the CPU profile, which varies them: PBT fixes them (issue 29)."""
    from jobs.tune import main
    tmp = tmp_path_factory.mktemp(f"pbt-{request.param}")
    root = storage_for(request, tmp)
    space = {"lr": {"grid": [1e-5, 0.2]}, "ema": 0.0, "tta": False}
    console = io.StringIO()
    with contextlib.redirect_stdout(console):
        code = main(tiny_sweep(tmp, shared_archive, space, "--samples", "2", "--epochs", "4",
                               "--scheduler", "pbt", "--perturbation-interval", "1",
                               "--max-concurrent", "2", "--name", "pbt", root=root))
    assert code == 0, console.getvalue()[-3000:]
    assert "PBT: batch_size 128, schedule onecycle fixed for the whole population" in \
        console.getvalue()
    # A local copy to read with pathlib (for S3: downloaded from the bucket).
    return tmp / "pbt" if request.param == "local" else download(storage.join(root, "pbt"),
                                                                 tmp / "copy")


def test_a_pbt_clone_starts_from_its_donors_weights(pbt):
    trials = pd.read_parquet(pbt / "trials.parquet")
    clones = trials[trials["cloned_from"].notna()]
    assert len(clones), "no trial exploited another in 4 epochs of 4 trials"
    assert set(clones["cloned_at_epoch"]) & {1, 2, 3}
    for _, row in clones.iterrows():
        donor, at = row["cloned_from"], int(row["cloned_at_epoch"])
        assert row["epoch"] == at + 1 and donor != row["trial_id"]
        # The donor's Tune checkpoint of that epoch (PBT keeps them all): the clone's first epoch
        # started from exactly its weights.
        sources = [p.parent for p in (pbt / f"trial_{donor}").glob("checkpoint_*/source.json")
                   if json.loads(p.read_text())["epoch"] == at]
        assert sources, (donor, at)
        state = load_state(sources[-1])
        assert row["start_weights"] == weights_digest(state.get("train_model", state["model"]))
        # ... not its own, and not fresh initial weights (every trial starts from the same seed).
        own = trials[(trials["trial_id"] == row["trial_id"]) & (trials["epoch"] == 1)]
        assert row["start_weights"] != own["start_weights"].iloc[0]
    # The LR each epoch ran with is recorded, and a clone runs with a perturbed one.
    assert trials["lr_peak"].notna().all() and trials["lr"].notna().all()
    sweep = json.loads((pbt / "sweep.json").read_text())["sweep"]
    assert (sweep["scheduler"], sweep["perturbation_interval"]) == ("pbt", 1)


def latest_history(run) -> list[dict]:
    """The per-epoch log in a Ray Train run's latest checkpoint, as its workers wrote it."""
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    return load_state(run / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"])["history"]


def logged_epochs(exp, trial_id: str) -> list[dict]:
    """Every epoch the workers of a trial's Train runs logged (its own and its clones'); only
    the epochs that trial trained."""
    return [m for run in (exp / "train_runs").glob(f"{trial_id}*")
            for m in latest_history(run) if m["trained_by"] == trial_id]


def test_what_ran_is_what_the_schedule_records(pbt):
    """best/schedule.json (and the record of every clone's best checkpoint): each epoch's LR of
    every step, peak LR, momentum and weight decay are what the workers of the run that trained
    that epoch logged, along the lineage through the donors; the recipe is the checkpoint's."""
    from resnet.train.checkpoint import load_state as load
    from resnet.tune.replay import schedule_document
    from resnet.config import TrainConfig
    summary = json.loads((pbt / "summary.json").read_text())
    trials = pd.read_parquet(pbt / "trials.parquet")
    kept = trials[trials["checkpoint_path"].map(  # local, or in the bucket
        lambda p: isinstance(p, str) and storage.exists(storage.join(p, "checkpoint.pt")))]
    documents = {"winner": json.loads((pbt / "best" / "schedule.json").read_text())}
    for _, row in kept.iterrows():  # every checkpoint Ray kept, by the code finish() uses
        state = load(row["checkpoint_path"])
        documents[f"{row['trial_id']}@{row['epoch']}"] = schedule_document(
            TrainConfig.from_dict(state["config"]), state["history"], {})
    winner = documents[f"{summary['best_trial']}@{summary['best_epoch']}"]
    assert winner["config"] == documents["winner"]["config"]  # the checkpoint's own recipe
    assert winner["epochs"] == documents["winner"]["epochs"]
    lineages = 0
    for name, document in documents.items():
        trained_by = {e["trained_by"] for e in document["epochs"]}
        lineages += len(trained_by) > 1
        for entry in document["epochs"]:
            logged = [m for m in logged_epochs(pbt, entry["trained_by"])
                      if m["epoch"] == entry["epoch"]]
            assert any(m["lr_steps"] == entry["lr_steps"] and m["lr_peak"] == entry["lr_peak"]
                       and m["momentum"] == entry["momentum"]
                       and m["weight_decay"] == entry["weight_decay"] for m in logged), \
                (name, entry["epoch"], entry["trained_by"])
    assert lineages, "no checkpoint with a donor in its lineage"
    with_exploit = len({e["trained_by"] for e in documents["winner"]["epochs"]}) > 1
    print(f"\nPBT winner {summary['best_trial']}: lineage "
          f"{[e['trained_by'] for e in documents['winner']['epochs']]} "
          f"({'with' if with_exploit else 'without'} an exploit)")


@pytest.mark.parametrize("pbt", ["local"], indirect=True)
def test_the_winners_schedule_replays_step_by_step_and_bit_for_bit(pbt, shared_archive, tmp_path):
    from resnet.train.driver import train_driver_fn
    summary = json.loads((pbt / "summary.json").read_text())
    schedule = json.loads((pbt / "best" / "schedule.json").read_text())
    assert schedule["trial_id"] == summary["best_trial"]
    assert [e["epoch"] for e in schedule["epochs"]] == list(range(1, summary["best_epoch"] + 1))
    values = read_schedule(str(pbt / "best" / "schedule.json"))
    replays = []
    for name in ("replay-a", "replay-b"):
        config = make_config(**{**values, "data": str(shared_archive), "use_gpu": False,
                                "cpus_per_worker": 1, "storage": str(tmp_path), "name": name})
        train_driver_fn(config)
        replays.append(latest_history(tmp_path / name))
    recorded = schedule["epochs"]
    for replay in replays:  # every step's LR as logged, momentum and decay epoch by epoch
        assert [m["lr_steps"] for m in replay[:len(recorded)]] == [e["lr_steps"] for e in recorded]
        assert [(m["momentum"], m["weight_decay"]) for m in replay[:len(recorded)]] == \
            [(e["momentum"], e["weight_decay"]) for e in recorded]
    keys = ("loss", "acc", "val_loss", "val_acc", "lr", "start_weights")
    assert [{k: m[k] for k in keys} for m in replays[0]] == \
        [{k: m[k] for k in keys} for m in replays[1]]  # two replays: bit for bit on the CPU


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    return storage_for(request, tmp_path)


@pytest.mark.e2e
def test_optuna_proposes_the_trials_runs_with_asha_and_resumes(shared_archive, tmp_path, root):
    space = {"schedule": "onecycle", "lr": {"loguniform": [0.01, 0.3]}, "batch_size": 64,
             "label_smoothing": {"uniform": [0.0, 0.2]}}
    args = ["jobs.tune", *tiny_sweep(tmp_path, shared_archive, space, "--samples", "4",
                                     "--epochs", "3", "--search", "optuna", "--scheduler", "asha",
                                     "--max-concurrent", "1", "--name", "optuna", root=root)]
    runs = storage.join(root, "optuna", "train_runs")
    stopped, _ = interrupt(args, lambda: trial_runs(runs), tmp_path)
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    done = run_job(*args, "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    exp = download(storage.join(root, "optuna"), tmp_path / "copy") if not storage.is_local(root) \
        else tmp_path / "optuna"
    assert json.loads((exp / "sweep.json").read_text())["sweep"]["search"] == "optuna"
    trials = pd.read_parquet(exp / "trials.parquet")
    assert trials["trial_id"].nunique() == 4
    assert set(trials["status"]) <= {"completed", "early-stopped"}
    assert json.loads((exp / "sweep.json").read_text())["sweep"]["scheduler"] == "asha"
    # The configs came from Optuna: its study (restored from the sweep's searcher state) holds
    # exactly the values the trials ran with.
    from ray.tune.search.optuna import OptunaSearch
    searcher = OptunaSearch()
    searcher.restore_from_dir(str(exp))
    proposed = sorted(round(t.params["lr"], 12) for t in searcher._ot_study.trials)
    ran = sorted(round(v, 12) for v in trials.drop_duplicates("trial_id")["config/lr"])
    assert proposed == ran
