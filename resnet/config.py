"""The one typed run config: built from a preset plus CLI flags, validated, sent to every worker."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from resnet.errors import UsageError

MODELS = ("resnet20", "resnet18", "tiny")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULES = ("onecycle", "cosine", "step")
AUGMENTS = ("crop", "keras", "none")
NORMALIZE = ("channel", "pixel")
FLIPS = ("random", "alternate")
PLACEMENTS = ("pack", "spread", "strict-spread")
# The grad-cam package's methods offered by --gradcam-method / --method (resnet/report/gradcam.py).
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "xgradcam", "layercam", "eigencam",
               "eigengradcam", "elementwise", "scorecam", "ablationcam")
ALL_IMAGES = "all"  # jobs.tune --subset all: every training image, whatever the profile says
TARGET_ACC = 0.88  # the accuracy the project aims to pass; summary.json records when it was


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on. Units: epochs, images, pixels, learning rate."""

    # Model and data.
    model: str = "resnet20"
    # resnet20 only: identity (dirac) initialisation of the residual branches' convolutions
    # instead of he_normal; the layers are unchanged.
    dirac_init: bool = False
    data: str | None = None  # a data source; None: $CIFAR10_DATA, else torchvision's download
    # The model's input normalisation. channel: (x - mean) / std per channel, CIFAR-10's
    # constants; pixel: minus the training images' per-pixel mean (a 3 x 32 x 32 image taken
    # when training starts, kept in the weights and the export), as the Keras example does.
    normalize: str = "channel"
    val_size: int = 5000  # images carved from train for validation (stratified)
    subset: int | None = None  # train on a stratified subset of this many images (smoke runs)
    seed: int = 0
    # Optimisation.
    epochs: int = 30
    batch_size: int = 256  # global batch, split evenly across workers
    optimizer: str = "sgd"  # sgd (Nesterov momentum), adam or rmsprop
    lr: float = 0.2  # peak LR for onecycle/cosine, base LR for step
    momentum: float = 0.9  # SGD momentum
    # Weight of each batch in BatchNorm's running statistics (torch convention). Keras' default
    # momentum 0.99 is 0.01 here: too slow for short runs of few steps, so only `keras` uses it.
    bn_momentum: float = 0.1
    rho: float = 0.9  # RMSprop decay
    eps: float = 1e-8  # Adam/RMSprop epsilon
    weight_decay: float = 5e-4  # optimizer weight decay (added to the gradient)
    bn_bias_decay: bool = True  # False: no weight decay on BatchNorm weights and biases
    # LR multiplier for the 1-D parameters (BatchNorm weights and biases, biases); their weight
    # decay is divided by it, so the decay per step stays (airbench trains BN biases at 64x).
    bn_lr_scale: float = 1.0
    # Lookahead (Zhang et al. 2019) over the optimizer: every k steps the slow weights move
    # alpha of the way to the fast ones, and the fast weights restart from them; 0 turns it off.
    lookahead_k: int = 0
    lookahead_alpha: float = 0.5
    l2: float = 0.0  # Keras-style L2 penalty on conv kernels, added to the loss
    label_smoothing: float = 0.1
    schedule: str = "onecycle"
    warmup_frac: float = 0.15  # share of all steps spent warming up linearly (every schedule)
    final_lr_ratio: float = 0.0  # last LR as a fraction of the peak (onecycle, cosine)
    # step schedule: (1-based epoch, factor) pairs; from that epoch on the LR is multiplied.
    milestones: tuple[tuple[int, float], ...] = ()
    # A replayed schedule (jobs.train --lr-schedule, from a sweep's best/schedule.json): per
    # epoch (peak LR, momentum, weight decay), the schedule's shape scaled by each epoch's peak;
    # epochs past the list keep its last entry. Empty: the LR above, the whole run.
    lr_by_epoch: tuple[tuple[float, float, float], ...] = ()
    # A replayed schedule's LR of every step, per epoch, as its workers logged it (the shape of
    # each epoch's own run, which along a PBT lineage is a donor's); epochs past the record
    # follow lr_by_epoch. Empty: the schedule computes the LR.
    lr_by_step: tuple[tuple[float, ...], ...] = ()
    # Augmentation, drawn per epoch from (seed, epoch).
    augment: str = "crop"  # crop: pad, crop and flip; keras: 0.1 shifts, nearest fill, flip
    # crop's zero padding in pixels, hence its largest shift: a random crop moves an image by up
    # to this many pixels each way (4 is the ResNet paper's; airbench's short runs use 2).
    crop_pad: int = 4
    cutout: int = 0  # side of the cutout square in pixels; 0 turns it off
    # random: each image mirrored with probability 1/2 every epoch; alternate: at random in the
    # first epoch, then on alternate epochs (airbench), so every image is seen both ways.
    flip: str = "random"
    # Evaluation. ema: per-step decay of an exponential moving average of the weights (and BN
    # statistics) that is evaluated, checkpointed as the model and exported; 0 turns it off.
    ema: float = 0.0
    tta: bool = False  # flip test-time augmentation: mean logits of the image and its mirror
    # With tta: also the images shifted by this many pixels both ways (reflect padding), each
    # with its mirror: 6 passes instead of 2, inside the exported model too; 0 turns it off.
    tta_shift: int = 0
    # Also report val_acc with each evaluation trick off (raw weights, no TTA): EMA and TTA only
    # change evaluation, so one run measures both. Costs up to 4 more passes over val per epoch.
    eval_variants: bool = False
    # Hardware.
    num_workers: int = 1
    # Where the workers go (Ray Train's placement strategy): pack (as few nodes as possible),
    # spread (as many as possible), strict-spread (every worker on its own node, or wait).
    placement: str = "pack"
    use_gpu: bool | None = None  # None: use GPUs when the cluster has any
    # GPUs per worker; a fraction packs several 1-worker runs (Tune trials) onto one GPU.
    gpus_per_worker: float = 1.0
    cpus_per_worker: int | None = None  # None: share the machine's CPUs between the workers
    amp: bool = True  # bf16 autocast on CUDA (no effect on CPU)
    channels_last: bool = True  # channels_last memory format (faster on CUDA and on CPU)
    # torch.compile the training model. Off by default: on this project's 2-core CPU it is
    # slower than eager (jobs.bench table 4); on a GPU `jobs.bench --gpu-check` measures it.
    compile: bool = False
    max_failures: int = 1  # worker-group restarts from the latest checkpoint before giving up
    # Where the run lives: <storage>/<name>/.
    storage: str = "results"
    name: str | None = None
    preset: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], check: bool = True) -> "TrainConfig":
        """Build from a plain dict (CLI, JSON, Tune); unknown keys are a usage error, and so
        (unless ``check`` is off: to describe a trial that failed on it) is a bad value."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageError(f"unknown config key(s) {', '.join(unknown)}; "
                             f"known keys: {', '.join(sorted(known))}")
        values = dict(values)
        if values.get("milestones") is not None:
            values["milestones"] = tuple((int(e), float(f)) for e, f in values["milestones"])
        for key in ("lr_by_epoch", "lr_by_step"):
            if values.get(key) is not None:
                values[key] = tuple(tuple(float(v) for v in row) for row in values[key])
        config = cls(**values)
        return config.validated() if check else config

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists); round-trips through from_dict."""
        out = dataclasses.asdict(self)
        out["milestones"] = [list(m) for m in self.milestones]
        out["lr_by_epoch"] = [list(m) for m in self.lr_by_epoch]
        out["lr_by_step"] = [list(m) for m in self.lr_by_step]
        return out

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes).validated()

    @property
    def run_name(self) -> str:
        """Runs are named without timestamps so that the same command resumes the same run."""
        return self.name or f"{self.model}-{self.preset or 'custom'}-seed{self.seed}"

    def validated(self) -> "TrainConfig":
        _check_choice("model", self.model, MODELS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("augment", self.augment, AUGMENTS)
        _check_choice("normalize", self.normalize, NORMALIZE)
        _check_choice("flip", self.flip, FLIPS)
        _check_choice("placement", self.placement, PLACEMENTS)
        _check(self.bn_lr_scale > 0 and math.isfinite(self.bn_lr_scale),
               f"--bn-lr-scale must be positive, got {self.bn_lr_scale}")
        _check(self.lookahead_k >= 0, f"--lookahead-k must be >= 0, got {self.lookahead_k}")
        _check(0 < self.lookahead_alpha <= 1,
               f"--lookahead-alpha must be in (0, 1], got {self.lookahead_alpha}")
        _check(0 <= self.tta_shift <= 8, f"--tta-shift must be 0-8 pixels, got {self.tta_shift}")
        _check(not self.tta_shift or self.tta, "--tta-shift needs --tta (it adds shifted "
               "copies to the flip test-time augmentation)")
        _check(not self.dirac_init or self.model == "resnet20",
               f"--dirac-init is for resnet20's residual branches, not {self.model}")
        _check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        _check(self.num_workers >= 1, f"--num-workers must be at least 1, got {self.num_workers}")
        _check(self.batch_size % self.num_workers == 0,
               f"--batch-size {self.batch_size} must be divisible by --num-workers "
               f"{self.num_workers} (the global batch is split evenly across workers)")
        _check(math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive, got {self.lr}")
        for key in ("weight_decay", "l2", "momentum", "eps"):
            value = getattr(self, key)
            _check(math.isfinite(value) and value >= 0,
                   f"--{key.replace('_', '-')} must be >= 0, got {value}")
        _check(0 < self.bn_momentum <= 1,
               f"--bn-momentum must be in (0, 1], got {self.bn_momentum}")
        _check(0 <= self.rho < 1, f"--rho must be in [0, 1), got {self.rho}")
        _check(0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}")
        _check(0 <= self.label_smoothing < 1,
               f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(0 <= self.warmup_frac < 1, f"--warmup-frac must be in [0, 1), got {self.warmup_frac}")
        _check(0 <= self.final_lr_ratio <= 1,
               f"--final-lr-ratio must be in [0, 1], got {self.final_lr_ratio}")
        _check(self.schedule != "step" or bool(self.milestones),
               "--schedule step needs --milestones, for example 10:0.5,20:0.5")
        for peak, momentum, decay in self.lr_by_epoch:
            _check(peak > 0 and momentum >= 0 and decay >= 0,
                   f"--lr-schedule: epoch values (lr {peak}, momentum {momentum}, weight decay "
                   f"{decay}) must be positive")
        _check(all(math.isfinite(v) and v >= 0 for row in self.lr_by_step for v in row),
               "--lr-schedule: every recorded step's LR must be >= 0")
        for epoch, factor in self.milestones:
            _check(epoch >= 1 and factor > 0,
                   f"milestone {epoch}:{factor} must have an epoch >= 1 and a factor > 0")
        _check(0 <= self.crop_pad <= 8, f"--crop-pad must be 0-8 pixels, got {self.crop_pad}")
        _check(self.augment == "crop" or self.crop_pad == TrainConfig.crop_pad,
               f"--crop-pad is the padding of --augment crop; with --augment {self.augment} "
               "leave it out")
        _check(0 <= self.cutout <= 32, f"--cutout must be 0-32 pixels, got {self.cutout}")
        _check(self.val_size >= 1, f"--val-size must be at least 1, got {self.val_size}")
        _check(self.subset is None or self.subset >= 1, f"--subset must be positive, got {self.subset}")
        _check(self.max_failures >= -1, f"--max-failures must be >= -1, got {self.max_failures}")
        _check(self.gpus_per_worker != 0, "--gpus-per-worker 0: to train without GPUs pass "
               "--cpu instead")
        _check(self.gpus_per_worker > 0 and (self.gpus_per_worker <= 1
                                             or float(self.gpus_per_worker).is_integer()),
               f"--gpus-per-worker must be a fraction up to 1 or a whole number, "
               f"got {self.gpus_per_worker:g}")
        _check(self.gpus_per_worker >= 1 or self.num_workers == 1,
               f"--gpus-per-worker {self.gpus_per_worker:g} with {self.num_workers} workers: "
               "fractions below 1 need exactly 1 worker (NCCL cannot share a GPU between the "
               "ranks of one group); use whole GPUs or --num-workers 1")
        _check(self.cpus_per_worker is None or self.cpus_per_worker >= 1,
               f"--cpus-per-worker must be at least 1, got {self.cpus_per_worker}")
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.run_name)),
               f"--name {self.run_name!r} must be a plain name (letters, digits, '.', '_', '-'; "
               "no path separators)")
        return self


# Presets set defaults; flags given on the command line override them.
PRESETS: dict[str, dict[str, Any]] = {
    # A plain one-cycle recipe: Nesterov SGD, crop and flip, label smoothing.
    "default": {},
    # The default plus the known tricks (README: "The fast recipe"): batch 128 at LR 0.2, cutout
    # 8, no weight decay on BatchNorm and biases, an EMA of the weights for evaluation, flip and
    # 2-pixel shift TTA; 50 epochs, the fewest that end >= 0.890 on validation (docs/results.md).
    "fast": {"model": "resnet20", "epochs": 50, "batch_size": 128, "cutout": 8,
             "bn_bias_decay": False, "ema": 0.995, "tta": True, "tta_shift": 2},
    # The original Keras run: ResNet20v1 on inputs minus the training images' per-pixel mean,
    # RMSprop, batch 32, L2 1e-4 on conv kernels as a loss term, Keras shift-and-flip
    # augmentation, LR 0.003 then stepped down from epoch 10 on.
    "keras": {
        "model": "resnet20", "normalize": "pixel", "epochs": 50, "batch_size": 32,
        "optimizer": "rmsprop", "lr": 0.003, "rho": 0.9, "eps": 1e-7, "weight_decay": 0.0,
        "l2": 1e-4, "bn_momentum": 0.01,
        "label_smoothing": 0.0, "schedule": "step", "warmup_frac": 0.0, "augment": "keras", "cutout": 0,
        "milestones": ((10, 0.5), (17, 0.9), (24, 0.8), (27, 0.8), (30, 0.7), (37, 0.7), (42, 0.8)),
    },
}


def make_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """Dataclass defaults, then the preset, then explicit overrides (None means not given)."""
    preset = preset or "default"
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values: dict[str, Any] = {**PRESETS[preset], "preset": preset}
    given = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig.from_dict(follow_switches({**values, **given}, given))


# Settings that mean something only under a switch: a switch turned off (by a flag or a sampled
# value) turns them off too, unless they are given beside it (then validation names the clash):
# `--preset fast --no-tta` drops the preset's shift TTA with its flip TTA.
DEPENDENTS = {"tta": ("tta_shift",)}


def follow_switches(values: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with the dependents of each switch that ``given`` turns off reset to their
    defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for switch, dependents in DEPENDENTS.items():
        if switch in given and not given[switch]:
            values.update({key: defaults[key] for key in dependents if key not in given})
    return values


def parse_milestones(text: str) -> tuple[tuple[int, float], ...]:
    """'10:0.5,17:0.9' -> ((10, 0.5), (17, 0.9)); epochs are 1-based."""
    try:
        pairs = [item.split(":") for item in text.split(",") if item.strip()]
        return tuple((int(e), float(f)) for e, f in pairs)
    except ValueError:
        raise UsageError(f"--milestones {text!r} must look like 10:0.5,20:0.5 "
                         "(1-based epoch:factor pairs)") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UsageError(message)


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"unknown {key} {value!r}; choose one of {', '.join(choices)}")
