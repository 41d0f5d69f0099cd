"""Ray integration tier: the real training loop in a real local Ray cluster, on a tiny real subset."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import torch

from resnet.train.checkpoint import inference_model, load_state, model_from_state
from resnet.config import make_config
from resnet.data import load_splits
from resnet.infra.cluster import check_shared_storage
from resnet.train.driver import train_driver_fn
from resnet.errors import UsageError
from resnet.models import build_model
from resnet.train.loop import evaluate
from tests.conftest import LOOPBACK, descendants, listening_sockets, reported_epoch, wait_for

pytestmark = pytest.mark.ray


def tiny_run(shared_archive, storage, **overrides):
    """One epoch of the BatchNorm-free tiny model: 512 images, global batch 64, so 8 steps."""
    config = make_config(model="tiny", data=str(shared_archive), subset=512, val_size=200,
                         epochs=1, batch_size=64, lr=0.05, cutout=8, cpus_per_worker=1,
                         storage=str(storage), **overrides)
    return config, train_driver_fn(config)


def test_two_ddp_workers_match_one_worker_with_the_same_global_batch(ray_local, shared_archive,
                                                                      tmp_path):
    _, one = tiny_run(shared_archive, tmp_path, num_workers=1, name="one")
    _, two = tiny_run(shared_archive, tmp_path, num_workers=2, name="two")
    w1 = load_state(one["best_checkpoint"])["model"]
    w2 = load_state(two["best_checkpoint"])["model"]
    torch.manual_seed(0)  # as train_fn_per_worker seeds the initial weights
    initial = build_model("tiny").state_dict()
    assert not torch.allclose(w1["fc.weight"], initial["fc.weight"])
    for key in w1:
        assert torch.allclose(w1[key], w2[key], rtol=1e-4, atol=1e-6), key
    m1, m2 = one["final_metrics"], two["final_metrics"]
    assert (m1["world_size"], m2["world_size"]) == (1, 2)  # as the workers saw it
    assert len(set(m2["pids"].split(","))) == 2 and m2["rendezvous"].startswith("127.0.0.1:")
    assert m1["step"] == m2["step"] == 8
    for key in ("loss", "acc", "val_loss", "val_acc", "lr"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-6), key


def test_outputs_and_rerun_resumes_instead_of_training_again(ray_local, shared_archive, tmp_path):
    config, first = tiny_run(shared_archive, tmp_path, name="resume")
    run_dir = tmp_path / "resume"
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["epoch"].tolist() == [1]
    assert {"epoch", "lr", "loss", "acc", "val_loss", "val_acc", "epoch_s",
            "samples_per_s"} <= set(metrics.columns)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["config"] == config.replace(use_gpu=False).to_dict()
    assert torch.__version__.startswith(summary["provenance"]["versions"]["torch"])
    assert summary["provenance"]["git_revision"]
    state = load_state(first["best_checkpoint"])
    assert (state["epoch"], state["step"]) == (1, 8)

    again = train_driver_fn(config)  # the same command: Ray Train restores the latest checkpoint
    assert again["epochs_completed"] == 1 and again["best_val_acc"] == first["best_val_acc"]
    assert again["final_metrics"]["epoch_s"] == first["final_metrics"]["epoch_s"]  # not retrained

    # Determinism: the same config and seed under another name train to the same metrics.
    twin = train_driver_fn(config.replace(name="twin"))["final_metrics"]
    for key in ("loss", "acc", "val_loss", "val_acc"):
        assert twin[key] == first["final_metrics"][key], key


def test_ema_and_flip_tta_are_what_is_evaluated_and_exported(ray_local, shared_archive, tmp_path):
    config, out = tiny_run(shared_archive, tmp_path, name="ema", ema=0.9, tta=True,
                           bn_bias_decay=False)
    state = load_state(out["best_checkpoint"])
    assert state["ema_count"] == 8  # one EMA update per step
    # The checkpoint's model is the EMA of the weights, not the last raw weights.
    assert not torch.allclose(state["model"]["fc.weight"], state["train_model"]["fc.weight"])

    # The EMA with flip TTA gives exactly the reported val_acc; without the flip it differs.
    _, splits = load_splits(str(shared_archive), 200, 512, 0)
    val = torch.tensor(splits.val_x), torch.tensor(splits.val_y)
    cpu = torch.device("cpu")
    loss, acc = evaluate(inference_model(state), *val, cpu, config)
    assert (loss, acc) == pytest.approx((state["history"][-1]["val_loss"],
                                         state["history"][-1]["val_acc"]), rel=1e-5)
    plain_loss, _ = evaluate(model_from_state(state), *val, cpu, config)
    assert plain_loss != pytest.approx(loss, rel=1e-5)

    # The exported model includes the flip.
    exported = torch.export.load(tmp_path / "ema" / "best" / "model.pt2").module()
    x = val[0][:32].float() / 255
    with torch.no_grad():
        assert torch.allclose(exported(x), inference_model(state)(x), atol=1e-5)


def test_storage_check_reads_a_marker_back_on_every_node(ray_local, tmp_path):
    check_shared_storage(str(tmp_path))  # one node, local disk: visible, and nothing left behind
    assert not list(tmp_path.iterdir())
    with pytest.raises(UsageError, match="not writable from the driver"):
        check_shared_storage("/proc/no-such-storage")


def test_the_embedded_ray_listens_on_loopback_only(ray_local, shared_archive, tmp_path):
    """While a 2-worker run trains: this process (the driver) and every process it started
    (GCS, raylet, dashboard, agents, the Train workers with torch.distributed's rendezvous store
    and gloo's sockets) listen on 127.0.0.1 only."""
    from tests.test_faults import in_background
    assert {node["NodeManagerAddress"] for node in ray_local.nodes()} == {"127.0.0.1"}
    config = make_config(model="tiny", data=str(shared_archive), subset=1000, val_size=200,
                         epochs=3, batch_size=64, num_workers=2, cpus_per_worker=1,
                         storage=str(tmp_path), name="loopback")
    run = in_background(lambda out: out.update(summary=train_driver_fn(config)))
    wait_for(lambda: reported_epoch(tmp_path / "loopback") >= 1 or not run["thread"].is_alive(),
             timeout=600)
    sockets = listening_sockets([os.getpid(), *descendants(os.getpid())])
    run["thread"].join(timeout=600)
    assert "error" not in run, run.get("error")
    assert {a for a, _ in sockets} <= LOOPBACK, sockets
    # The check saw the rendezvous store (its port, as the run recorded it) while it listened.
    host, port = run["summary"]["final_metrics"]["rendezvous"].rsplit(":", 1)
    assert host == "127.0.0.1" and f"{int(port):04X}" in {p for _, p in sockets}, sockets


def test_tied_val_acc_the_best_epoch_export_and_test_acc_agree(ray_local, cifar, tmp_path):
    """LR 1e-6 barely moves the weights: val_acc is the same at every epoch. Ray Train keeps the
    latest of the tied checkpoints; summary.json must name that epoch, and test_acc must be the
    exported model's accuracy on the test split."""
    from tests.test_data import write_tree
    tree = write_tree(tmp_path / "tree", cifar, train=25, test=5)
    config = make_config(model="tiny", data=str(tree), val_size=10, epochs=3, batch_size=64,
                         lr=1e-6, cpus_per_worker=1, storage=str(tmp_path), name="tied")
    summary = train_driver_fn(config)
    metrics = pd.read_parquet(tmp_path / "tied" / "metrics.parquet")
    assert metrics["val_acc"].nunique() == 1  # a real tie at every epoch
    state = load_state(summary["best_checkpoint"])
    assert summary["best_epoch"] == state["epoch"] == 3  # the later epoch, the one kept
    assert summary["best_val_acc"] == state["history"][-1]["val_acc"]
    exported = torch.export.load(tmp_path / "tied" / "best" / "model.pt2").module()
    _, splits = load_splits(str(tree), 10, None, 0)
    with torch.no_grad():
        predicted = exported(torch.tensor(splits.test_x).float() / 255).argmax(1).numpy()
    assert summary["test_acc"] == (predicted == splits.test_y).mean()
    assert summary["precision"] == {"train": "fp32", "val_acc": "fp32", "test_acc": "fp32",
                                    "export": "fp32"}


def test_an_error_inside_a_ray_task_reaches_the_user_as_one_line(ray_local, tmp_path, capsys):
    import ray.train

    from resnet.train.driver import finalize_best
    from resnet.errors import run_main
    gone = ray.train.Checkpoint(str(tmp_path / "epoch_0001"))  # deleted, as by Ray

    def export_a_deleted_checkpoint() -> int:
        ray_local.get(finalize_best.remote(gone, make_config(), None, None))
        return 0

    assert run_main("jobs.x", export_a_deleted_checkpoint) == 2
    err = capsys.readouterr().err
    assert err == f"jobs.x: error: checkpoint {tmp_path}/epoch_0001 does not exist\n"
