"""jobs.bench's table 6 (and the GPU check's part 5): jobs.predict's Ray Data pipeline against
a plain PyTorch loop.

Both sides classify the same image files with the same export, batch, decoding and resize
(``images.decode_many``) and the same number of threads, and are timed the same way: wall
seconds from the first file read to the last prediction, after a warm-up. The plain loop reads,
decodes and predicts batch after batch in this process (torch threads = the CPUs), warmed up by
one batch. The pipeline is ``pipeline.build`` as jobs.predict runs it, with its start-up kept
out of the time: Ray Data waits for the replicas (a process each, loading the export) before it
reads anything (``wait_for_min_actors_s``), and the clock starts when the first block of files
has been read (a stamp inside the read task; that block's read itself, tens of milliseconds,
goes uncounted) and stops when the last row reaches the driver. The rounds are interleaved
(plain, 1 replica, 2 replicas, plain, ...) so that a busy machine slows every side alike; the
medians are shown.
"""

from __future__ import annotations

import io
import os
import shutil
import statistics
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from resnet.data.sources import resolve_source as resolve_data
from resnet.errors import UsageError
from resnet.predict.images import decode_many, to_input
from resnet.predict.model import Model, load_module
from resnet.predict.pipeline import Plan, Predictor, build, make_plan
from resnet.predict.sources import resolve_source

TARGET = ">= 0.8"
TITLE = ("6. jobs.predict's pipeline against a plain PyTorch loop (images/s, first file read "
         "to last prediction)")


def bench_predict(data: str | None, workdir: str, images: int = 10_000, batch: int = 256,
                  rounds: int = 3, model: str = "resnet20", replicas: tuple[int, ...] = (1, 2),
                  use_gpu: bool = False) -> list[dict]:
    """Table 6 rows, one per replica count: images/s of each side and their ratio. The images
    are written under ``workdir`` and removed after. ``use_gpu``: the replicas on GPUs
    (one each, decoding in CPU tasks) and the plain loop on one GPU."""
    folder = Path(workdir) / "predict-images"
    try:
        n = bench_images(data, images, folder)
        exported = bench_model(model)
        paths = sorted(str(p) for p in folder.rglob("*") if p.is_file())
        cpus = int(ray.cluster_resources().get("CPU", 1))
        resources = {"CPU": cpus, "GPU": float(max(replicas)) if use_gpu else 0.0}
        plans = {r: make_plan(resources, n, r, None, batch, use_gpu) for r in replicas}
        source = resolve_source(str(folder))
        rates: dict[str, list[float]] = {"plain": [], **{f"r{r}": [] for r in replicas}}
        for _ in range(rounds):
            rates["plain"].append(plain_images_per_s(paths, exported, batch, cpus, use_gpu))
            for r, plan in plans.items():
                rates[f"r{r}"].append(pipeline_images_per_s(source, exported, plan))
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # 10,000 files: not left in the temp folder
    plain = statistics.median(rates["plain"])
    rows = []
    for r, plan in plans.items():
        project = statistics.median(rates[f"r{r}"])
        rows.append({"images": n, "model": model, "batch": batch,
                     "pipeline": plan.describe().split(", batch")[0],
                     "pipeline_images_per_s": project,
                     "plain_images_per_s": plain, "plain_threads": cpus,
                     "ratio": project / plain, "target": TARGET})
    return rows


def plain_images_per_s(paths: list[str], model: Model, batch: int, threads: int,
                       use_gpu: bool = False) -> float:
    """The plain loop: open, read, decode and resize a batch, predict it; next batch."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    device = "cuda" if use_gpu else "cpu"
    try:
        module = load_module(model.data, device)

        def predict(chunk: list[str]) -> int:
            blobs = []
            for path in chunk:
                with open(path, "rb") as f:
                    blobs.append(f.read())
            decoded, _, _, _ = decode_many(blobs)
            with torch.inference_mode():
                probs = torch.softmax(module(to_input(decoded, device)).float(), dim=1)
                probs.topk(min(3, probs.shape[1]), dim=1)[0].cpu()  # waits for the GPU
            return len(decoded)

        predict(paths[:batch])  # warm-up
        started = time.time()
        done = sum(predict(paths[i:i + batch]) for i in range(0, len(paths), batch))
        return done / (time.time() - started)
    finally:
        torch.set_num_threads(before)


def stamp_read(block: pa.Table) -> pa.Table:
    """Inside the read task, right after the block's files were read: when (epoch seconds)."""
    return block.append_column("read_at", pa.array(np.full(block.num_rows, time.time())))


class TimedPredictor(Predictor):
    """The Predictor, passing on when its batch's files were read."""

    def __call__(self, batch):
        table = super().__call__(batch)
        first = float(np.min(batch["read_at"])) if len(batch["read_at"]) else time.time()
        return table.append_column("read_at", pa.array(np.full(table.num_rows, first)))


def pipeline_images_per_s(source, model: Model, plan: Plan) -> float:
    """jobs.predict's pipeline, from the first block read to the last row on the driver. The
    replicas start before anything is read (Ray Data waits for them), so their start-up, like
    the plain loop's model loading, is not timed; the read tasks' own start is not either."""
    context = ray.data.DataContext.get_current()
    saved = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = 600
    try:
        ds = build(source, model, plan, top_k=3, predictor=TimedPredictor, after_read=stamp_read)
        first, done = float("inf"), 0
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            first = min(first, float(pc.min(table["read_at"]).as_py()))
            done += table.num_rows - table["predicted"].null_count
        return done / (time.time() - first)
    finally:
        context.wait_for_min_actors_s = saved


def bench_model(name: str) -> Model:
    """An export of a freshly initialised ``name`` (speed does not depend on the weights)."""
    import torch

    from resnet.models import build_model
    from resnet.train.checkpoint import export_model
    torch.manual_seed(0)
    classes = tuple(f"class{i}" for i in range(10))
    return Model("(bench)", export_model(build_model(name), list(classes)), classes, "bench")


def bench_images(data: str | None, n: int, folder: Path) -> int:
    """``n`` image files in ``folder``: the first ones of ``--data``'s archive or tree as they
    are, else its decoded images written as PNG. Returns how many."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    found = resolve_data(data)
    written = 0
    if found.kind == "tree-archive":
        with tarfile.open(found.path, "r|*") as tar:
            for member in tar:
                if written >= n:
                    break
                if member.isfile() and not Path(member.name).name.startswith("."):
                    written += 1
                    (folder / f"{written:06d}{Path(member.name).suffix}").write_bytes(
                        tar.extractfile(member).read())
    elif found.kind == "tree":
        for path in found.files()[:n]:
            written += 1
            shutil.copyfile(path, folder / f"{written:06d}{path.suffix}")
    else:
        from PIL import Image

        from resnet.data import load_dataset
        decoded = load_dataset(data)
        for image in decoded.train_x[:n]:
            written += 1
            buffer = io.BytesIO()
            Image.fromarray(image.transpose(1, 2, 0)).save(buffer, "PNG")
            (folder / f"{written:06d}.png").write_bytes(buffer.getvalue())
    if written < n:
        raise UsageError(f"--data has {written} images; table 6 needs {n}")
    os.sync()
    return written
