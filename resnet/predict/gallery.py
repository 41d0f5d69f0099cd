"""``--gradcam N``: Grad-CAM overlays of the N least confident predictions, and ``index.html``.

The CAMs come from the ``grad-cam`` package on the last residual stage, as ``jobs.gradcam``
draws them (``resnet/report/gradcam.py``: its methods and its overlay), here on the export
itself: ``torch.export.unflatten`` gives back the network's stages as modules to hook. As there,
the CAM explains the predicted class on the unflipped image (an export with flip TTA is
unwrapped for the CAM; its prediction and probability are the export's). The images are the
files re-read and decoded as the pipeline decoded them; the page links the PNGs beside it.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from resnet.errors import UsageError
from resnet.models import LAST_STAGE  # the stage each of our networks is explained at
from resnet.predict.images import decode, to_input
from resnet.predict.model import Model
from resnet.report.gradcam import METHODS, overlay

FOLDER = "gradcam"
PAGE = "index.html"


@dataclass(frozen=True)
class Explained:
    """One overlay: the row it explains and its PNG (the image and its heat map, 128 x 128 each)."""

    name: str
    row: dict
    png: bytes


def explainable(model: Model):
    """(network to hook, its last stage) inside the export; a UsageError, before Ray starts,
    for an export whose network this project does not know."""
    module = torch.export.unflatten(torch.export.load(io.BytesIO(model.data)))
    net = getattr(module, "model", module)  # a FlipTTA wrapper keeps the network as .model
    for name in dict.fromkeys(LAST_STAGE.values()):
        stage = getattr(net, name, None)
        if isinstance(stage, torch.nn.Module):
            return net, stage
    raise UsageError(f"--gradcam: MODEL {model.location} has none of the stages Grad-CAM is "
                     f"drawn at ({', '.join(dict.fromkeys(LAST_STAGE.values()))}); it needs an "
                     "export of this project's resnet20, resnet18 or tiny (or leave --gradcam out)")


def least_confident(predictions: pa.Table, n: int) -> list[dict]:
    """The ``n`` rows with the lowest top-1 probability (ties: by path)."""
    if n <= 0 or predictions.num_rows == 0:
        return []
    order = sorted(range(predictions.num_rows), key=lambda i: (
        predictions["probability"][i].as_py(), predictions["path"][i].as_py()))
    return [predictions.slice(i, 1).to_pylist()[0] for i in order[:n]]


def explain(model: Model, rows: list[dict], blobs: dict[str, bytes], method: str = "gradcam"
            ) -> list[Explained]:
    """Overlays of ``rows`` (their files' bytes by path): CAM of each row's predicted class."""
    rows = [row for row in rows if row["path"] in blobs]
    if not rows:
        return []
    net, stage = explainable(model)
    pixels = np.stack([decode(blobs[row["path"]])[0] for row in rows])  # N x 32 x 32 x 3
    index = {name: i for i, name in enumerate(model.classes)}
    targets = [ClassifierOutputTarget(index[row["predicted"]]) for row in rows]
    with METHODS[method](model=net, target_layers=[stage]) as cam:
        cams = cam(input_tensor=to_input(pixels), targets=targets)  # N x 32 x 32 in [0, 1]
    out = []
    for i, row in enumerate(rows):
        rgb, heat = overlay(pixels[i].transpose(2, 0, 1), cams[i])  # 128 x 128 x 3 each
        side = np.concatenate([rgb, heat], axis=1)  # 128 x 256 x 3 in [0, 1]
        buffer = io.BytesIO()
        Image.fromarray((side * 255).round().astype(np.uint8)).save(buffer, "PNG")
        out.append(Explained(f"{i:04d}_{_safe(row['predicted'])}.png", row, buffer.getvalue()))
    return out


def page(explained: list[Explained], summary: dict) -> bytes:
    """``index.html``: the overlays (relative links into gradcam/), least confident first, each
    with its path, the prediction, the top-k and the image's size."""
    cards = []
    for item in explained:
        row = item.row
        top = ", ".join(f"{html.escape(c)} {p:.2f}" for c, p in
                        zip(row["top_k_classes"], row["top_k_probabilities"]))
        cards.append(
            f'<figure><img src="{FOLDER}/{html.escape(item.name)}" width="256" height="128" '
            f'alt="{html.escape(row["predicted"])}"><figcaption><b>{html.escape(row["predicted"])}'
            f'</b> {row["probability"]:.3f}<br>top: {top}<br>{row["width"]} x {row["height"]} px'
            f'<br><code>{html.escape(row["path"])}</code></figcaption></figure>')
    counts = ", ".join(f"{html.escape(k)} {v}" for k, v in summary["counts"].items())
    skipped = summary["skipped"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jobs.predict: least confident</title>
<style>body{{font:14px sans-serif;margin:1.5em}} figure{{display:inline-block;margin:0 1em 1em 0;
vertical-align:top;width:256px}} figcaption{{font-size:12px;overflow-wrap:anywhere}}
img{{image-rendering:pixelated}}</style></head><body>
<h1>The {len(explained)} least confident of {summary["images"]} predictions</h1>
<p>Model <code>{html.escape(summary["model"])}</code>, source
<code>{html.escape(summary["source"])}</code>. Each pair: the image as the model saw it (32 x 32,
drawn at 128 x 128) and the Grad-CAM of the predicted class on the last residual stage.</p>
<p>Predicted: {counts}. Skipped: {skipped}.</p>
{chr(10).join(cards)}
</body></html>
""".encode()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40] or "class"
