"""Start-up of ``python -m jobs.train``, phase by phase, against a bare no-op ``TorchTrainer``
started the same way in the same run (Ray's own share), from the timing marks of
``resnet/infra/timing.py``. Each process is stopped at its first step: what comes after is training."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from resnet.data import load_dataset
from resnet.infra.timing import read_marks

PHASES = (  # (column, from mark, to mark)
    ("interpreter_s", "launch", "main"),  # Python start-up and argument parsing
    ("imports_s", "main", "data_start"),  # torch, Ray and the project
    ("data_load_s", "data_start", "data_done"),
    ("ray_start_s", "ray_start", "ray_ready"),
    ("worker_group_start_s", "fit_start", "worker_start"),  # Ray Train's controller and workers
    ("worker_setup_s", "worker_start", "first_step"),  # data to the device, model, first step
    ("to_first_step_s", "launch", "first_step"),
)

# The floor: a TorchTrainer whose worker function does nothing, started as jobs.train starts its
# own (an embedded Ray on loopback), with the same marks. It has no data to load.
NOOP_TRAINER = """
import sys
from resnet.infra import timing
timing.mark("main")
import ray.train
from ray.train.torch import TorchTrainer
from resnet.infra.cluster import connect_ray
timing.mark("data_start")
timing.mark("data_done")
timing.mark("ray_start")
connect_ray()
timing.mark("ray_ready")

def noop(config):
    from resnet.infra import timing
    timing.mark("worker_start")
    timing.mark("first_step")

trainer = TorchTrainer(noop, scaling_config=ray.train.ScalingConfig(
    num_workers=1, resources_per_worker={"CPU": 1}), run_config=ray.train.RunConfig(
    name="noop", storage_path=sys.argv[1]))
timing.mark("fit_start")
trainer.fit()
"""


def small_source(data: str | None, workdir: str, per_class: int = 120) -> str:
    """The first ``per_class`` images of each class of ``data`` as a PNG tree in a .tar: a real
    source that decodes in a second, so a smoke run's cold start-up row stays cheap."""
    dataset = load_dataset(data)
    path = os.path.join(workdir, "small-source.tar")
    with tarfile.open(path, "w") as tar:
        for label, name in enumerate(dataset.classes):
            for i in np.flatnonzero(dataset.train_y == label)[:per_class]:
                png = io.BytesIO()
                Image.fromarray(dataset.train_x[i].transpose(1, 2, 0)).save(png, format="PNG")
                member = tarfile.TarInfo(f"train/{name}/{i:05d}.png")
                member.size = png.tell()
                png.seek(0)
                tar.addfile(member, png)
    return path


def bench_startup(data: str | None, workdir: str, smoke: bool = False) -> list[dict]:
    """Launch ``python -m jobs.train`` with a cold cache (a fresh cache folder), then warm, then
    the no-op TorchTrainer; each until its first step."""
    cache = os.path.join(workdir, "cache")
    source = small_source(data, workdir) if smoke else data
    runs = os.path.join(workdir, "runs")
    rows = []
    for run in ("jobs.train, cold cache", "jobs.train, warm cache", "no-op TorchTrainer"):
        marks_file = os.path.join(workdir, f"marks-{len(rows)}.jsonl")
        if run.startswith("jobs.train"):
            args = [sys.executable, "-m", "jobs.train", "--epochs", "1", "--subset", "512",
                    "--val-size", "500", "--batch-size", "64", "--num-workers", "1",
                    "--storage", runs, "--name", f"startup-{len(rows)}"]
            args += ["--data", source] if source else []
        else:
            args = [sys.executable, "-c", NOOP_TRAINER, runs]
        env = {**os.environ, "RESNET_CACHE_DIR": cache, "RESNET_TIMINGS": marks_file}
        env.pop("RAY_ADDRESS", None)  # its own embedded Ray, as `make run` starts it
        launched = time.time()
        marks = launch_until_first_step(args, env, marks_file)
        marks["launch"] = launched
        rows.append({"run": run, **{name: marks[end] - marks[start] for name, start, end in PHASES}})
    return rows


def launch_until_first_step(args: list[str], env: dict[str, str], marks_file: str,
                            timeout: float = 900) -> dict[str, float]:
    """Run a job until its first training step is marked, then Ctrl-C it (what comes after
    is not start-up); returns its marks."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if first_step_marked(marks_file):
                    proc.send_signal(signal.SIGINT)  # stops cleanly (exit 130)
                    break
                time.sleep(0.05)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            proc.kill()
        err.seek(0)
        marks = read_marks(marks_file) if os.path.exists(marks_file) else {}
        if "first_step" not in marks:
            raise RuntimeError(f"{args[1:3]} ended ({proc.returncode}) before its first step: "
                               f"{err.read()[-2000:]}")
    return marks


def first_step_marked(marks_file: str) -> bool:
    try:
        return "first_step" in read_marks(marks_file)
    except (OSError, ValueError):  # not written yet, or a line being appended
        return False
