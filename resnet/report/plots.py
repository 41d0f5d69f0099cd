"""The pictures of a sweep's report: a metric per epoch, each trial's learning rate step by step,
the lineage of a PBT population, the winner's confusion matrix. Each returns PNG bytes."""

from __future__ import annotations

import io

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from resnet.config import TrainConfig  # noqa: E402
from resnet.train.schedules import make_schedule  # noqa: E402

WINNER = {"linewidth": 2.8, "alpha": 1.0, "zorder": 3, "color": "tab:red"}
OTHER = {"linewidth": 1.0, "alpha": 0.45, "zorder": 2}


def plot_per_epoch(trials: pd.DataFrame, winner: str | None, column: str, title: str,
                   target: float | None = None) -> bytes:
    """``column`` against epoch for every trial; the winner drawn thick and labelled."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for trial_id, rows in trials.groupby("trial_id", sort=True):
        rows = rows[rows[column].notna()]
        if rows.empty:
            continue
        best = trial_id == winner
        ax.plot(rows["epoch"].astype(int), rows[column].astype(float), marker="o", markersize=3,
                label=f"winner {trial_id}" if best else None, **(WINNER if best else OTHER))
    if target is not None:
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set(xlabel="epoch", ylabel=column, title=title)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    return _finish(fig, ax)


def lr_path(rows: pd.DataFrame, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(epochs as fractions, LR) at every step a trial ran, recomputed from its config: a
    schedule is a pure function of the step, scaled each epoch by the peak LR that epoch ran
    with (a PBT clone's perturbed one). Steps per epoch come from the rows' step counter."""
    rows = rows[rows["step"].notna() & rows["epoch"].notna()].sort_values("epoch")
    if rows.empty:
        return np.zeros(0), np.zeros(0)
    last_epoch, last_step = int(rows["epoch"].iloc[-1]), int(rows["step"].iloc[-1])
    steps_per_epoch = max(1, last_step // last_epoch)
    peaks = rows.set_index("epoch")["lr_peak"] if "lr_peak" in rows else pd.Series(dtype=float)
    by_epoch = [(float(peaks.get(e, config.lr)) if pd.notna(peaks.get(e, config.lr))
                 else config.lr, config.momentum, config.weight_decay)
                for e in range(1, last_epoch + 1)]
    schedule = make_schedule(config.replace(lr_by_epoch=tuple(by_epoch)), steps_per_epoch)
    steps = np.arange(last_step)
    return steps / steps_per_epoch, np.array([schedule(int(s)) for s in steps])


def plot_lr_paths(trials: pd.DataFrame, configs: dict[str, TrainConfig],
                  winner: str | None) -> bytes:
    """Every trial's learning rate at every step it ran (log scale; zeros left out)."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for trial_id, rows in trials.groupby("trial_id", sort=True):
        if trial_id not in configs:
            continue
        x, lr = lr_path(rows, configs[trial_id])
        best = trial_id == winner
        ax.plot(x, lr, label=f"winner {trial_id}" if best else None, **(WINNER if best else OTHER))
    ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate of each trial, step by "
           "step (log scale)")
    ax.set_yscale("log", nonpositive="mask")  # LRs span decades; a diverging trial's is huge
    return _finish(fig, ax)


def plot_lineage(trials: pd.DataFrame, winner: str | None) -> bytes | None:
    """A PBT population: one lane per trial over the epochs, an arrow from the donor (trial,
    epoch) each clone took its weights from; None when no trial was cloned."""
    if "cloned_from" not in trials or trials["cloned_from"].isna().all():
        return None
    lanes = {t: i for i, t in enumerate(sorted(trials["trial_id"].unique()))}
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(lanes) + 1.8), dpi=110)
    for trial_id, rows in trials.groupby("trial_id"):
        epochs = rows["epoch"].dropna().astype(int)
        ax.plot(epochs, [lanes[trial_id]] * len(epochs), marker="o", markersize=4,
                **(WINNER if trial_id == winner else {"color": "tab:blue", "linewidth": 1.2}))
    for _, row in trials[trials["cloned_from"].notna()].iterrows():
        donor, at = row["cloned_from"], float(row["cloned_at_epoch"])
        if donor in lanes:
            ax.annotate("", xy=(float(row["epoch"]), lanes[row["trial_id"]]),
                        xytext=(at, lanes[donor]),
                        arrowprops={"arrowstyle": "->", "color": "tab:orange", "linewidth": 1.5})
    ax.set_yticks(list(lanes.values()), list(lanes.keys()))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="epoch", title="PBT lineage: arrows from the donor's checkpoint to the clone")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_confusion(matrix: np.ndarray, classes: list[str], title: str) -> bytes:
    """Rows: true class, columns: predicted; colour is the share of the row, text the count."""
    share = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i, j in np.ndindex(matrix.shape):
        ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    return _png(fig)


def _finish(fig, ax) -> bytes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    return _png(fig)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()
