"""The Ray Data pipeline: files -> decoded 32 x 32 images -> the export's predictions, streamed.

As Ray's "Image Classification Batch Inference with PyTorch" guide: ``read_binary_files`` (or an
archive's read task, ``sources.py``) -> ``map_batches(Predictor, compute=ActorPoolStrategy(size=
replicas))`` -> the rows. Each replica holds the export once. On GPUs each replica takes one
(``num_gpus``) and decoding runs as a separate CPU stage of Ray tasks, fused with the reads, so
the CPUs decode while the GPUs infer; on CPUs the replicas decode their own batches (one stage
fewer: no decoded images go through the object store) with the intra-op threads Ray gave them.
Files that give no image come out as rows with a ``skipped`` reason; nothing stops the run.

The outputs replace the previous run's whole (each written to a temp name and renamed, or put as
one object on an object store), so a rerun into the same --out gives the same rows and never
adds to them. ``predictions.parquet``: one row per image, sorted by path: ``path``,
``predicted`` (class name), ``probability`` (its softmax probability), ``top_k_classes`` and
``top_k_probabilities`` (best first), ``width`` and ``height`` (pixels, as the image is shown:
after its EXIF orientation). ``summary.json``: counts per class, images/s, every skipped file
with its reason, the model, the source, how the pipeline ran, the Ray cluster and provenance;
written last, so a complete run has one.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from resnet.infra import storage
from resnet.infra.provenance import provenance
from resnet.predict.gallery import FOLDER, PAGE, Explained
from resnet.predict.images import SIZE, decode_many, to_input
from resnet.predict.model import Model, load_module
from resnet.predict.sources import Source, read_dataset

# One row per file: the prediction, or the reason it was skipped (then the rest is null).
SCHEMA = pa.schema([("path", pa.string()), ("predicted", pa.string()),
                    ("probability", pa.float32()), ("top_k_classes", pa.list_(pa.string())),
                    ("top_k_probabilities", pa.list_(pa.float32())), ("width", pa.int32()),
                    ("height", pa.int32()), ("skipped", pa.string())])


MAX_CPU_REPLICAS = 8  # beyond this, more threads per replica rather than more processes
READ_TASKS = 2  # read tasks at a time on CPUs: reading a block of small files takes ~10 ms


@dataclass(frozen=True)
class Plan:
    """How the pipeline runs: replicas of the export, each with ``cpus`` CPUs (its torch
    threads) and ``gpus`` GPUs; ``batch`` images per model call; ``files_per_block`` files per
    read block; ``read_cpus`` per read task (a small share: reading files is I/O)."""

    replicas: int
    cpus: float
    gpus: float
    batch: int
    files_per_block: int
    read_cpus: float
    read_tasks: int | None  # read tasks at a time (None: as Ray's CPUs allow)
    decode_in_replica: bool

    def describe(self) -> str:
        where = f"{self.gpus:g} GPU + {self.cpus:g} CPU" if self.gpus else f"{self.cpus:g} CPU"
        decode = "in the replicas" if self.decode_in_replica else "in CPU tasks"
        return (f"{self.replicas} replica(s) x {where}, batch {self.batch}, decoding {decode}, "
                f"{self.files_per_block} files per read block")


def make_plan(resources: dict, files: int | None, replicas: int | None, cpus: float | None,
              batch: int, use_gpu: bool | None, files_per_block: int | None = None) -> Plan:
    """Fill in what was not given from the cluster (``ray.cluster_resources()``). On GPUs: one
    replica per GPU (and 1 CPU), decoding in CPU tasks. On CPUs: one replica per CPU, at most
    8, each with an equal share of the CPUs as its torch threads, decoding its own files (on 2
    busy CPUs two 1-thread replicas beat one 2-thread replica by about 2x: jobs.bench table 6).
    ``files`` (None: not known, an archive): a small source gets no more replicas than it has
    batches, and blocks enough for each."""
    total_cpus = max(1, int(resources.get("CPU", 1)))
    gpus = float(resources.get("GPU", 0))
    on_gpu = gpus >= 1 if use_gpu is None else use_gpu
    cpus_given = cpus is not None
    if on_gpu:
        plan = Plan(replicas or max(1, int(gpus)), float(cpus or 1), 1.0, batch,
                    files_per_block or batch, 1.0, None, False)
    else:
        replicas = replicas or min(total_cpus, MAX_CPU_REPLICAS)
        cpus = cpus or max(1, total_cpus // replicas)
        # The replicas hold the CPUs; reads ask for none (they wait on I/O), a few at a time.
        plan = Plan(replicas, float(cpus), 0.0, batch, files_per_block or 4 * batch, 0.0,
                    READ_TASKS, True)
    if files is None:
        return plan
    replicas = max(1, min(plan.replicas, -(-files // batch)))
    per_block = max(1, min(plan.files_per_block, -(-files // replicas)))
    blocks = -(-files // per_block)
    if not on_gpu and not cpus_given:  # fewer replicas: more threads each
        plan = replace(plan, cpus=float(max(1, total_cpus // replicas)))
    return replace(plan, replicas=replicas, files_per_block=per_block,
                   read_tasks=min(plan.read_tasks, blocks) if plan.read_tasks else None)


def decode_stage(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The CPU stage of the GPU pipeline: bytes -> uint8 N x 32 x 32 x 3 (zeros where skipped)."""
    blobs = list(batch["bytes"])
    decoded, widths, heights, reasons = decode_many(blobs)
    images = np.zeros((len(blobs), SIZE, SIZE, 3), np.uint8)
    ok = np.array([r is None for r in reasons], bool)
    images[ok] = decoded
    errors = _merge(batch.get("error"), reasons)
    return {"path": batch["path"], "image": images, "width": widths, "height": heights,
            "error": np.array(errors, dtype=object)}


class Predictor:
    """One replica: the export on its device (a GPU when Ray gave the replica one). A batch of
    undecoded files is decoded here; either way, one output row per input row."""

    def __init__(self, model: bytes, classes: tuple[str, ...], top_k: int, threads: int) -> None:
        import torch
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(threads)))  # Ray's CPUs for this replica
        self.module = load_module(model, self.device)
        self.classes = np.array(classes, dtype=object)
        self.top_k = max(1, min(top_k, len(classes)))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch
        paths = [str(p) for p in batch["path"]]
        if "image" in batch:  # decoded by decode_stage
            errors = _reasons(batch["error"])
            ok = np.array([e is None for e in errors], bool)
            images, widths, heights = batch["image"][ok], batch["width"], batch["height"]
        else:
            images, widths, heights, reasons = decode_many(list(batch["bytes"]))
            errors = _merge(batch.get("error"), reasons)
            ok = np.array([e is None for e in errors], bool)
        if len(images):
            with torch.inference_mode():
                logits = self.module(to_input(images, self.device))  # M x classes
                probs, index = torch.softmax(logits.float(), dim=1).topk(self.top_k, dim=1)
            probs, index = probs.cpu().numpy(), index.cpu().numpy()  # M x k, best first
        else:
            probs, index = np.zeros((0, self.top_k), np.float32), np.zeros((0, self.top_k), int)
        return rows_table(paths, ok, probs, index, self.classes, widths, heights, errors)


def rows_table(paths, ok, probs, index, classes, widths, heights, errors) -> pa.Table:
    """The output rows: predictions where ``ok`` (in order), the skip reason elsewhere."""
    n, k = len(paths), probs.shape[1]
    where = np.flatnonzero(ok)  # row of each prediction
    predicted = np.full(n, None, dtype=object)
    predicted[where] = classes[index[:, 0]] if len(where) else []
    top1 = np.full(n, np.nan, np.float32)
    top1[where] = probs[:, 0]
    offsets = np.zeros(n + 1, np.int32)  # list offsets: k values per predicted row, 0 otherwise
    offsets[1:] = np.cumsum(ok.astype(np.int32) * k)
    missing = ~ok
    mask = pa.array(missing)
    return pa.table([
        pa.array(paths, pa.string()),
        pa.array(predicted, pa.string()),
        pa.array(top1, pa.float32(), mask=missing),
        pa.ListArray.from_arrays(offsets, pa.array(classes[index].ravel(), pa.string()),
                                 mask=mask),
        pa.ListArray.from_arrays(offsets, pa.array(probs.ravel(), pa.float32()), mask=mask),
        pa.array(np.asarray(widths, np.int32), pa.int32(), mask=missing),
        pa.array(np.asarray(heights, np.int32), pa.int32(), mask=missing),
        pa.array(errors, pa.string()),
    ], schema=SCHEMA)


def build(source: Source, model: Model, plan: Plan, top_k: int, predictor: type = Predictor,
          after_read=None) -> ray.data.Dataset:
    """The lazy Dataset of output rows (nothing runs until it is iterated). ``after_read``: a
    function of a pyarrow block run inside the read tasks (jobs.bench stamps the read time)."""
    ds = read_dataset(source, plan.files_per_block, plan.read_cpus, plan.read_tasks)
    if after_read is not None:
        ds = ds.map_batches(after_read, batch_format="pyarrow", batch_size=None,
                            num_cpus=plan.read_cpus, udf_modifying_row_count=False,
                            compute=ray.data.TaskPoolStrategy(size=plan.read_tasks))
    if not plan.decode_in_replica:
        ds = ds.map_batches(decode_stage, batch_size=plan.batch, num_cpus=plan.read_cpus,
                            batch_format="numpy", udf_modifying_row_count=False)
    return ds.map_batches(
        predictor, fn_constructor_args=(model.data, model.classes, top_k, int(plan.cpus)),
        compute=ray.data.ActorPoolStrategy(size=plan.replicas), batch_size=plan.batch,
        num_cpus=plan.cpus, num_gpus=plan.gpus or None, batch_format="numpy",
        zero_copy_batch=True, udf_modifying_row_count=False)


@dataclass
class Outcome:
    """Every row the pipeline gave (predictions and skips), and how long it ran."""

    rows: pa.Table
    seconds: float  # from the start of execution to the last row, Ray Data's start-up included


def run(ds: ray.data.Dataset) -> Outcome:
    """Run the pipeline to the end (Ray Data's progress bar shows it), gathering the rows on
    the driver: about 100 bytes per image."""
    started = time.perf_counter()
    tables = list(_batches(ds))
    seconds = time.perf_counter() - started
    rows = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    return Outcome(rows, seconds)


def _batches(ds: ray.data.Dataset) -> Iterator[pa.Table]:
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield table.cast(SCHEMA)


def _merge(read_errors, reasons: list[str | None]) -> list[str | None]:
    """The read's own error (an archive that broke) first, else the decoder's reason."""
    if read_errors is None:
        return reasons
    return [e if e is not None else r for e, r in zip(_reasons(read_errors), reasons)]


def _reasons(column) -> list[str | None]:
    """A reason column as Ray hands it over: strings, with None (or NaN, for a column Arrow
    stored as all-null) where there is no reason."""
    return [value if isinstance(value, str) else None for value in column]


# --- outputs -----------------------------------------------------------------------------------

PREDICTIONS = "predictions.parquet"
SUMMARY = "summary.json"


def split(rows: pa.Table, early: tuple[tuple[str, str], ...] = ()) -> tuple[pa.Table, list[dict]]:
    """(the predictions sorted by path, without the ``skipped`` column; every skipped file as
    {path, reason}, sorted by path: those found unreadable while listing, then the pipeline's)."""
    skipped_mask = pc.is_valid(rows["skipped"])
    predictions = rows.filter(pc.invert(skipped_mask)).drop_columns(["skipped"])
    predictions = predictions.sort_by("path") if predictions.num_rows else predictions
    late = rows.filter(skipped_mask).select(["path", "skipped"]).to_pylist()
    skipped = [{"path": p, "reason": r} for p, r in early] + \
        [{"path": row["path"], "reason": row["skipped"]} for row in late]
    return predictions, sorted(skipped, key=lambda item: item["path"])


def summarize(predictions: pa.Table, skipped: list[dict], names: tuple[str, ...],
              seconds: float, **about: Any) -> dict[str, Any]:
    """summary.json's content; ``names``: the classes, in the order of the model's outputs;
    ``about``: the model, source, plan and cluster, as given."""
    counts = Counter(predictions["predicted"].to_pylist())
    reasons = Counter(_reason_kind(item["reason"]) for item in skipped)
    return {
        "images": predictions.num_rows,
        "counts": {name: counts.get(name, 0) for name in names},
        "skipped": len(skipped),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "skipped_files": skipped,
        "seconds": round(seconds, 3),
        "images_per_s": round(predictions.num_rows / seconds, 1) if seconds > 0 else None,
        **about,
        "provenance": provenance(),
    }


def write_all(out: str, predictions: pa.Table, summary: dict[str, Any],
              explained: list[Explained], page: bytes | None) -> list[str]:
    """Write every output into ``out`` (the overlays, the predictions, the page, then the
    summary); overlays of an earlier run that this one did not draw are removed. Returns the
    files written, relative to ``out``."""
    written = []
    names = {item.name for item in explained}
    for item in explained:
        storage.write_bytes(storage.join(out, FOLDER, item.name), item.png)
        written.append(f"{FOLDER}/{item.name}")
    for name in storage.listdir(storage.join(out, FOLDER)):
        if name.endswith(".png") and name not in names:
            storage.delete(storage.join(out, FOLDER, name))
    buffer = io.BytesIO()
    pq.write_table(predictions, buffer)
    storage.write_bytes(storage.join(out, PREDICTIONS), buffer.getvalue())
    written.append(PREDICTIONS)
    if page is not None:
        storage.write_bytes(storage.join(out, PAGE), page)
        written.append(PAGE)
    else:
        storage.delete(storage.join(out, PAGE))  # a page of an earlier run would mislead
    storage.write_bytes(storage.join(out, SUMMARY), json.dumps(summary, indent=2).encode())
    return [*written, SUMMARY]


def _reason_kind(reason: str) -> str:
    """A reason without its details, for the counts: "corrupt image (OSError: ...)" ->
    "corrupt image"."""
    return reason.split(" (", 1)[0]
