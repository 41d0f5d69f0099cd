"""What MODEL names: an exported ``model.pt2``, or a run or sweep folder (its ``best/model.pt2``),
and the class names of its outputs.

The names come from ``--classes`` when given, else from the export's own metadata (the
``resnet.json`` that ``export_model`` writes into it), else from the ``summary.json`` of the run
the export sits in (``<run>/summary.json`` beside ``<run>/best/``). Nothing falls back to
CIFAR-10's list: a model trained on an imported tree predicts that tree's classes.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from resnet.errors import UsageError
from resnet.infra import storage
from resnet.train.checkpoint import export_metadata

EXPORT = "model.pt2"


@dataclass(frozen=True)
class Model:
    """An export's bytes (they travel to every replica, on any node), where it was found, and
    the class names of its outputs, in the order of the logits."""

    location: str
    data: bytes
    classes: tuple[str, ...]
    classes_from: str  # "--classes", "export metadata" or the summary.json they came from


def load_model(where: str, classes: str | None = None) -> Model:
    """Read and check MODEL now, before Ray starts (UsageError: one line)."""
    location = find_export(where)
    try:
        data = storage.read_bytes(location)
    except OSError as exc:
        raise UsageError(f"MODEL {where} cannot be read ({exc.strerror or exc})") from None
    if data is None:
        raise UsageError(f"MODEL {where}: no such file; pass a {EXPORT} or the run or sweep "
                         f"folder holding best/{EXPORT}")
    try:
        meta = export_metadata(data)
    except UsageError as exc:  # the bytes are not a torch.export: say which file
        raise UsageError(f"MODEL {location}: {exc}") from None
    names, source = class_names(location, meta, classes)
    outputs = output_count(data)
    if outputs != len(names):
        raise UsageError(f"MODEL {where} has {outputs} outputs but {len(names)} class names "
                         f"(from {source}); pass --classes with {outputs} comma-separated names")
    return Model(location, data, names, source)


def find_export(where: str) -> str:
    """The export's location: MODEL itself, or ``best/model.pt2`` (or ``model.pt2``) in it."""
    try:
        if not storage.is_dir(where):
            return where
        for candidate in (storage.join(where, "best", EXPORT), storage.join(where, EXPORT)):
            if storage.exists(candidate):
                return candidate
    except OSError as exc:
        raise UsageError(f"MODEL {where} cannot be read ({exc})") from None
    raise UsageError(f"MODEL {where} is a folder without best/{EXPORT} or {EXPORT}; pass an "
                     f"exported {EXPORT} or a finished run or sweep folder")


def class_names(location: str, meta: dict, flag: str | None) -> tuple[tuple[str, ...], str]:
    """(names, where they came from): --classes, the export's metadata, or its run's summary."""
    if flag is not None:
        names = tuple(name.strip() for name in flag.split(","))
        if not all(names) or len(set(names)) != len(names):
            raise UsageError(f"--classes {flag!r}: give distinct, non-empty names separated by "
                             "commas, in the order of the model's outputs")
        return names, "--classes"
    if meta.get("classes"):
        return tuple(str(c) for c in meta["classes"]), "export metadata"
    summary = run_summary(location)
    if summary:
        return summary
    raise UsageError(f"MODEL {location} carries no class names (exported before they were "
                     "stored in it) and no summary.json of its run lies beside best/; pass the "
                     "run folder it came from, or --classes a,b,c in the order of its outputs")


def run_summary(location: str) -> tuple[tuple[str, ...], str] | None:
    """The class names in ``<run>/summary.json`` for ``<run>/best/model.pt2`` (or in the
    export's own folder), if there."""
    url, _, query = location.partition("?")
    folder = url.rsplit("/", 1)[0] if "/" in url else "."
    candidates = [folder.rsplit("/", 1)[0]] if folder.endswith("/best") else []
    for run in [*candidates, folder]:
        summary = storage.join(run + (f"?{query}" if query else ""), "summary.json")
        try:
            data = storage.read_bytes(summary)
            names = json.loads(data)["classes"] if data else None
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(names, list) and names:
            return tuple(str(n) for n in names), summary
    return None


def output_count(data: bytes) -> int:
    """How many logits the export gives for one image."""
    import torch
    module = load_module(data)
    with torch.inference_mode():
        return int(module(torch.zeros(1, 3, 32, 32)).shape[1])


def load_module(data: bytes, device="cpu"):
    """The export as a callable module on ``device`` (torch.export programs run in eval mode)."""
    import torch
    return torch.export.load(io.BytesIO(data)).module().to(device)
