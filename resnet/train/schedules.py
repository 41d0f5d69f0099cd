"""Learning-rate schedules as pure functions of the global step (0-based) to a learning rate.

The training loop sets the LR of every parameter group before each step, so a resumed run only
needs the step counter from its checkpoint to continue the schedule exactly.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

from resnet.config import TrainConfig
from resnet.errors import UsageError

Schedule = Callable[[int], float]


def _warmup(step: int, warmup_steps: int, peak_lr: float) -> float:
    # Linear from peak/warmup_steps at step 0 up to the peak at the last warm-up step, so the
    # very first update already moves the weights.
    return peak_lr * (step + 1) / warmup_steps


def onecycle(step: int, *, total_steps: int, peak_lr: float, warmup_frac: float,
             final_lr_ratio: float) -> float:
    """Linear warm-up to ``peak_lr``, then linear decay to ``peak_lr * final_lr_ratio``."""
    warmup_steps = round(total_steps * warmup_frac)
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr)
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return peak_lr * (1.0 - progress * (1.0 - final_lr_ratio))


def cosine(step: int, *, total_steps: int, peak_lr: float, warmup_frac: float,
           final_lr_ratio: float) -> float:
    """Linear warm-up to ``peak_lr``, then half a cosine down to ``peak_lr * final_lr_ratio``."""
    warmup_steps = round(total_steps * warmup_frac)
    if step < warmup_steps:
        return _warmup(step, warmup_steps, peak_lr)
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    final_lr = peak_lr * final_lr_ratio
    return final_lr + (peak_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def step_decay(step: int, *, steps_per_epoch: int, base_lr: float,
               milestones: Sequence[tuple[int, float]], warmup_steps: int = 0) -> float:
    """``base_lr`` times every factor whose (1-based) milestone epoch has been reached, after
    an optional linear warm-up (none in the Keras recipe)."""
    if step < warmup_steps:
        return _warmup(step, warmup_steps, base_lr)
    epoch = step // steps_per_epoch + 1
    lr = base_lr
    for milestone_epoch, factor in milestones:
        if epoch >= milestone_epoch:
            lr *= factor
    return lr


def replayed(step: int, *, shape: Schedule, steps_per_epoch: int,
             peaks: Sequence[float]) -> float:
    """A recorded schedule: the family's shape (its LR at peak 1) times the peak of the step's
    epoch (epochs past the record keep its last peak). Every family is linear in its peak."""
    return peaks[min(step // steps_per_epoch, len(peaks) - 1)] * shape(step)


def recorded(step: int, *, steps_per_epoch: int, lrs: Sequence[Sequence[float]],
             after: Schedule) -> float:
    """A schedule logged step by step (``lrs[epoch][step in epoch]``); ``after`` past it."""
    epoch = step // steps_per_epoch
    return lrs[epoch][step % steps_per_epoch] if epoch < len(lrs) else after(step)


def make_schedule(config: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The schedule named by ``config.schedule``, bound to this run's step counts (and, with
    ``lr_by_epoch``, scaled epoch by epoch as recorded; with ``lr_by_step``, step by step)."""
    if config.lr_by_step:
        counts = sorted({len(row) for row in config.lr_by_step})
        if counts != [steps_per_epoch]:
            raise UsageError(f"--lr-schedule was recorded with {counts[0]} steps an epoch; this "
                             f"run takes {steps_per_epoch} (another --data, --subset, --val-size "
                             "or --batch-size): replay it on the data and batch it ran with")
        return functools.partial(recorded, steps_per_epoch=steps_per_epoch,
                                 lrs=config.lr_by_step,
                                 after=make_schedule(config.replace(lr_by_step=()),
                                                     steps_per_epoch))
    if config.lr_by_epoch:
        shape = make_schedule(config.replace(lr=1.0, lr_by_epoch=()), steps_per_epoch)
        return functools.partial(replayed, shape=shape, steps_per_epoch=steps_per_epoch,
                                 peaks=[peak for peak, _, _ in config.lr_by_epoch])
    total_steps = config.epochs * steps_per_epoch
    if config.schedule == "step":
        return functools.partial(step_decay, steps_per_epoch=steps_per_epoch,
                                 base_lr=config.lr, milestones=config.milestones,
                                 warmup_steps=round(total_steps * config.warmup_frac))
    shape = {"onecycle": onecycle, "cosine": cosine}[config.schedule]
    return functools.partial(shape, total_steps=total_steps, peak_lr=config.lr,
                             warmup_frac=config.warmup_frac, final_lr_ratio=config.final_lr_ratio)
