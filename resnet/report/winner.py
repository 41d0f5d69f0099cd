"""The sweep's post-job step: the winner's best checkpoint exported (``best/model.pt2``), its
schedule as it ran (``best/schedule.json``), Grad-CAM as a Ray task (``gradcam/``), the summary,
and the report (``analysis/report.html``)."""

from __future__ import annotations

import json
import shlex
from typing import Any

import ray

from resnet.config import TrainConfig
from resnet.infra import storage
from resnet.infra.provenance import provenance
from resnet.report.analysis import open_experiment
from resnet.report.gradcam import gradcam_task
from resnet.report.html import write_analysis
from resnet.train.checkpoint import load_state
from resnet.train.driver import export_best
from resnet.tune.replay import schedule_document
from resnet.tune.results import per_trial, time_split
from resnet.tune.runner import SweepRun


def finish(run: SweepRun) -> dict[str, Any]:
    """Export the winner (and its test accuracy, once), render Grad-CAM, build the summary."""
    sweep, base, splits, results, exp_dir = run.sweep, run.base, run.splits, run.results, run.exp_dir
    best = results.best
    checkpoint = ray.train.Checkpoint(best["checkpoint_path"])
    state = load_state(checkpoint)
    # The recipe of the weights themselves: the checkpoint's own config, not the trial's final
    # Tune config (under PBT a later exploit may have taken another donor's recipe since).
    winner = TrainConfig.from_dict(state["config"])
    final = export_best(checkpoint, winner, splits, exp_dir)
    # The winner's schedule as its weights ran it, epoch by epoch (with a PBT clone's donors).
    history = state["history"]
    storage.write_bytes(storage.join(exp_dir, "best", "schedule.json"), json.dumps(
        schedule_document(winner, history, {"sweep": exp_dir, "trial_id": best["trial_id"],
                                            "checkpoint": best["checkpoint_path"]}),
        indent=2).encode())
    gradcam_files: list[str] = []
    if sweep.gradcam_images:
        # Held-out images: the test split when the source has one, else validation.
        x, y = (splits.test_x, splits.test_y) if splits.test_x is not None else (splits.val_x,
                                                                                 splits.val_y)
        title = f"{winner.model}, trial {best['trial_id']} epoch {best['epoch']}, " \
                f"val_acc {best['val_acc']:.4f}, {sweep.gradcam_method}"
        files = ray.get(gradcam_task.options(num_cpus=1, num_gpus=1 if base.use_gpu else 0)
                        .remote(checkpoint, x, y, sweep.gradcam_images, sweep.gradcam_method, title))
        for filename, data in files.items():
            storage.write_bytes(storage.join(exp_dir, "gradcam", filename), data)
        gradcam_files = sorted(files)
    counts = results.trials.drop_duplicates("trial_id")["status"].value_counts().to_dict()
    table = per_trial(results.trials, sweep.target, results.configs).set_index("trial")
    return {
        "sweep": exp_dir, "profile": sweep.profile,
        "best_trial": best["trial_id"], "best_val_acc": best["val_acc"],
        "best_epoch": best["epoch"], "best_checkpoint": best["checkpoint_path"],
        # The best trial's last epoch, beside its best: one that ends at its best is trusted;
        # and the first epoch at which it passed the target (None: never).
        "best_trial_final_val_acc": float(table.loc[best["trial_id"], "final_val_acc"]),
        "best_trial_last_epoch": int(table.loc[best["trial_id"], "epochs"]),
        "best_trial_first_epoch_at_target": results.first_epoch_per_trial.get(best["trial_id"]),
        "best_config": winner.to_dict(),
        "target_acc": sweep.target, "target_reached": results.first_at_target is not None,
        "first_at_target": results.first_at_target,
        "first_epoch_at_target_per_trial": results.first_epoch_per_trial,
        "test_acc": final["test_acc"], "test_loss": final["test_loss"],
        "trials": {status: int(counts.get(status, 0))
                   for status in ("completed", "early-stopped", "diverged", "failed")},
        "time": time_split(table),
        "model_export": storage.join(exp_dir, "best", "model.pt2"),
        "schedule": storage.join(exp_dir, "best", "schedule.json"),
        "gradcam": [storage.join(exp_dir, "gradcam", f) for f in gradcam_files],
        "sweep_config": sweep.to_dict(), "provenance": provenance(),
    }


def print_next_steps(exp_dir: str, summary: dict[str, Any]) -> None:
    """The report (written now: it takes seconds), and where the winner's outputs are."""
    out = storage.join(exp_dir, "analysis")
    write_analysis(open_experiment(exp_dir), out)
    # Quoted for a shell: an s3:// location's query holds '&'.
    command = shlex.join(["python", "-m", "jobs.analyze", exp_dir])
    print(f"report: {storage.join(out, 'report.html')} ({command} refreshes it)", flush=True)
    print(f"best model: {summary['model_export']}; its schedule: {summary['schedule']}",
          flush=True)
    if summary["gradcam"]:
        print(f"Grad-CAM: {storage.join(exp_dir, 'gradcam', 'gradcam.png')}", flush=True)
    # Tune writes each trial's scalars (stepped by epoch) as TensorBoard event files.
    print(f"TensorBoard: {shlex.join(['tensorboard', '--logdir', exp_dir])}", flush=True)
