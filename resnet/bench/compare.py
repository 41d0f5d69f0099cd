"""Like-for-like timing of the project's training loop against a bare PyTorch loop, in one process.

Both sides use the same model, batch, memory format, precision and threads; they are timed the
same way (``rounds`` blocks of ``steps`` steps each, interleaved A, B, A, B after the same
warm-up, medians). The bare loop is the floor: one fixed batch already on the device, forward,
loss, backward, Nesterov SGD step. The project's step adds what it needs to train for real
(gather and augmentation, the LR schedule, the EMA, the on-device accumulators); its whole
epoch adds evaluation (EMA, flip TTA) and the checkpoint. ``breakdown`` times each extra alone.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Any, Callable

import ray
import torch
import torch.nn.functional as F

from resnet.config import TrainConfig
from resnet.data import Splits
from resnet.models import build_model
from resnet.train.augment import augment
from resnet.train.checkpoint import save_state
from resnet.train.loop import (autocast, build_loop, plan, prepare_device, state_dict, to_input,
                               train_epoch, train_precision, train_step, validate)

# The fast preset trains on 45,000 images and validates on 5,000 each epoch: the bench's smaller
# epochs keep that proportion, so evaluation weighs in the whole-epoch ratio as it does for real.
VAL_SHARE = 5000 / 45000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(model_name: str, batch: int, device: torch.device, channels_last: bool = True,
              precision: str = "fp32", compile_model: bool = False) -> Callable[[], None]:
    """One step of the bare loop (a closure over its model, optimizer and fixed batch)."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device).train()
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    run = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)

    def step() -> None:
        with autocast(precision):
            loss = F.cross_entropy(run(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def interleaved(sides: dict[str, Callable[[], None]], items: int, rounds: int, warmup: int,
                device: torch.device) -> dict[str, float]:
    """Items per second of each side: ``warmup`` calls each, then ``rounds`` rounds of one timed
    call per side in turn (A, B, A, B); the median over rounds."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            sync(device)
            started = time.perf_counter()
            fn()
            sync(device)
            rates[name].append(items / (time.perf_counter() - started))
    return {name: statistics.median(values) for name, values in rates.items()}


def repeat(fn: Callable[[], None], n: int) -> Callable[[], None]:
    def block() -> None:
        for _ in range(n):
            fn()
    return block


def compare(config: TrainConfig, splits: Splits, steps: int, rounds: int,
            device: torch.device) -> dict[str, Any]:
    """Table 1 for one model: the project's step and whole epoch against the bare loop, and
    the breakdown of the extras, on ``splits`` (``steps`` global batches of training images)."""
    loop = build_loop(config, splits, device)
    precision = train_precision(device, config)
    bare = bare_step(config.model, config.batch_size, device, config.channels_last, precision)
    epoch_plan = plan(loop, 0)
    sums = torch.zeros(3, device=device)
    counter = iter(range(10**9))
    loop.model.train()

    def project() -> None:
        train_step(loop, epoch_plan, next(counter) % loop.steps_per_epoch, sums)

    per_step = interleaved({"project": repeat(project, steps), "bare": repeat(bare, steps)},
                           config.batch_size * steps, rounds, warmup=2, device=device)
    directory = tempfile.mkdtemp(prefix="resnet-bench-checkpoint-")

    def whole_epoch() -> None:
        train_epoch(loop, 1)
        validate(loop)
        save_state(directory, state_dict(loop))

    images = loop.steps_per_epoch * config.batch_size
    per_epoch = interleaved({"project": whole_epoch, "bare": repeat(bare, loop.steps_per_epoch)},
                            images, rounds, warmup=1, device=device)
    return {
        "rows": [
            {"model": config.model, "batch": config.batch_size, "compare": "training step",
             "project_samples_per_s": per_step["project"], "bare_samples_per_s": per_step["bare"],
             "ratio": per_step["project"] / per_step["bare"]},
            {"model": config.model, "batch": config.batch_size,
             "compare": f"whole epoch ({images} train + {len(splits.val_y)} val images)",
             "project_samples_per_s": per_epoch["project"], "bare_samples_per_s": per_epoch["bare"],
             "ratio": per_epoch["project"] / per_epoch["bare"], "target": ">= 0.9"}],
        "breakdown": breakdown(loop, bare, directory, rounds),
    }


def timed_ms(fn: Callable[[], Any], repeats: int, device: torch.device) -> float:
    """Median milliseconds of one call (after one call to warm up)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def breakdown(loop, bare: Callable[[], None], directory: str, repeats: int) -> list[dict]:
    """What each extra of the project's loop costs per training step, timed alone."""
    config, device = loop.config, loop.device
    epoch_plan = plan(loop, 0)
    ids = epoch_plan.order[:loop.local_batch]
    logits = torch.randn(loop.local_batch, 10, device=device)
    loss, y = logits.sum(), loop.train_y[ids]
    sums = torch.zeros(3, device=device)
    steps = loop.steps_per_epoch

    def accumulate() -> None:
        sums[0] += loss.detach() * len(y)
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += len(y)

    def set_lr() -> None:
        for group in loop.optimizer.param_groups:
            group["lr"] = loop.lr_at(loop.step) * group.get("lr_scale", 1.0)

    parts = {
        "bare step (forward, backward, SGD step)": (bare, 1),
        "gather + augmentation": (lambda: to_input(augment(
            loop.train_x[ids], ids, epoch_plan, config.augment, config.cutout), config), 1),
        "LR schedule": (set_lr, 1),
        "EMA update": ((lambda: loop.ema.update_parameters(loop.net)) if loop.ema else None, 1),
        "accumulators": (accumulate, 1),
        "epoch plan (order, shifts, flips)": (lambda: plan(loop, 0), steps),
        "evaluation (EMA, TTA), per step": (lambda: validate(loop), steps),
        "checkpoint, per step": (lambda: save_state(directory, state_dict(loop)), steps),
    }
    bare_ms = timed_ms(bare, repeats, device)
    rows = []
    for name, (fn, per) in parts.items():
        ms = bare_ms if fn is bare else timed_ms(fn, repeats, device) / per if fn else 0.0
        rows.append({"model": config.model, "part": name, "ms_per_step": ms,
                     "share_of_bare_step": ms / bare_ms})
    return rows


@ray.remote
def compare_task(config: dict, splits: Splits, steps: int, rounds: int, threads: int
                 ) -> dict[str, Any]:
    """``compare`` in a Ray worker with the CPUs (and GPU) a training worker would get."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prepare_device(device, threads)
    return compare(TrainConfig.from_dict(config), splits, steps, rounds, device)
