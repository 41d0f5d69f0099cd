"""Benchmarks: where training time goes, as ratios of two sides measured alike in one run.

1. the project's training step and whole epoch against a bare PyTorch loop (``resnet/bench/compare.py``),
   with a breakdown of what each extra costs per step;
2. data feeding: batched on-device augmentation against torchvision transforms + DataLoader;
3. start-up of ``python -m jobs.train``, cold and warm cache, against a no-op TorchTrainer
   (``resnet/bench/startup.py``);
4. memory layout, precision and ``torch.compile`` (compile seconds, cold and warm cache);
5. two 1-CPU workers against one 2-CPU worker on this machine.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import ray
import torch

from resnet.bench.compare import VAL_SHARE, bare_step, compare_task, interleaved, repeat, sync
from resnet.bench.predict_speed import TITLE as PREDICT_TITLE
from resnet.bench.predict_speed import bench_predict
from resnet.bench.startup import bench_startup
from resnet.config import make_config
from resnet.data import Splits, load_splits
from resnet.infra.cluster import connect_ray
from resnet.train.augment import augment, plan_epoch
from resnet.train.checkpoint import load_state
from resnet.train.driver import make_trainer
from resnet.train.loop import prepare_device

NOT_MEASURED = "not measured: no GPU"


@dataclass(frozen=True)
class BenchConfig:
    data: str | None = None
    models: tuple[str, ...] = ("resnet20", "resnet18")
    batch_size: int = 256
    steps: int = 20  # steps per timed block, and per bench epoch (resnet18 on a CPU: a fifth)
    rounds: int = 3  # interleaved timed rounds per side (medians)
    feed_images: int = 10240  # images pushed through each data-feeding path
    smoke: bool = False

    @classmethod
    def smoke_sized(cls, data: str | None) -> "BenchConfig":
        """Tiny sizes: every table, to check that the benchmark works (CI runs it)."""
        return cls(data=data, models=("resnet20",), batch_size=32, steps=2, rounds=1,
                   feed_images=512, smoke=True)

    def steps_for(self, model: str, device: torch.device) -> int:
        # resnet18 trains at about 1/30 of resnet20's speed on a CPU: fewer steps per block.
        return max(2, self.steps // 5) if model == "resnet18" and device.type == "cpu" \
            else self.steps


def devices(cpus: int) -> tuple[torch.device, int]:
    """The device a training worker gets here, and the GPUs to ask Ray for."""
    return (torch.device("cuda"), 1) if torch.cuda.is_available() else (torch.device("cpu"), 0)


# -- 1: the project's step and epoch against the bare loop -------------------------------------

def bench_steps(bench: BenchConfig, cpus: int) -> tuple[list[dict], list[dict]]:
    """Table 1 and its breakdown, per model, in a Ray worker with every CPU (or one GPU)."""
    device, gpus = devices(cpus)
    rows, parts = [], []
    for model in bench.models:
        steps = bench.steps_for(model, device)
        train = bench.batch_size * steps  # one bench epoch: `steps` global batches
        _, splits = load_splits(bench.data, max(10, round(train * VAL_SHARE)), train, 0)
        config = make_config("fast", model=model, batch_size=bench.batch_size,
                             use_gpu=bool(gpus), cpus_per_worker=cpus)
        out = ray.get(compare_task.options(num_cpus=cpus, num_gpus=gpus).remote(
            config.to_dict(), splits, steps, bench.rounds, cpus))
        rows += out["rows"]
        parts += out["breakdown"]
    return rows, parts


# -- 5: workers on one machine, through Ray Train --------------------------------------------

def project_samples_per_s(bench: BenchConfig, splits_ref, model: str, num_workers: int,
                          cpus_per_worker: int, storage_dir: str, name: str) -> float:
    """samples/s of epoch 2 (epoch 1 warms up) of a real Ray Train run of the fast preset."""
    config = make_config("fast", model=model, epochs=2, batch_size=bench.batch_size,
                         num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                         use_gpu=False, storage=storage_dir, name=name, max_failures=0)
    result = make_trainer(config, splits_ref, config.run_name, storage_dir).fit()
    return float(load_state(result.checkpoint)["history"][-1]["samples_per_s"])


def bench_workers(bench: BenchConfig, storage_dir: str) -> list[dict]:
    """Table 5: aggregate samples/s of 2 workers x 1 CPU against 1 worker x 2 CPUs."""
    model = bench.models[0]
    _, splits = load_splits(bench.data, 500, bench.batch_size * (bench.steps + 1), 0)
    splits_ref = ray.put(splits)
    one = project_samples_per_s(bench, splits_ref, model, 1, 2, storage_dir, "workers-1x2")
    two = project_samples_per_s(bench, splits_ref, model, 2, 1, storage_dir, "workers-2x1")
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


# -- 4: memory layout, precision, torch.compile ------------------------------------------------

@ray.remote(max_calls=1)  # a fresh process per call: compiled code cached in memory dies with it
def layout_task(model: str, batch: int, steps: int, rounds: int, threads: int,
                compile_cache: str) -> list[dict]:
    """The bare loop: channels_last against contiguous; bf16 against fp32 (CUDA); compiled
    against eager, with the seconds the first compiled step took beyond a normal step."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = compile_cache  # a later call finds it warm
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prepare_device(device, threads)
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    items = batch * steps

    def pair(name: str, baseline: Callable, variant: Callable) -> dict:
        rates = interleaved({"variant": repeat(variant, steps), "baseline": repeat(baseline, steps)},
                            items, rounds, warmup=1, device=device)
        return {"model": model, "comparison": name, "baseline_samples_per_s": rates["baseline"],
                "variant_samples_per_s": rates["variant"],
                "ratio": rates["variant"] / rates["baseline"]}

    rows = [pair("channels_last / contiguous (fp32)", bare_step(model, batch, device, False),
                 bare_step(model, batch, device, True))]
    if cuda:
        rows.append(pair("bf16 autocast / fp32 (channels_last)",
                         bare_step(model, batch, device), bare_step(model, batch, device,
                                                                    precision="bf16")))
    else:
        rows.append({"model": model, "comparison": "bf16 autocast / fp32 (channels_last)",
                     "baseline_samples_per_s": NOT_MEASURED, "variant_samples_per_s": NOT_MEASURED,
                     "ratio": NOT_MEASURED})
    eager = bare_step(model, batch, device, precision=precision)
    compiled = bare_step(model, batch, device, precision=precision, compile_model=True)
    sync(device)
    started = time.perf_counter()
    compiled()  # compiles (forward and backward) on the first call
    sync(device)
    first_s = time.perf_counter() - started
    row = pair(f"torch.compile / eager (channels_last, {precision})", eager, compiled)
    row["compile_s"] = first_s - batch / row["variant_samples_per_s"]  # beyond a normal step
    return rows + [row]


def bench_layout(bench: BenchConfig, cpus: int, workdir: str) -> list[dict]:
    """Table 4, per model; compile seconds with a cold Inductor cache, then again (a second
    fresh process, as a second trial on the node) with the cache the first one left."""
    _, gpus = devices(cpus)
    rows = []
    for model in bench.models:
        steps = bench.steps_for(model, devices(cpus)[0])
        cache = os.path.join(workdir, f"inductor-{model}")
        first = ray.get(layout_task.options(num_cpus=cpus, num_gpus=gpus).remote(
            model, bench.batch_size, steps, bench.rounds, cpus, cache))
        again = ray.get(layout_task.options(num_cpus=cpus, num_gpus=gpus).remote(
            model, bench.batch_size, 1, 1, cpus, cache))
        first[-1]["compile_s_warm_cache"] = again[-1]["compile_s"]
        rows += first
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
    done("3. start-up to the first step (seconds)", bench_startup(bench.data, workdir, bench.smoke))
    connect_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    rows, parts = bench_steps(bench, cpus)
    done("1. training step and whole epoch against a bare loop (samples/s)", rows)
    done("1b. what each extra costs per training step", parts)
    done("2. data feeding (images/s)", bench_feeding(
        bench, load_splits(bench.data, 500, min(bench.feed_images, 40000), 0)[1]))
    done("4. layout, precision and torch.compile (samples/s, bare loop)",
         bench_layout(bench, cpus, workdir))
    if cpus >= 2 and not torch.cuda.is_available():
        done("5. workers on one machine (samples/s, aggregate)",
             bench_workers(bench, os.path.join(workdir, "runs")))
    done(PREDICT_TITLE, bench_predict(bench.data, workdir, images=512 if bench.smoke else 10_000,
                                      batch=bench.batch_size, rounds=bench.rounds,
                                      model=bench.models[0]))
    return {"tables": dict(sorted(tables.items())), "cpus": cpus, "device": device_name(cpus)}


def device_name(cpus: int) -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU only, {cpus} CPUs"


def print_table(title: str, rows: list[dict]) -> None:
    import pandas as pd
    with pd.option_context("display.width", 220, "display.max_columns", 20,
                           "display.float_format", "{:.3g}".format):
        print(f"\n{title}\n{pd.DataFrame(rows).to_string(index=False)}", flush=True)
