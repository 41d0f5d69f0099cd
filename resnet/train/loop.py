"""One worker's training loop, without Ray: its state (model, optimizer, EMA, schedule, the data on
the device) and its steps, epochs and evaluation. ``resnet/train/worker.py`` runs it under Ray Train (one
per DDP rank); ``jobs.bench`` times its steps against a bare PyTorch loop in the same process.

Data parallel: every rank holds the whole training set as one uint8 tensor on its device, and in
each step takes its own slice of the global batch from the epoch's shared permutation.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from resnet.config import TrainConfig
from resnet.data import Splits
from resnet.models import FlipTTA, build_model, conv_kernels, set_bn_momentum, set_pixel_mean
from resnet.train.augment import EpochPlan, augment, plan_epoch
from resnet.train.checkpoint import weights_digest
from resnet.train.ema import EMA
from resnet.train.lookahead import Lookahead
from resnet.train.schedules import Schedule, make_schedule

# Images per forward pass when evaluating. Not larger: on this 2-core CPU resnet20's forward
# costs 0.85 ms per image at 256 and 1.37 ms at 1,024 (the activations outgrow the caches).
EVAL_BATCH = 256
# Evaluation runs as the exported model computes: fp32 weights and activations (on CUDA with
# torch's default TF32 convolutions, as a user's own fp32 inference gets). val_acc picks the
# winner and test_acc describes the export, so neither may come from a bf16 pass.
EVAL_PRECISION = "fp32"


def param_groups(net: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """One group, or two when the 1-D parameters (BatchNorm weights and biases, and biases) are
    treated apart: no weight decay on them (bn_bias_decay off), and/or an LR ``lr_scale`` times
    the schedule's with the decay divided by it (bn_lr_scale: the same decay per step)."""
    params = list(net.parameters())
    if config.bn_bias_decay and config.bn_lr_scale == 1:
        return [{"params": params, "lr_scale": 1.0}]
    decay = config.weight_decay / config.bn_lr_scale if config.bn_bias_decay else 0.0
    return [{"params": [p for p in params if p.ndim > 1], "lr_scale": 1.0},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": decay,
             "lr_scale": config.bn_lr_scale}]


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.momentum > 0, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)
    # RMSprop as Keras: rho is torch's alpha; the accumulator starts at zero in both.
    return torch.optim.RMSprop(params, lr=config.lr, alpha=config.rho, eps=config.eps,
                               weight_decay=config.weight_decay)


def l2_penalty(model: nn.Module, l2: float) -> torch.Tensor | float:
    """Keras kernel_regularizer=l2(l2): l2 * sum of squared conv kernel weights, a loss term."""
    if not l2:
        return 0.0
    return l2 * sum(w.pow(2).sum() for w in conv_kernels(model))


def train_precision(device: torch.device, config: TrainConfig) -> str:
    """bf16 autocast on CUDA (no loss scaling needed for bf16); full fp32 elsewhere."""
    return "bf16" if device.type == "cuda" and config.amp else "fp32"


def autocast(precision: str):
    if precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    if config.channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_device(device: torch.device, cpus: int | None) -> None:
    """Per-process settings of a training worker: on a CPU, intra-op threads equal to the CPUs
    Ray gave it (or workers on one machine oversubscribe its cores); on CUDA, cuDNN's autotuner
    (fixed 32 x 32 inputs: it picks the fastest kernels once)."""
    if device.type == "cpu":
        # Arithmetic on denormal floats (below 1.2e-38) is 10-100x slower on x86 CPUs: the
        # keras recipe's L2 under RMSprop leaves tens of thousands of weights and RMSprop
        # averages there, and its epochs took 10x longer from epoch 27 on. Flush them to zero,
        # as TensorFlow does on CPUs (a no-op where the CPU cannot).
        torch.set_flush_denormal(True)
    if device.type == "cpu" and cpus:
        torch.set_num_threads(cpus)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             device: torch.device, config: TrainConfig, rank: int = 0, world: int = 1
             ) -> tuple[float, float]:
    """(mean loss, accuracy) over every image; ranks share the work (strided shards) and sum.

    The loss includes the Keras L2 term, as Keras' val_loss does.
    """
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64 if device.type == "cpu" else torch.float32,
                         device=device)  # loss sum, correct, count
    shard = torch.arange(rank, len(labels), world, device=labels.device)
    for start in range(0, len(shard), EVAL_BATCH):
        ids = shard[start:start + EVAL_BATCH]
        x = to_input(images[ids].float().div_(255), config)
        with autocast(EVAL_PRECISION):
            logits = model(x)
        y = labels[ids]
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(ids)
    loss_sum, correct, count = all_reduce_sum(totals).tolist()
    return loss_sum / count + float(l2_penalty(model, config.l2)), correct / count


def broadcast_buffers(*modules: nn.Module) -> None:
    """Give every rank rank 0's floating-point buffers (BatchNorm running statistics).

    DDP broadcasts rank 0's buffers before each training forward, after which each rank updates
    them from its own local batch; after the last step the ranks differ, and only rank 0's are
    checkpointed. One collective per module: the buffers travel as one flat tensor.
    """
    if not distributed():
        return
    for module in modules:
        buffers = [b for b in module.buffers() if b.is_floating_point()]
        if not buffers:
            continue
        flat = torch.cat([b.reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(buffers, [v.view_as(b) for v, b in zip(
            flat.split([b.numel() for b in buffers]), buffers)])


@dataclass
class Loop:
    """One rank's training state. ``net`` is the raw model; ``model`` is what trains (``net``
    moved to the device, DDP-wrapped when world > 1); the EMA copy, when on, is what is
    evaluated, checkpointed as the model and exported."""

    config: TrainConfig
    device: torch.device
    rank: int
    world: int
    net: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ema: EMA | None
    lookahead: Lookahead | None
    criterion: nn.Module
    lr_at: Schedule
    precision: str
    train_x: torch.Tensor  # uint8 N x 3 x 32 x 32 on the device
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    step: int = 0  # global optimizer steps so far (the schedule's clock)

    @property
    def eval_net(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.net

    @property
    def eval_model(self) -> nn.Module:
        return FlipTTA(self.eval_net, self.config.tta_shift) if self.config.tta else self.eval_net

    @property
    def local_batch(self) -> int:
        return self.config.batch_size // self.world

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_y) // self.config.batch_size  # the last partial batch is dropped


def build_loop(config: TrainConfig, splits: Splits, device: torch.device, rank: int = 0,
               world: int = 1, wrap: Callable[[nn.Module], nn.Module] | None = None) -> Loop:
    """The loop's state at step 0. ``wrap`` moves the model to the device and makes it
    distributed (Ray Train's ``prepare_model``); by default it is only moved."""
    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts)
    net = set_bn_momentum(build_model(config.model, len(splits.classes), config.dirac_init,
                                      config.normalize), config.bn_momentum)
    if config.normalize == "pixel":  # the mean image of what this run trains on (a resume
        # restores the same from its state); 1 x 3 x 32 x 32 in [0, 1], float64 sums: exact.
        set_pixel_mean(net, torch.from_numpy(
            splits.train_x.mean(axis=0, keepdims=True, dtype=np.float64) / 255))
    if config.channels_last:  # NHWC convolutions: faster on CUDA and on CPU (jobs.bench)
        net = net.to(memory_format=torch.channels_last)
    model = wrap(net) if wrap is not None else net.to(device)
    if config.compile:  # the training forward and backward; evaluation and export stay eager
        model = torch.compile(model)
    # The whole data set lives on the device as uint8: 45k x 3 x 32 x 32 is 138 MB.
    # torch.tensor copies: arrays from Ray's object store are read-only.
    data = [torch.tensor(a, device=device) for a in (splits.train_x, splits.train_y,
                                                     splits.val_x, splits.val_y)]
    steps_per_epoch = len(splits.train_y) // config.batch_size
    return Loop(config=config, device=device, rank=rank, world=world, net=net, model=model,
                optimizer=make_optimizer(config, param_groups(net, config)),
                ema=EMA(net, config.ema) if config.ema else None,
                lookahead=Lookahead(net, config.lookahead_k, config.lookahead_alpha)
                if config.lookahead_k else None,
                criterion=nn.CrossEntropyLoss(label_smoothing=config.label_smoothing),
                lr_at=make_schedule(config, steps_per_epoch),
                precision=train_precision(device, config), train_x=data[0], train_y=data[1],
                val_x=data[2], val_y=data[3])


def plan(loop: Loop, epoch: int) -> EpochPlan:
    """The epoch's sample order and augmentation, the same on every rank."""
    config = loop.config
    return plan_epoch(len(loop.train_y), config.seed, epoch, config.augment,
                      flip=config.flip, pad=config.crop_pad).to(loop.device)


def train_input(loop: Loop, epoch_plan: EpochPlan, ids: torch.Tensor) -> torch.Tensor:
    """The samples ``ids`` augmented as planned, as the model takes them: B x 3 x 32 x 32."""
    config = loop.config
    # A PixelMean model's mean image (1 x 3 x 32 x 32) shifts with the images, as in Keras.
    centre = loop.net.normalize.mean if config.normalize == "pixel" else None
    return to_input(augment(loop.train_x[ids], ids, epoch_plan, config.augment, config.cutout,
                            centre), config)


def train_step(loop: Loop, epoch_plan: EpochPlan, batch: int, sums: torch.Tensor) -> float:
    """One optimizer step on this rank's slice of global batch ``batch``; adds (loss * n,
    correct, n) to ``sums`` on the device (no host sync). Returns the step's LR."""
    config = loop.config
    begin = batch * config.batch_size + loop.rank * loop.local_batch
    ids = epoch_plan.order[begin:begin + loop.local_batch]  # this rank's slice
    x, y = train_input(loop, epoch_plan, ids), loop.train_y[ids]
    lr = loop.lr_at(loop.step)
    for group in loop.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # absent in checkpoints before it
    with autocast(loop.precision):
        logits = loop.model(x)
        loss = loop.criterion(logits.float(), y) + l2_penalty(loop.net, config.l2)
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    loop.optimizer.step()
    if loop.lookahead is not None:
        loop.lookahead.step()
    if loop.ema is not None:
        loop.ema.update_parameters(loop.net)
    loop.step += 1
    sums[0] += loss.detach() * len(y)
    sums[1] += (logits.argmax(1) == y).sum()
    sums[2] += len(y)
    return lr


def epoch_hyperparameters(config: TrainConfig, epoch: int) -> tuple[float, float, float]:
    """(peak LR, momentum, weight decay) of a 0-based epoch: the config's, or the replayed
    schedule's record of that epoch."""
    if not config.lr_by_epoch:
        return config.lr, config.momentum, config.weight_decay
    return config.lr_by_epoch[min(epoch, len(config.lr_by_epoch) - 1)]


def set_epoch_hyperparameters(loop: Loop, epoch: int) -> None:
    """A replayed schedule changes weight decay (every optimizer) and momentum (SGD's; Adam and
    RMSprop have none here) at epoch boundaries."""
    config = loop.config
    if not config.lr_by_epoch:
        return
    _, momentum, decay = epoch_hyperparameters(config, epoch)
    for i, group in enumerate(loop.optimizer.param_groups):  # [all] or [weights, 1-D]
        if config.optimizer == "sgd":
            group["momentum"] = momentum
        group["weight_decay"] = decay if i == 0 else (
            decay / config.bn_lr_scale if config.bn_bias_decay else 0.0)


def train_epoch(loop: Loop, epoch: int, after_first_step: Callable[[], None] | None = None
                ) -> dict[str, Any]:
    """Every step of one epoch: lr (the last step's), lr_steps (every step's), loss, acc,
    samples_per_s (training only)."""
    set_epoch_hyperparameters(loop, epoch)
    started = time.perf_counter()
    start_weights = weights_digest(loop.net.state_dict())  # where this epoch started from
    epoch_plan = plan(loop, epoch)
    loop.model.train()
    sums = torch.zeros(3, device=loop.device)  # loss * n, correct, n over this rank's samples
    lrs = []  # every step's LR, as set: the record a replay follows step by step
    for batch in range(loop.steps_per_epoch):
        lrs.append(train_step(loop, epoch_plan, batch, sums))
        if batch == 0 and after_first_step is not None:
            after_first_step()
    loss_sum, correct, count = all_reduce_sum(sums).tolist()
    out = {"lr": lrs[-1] if lrs else math.nan, "lr_steps": lrs, "loss": loss_sum / count,
           "acc": correct / count,
           "samples_per_s": count / (time.perf_counter() - started),
           "diverged": not math.isfinite(loss_sum), "start_weights": start_weights}
    if loop.device.type == "cuda":  # what packing trials on one GPU must fit
        out["gpu_mem_mb"] = torch.cuda.max_memory_allocated(loop.device) / 2**20
    return out


def validate(loop: Loop) -> dict[str, float]:
    """val_loss and val_acc of the evaluated model (EMA and TTA when on), every rank with rank
    0's BatchNorm statistics; with ``eval_variants`` also val_acc with those tricks off."""
    net, eval_net, config = loop.net, loop.eval_net, loop.config
    broadcast_buffers(*{id(m): m for m in (net, eval_net)}.values())
    val_loss, val_acc = evaluate(loop.eval_model, loop.val_x, loop.val_y, loop.device, config,
                                 loop.rank, loop.world)
    out = {"val_loss": val_loss, "val_acc": val_acc}
    if config.eval_variants:  # EMA and TTA only change evaluation: one run measures both
        variants = {"plain": net}
        if config.tta:
            variants["tta_only"] = FlipTTA(net, config.tta_shift)
        if config.tta_shift:  # what the shifted views add to the flip
            variants["flip_only"] = FlipTTA(eval_net)
        if eval_net is not net:
            variants["ema_only"] = eval_net
        out.update({f"val_acc_{name}": evaluate(m, loop.val_x, loop.val_y, loop.device, config,
                                                loop.rank, loop.world)[1]
                    for name, m in variants.items()})
    return out


def state_dict(loop: Loop) -> dict[str, Any]:
    """What a checkpoint needs to continue this loop: "model" holds the evaluated weights (the
    EMA when on), "train_model" the raw ones."""
    state = {"model": loop.eval_net.state_dict(), "optimizer": loop.optimizer.state_dict(),
             "step": loop.step}
    if loop.ema is not None:
        state.update(train_model=loop.net.state_dict(), ema_count=loop.ema.n_averaged)
    if loop.lookahead is not None:
        state["lookahead"] = loop.lookahead.state_dict()
    return state


def load_state_dict(loop: Loop, state: dict[str, Any]) -> None:
    """Continue from a checkpoint written by ``state_dict`` (at its step)."""
    loop.net.load_state_dict(state.get("train_model", state["model"]))
    if loop.ema is not None and "train_model" in state:
        loop.ema.module.load_state_dict(state["model"])
        loop.ema.n_averaged = state["ema_count"]
    # The optimizer's state (momentum buffers) comes from the checkpoint, its hyperparameters
    # from this run's config: a PBT clone continues its donor with perturbed ones.
    configured = [{k: v for k, v in group.items() if k != "params"}
                  for group in loop.optimizer.param_groups]
    loop.optimizer.load_state_dict(state["optimizer"])
    for group, hyper in zip(loop.optimizer.param_groups, configured):
        group.update(hyper)
    if loop.lookahead is not None:
        loop.lookahead.load_state_dict(state["lookahead"])
    loop.step = state["step"]
