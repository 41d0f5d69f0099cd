"""End-to-end tier: ``python -m jobs.train`` as a user runs it, on real CIFAR-10 images."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from resnet.train.checkpoint import inference_model, load_state
from resnet.data import load_splits
from tests.conftest import run_job

pytestmark = pytest.mark.e2e

# Loads the export in a fresh interpreter that cannot import this project (cwd outside the
# repository, no PYTHONPATH), and proves it by the absence of `resnet` in sys.modules.
LOAD_EXPORT = """
import sys, numpy as np, torch
program = torch.export.load(sys.argv[1]).module()
x = torch.from_numpy(np.load(sys.argv[2]))
np.save(sys.argv[3], program(x).detach().numpy())
assert not any(m == "resnet" or m.startswith("resnet.") for m in sys.modules), "project imported"
"""


def test_train_job_two_cpu_workers_on_a_real_subset(shared_archive, tmp_path):
    storage = tmp_path / "runs"
    proc = run_job("jobs.train", "--data", str(shared_archive), "--subset", "4000", "--val-size",
                   "1000", "--epochs", "2", "--num-workers", "2", "--cpu", "--batch-size", "64",
                   "--lr", "0.05", "--storage", str(storage), "--name", "e2e")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "Epoch 1/2 - " in log and "Epoch 2/2 - " in log and "val_acc improved from" in log

    run_dir = storage / "e2e"
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["epoch"].tolist() == [1, 2]
    assert summary["best_val_acc"] == metrics["val_acc"].max() > 0.25
    # The last epoch's val_acc beside the best, in summary.json and in the closing line.
    assert summary["final_val_acc"] == metrics["val_acc"].iloc[-1]
    assert f"of 2, final {summary['final_val_acc']:.4f} (completed)" in proc.stdout
    # Two ranks really ran, each in its own process: what the workers saw, not the config echoed.
    assert metrics["world_size"].tolist() == [2, 2] and len(summary["placement"]) == 2
    assert len({rank["pid"] for rank in summary["placement"]}) == 2
    assert summary["data"]["sizes"]["train"] == 4000
    assert summary["epochs_completed"] == 2 and summary["status"] == "completed"
    assert set(summary["provenance"]["versions"]) >= {"torch", "ray", "torchvision"}
    assert (run_dir / "checkpoint_manager_snapshot.json").is_file()  # Ray Train's run directory
    best = load_state(summary["best_checkpoint"])
    assert best["epoch"] == summary["best_epoch"] and best["best_val_acc"] == summary["best_val_acc"]

    # The exported model gives the in-memory model's logits, in a process without this project,
    # and its accuracy on the validation split is exactly the val_acc the 2 workers logged for
    # that epoch (before they evaluated, both took rank 0's BatchNorm statistics).
    _, splits = load_splits(str(shared_archive), 1000, 4000, 0)
    images = splits.val_x.astype(np.float32) / 255
    np.save(tmp_path / "x.npy", images)
    with torch.no_grad():
        expected = inference_model(best)(torch.from_numpy(images[:64])).numpy()
    subprocess.run([sys.executable, "-c", LOAD_EXPORT, str(run_dir / "best" / "model.pt2"),
                    str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   cwd=tmp_path, check=True, env={"PATH": "/usr/bin:/bin"}, timeout=300)
    logits = np.load(tmp_path / "y.npy")
    assert logits.shape == (1000, 10)
    np.testing.assert_allclose(logits[:64], expected, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == splits.val_y).mean() == summary["best_val_acc"]
    # The loss is continuous: it would differ if rank 1 had scored its shard with its own
    # BatchNorm statistics (only rank 0's are saved). Equal up to float summation order.
    best_row = metrics.set_index("epoch").loc[summary["best_epoch"]]
    val_loss = torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(),
                                                 torch.from_numpy(splits.val_y)).item()
    assert val_loss == pytest.approx(best_row["val_loss"], rel=1e-6)
