"""Benchmarks: where a training step's time goes, as ratios measured side by side in one run.

1. step throughput: the project's whole path (Ray Train worker, DDP, on-device data and
   augmentation, schedule, reporting) against a bare PyTorch loop in the same kind of process;
2. data feeding: batched on-device augmentation against torchvision transforms + DataLoader;
3. start-up of ``python -m jobs.train`` (see ``resnet/timing.py``), cold and warm cache;
4. memory layout and precision;
5. two 1-CPU workers against one 2-CPU worker on this machine.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import ray
import torch
import torch.nn.functional as F
from PIL import Image

from resnet.augment import augment, plan_epoch
from resnet.checkpoint import load_state
from resnet.config import make_config
from resnet.data import Splits, load_dataset, load_splits
from resnet.driver import connect_ray, make_trainer
from resnet.models import build_model
from resnet.timing import read_marks

NOT_MEASURED = "not measured: no GPU"


@dataclass(frozen=True)
class BenchConfig:
    data: str | None = None
    models: tuple[str, ...] = ("resnet20", "resnet18")
    batch_size: int = 256
    steps: int = 20  # timed training steps per measurement (after warm-up)
    feed_images: int = 10240  # images pushed through each data-feeding path
    smoke: bool = False

    @classmethod
    def smoke_sized(cls, data: str | None) -> "BenchConfig":
        """Tiny sizes: every table, in about a minute (CI keeps the code working)."""
        return cls(data=data, models=("resnet20",), batch_size=32, steps=3, feed_images=512,
                   smoke=True)


# -- 1 and 5: the project's path through Ray Train, and the bare loop ------------------------

def project_samples_per_s(bench: BenchConfig, splits_ref, model: str, num_workers: int,
                          cpus_per_worker: int, use_gpu: bool, storage_dir: str, name: str) -> float:
    """samples/s of epoch 2 (epoch 1 warms up) of a real ``train_fn_per_worker`` run."""
    config = make_config(model=model, epochs=2, batch_size=bench.batch_size, num_workers=num_workers,
                         cpus_per_worker=cpus_per_worker, use_gpu=use_gpu, storage=storage_dir,
                         name=name, max_failures=0)
    result = make_trainer(config, splits_ref, config.run_name, storage_dir).fit()
    return float(load_state(result.checkpoint)["history"][-1]["samples_per_s"])


@ray.remote
def bare_samples_per_s(model_name: str, batch_size: int, steps: int, threads: int,
                       channels_last: bool = False, bf16: bool = False,
                       compile_model: bool = False) -> float:
    """A bare PyTorch loop in a Ray worker: one fixed batch on the device, forward, loss,
    backward, SGD step; samples/s over ``steps`` steps after 3 warm-up steps."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return loop_samples_per_s(model_name, batch_size, steps, device, channels_last, bf16,
                              compile_model)


def loop_samples_per_s(model_name: str, batch_size: int, steps: int, device: torch.device,
                       channels_last: bool = False, bf16: bool = False,
                       compile_model: bool = False) -> float:
    torch.manual_seed(0)
    model = build_model(model_name).to(device).train()
    x = torch.rand(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(run(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch_size * steps / (time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_steps(bench: BenchConfig, splits_ref, cpus: int, storage_dir: str) -> list[dict]:
    """Table 1: project path / bare loop, per model, 1 worker with every CPU (or one GPU)."""
    rows = []
    gpus = 1 if torch.cuda.is_available() else 0
    for model in bench.models:
        project = project_samples_per_s(bench, splits_ref, model, 1, cpus, bool(gpus),
                                        storage_dir, f"steps-{model}")
        # The bare loop uses the project's defaults too: channels_last, and bf16 on CUDA.
        bare = ray.get(bare_samples_per_s.options(num_cpus=cpus, num_gpus=gpus).remote(
            model, bench.batch_size, bench.steps * 2, cpus, channels_last=True, bf16=bool(gpus)))
        rows.append({"model": model, "batch": bench.batch_size, "project_samples_per_s": project,
                     "bare_samples_per_s": bare, "ratio": project / bare, "target": ">= 0.95"})
    return rows


def bench_workers(bench: BenchConfig, splits_ref, storage_dir: str,
                  one: float | None = None) -> list[dict]:
    """Table 5: aggregate samples/s of 2 workers x 1 CPU against 1 worker x 2 CPUs. ``one``:
    table 1's figure when that was the same run (a 2-CPU machine without GPU)."""
    model = bench.models[0]
    if one is None:
        one = project_samples_per_s(bench, splits_ref, model, 1, 2, False, storage_dir,
                                    "workers-1x2")
    two = project_samples_per_s(bench, splits_ref, model, 2, 1, False, storage_dir, "workers-2x1")
    return [{"model": model, "global_batch": bench.batch_size, "1_worker_x_2_cpus": one,
             "2_workers_x_1_cpu": two, "ratio": two / one, "target": ">= 0.9"}]


# -- 2: data feeding ---------------------------------------------------------------------------

class CifarStyleDataset(torch.utils.data.Dataset):
    """What torchvision's ``CIFAR10`` does per item: HWC uint8 -> PIL image -> transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))  # N x 32 x 32 x 3
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def torchvision_images_per_s(images: np.ndarray, labels: np.ndarray, batch_size: int,
                             workers: int) -> float:
    from torchvision import transforms
    transform = transforms.Compose([
        transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    loader = torch.utils.data.DataLoader(CifarStyleDataset(images, labels, transform),
                                         batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True)
    started, seen = time.perf_counter(), 0
    for x, _ in loader:  # worker start-up counts: a DataLoader pays it every epoch
        seen += len(x)
    return seen / (time.perf_counter() - started)


def project_images_per_s(images: np.ndarray, batch_size: int, device: torch.device) -> float:
    """The training loop's feeding: plan the epoch, then per batch gather + augment on device."""
    data = torch.tensor(images, device=device)
    sync(device)
    started = time.perf_counter()
    plan = plan_epoch(len(data), 0, 0, "crop").to(device)
    seen = 0
    for begin in range(0, len(data) - batch_size + 1, batch_size):
        ids = plan.order[begin:begin + batch_size]
        x = augment(data[ids], ids, plan, "crop")
        seen += len(x)
    sync(device)
    return seen / (time.perf_counter() - started)


def bench_feeding(bench: BenchConfig, splits: Splits) -> list[dict]:
    n = min(bench.feed_images, len(splits.train_y))
    images, labels = splits.train_x[:n], splits.train_y[:n]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    project = project_images_per_s(images, bench.batch_size, device)
    rows = []
    for workers in (0, 2):
        baseline = torchvision_images_per_s(images, labels, bench.batch_size, workers)
        rows.append({"images": n, "batch": bench.batch_size,
                     "torchvision": f"DataLoader(num_workers={workers})",
                     "project_images_per_s": project, "torchvision_images_per_s": baseline,
                     "ratio": project / baseline, "target": ">= 10"})
    return rows


# -- 3: start-up -------------------------------------------------------------------------------

STARTUP_PHASES = (  # (column, from mark, to mark); marks from resnet/timing.py
    ("interpreter_s", "launch", "main"),  # Python start-up and argument parsing
    ("imports_s", "main", "data_start"),  # torch, Ray and the project
    ("data_load_s", "data_start", "data_done"),
    ("ray_start_s", "ray_start", "ray_ready"),
    ("worker_group_start_s", "fit_start", "worker_start"),
    ("worker_setup_s", "worker_start", "first_step"),  # data to the device, model, first step
    ("to_first_step_s", "launch", "first_step"),
)


def small_source(data: str | None, workdir: str, per_class: int = 120) -> str:
    """The first ``per_class`` images of each class of ``data`` as a PNG tree in a .tar: a real
    source that decodes in a second, so the smoke run's cold start-up row stays cheap."""
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


def bench_startup(bench: BenchConfig, workdir: str) -> list[dict]:
    """Table 3: launch ``python -m jobs.train`` twice: cold cache (fresh cache folder), warm.
    The smoke run starts from a small source (see ``small_source``)."""
    cache = os.path.join(workdir, "cache")
    data = small_source(bench.data, workdir) if bench.smoke else bench.data
    rows = []
    for run in ("cold cache", "warm cache"):
        marks_file = os.path.join(workdir, f"marks-{run.split()[0]}.jsonl")
        args = [sys.executable, "-m", "jobs.train", "--epochs", "1", "--subset", "512",
                "--val-size", "500", "--batch-size", "64", "--num-workers", "1",
                "--storage", os.path.join(workdir, "runs"), "--name", f"startup-{run.split()[0]}"]
        if data:
            args += ["--data", data]
        env = {**os.environ, "RESNET_CACHE_DIR": cache, "RESNET_TIMINGS": marks_file}
        env.pop("RAY_ADDRESS", None)  # its own embedded Ray, as `make run` starts it
        launched = time.time()
        marks = launch_until_first_step(args, env, marks_file)
        marks["launch"] = launched
        rows.append({"run": run, **{name: marks[end] - marks[start]
                                    for name, start, end in STARTUP_PHASES}})
    return rows


def launch_until_first_step(args: list[str], env: dict[str, str], marks_file: str,
                            timeout: float = 900) -> dict[str, float]:
    """Run jobs.train until its first training step is marked, then Ctrl-C it (what comes
    after is not start-up); returns its marks."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if first_step_marked(marks_file):
                    proc.send_signal(signal.SIGINT)  # stops cleanly (exit 130)
                    break
                time.sleep(0.1)
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            proc.kill()
        err.seek(0)
        marks = read_marks(marks_file) if os.path.exists(marks_file) else {}
        if "first_step" not in marks:
            raise RuntimeError(f"jobs.train ended ({proc.returncode}) before its first step: "
                               f"{err.read()[-2000:]}")
    return marks


def first_step_marked(marks_file: str) -> bool:
    try:
        return "first_step" in read_marks(marks_file)
    except (OSError, ValueError):  # not written yet, or a line being appended
        return False


# -- 4: memory layout and precision ------------------------------------------------------------

def bench_layout(bench: BenchConfig, cpus: int) -> list[dict]:
    """Bare loop in a Ray worker: channels_last vs contiguous; on CUDA also bf16 and compile."""
    cuda = torch.cuda.is_available()
    gpus = 1 if cuda else 0

    def measure(**kw) -> float:
        return ray.get(bare_samples_per_s.options(num_cpus=cpus, num_gpus=gpus).remote(
            model, bench.batch_size, bench.steps * 2, cpus, **kw))

    rows = []
    for model in bench.models:
        base = measure()
        cl = measure(channels_last=True)
        rows.append({"model": model, "comparison": "channels_last / contiguous (fp32)",
                     "baseline_samples_per_s": base, "variant_samples_per_s": cl,
                     "ratio": cl / base})
        for comparison, kw in (("bf16 autocast / fp32 (channels_last)", {"bf16": True}),
                               ("torch.compile / eager (channels_last, bf16)",
                                {"bf16": True, "compile_model": True})):
            if not cuda:
                rows.append({"model": model, "comparison": comparison,
                             "baseline_samples_per_s": NOT_MEASURED,
                             "variant_samples_per_s": NOT_MEASURED, "ratio": NOT_MEASURED})
                continue
            baseline = measure(channels_last=True, bf16=kw.get("compile_model", False))
            variant = measure(channels_last=True, **kw)
            rows.append({"model": model, "comparison": comparison,
                         "baseline_samples_per_s": baseline, "variant_samples_per_s": variant,
                         "ratio": variant / baseline})
    return rows


# -- all of it ----------------------------------------------------------------------------------

def run_bench(bench: BenchConfig, on_table: Callable[[str, list[dict]], None] | None = None
              ) -> dict[str, Any]:
    """Every table, in order; returns {table title: rows} plus the machine it ran on.
    ``on_table(title, rows)`` is called as each table is done (long runs show progress)."""
    workdir = tempfile.mkdtemp(prefix="resnet-bench-")
    tables: dict[str, list[dict]] = {}

    def done(title: str, rows: list[dict]) -> None:
        tables[title] = rows
        if on_table:
            on_table(title, rows)

    # Start-up first, before this process starts its own Ray: jobs.train starts an embedded one.
    done("3. start-up of jobs.train (seconds)", bench_startup(bench, workdir))
    _, splits = load_splits(bench.data, 500, bench.batch_size * (bench.steps + 1), 0)
    connect_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    splits_ref = ray.put(splits)
    storage_dir = os.path.join(workdir, "runs")
    steps = bench_steps(bench, splits_ref, cpus, storage_dir)
    done("1. training step throughput (samples/s)", steps)
    done("2. data feeding (images/s)", bench_feeding(
        bench, load_splits(bench.data, 500, min(bench.feed_images, 40000), 0)[1]))
    done("4. layout and precision (samples/s, bare loop)", bench_layout(bench, cpus))
    if cpus >= 2:
        same_run = cpus == 2 and not torch.cuda.is_available()  # table 1 ran 1 worker x 2 CPUs
        done("5. workers on one machine (samples/s, aggregate)", bench_workers(
            bench, splits_ref, storage_dir, steps[0]["project_samples_per_s"] if same_run else None))
    return {"tables": dict(sorted(tables.items())), "cpus": cpus, "device": device_name(cpus)}


def device_name(cpus: int) -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only, {cpus} CPUs"


def print_table(title: str, rows: list[dict]) -> None:
    import pandas as pd
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3g}".format):
        print(f"\n{title}\n{pd.DataFrame(rows).to_string(index=False)}", flush=True)
