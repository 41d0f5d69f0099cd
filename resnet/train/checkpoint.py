"""Checkpoints (a plain dict in ``checkpoint.pt``) and the ``torch.export`` of a trained model."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet.errors import UsageError
from resnet.infra import storage
from resnet.models import FlipTTA, build_model

CHECKPOINT_FILE = "checkpoint.pt"


def save_state(directory: str | Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(directory) / CHECKPOINT_FILE)


def load_state(checkpoint, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint dict from a ``ray.train.Checkpoint``, or a location (local path or URI,
    ``resnet/infra/storage.py``) of its folder or of the file itself.

    ``weights_only=True``: tensors and plain containers only, never arbitrary pickled objects.
    """
    if hasattr(checkpoint, "as_directory"):
        with checkpoint.as_directory() as directory:
            return load_state(directory, map_location)
    path = str(checkpoint)
    try:
        if storage.is_dir(path):
            path = storage.join(path, CHECKPOINT_FILE)
        if storage.resolve(path)[1].endswith(".pt2"):
            raise UsageError(f"{path} is an exported model (torch.export), not a checkpoint; pass "
                             f"the {CHECKPOINT_FILE} it was exported from (summary.json: "
                             "best_checkpoint)")
        data = storage.read_bytes(path)
    except OSError as exc:  # the storage, not the file: unmounted, no permission, unreachable
        raise UsageError(f"checkpoint {path} cannot be read ({exc.strerror or exc})") from None
    if data is None:
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated files and foreign pickles fail in many ways
        raise UsageError(f"checkpoint {path} is corrupt or not a checkpoint of this project "
                         f"({type(exc).__name__}); pass a checkpoint.pt written by jobs.train") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UsageError(f"checkpoint {path} is not a checkpoint of this project (no model/config)")
    return state


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of a state dict's tensors (names, values; layout-independent): equal
    digests mean the same weights, e.g. a PBT clone starting from its donor's checkpoint."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_from_state(state: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint was trained as, with its weights, in eval mode."""
    name = state["config"]["model"]
    model = build_model(name, num_classes=len(state.get("classes", range(10))),
                        normalize=state["config"].get("normalize", "channel"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UsageError(f"checkpoint weights do not fit model {name!r} "
                         f"({str(exc).splitlines()[0]})") from None
    return model.eval()


def inference_model(state: dict[str, Any]) -> nn.Module:
    """The model as evaluated in training: with flip TTA when the run used it."""
    model = model_from_state(state)
    config = state["config"]
    return FlipTTA(model, config.get("tta_shift", 0)).eval() if config.get("tta") else model


EXPORT_META = "resnet.json"  # inside a model.pt2 (an extra file): {"classes": [...], "input": ...}
EXPORT_INPUT = "float32 N x 3 x 32 x 32 in [0, 1]"


def export_model(model: nn.Module, classes: list[str] | None = None) -> bytes:
    """``torch.export`` with a dynamic batch: float32 N x 3 x 32 x 32 in [0, 1] -> N x classes.

    Exported on the CPU in eval mode, so the file loads anywhere with
    ``torch.export.load(path).module()`` and needs nothing from this project. The class names
    (in the order of the logits) travel inside it as ``resnet.json`` (``export_metadata``).
    """
    model = model.to("cpu").eval()
    example = torch.rand(2, 3, 32, 32)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    buffer = io.BytesIO()
    meta = {"classes": [str(c) for c in classes] if classes is not None else None,
            "input": EXPORT_INPUT}
    torch.export.save(program, buffer, extra_files={EXPORT_META: json.dumps(meta)})
    return buffer.getvalue()


def export_metadata(data: bytes) -> dict[str, Any]:
    """The metadata an export carries ({} for exports made before it did); raises UsageError
    when the bytes are not a ``torch.export`` file at all."""
    extra = {EXPORT_META: ""}
    try:
        if not zipfile.is_zipfile(io.BytesIO(data)):  # before torch, which logs a traceback
            raise ValueError("not a zip archive")
        torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as exc:  # zip, pickle and version errors alike
        raise UsageError(f"not a torch.export model ({type(exc).__name__}); pass a model.pt2 "
                         "written by jobs.train or jobs.tune, or their run folder") from None
    return json.loads(extra[EXPORT_META]) if extra[EXPORT_META] else {}
