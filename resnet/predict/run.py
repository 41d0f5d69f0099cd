"""``run_predict``: jobs.predict's engine. Every check that can fail on bad input runs before Ray
starts (MODEL, SOURCE, --out, the flags); then the Ray Data pipeline, then the outputs, written
from the driver."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import ray

from resnet.errors import UsageError
from resnet.infra import storage
from resnet.infra.cluster import connect_ray, ray_cluster
from resnet.predict import gallery, pipeline
from resnet.predict.model import load_model
from resnet.predict.sources import read_files, resolve_source


@dataclass(frozen=True)
class PredictConfig:
    model: str
    source: str
    out: str
    top_k: int = 3
    gradcam: int = 0
    classes: str | None = None
    batch_size: int = 256
    replicas: int | None = None
    cpus_per_replica: int | None = None
    use_gpu: bool | None = None


def check_flags(config: PredictConfig) -> None:
    for flag, value, least in (("--top-k", config.top_k, 1), ("--gradcam", config.gradcam, 0),
                               ("--batch-size", config.batch_size, 1),
                               ("--replicas", config.replicas, 1),
                               ("--cpus-per-replica", config.cpus_per_replica, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")


def run_predict(config: PredictConfig) -> dict:
    """Predict every image of SOURCE with MODEL into --out; returns summary.json's content."""
    check_flags(config)
    out = storage.absolute(config.out)
    model = load_model(config.model, config.classes)
    if config.gradcam:
        gallery.explainable(model)  # an export Grad-CAM cannot hook: one line now
    source = resolve_source(config.source, exclude=out)
    if storage.is_local(out) and storage.exists(out):
        raise UsageError(f"--out {config.out} is a file; pass a folder (created if missing)")
    storage.check_writable(out, "--out")
    embedded = connect_ray()
    resources = ray.cluster_resources()
    if config.use_gpu and resources.get("GPU", 0) < 1:
        raise UsageError("--gpu: this Ray cluster has no GPU; leave --gpu out or use --cpu")
    plan = pipeline.make_plan(resources, source.files, config.replicas, config.cpus_per_replica,
                              config.batch_size, config.use_gpu)
    count = f"{source.files} file(s)" if source.files is not None else "the archive's files"
    print(f"[predict] {count} from {source.shown} ({source.kind}) with {model.location}: "
          f"{len(model.classes)} classes from {model.classes_from}; {plan.describe()}",
          flush=True)
    outcome = pipeline.run(pipeline.build(source, model, plan, config.top_k))
    predictions, skipped = pipeline.split(outcome.rows, source.skipped)
    explained, page = [], None
    summary = pipeline.summarize(
        predictions, skipped, model.classes, outcome.seconds, model=model.location,
        classes=list(model.classes), classes_from=model.classes_from, source=source.shown,
        source_kind=source.kind, out=out, top_k=min(config.top_k, len(model.classes)),
        pipeline=asdict(plan), ray_cluster=ray_cluster(embedded))
    if config.gradcam:
        rows = gallery.least_confident(predictions, config.gradcam)
        explained = gallery.explain(model, rows, read_files(source, [r["path"] for r in rows]))
        summary["gradcam"] = [f"{gallery.FOLDER}/{item.name}" for item in explained]
        page = gallery.page(explained, summary)
    written = pipeline.write_all(out, predictions, summary, explained, page)
    report(summary, out, written)
    return summary


def report(summary: dict, out: str, written: list[str]) -> None:
    """The closing lines: what was predicted, how fast, what was skipped, where it went."""
    top = sorted(summary["counts"].items(), key=lambda kv: -kv[1])[:5]
    print(f"[predict] {summary['images']} image(s) in {summary['seconds']:.1f}s "
          f"({summary['images_per_s'] or 0:.0f} images/s, Ray Data's start-up included); "
          f"most predicted: {', '.join(f'{k} {v}' for k, v in top)}", flush=True)
    if summary["skipped"]:
        reasons = ", ".join(f"{k} {v}" for k, v in summary["skipped_by_reason"].items())
        print(f"[predict] skipped {summary['skipped']} file(s): {reasons} (each listed in "
              "summary.json)", flush=True)
    shown = [w for w in written if not w.startswith(gallery.FOLDER + "/")]
    overlays = len(written) - len(shown)
    print(f"[predict] wrote {out}: {', '.join(shown)}"
          + (f" and {overlays} Grad-CAM overlay(s) in {gallery.FOLDER}/" if overlays else ""),
          flush=True)
