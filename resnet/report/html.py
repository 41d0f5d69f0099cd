"""The files ``jobs.analyze`` writes for a sweep: plots, trials.parquet and .csv, and report.html,
one self-contained page (images embedded as data: URIs, no scripts, nothing fetched)."""

from __future__ import annotations

import base64
import html
import json
import time
from typing import Any

import pandas as pd

from resnet.config import TARGET_ACC
from resnet.infra import storage
from resnet.infra.provenance import provenance
from resnet.report.analysis import Analysis, winner_confusion
from resnet.report.plots import plot_lineage, plot_lr_paths, plot_per_epoch
from resnet.tune.results import write_parquet

STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;
text-align:right}th{background:#eef}tr.winner td{background:#fde8e8;font-weight:600}
img{max-width:100%;border:1px solid #ddd}pre{background:#f6f6f6;padding:1em;overflow:auto}
.partial{background:#fff3cd;padding:.6em;border:1px solid #e0c060}"""


def write_analysis(analysis: Analysis, out_dir: str, top: int | None = None) -> dict[str, Any]:
    """Write every file under ``out_dir``; returns {file name: path} and notes for the console."""
    sweep = analysis.settings["sweep"]
    target = sweep.get("target", TARGET_ACC)
    trials, configs = analysis.results.trials, analysis.results.configs
    winner = analysis.winner["trial"] if analysis.winner is not None else None
    images: dict[str, bytes] = {
        "curves.png": plot_per_epoch(trials, winner, analysis.metric,
                                     f"{analysis.metric} per epoch, {len(analysis.table)} trials",
                                     target if analysis.metric == "val_acc" else None),
        "lr.png": plot_lr_paths(trials, configs, winner),
    }
    lineage = plot_lineage(trials, winner)
    if lineage is not None:  # a PBT sweep that cloned
        images["lineage.png"] = lineage
    confusion, caption = winner_confusion(analysis)
    notes = {"confusion.png": caption}
    if confusion is not None:
        images["confusion.png"] = confusion
    written = {}
    for name, data in images.items():
        written[name] = storage.join(out_dir, name)
        storage.write_bytes(written[name], data)
    trials = analysis.results.trials
    written["trials.parquet"] = storage.join(out_dir, "trials.parquet")
    write_parquet(written["trials.parquet"], trials, {**analysis.settings, "analysed_with":
                                                      provenance()})
    written["trials.csv"] = storage.join(out_dir, "trials.csv")
    storage.write_bytes(written["trials.csv"], trials.to_csv(index=False).encode())
    gradcam = storage.read_bytes(storage.join(analysis.exp_dir, "gradcam", "gradcam.png"))
    page = render_html(analysis, images, notes, gradcam, top)
    written["report.html"] = storage.join(out_dir, "report.html")
    storage.write_bytes(written["report.html"], page.encode())
    return {"files": written, "notes": notes}


def render_html(analysis: Analysis, images: dict[str, bytes], notes: dict[str, str],
                gradcam: bytes | None, top: int | None = None) -> str:
    sweep = analysis.settings["sweep"]
    name = analysis.exp_dir.rstrip("/").rsplit("/", 1)[-1]
    winner = analysis.winner
    table = analysis.table.head(top) if top else analysis.table
    counts = analysis.table["status"].value_counts().to_dict()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {_e(name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Sweep {_e(name)}</h1>",
             f"<p>{_e(analysis.exp_dir)}; {len(analysis.table)} trials: "
             f"{_e(', '.join(f'{v} {k}' for k, v in counts.items()))}. "
             f"Report written {_e(time.strftime('%Y-%m-%d %H:%M:%S %Z'))}.</p>"]
    if analysis.partial:
        parts.append("<p class='partial'>Partial results: the sweep is still running (or was "
                     "interrupted; <code>jobs.tune --resume</code> continues it). Trials marked "
                     "running or pending have not finished.</p>")
    if winner is not None:
        hit = analysis.results.first_at_target
        target = sweep.get("target", TARGET_ACC)
        parts.append(f"<p><b>Best:</b> trial {_e(winner['trial'])}, "
                     f"{_e(analysis.metric)} {winner[f'best_{analysis.metric}']:.4f} at epoch "
                     f"{winner['best_epoch']} (final epoch "
                     f"{winner[f'final_{analysis.metric}']:.4f}). Target val_acc {target:g}: "
                     + (f"first reached by trial {_e(hit['trial_id'])} at epoch {hit['epoch']}."
                        if hit else "not reached.") + "</p>")
    parts.append(f"<h2>Trials{f' (top {top})' if top else ''}</h2>")
    parts.append(_table_html(table, winner))
    captions = {"curves.png": f"{analysis.metric} per epoch; the winner in red",
                "lr.png": "learning rate of each trial at every step it ran (recomputed from "
                          "its config and the peak LR of each epoch)",
                "lineage.png": "PBT lineage: which trial cloned which, at which epoch",
                "confusion.png": f"confusion matrix of the winner: {notes.get('confusion.png', '')}"}
    for file, data in images.items():
        parts.append(f"<h2>{_e(captions[file])}</h2>{_img(data, file)}")
    if "confusion.png" not in images:
        parts.append(f"<p>No confusion matrix: {_e(notes.get('confusion.png', ''))}</p>")
    if gradcam is not None:
        parts.append(f"<h2>Grad-CAM of the winner</h2>{_img(gradcam, 'gradcam.png')}")
    if winner is not None:
        config = analysis.results.configs[winner["trial"]].to_dict()
        parts.append(f"<h2>Winner's config</h2><pre>{_e(json.dumps(config, indent=2))}</pre>")
    parts.append("<h2>Sweep settings and provenance</h2><pre>"
                 f"{_e(json.dumps({'sweep': sweep, 'analysed_with': provenance()}, indent=2, default=str))}"
                 "</pre></body></html>")
    return "\n".join(parts)


def _table_html(table: pd.DataFrame, winner) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    rows = []
    for _, row in table.iterrows():
        cls = " class='winner'" if winner is not None and row["trial"] == winner["trial"] else ""
        cells = "".join(f"<td>{_e(_fmt(v))}</td>" for v in row)
        rows.append(f"<tr{cls}>{cells}</tr>")
    return f"<div class='scroll'><table><tr>{head}</tr>{''.join(rows)}</table></div>"


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _img(data: bytes, alt: str) -> str:
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{base64.b64encode(data).decode()}'>"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
