"""python -m jobs.train: one training run on Ray Train (embedded local Ray, or RAY_ADDRESS)."""

from __future__ import annotations

import argparse
import os
import sys

from resnet.config import (AUGMENTS, FLIPS, MODELS, NORMALIZE, OPTIMIZERS, PLACEMENTS, PRESETS,
                           SCHEDULES, TrainConfig, make_config, parse_milestones)
from resnet.errors import OneLineParser, UsageError, run_main
from resnet.infra.console import hidden_note, quiet
from resnet.tune.replay import read_schedule

D = TrainConfig()  # dataclass defaults, shown in --help; a preset may change them


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m jobs.train",
        description="Train a ResNet on CIFAR-10 with Ray Train (DDP; gloo on CPU, NCCL on GPU). "
                    "Writes <storage>/<name>/: Ray Train's checkpoints, metrics.parquet, "
                    "summary.json and best/model.pt2. Running the same command again resumes.",
        epilog="Flags left out take the preset's value, else the default shown. "
               f"Presets: {', '.join(PRESETS)} (keras: the original Keras ResNet20v1 recipe).")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="data source: an image-folder tree (train/<class>/*), a "
                      ".tar/.tar.gz/.tar.xz of one, a cifar-10-batches-py/ directory or "
                      "cifar-10-python.tar.gz (default: $CIFAR10_DATA, else torchvision's download "
                      "into ~/.cache/resnet-cifar10/download)")
    data.add_argument("--val-size", type=int, help=f"validation images carved from train, "
                      f"stratified (default {D.val_size})")
    data.add_argument("--subset", type=int, help="train on a stratified subset of this many "
                      "images (smoke runs; default: all)")
    data.add_argument("--seed", type=int, help=f"seed of splits, init and augmentation (default {D.seed})")

    opt = p.add_argument_group("model and optimisation")
    opt.add_argument("--preset", choices=list(PRESETS), help="recipe to start from (default: default)")
    opt.add_argument("--lr-schedule", help="replay a sweep's best/schedule.json: its recipe and "
                     "its LR (and momentum, weight decay) epoch by epoch; other flags override")
    opt.add_argument("--model", choices=MODELS, help=f"architecture (default {D.model})")
    opt.add_argument("--epochs", type=int, help=f"epochs to train (default {D.epochs})")
    opt.add_argument("--batch-size", type=int, help=f"global batch, split across workers "
                     f"(default {D.batch_size})")
    opt.add_argument("--optimizer", choices=OPTIMIZERS, help=f"sgd is Nesterov SGD (default {D.optimizer})")
    opt.add_argument("--lr", type=float, help=f"peak (onecycle, cosine) or base (step) learning "
                     f"rate (default {D.lr})")
    opt.add_argument("--momentum", type=float, help=f"SGD momentum (default {D.momentum})")
    opt.add_argument("--bn-momentum", type=float, help="weight of each batch in BatchNorm's "
                     f"running statistics, torch convention (default {D.bn_momentum}; keras: 0.01)")
    opt.add_argument("--rho", type=float, help=f"RMSprop decay (default {D.rho})")
    opt.add_argument("--eps", type=float, help=f"Adam/RMSprop epsilon (default {D.eps})")
    opt.add_argument("--weight-decay", type=float, help=f"optimizer weight decay (default {D.weight_decay})")
    opt.add_argument("--l2", type=float, help="Keras-style L2 penalty on conv kernels, added to "
                     f"the loss (default {D.l2})")
    opt.add_argument("--label-smoothing", type=float, help="share of the target spread "
                     f"uniformly over all classes (default {D.label_smoothing})")
    opt.add_argument("--schedule", choices=SCHEDULES, help=f"LR schedule (default {D.schedule})")
    opt.add_argument("--warmup-frac", type=float, help="share of all steps spent warming up "
                     f"linearly, any schedule (default {D.warmup_frac}; keras: 0)")
    opt.add_argument("--final-lr-ratio", type=float, help="final LR as a fraction of the peak "
                     f"(onecycle, cosine; default {D.final_lr_ratio})")
    opt.add_argument("--milestones", type=parse_milestones_arg, help="step schedule: 1-based "
                     "epoch:factor pairs, e.g. 10:0.5,20:0.5 (from epoch 10 the LR is halved)")
    opt.add_argument("--augment", choices=AUGMENTS, help="crop: pad (--crop-pad) + random crop + flip; "
                     f"keras: 0.1 shifts with nearest fill + flip (default {D.augment})")
    opt.add_argument("--crop-pad", type=int, help="crop: zero padding in pixels, the largest "
                     f"shift each way (default {D.crop_pad})")
    opt.add_argument("--normalize", choices=NORMALIZE, help="channel: per-channel mean and std; "
                     "pixel: minus the training images' per-pixel mean, as Keras' example "
                     f"(default {D.normalize}; keras: pixel)")
    opt.add_argument("--cutout", type=int, help=f"cutout square side in pixels, 0 = off (default {D.cutout})")
    decay = opt.add_mutually_exclusive_group()
    decay.add_argument("--no-bn-bias-decay", dest="bn_bias_decay", action="store_const",
                       const=False, help="no weight decay on BatchNorm weights and biases "
                       "(fast preset)")
    decay.add_argument("--bn-bias-decay", dest="bn_bias_decay", action="store_const", const=True,
                       help="weight decay on every parameter (default)")
    opt.add_argument("--bn-lr-scale", type=float, help="LR multiplier for BatchNorm weights "
                     "and biases and other biases, their weight decay divided by it (default "
                     f"{D.bn_lr_scale:g})")
    opt.add_argument("--lookahead-k", type=int, help="Lookahead: sync the slow weights every k "
                     f"steps, 0 = off (default {D.lookahead_k})")
    opt.add_argument("--lookahead-alpha", type=float, help="Lookahead: share of the way the slow "
                     f"weights move (default {D.lookahead_alpha})")
    opt.add_argument("--flip", choices=FLIPS, help="random: mirror each image with probability "
                     "1/2 each epoch; alternate: at random once, then on alternate epochs "
                     f"(default {D.flip})")
    opt.add_argument("--dirac-init", dest="dirac_init", action="store_const", const=True,
                     help="resnet20: identity initialisation of the residual branches' convs "
                     "(default: he_normal, as Keras)")
    opt.add_argument("--ema", type=float, help="per-step decay of an EMA of the weights that is "
                     f"evaluated and exported, 0 = off (default {D.ema}; fast: 0.995)")
    tta = opt.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_const", const=True, help="flip "
                     "test-time augmentation in evaluation and in the exported model (fast preset)")
    tta.add_argument("--no-tta", dest="tta", action="store_const", const=False,
                     help="evaluate the image only (default)")
    opt.add_argument("--tta-shift", type=int, help="with --tta, also the images shifted by "
                     "this many pixels both ways, each with its mirror (6 passes), 0 = off "
                     f"(default {D.tta_shift})")
    add_eval_variants_flag(opt)

    hw = p.add_argument_group("hardware and run")
    hw.add_argument("--num-workers", type=int, help=f"Ray Train workers, one DDP rank each "
                    f"(default {D.num_workers})")
    add_device_flags(hw)
    hw.add_argument("--cpus-per-worker", type=int, help="CPUs (and torch threads) per worker "
                    "(default: the machine's CPUs divided by --num-workers)")
    hw.add_argument("--no-amp", dest="amp", action="store_const", const=False,
                    help="turn off bf16 autocast on CUDA")
    hw.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False,
                    help="keep the contiguous memory format (channels_last is the default)")
    add_compile_flag(hw)
    hw.add_argument("--max-failures", type=int, help="worker-group restarts from the latest "
                    f"checkpoint before the run fails, -1 = unlimited (default {D.max_failures})")
    hw.add_argument("--storage", help=f"root folder or URI (s3://, gs://) for runs (default {D.storage})")
    hw.add_argument("--name", help="run name, no timestamp, so the same command resumes "
                    "(default: <model>-<preset>-seed<seed>)")
    add_verbose_flag(hw)
    add_mlflow_flags(hw, "the run's config, every epoch's metrics, its files")
    return p


def add_device_flags(group) -> None:
    """--gpu/--cpu, --gpus-per-worker and --placement, shared with jobs.tune."""
    device = group.add_mutually_exclusive_group()
    device.add_argument("--gpu", dest="use_gpu", action="store_const", const=True,
                        help="train on GPUs (default: when the cluster has any)")
    device.add_argument("--cpu", dest="use_gpu", action="store_const", const=False,
                        help="train on CPUs even when GPUs exist")
    group.add_argument("--gpus-per-worker", type=float, help="GPUs per worker with --gpu; 0.25 "
                       "packs 4 one-worker runs (trials) on a GPU; a fraction below 1 needs "
                       "--num-workers 1 (default 1)")
    group.add_argument("--placement", choices=PLACEMENTS, help="where the workers go: pack "
                       "(fewest nodes: fastest all-reduce), spread (most nodes: one node's loss "
                       "hits fewer ranks), strict-spread (one worker per node, or wait) "
                       "(default pack)")


def add_mlflow_flags(group, what: str) -> None:
    """--mlflow and --mlflow-model-name, shared with jobs.tune and jobs.analyze."""
    group.add_argument("--mlflow", metavar="URI", help=f"log to this MLflow tracking server or "
                       f"store: {what}; the model registered (default: $MLFLOW_TRACKING_URI when "
                       "set, else no tracking; needs pip install -e '.[mlflow]')")
    group.add_argument("--mlflow-model-name", help="the registered model's name (default "
                       "resnet-cifar10)")


def add_verbose_flag(group) -> None:
    """--verbose, shared with jobs.tune."""
    group.add_argument("--verbose", action="store_true", help="show all of Ray's own logging "
                       "on the console too (default: only its errors; all of it is in Ray's "
                       "session logs); also RESNET_VERBOSE=1")


def add_compile_flag(group) -> None:
    """--compile/--no-compile, shared with jobs.tune."""
    compiled = group.add_mutually_exclusive_group()
    compiled.add_argument("--compile", dest="compile", action="store_const", const=True,
                          help="torch.compile the training model (default off: slower than "
                          "eager on the CPUs measured; see jobs.bench table 4)")
    compiled.add_argument("--no-compile", dest="compile", action="store_const", const=False,
                          help="train the eager model (default)")


def add_eval_variants_flag(group) -> None:
    """--eval-variants, shared with jobs.tune."""
    group.add_argument("--eval-variants", action="store_const", const=True,
                       help="also report val_acc with the raw weights and without TTA each "
                       "epoch (val_acc_plain, _tta_only, _ema_only), to measure those tricks")


def parse_milestones_arg(text: str):
    try:
        return parse_milestones(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    from resnet.infra import timing  # no heavy imports: marks when this job began (jobs.bench)
    timing.mark("main")
    args = vars(build_parser().parse_args(argv))
    verbose = args.pop("verbose")
    filters = quiet(verbose) if argv is None else []  # before Ray is imported

    def run() -> int:
        from resnet.train.driver import (
            train_driver_fn,  # imports Ray and torch: after parsing
        )
        mlflow = args.pop("mlflow") or os.environ.get("MLFLOW_TRACKING_URI")
        model_name = args.pop("mlflow_model_name") or "resnet-cifar10"
        if mlflow:
            from resnet.tracking.mlflow_runs import require_mlflow
            require_mlflow()
        schedule = args.pop("lr_schedule")
        recipe = read_schedule(schedule) if schedule else {}
        preset = args.pop("preset")
        config = make_config(preset, **{**recipe, **{k: v for k, v in args.items()
                                                     if v is not None}})
        if schedule and not preset:
            config = config.replace(preset="replay")  # names the run <model>-replay-seed<seed>
        summary = train_driver_fn(config)
        if mlflow:
            from resnet.tracking.sweep_runs import log_train_run
            link = log_train_run(mlflow, summary, model_name)
            print(f"MLflow: {link or mlflow} (the run; model {model_name!r} registered)")
        return 0 if summary["epochs_completed"] else 1

    return run_main("jobs.train", run, standalone=argv is None,
                    closing_note=lambda: hidden_note(filters))


if __name__ == "__main__":
    sys.exit(main())
