"""The per-worker training loop that Ray Train's ``TorchTrainer`` runs on every worker.

Data parallel: every rank holds the whole training set as one uint8 tensor on its device, and in
each step takes its own slice of the global batch from the epoch's shared permutation. DDP
averages the gradients, so the update equals one worker's on the whole global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from resnet import timing
from resnet.augment import augment, plan_epoch
from resnet.checkpoint import load_state, save_state
from resnet.config import TrainConfig
from resnet.data import Splits
from resnet.ema import EMA
from resnet.models import FlipTTA, build_model, conv_kernels, set_bn_momentum
from resnet.schedules import make_schedule

EVAL_BATCH = 1024  # images per forward pass when evaluating
# Through logging, not print: Ray Train forwards worker log records to the driver's console.
log = logging.getLogger("resnet.train")


def param_groups(net: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """Weight decay on every parameter, or (bn_bias_decay off) only on conv and linear weights:
    the 1-D parameters are BatchNorm weights and biases, and biases."""
    params = list(net.parameters())
    if config.bn_bias_decay:
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


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


def autocast(device: torch.device, config: TrainConfig):
    """bf16 autocast on CUDA (no loss scaling needed for bf16); full fp32 elsewhere."""
    if device.type == "cuda" and config.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_input(x: torch.Tensor, device: torch.device, config: TrainConfig) -> torch.Tensor:
    if config.channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
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
        x = to_input(images[ids].float().div_(255), device, config)
        with autocast(device, config):
            logits = model(x)
        y = labels[ids]
        totals[0] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[1] += (logits.argmax(1) == y).sum()
        totals[2] += len(ids)
    loss_sum, correct, count = all_reduce_sum(totals).tolist()
    return loss_sum / count + float(l2_penalty(model, config.l2)), correct / count


def evaluate_variants(net: nn.Module, eval_net: nn.Module, images: torch.Tensor,
                      labels: torch.Tensor, device: torch.device, config: TrainConfig,
                      rank: int = 0, world: int = 1) -> dict[str, float]:
    """val_acc with the evaluation tricks off: "plain" (raw weights, no TTA), and with only TTA
    or only the EMA when they are on. ``net`` is the raw model, ``eval_net`` the EMA (or net)."""
    variants = {"plain": net}
    if config.tta:
        variants["tta_only"] = FlipTTA(net)
    if eval_net is not net:
        variants["ema_only"] = eval_net
    return {f"val_acc_{name}": evaluate(m, images, labels, device, config, rank, world)[1]
            for name, m in variants.items()}


def train_fn_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point. ``loop_config``: {"config": TrainConfig dict, "data": ObjectRef
    of the Splits, "log_prefix": text before each log line (the trial id under Tune)}."""
    timing.mark("worker_start")
    quiet_ray_train_reports()
    config = TrainConfig.from_dict(loop_config["config"])
    prefix = loop_config.get("log_prefix", "")
    splits: Splits = ray.get(loop_config["data"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config.cpus_per_worker:
        # Intra-op threads must match the CPUs Ray gave this worker, or workers oversubscribe.
        torch.set_num_threads(config.cpus_per_worker)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed 32 x 32 inputs: pick the fastest kernels

    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP also broadcasts)
    net = set_bn_momentum(build_model(config.model, num_classes=len(splits.classes)),
                          config.bn_momentum)
    if config.channels_last:  # NHWC convolutions: faster on CUDA and on CPU (jobs.bench)
        net = net.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(net)  # moves to device; DDP when world > 1
    optimizer = make_optimizer(config, param_groups(net, config))
    # The EMA copy (weights and BatchNorm statistics) is what gets evaluated and exported.
    ema = EMA(net, config.ema) if config.ema else None
    eval_net = ema.module if ema is not None else net
    eval_model = FlipTTA(eval_net) if config.tta else eval_net

    local_batch = config.batch_size // world
    steps_per_epoch = len(splits.train_y) // config.batch_size  # the last partial batch is dropped
    lr_at = make_schedule(config, steps_per_epoch)

    start_epoch, step, best_acc, best_epoch, history = 0, 0, -math.inf, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group or a re-run: continue at the saved epoch and step
        state = load_state(checkpoint, map_location=device)
        net.load_state_dict(state.get("train_model", state["model"]))
        if ema is not None and "train_model" in state:
            ema.module.load_state_dict(state["model"])
            ema.n_averaged = state["ema_count"]
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, step = state["epoch"], state["step"]
        best_acc, best_epoch, history = state["best_val_acc"], state["best_epoch"], state["history"]
        if rank == 0:
            log.info(f"{prefix}Resuming from epoch {start_epoch} (step {step}) of {config.epochs}")
        if history and history[-1].get("diverged"):
            return

    # The whole data set lives on the device as uint8: 45k x 3 x 32 x 32 is 138 MB.
    # torch.tensor copies: arrays from Ray's object store are read-only.
    train_x, train_y, val_x, val_y = (torch.tensor(a, device=device) for a in (
        splits.train_x, splits.train_y, splits.val_x, splits.val_y))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    start_step = step
    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        plan = plan_epoch(len(train_y), config.seed, epoch, config.augment).to(device)
        model.train()
        sums = torch.zeros(3, device=device)  # loss * n, correct, n over this rank's samples
        for batch in range(steps_per_epoch):
            begin = batch * config.batch_size + rank * local_batch
            ids = plan.order[begin:begin + local_batch]  # this rank's slice of the global batch
            x = to_input(augment(train_x[ids], ids, plan, config.augment, config.cutout), device, config)
            y = train_y[ids]
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, config):
                logits = model(x)
                loss = criterion(logits.float(), y) + l2_penalty(net, config.l2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update_parameters(net)
            if step == start_step and rank == 0:
                timing.mark("first_step", device)
            step += 1
            # Accumulate on the device: no host sync inside the step loop.
            sums[0] += loss.detach() * len(y)
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += len(y)
        loss_sum, correct, count = all_reduce_sum(sums).tolist()
        train_s = time.perf_counter() - started
        val_loss, val_acc = evaluate(eval_model, val_x, val_y, device, config, rank, world)
        metrics = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / count, "acc": correct / count,
                   "val_loss": val_loss, "val_acc": val_acc,
                   "epoch_s": time.perf_counter() - started, "samples_per_s": count / train_s,
                   "step": step, "diverged": not math.isfinite(loss_sum)}
        if config.eval_variants:
            metrics.update(evaluate_variants(net, eval_net, val_x, val_y, device, config, rank, world))
        history.append(metrics)
        previous_best = best_acc
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch + 1
        if rank == 0:
            log_epoch(metrics, config.epochs, previous_best, prefix)
        # "model" holds the evaluated weights (the EMA when on); "train_model" the raw ones.
        state = {"model": eval_net.state_dict(), "optimizer": optimizer.state_dict(),
                 "epoch": epoch + 1, "step": step, "best_val_acc": best_acc,
                 "best_epoch": best_epoch, "history": history, "config": config.to_dict(),
                 "classes": list(splits.classes)}
        if ema is not None:
            state.update(train_model=net.state_dict(), ema_count=ema.n_averaged)
        report(metrics, rank, state)
        if metrics["diverged"]:
            return


def report(metrics: dict[str, Any], rank: int, state: dict[str, Any]) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save_state(directory, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"epoch_{metrics['epoch']:04d}")


def log_epoch(m: dict[str, Any], epochs: int, previous_best: float, prefix: str = "") -> None:
    variants = [f"{k[len('val_acc_'):]} {v:.4f}" for k, v in m.items() if k.startswith("val_acc_")]
    log.info(prefix + epoch_line(m, epochs) + (f" (val_acc {', '.join(variants)})" if variants else ""))
    if m["diverged"]:
        log.info(f"{prefix}loss is {m['loss']} at epoch {m['epoch']}: the run diverged and stops "
                 "here (try a lower --lr)")
    elif m["val_acc"] > previous_best:
        log.info(f"{prefix}val_acc improved from {previous_best:.5f} to {m['val_acc']:.5f}, "
                 "saving checkpoint")
    else:
        log.info(f"{prefix}val_acc did not improve from {previous_best:.5f}")


def quiet_ray_train_reports() -> None:
    # Ray Train logs every report at INFO under a logger named after its source file, which
    # LoggingConfig(log_level) does not filter; it would print each metrics dict once per rank.
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def epoch_line(m: dict[str, Any], epochs: int) -> str:
    """One line per epoch, as the Keras log prints it."""
    return (f"Epoch {m['epoch']}/{epochs} - {m['epoch_s']:.0f}s - loss: {m['loss']:.4f} - "
            f"acc: {m['acc']:.4f} - val_loss: {m['val_loss']:.4f} - val_acc: {m['val_acc']:.4f} - "
            f"lr: {m['lr']:.6f} - {m['samples_per_s']:.0f} samples/s")
