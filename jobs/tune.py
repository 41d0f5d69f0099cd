"""python -m jobs.tune: the main job. A Ray Tune sweep of the learning-rate schedule (one
TorchTrainer per trial), then the best model's export and Grad-CAM."""

from __future__ import annotations

import argparse
import sys

from jobs.train import (add_compile_flag, add_device_flags, add_eval_variants_flag,
                        add_mlflow_flags, add_verbose_flag)
from resnet.config import ALL_IMAGES, CAM_METHODS, MODELS, OPTIMIZERS
from resnet.errors import OneLineParser, run_main
from resnet.infra.console import hidden_note, quiet

SWEEP_KEYS = ("samples", "target", "scheduler", "search", "grace_period",
              "perturbation_interval", "max_concurrent", "space", "keras_trial",
              "gradcam_images", "gradcam_method", "resume", "mlflow", "mlflow_model_name")


def subset_arg(text: str) -> int | str:
    """--subset: a number of images, or 'all' (every training image, on any profile)."""
    if text == ALL_IMAGES:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of images nor "
                                         f"'{ALL_IMAGES}'") from None


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m jobs.tune",
        description="Search the learning-rate schedule with Ray Tune (one Ray Train run per "
                    "trial, ASHA early stopping), export the best model and render Grad-CAM. "
                    "Writes <storage>/<name>/: Tune's experiment, train_runs/, trials.parquet, "
                    "summary.json, best/model.pt2 and gradcam/.",
        epilog="Defaults fit the hardware: with GPUs 16 trials x 50 epochs on all images plus "
               "the keras trial; CPU only: one trial per schedule family x 3 epochs on a 4,000-image "
               "subset with a 2,000-image validation split. Flags override the profile.")
    g = p.add_argument_group("sweep")
    g.add_argument("--samples", type=int, help="trials sampled from the space, times its grid "
                   "combinations (GPU 16; CPU 1 x the 3 schedule families)")
    g.add_argument("--epochs", type=int, help="epochs per trial, the schedule's length (GPU 50, CPU 3)")
    g.add_argument("--target", type=float, help="val_acc the sweep aims to pass (default 0.88)")
    g.add_argument("--scheduler", choices=("asha", "fifo", "pbt"),
                   help="asha stops weak trials early, fifo runs all to the end, pbt (Population "
                   "Based Training) lets weak trials clone strong ones and perturbs their LR "
                   "(default asha)")
    g.add_argument("--search", choices=("random", "optuna"), help="random (and grid) sampling, "
                   "or Optuna's TPE proposing each trial from the results so far (default random)")
    g.add_argument("--grace-period", type=int, help="ASHA: epochs every trial runs before it may "
                   "be stopped (default: a fifth of --epochs, at least 1)")
    g.add_argument("--perturbation-interval", type=int, help="PBT: epochs between exploits "
                   "(default: a tenth of --epochs, at least 1)")
    g.add_argument("--max-concurrent", type=int, help="trials at a time (default: as many as the "
                   "cluster's CPUs or GPUs hold)")
    g.add_argument("--space", help="YAML or JSON file laid over the default search space "
                   "(see README)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer of every searched trial; "
                   "picks the LR range (default sgd)")
    keras = g.add_mutually_exclusive_group()
    keras.add_argument("--keras-trial", dest="keras_trial", action="store_const", const=True,
                       help="add the original Keras recipe as one fixed trial (GPU default)")
    keras.add_argument("--no-keras-trial", dest="keras_trial", action="store_const", const=False,
                       help="leave the Keras trial out (CPU default)")
    g.add_argument("--resume", action="store_true", help="continue the sweep in <storage>/<name>: "
                   "finished trials are kept, unfinished ones continue from their checkpoints")
    g.add_argument("--gradcam-images", type=int, help="held-out images explained with Grad-CAM "
                   "after the sweep, one per class first; 0 = none (default 10)")
    g.add_argument("--gradcam-method", choices=CAM_METHODS, help="CAM method (default gradcam)")
    add_eval_variants_flag(g)
    add_mlflow_flags(g, "the sweep as a parent run, each trial a child run as it runs, the "
                        "winner's files as artifacts")

    d = p.add_argument_group("data and model")
    d.add_argument("--data", help="data source, as for jobs.train (default: $CIFAR10_DATA, else "
                   "torchvision's download)")
    d.add_argument("--model", choices=MODELS, help="architecture (default resnet20)")
    d.add_argument("--subset", type=subset_arg, help="train on a stratified subset of this many "
                   "images, or 'all' (GPU: all, CPU 4000)")
    d.add_argument("--val-size", type=int, help="validation images carved from train (GPU 5000, "
                   "CPU 2000)")
    d.add_argument("--seed", type=int, help="seed of splits, sampling and training (default 0)")

    h = p.add_argument_group("hardware and storage")
    h.add_argument("--num-workers", type=int, help="Ray Train workers per trial (default 1)")
    add_device_flags(h)
    h.add_argument("--cpus-per-worker", type=int, help="CPUs (and torch threads) per worker "
                   "(default: CPU 1, GPU the CPUs per GPU times --gpus-per-worker)")
    add_compile_flag(h)
    h.add_argument("--storage", help="root folder or URI for sweeps (default results)")
    h.add_argument("--name", help="sweep name, no timestamp (default tune-<model>-<profile>-seed<seed>)")
    add_verbose_flag(h)
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    verbose = args.pop("verbose")
    filters = quiet(verbose) if argv is None else []  # before Ray is imported

    def run() -> int:
        from resnet.sweep import run_sweep
        from resnet.tune.settings import (
            make_sweep,  # imports Ray and torch: after parsing
        )
        sweep_flags = {k: args.pop(k) for k in SWEEP_KEYS}
        sweep_flags["resume"] = sweep_flags["resume"] or None
        run_sweep(make_sweep(args, sweep_flags))
        return 0

    return run_main("jobs.tune", run, resume_hint="run the same command with --resume to "
                    "continue from the latest checkpoints", standalone=argv is None,
                    closing_note=lambda: hidden_note(filters))


if __name__ == "__main__":
    sys.exit(main())
