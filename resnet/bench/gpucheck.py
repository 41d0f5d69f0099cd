"""``jobs.bench --gpu-check``: every GPU figure the project needs, in one short run that stops by
itself (at most ``budget_s``, 8 minutes by default). Run it first whenever a GPU machine is at hand.

1. seconds per epoch of the fast preset for resnet20 and resnet18 (bf16, channels_last),
   ``torch.compile`` off and on, and samples/s against the bare loop (``resnet/bench/compare.py``);
2. wall seconds from the command to 88% val_acc: ``python -m jobs.train --preset fast`` (resnet20)
   and resnet18 with the fast recipe at fewer epochs, start-up included, stopped at the target;
3. aggregate samples/s of k trials packed on one GPU (``--gpus-per-worker 1/k``) against one,
   and the GPU memory each used;
4. start-up phases on that machine (``resnet/bench/startup.py``);
5. jobs.predict's Ray Data pipeline (a replica per GPU, decoding in CPU tasks) against a plain
   PyTorch loop on one GPU, on 10,000 image files (``resnet/bench/predict_speed.py``).

Each part has its share of the budget; a part that cannot fit is reported as not run. On a CPU
(``--smoke``) every part runs at tiny sizes, so CI keeps the code working.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray

from resnet.bench.compare import VAL_SHARE, compare_task
from resnet.bench.predict_speed import bench_predict
from resnet.bench.startup import bench_startup
from resnet.config import TARGET_ACC, make_config
from resnet.data import load_splits
from resnet.infra.cluster import connect_ray
from resnet.train.checkpoint import load_state
from resnet.train.driver import make_trainer

FULL_TRAIN = 45000  # the fast preset's training images: seconds per epoch = FULL_TRAIN / rate


@dataclass(frozen=True)
class GpuCheck:
    data: str | None = None
    budget_s: float = 480.0  # the whole check, start-up tables included
    smoke: bool = False  # tiny sizes, CPU allowed (CI)

    @property
    def sizes(self) -> dict[str, Any]:
        if self.smoke:
            return {"batch": 32, "steps": 2, "rounds": 1, "packing": (1, 2), "pack_images": 256,
                    "to_target": {"resnet20": ["--subset", "512", "--val-size", "200",
                                               "--epochs", "2", "--batch-size", "32"]},
                    "target": 0.12}
        return {"batch": 256, "steps": 40, "rounds": 1, "packing": (1, 2, 4, 8),
                "pack_images": 10240, "target": TARGET_ACC,
                "to_target": {"resnet20": ["--epochs", "30"],  # the fast preset as it ships
                              "resnet18": ["--model", "resnet18", "--epochs", "10"]}}


def run_check(check: GpuCheck, on_table: Callable[[str, list[dict]], None] | None = None
              ) -> dict[str, Any]:
    """Every part in order, each within what is left of the budget."""
    deadline = time.monotonic() + check.budget_s
    workdir = tempfile.mkdtemp(prefix="resnet-gpu-check-")
    tables: dict[str, list[dict]] = {}

    def part(title: str, share: float, fn: Callable[[float], list[dict]]) -> None:
        left = deadline - time.monotonic()
        allowed = min(left, share * check.budget_s)
        if allowed < 20:
            rows = [{"not run": f"out of time ({left:.0f}s of the budget left)"}]
        else:
            rows = fn(allowed)
        tables[title] = rows
        if on_table:
            on_table(title, rows)

    # Start-up first: jobs.train and the no-op trainer start Ray of their own.
    part("4. start-up to the first step (seconds)", 0.2,
         lambda allowed: bench_startup(check.data, workdir, check.smoke))
    part("2. wall seconds from the command to the target val_acc", 0.4,
         lambda allowed: to_target(check, workdir, time.monotonic() + allowed))
    connect_ray()
    part("1. seconds per epoch of the fast preset, against the bare loop", 0.2,
         lambda allowed: epochs(check))
    part("3. k trials packed on one GPU", 0.15,
         lambda allowed: packing(check, workdir, time.monotonic() + allowed))
    part("5. jobs.predict's pipeline against a plain PyTorch loop (images/s)", 0.05,
         lambda allowed: bench_predict(check.data, workdir, images=512 if check.smoke else 10_000,
                                       batch=check.sizes["batch"], rounds=1,
                                       replicas=(1,), use_gpu=_cuda()))
    return {"tables": dict(sorted(tables.items())), "budget_s": check.budget_s}


def epochs(check: GpuCheck) -> list[dict]:
    """Part 1: the project's whole epoch and the bare loop, per model, compile off and on."""
    sizes, gpus = check.sizes, 1 if _cuda() else 0
    rows = []
    for model in ("resnet20",) if check.smoke else ("resnet20", "resnet18"):
        train = sizes["batch"] * sizes["steps"]
        _, splits = load_splits(check.data, max(10, round(train * VAL_SHARE)), train, 0)
        for compiled in (False, True):
            config = make_config("fast", model=model, batch_size=sizes["batch"],
                                 use_gpu=bool(gpus), compile=compiled)
            out = ray.get(compare_task.options(num_cpus=1, num_gpus=gpus).remote(
                config.to_dict(), splits, sizes["steps"], sizes["rounds"], 1))
            whole = out["rows"][1]
            rows.append({"model": model, "compile": compiled,
                         "epoch_s": FULL_TRAIN / whole["project_samples_per_s"],
                         "project_samples_per_s": whole["project_samples_per_s"],
                         "bare_samples_per_s": whole["bare_samples_per_s"],
                         "ratio": whole["ratio"]})
    return rows


def to_target(check: GpuCheck, workdir: str, deadline: float) -> list[dict]:
    """Part 2: launch jobs.train per model and stop it at its first epoch at the target."""
    sizes, rows = check.sizes, []
    for model, extra in sizes["to_target"].items():
        left = deadline - time.monotonic()
        if left < 30:
            rows.append({"model": model, "not run": "out of time"})
            continue
        name = f"to-target-{model}"
        args = [sys.executable, "-m", "jobs.train", "--preset", "fast", *extra,
                "--storage", os.path.join(workdir, "runs"), "--name", name]
        args += ["--data", check.data] if check.data else []
        run_dir = os.path.join(workdir, "runs", name)
        rows.append({"model": model, "args": " ".join(extra),
                     **run_until(args, run_dir, sizes["target"], left)})
    return rows


def run_until(args: list[str], run_dir: str, target: float, timeout: float) -> dict[str, Any]:
    """Seconds from launch to the first checkpointed epoch with val_acc >= target (then the
    run is stopped with Ctrl-C), or what was reached when it ended or ran out of time."""
    launched = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_ADDRESS": ""})
    best, epoch = 0.0, 0
    try:
        while proc.poll() is None and time.monotonic() - launched < timeout:
            metrics = latest_metrics(run_dir)
            if metrics:
                best, epoch = max(best, metrics["val_acc"]), metrics["epoch"]
                if metrics["val_acc"] >= target:
                    return {"target": target, "reached_at_epoch": epoch,
                            "wall_s": time.monotonic() - launched, "val_acc": metrics["val_acc"]}
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {"target": target, "reached_at_epoch": None, "wall_s": time.monotonic() - launched,
            "best_val_acc": best, "epochs_done": epoch}


def latest_metrics(run_dir: str) -> dict[str, Any] | None:
    """The metrics of a run's latest checkpointed epoch (Ray Train's snapshot), or None."""
    try:
        with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
            return json.load(f)["latest_checkpoint_result"]["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@ray.remote(num_cpus=0)
def train_run(config: dict, splits_ref, storage: str) -> dict[str, float]:
    """One packed trial: a 2-epoch Ray Train run; samples/s and GPU memory of epoch 2."""
    from resnet.config import TrainConfig
    config = TrainConfig.from_dict(config)
    result = make_trainer(config, splits_ref[0], config.run_name, storage).fit()
    last = load_state(result.checkpoint)["history"][-1]
    return {"samples_per_s": last["samples_per_s"], "gpu_mem_mb": last.get("gpu_mem_mb", 0.0)}


def packing(check: GpuCheck, workdir: str, deadline: float) -> list[dict]:
    """Part 3: k trials side by side on one GPU (a 1/k share each) against one alone."""
    sizes, cuda = check.sizes, _cuda()
    _, splits = load_splits(check.data, 500, sizes["pack_images"], 0)
    splits_ref = [ray.put(splits)]  # in a list: passed as a reference, not resolved
    rows, alone = [], None
    for k in sizes["packing"]:
        if time.monotonic() > deadline:
            rows.append({"trials": k, "not run": "out of time"})
            continue
        share = 1 / k
        configs = [make_config("fast", epochs=2, batch_size=sizes["batch"], use_gpu=cuda,
                               gpus_per_worker=share if cuda else 1, cpus_per_worker=1,
                               max_failures=0, storage=workdir, name=f"pack{k}-{i}")
                   for i in range(k)]
        out = ray.get([train_run.remote(c.to_dict(), splits_ref, workdir) for c in configs])
        total = sum(o["samples_per_s"] for o in out)
        alone = alone or total
        rows.append({"trials": k, "gpus_per_worker": share if cuda else None,
                     "aggregate_samples_per_s": total, "vs_one_trial": total / alone,
                     "gpu_mem_mb_each": max(o["gpu_mem_mb"] for o in out)})
    return rows


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()
