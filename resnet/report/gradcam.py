"""Grad-CAM with the ``grad-cam`` package: where in each image the model looked for its prediction.

``gradcam_files`` returns every output file as bytes (``gradcam.png``, one PNG per image and
``cams.npz``), so a Ray task on any node can render and the driver writes them into storage.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display: render to PNG bytes only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from pytorch_grad_cam import (  # noqa: E402
    AblationCAM,
    EigenCAM,
    EigenGradCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from torch import nn  # noqa: E402

from resnet.config import CAM_METHODS  # noqa: E402
from resnet.errors import UsageError  # noqa: E402
from resnet.models import FlipTTA, last_stage  # noqa: E402

METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM,
           "xgradcam": XGradCAM, "layercam": LayerCAM, "eigencam": EigenCAM,
           "eigengradcam": EigenGradCAM, "elementwise": GradCAMElementWise,
           "scorecam": ScoreCAM, "ablationcam": AblationCAM}
assert tuple(METHODS) == CAM_METHODS
UPSCALE = 4  # 32 x 32 images are drawn at 128 x 128 so that a person can read them


@dataclass
class CamResult:
    """N explained images: uint8 N x 3 x 32 x 32, labels, predictions, their probability, and
    the CAMs (float32 N x 32 x 32 in [0, 1], for the predicted class)."""

    images: np.ndarray
    labels: np.ndarray
    preds: np.ndarray
    probs: np.ndarray
    cams: np.ndarray


def pick_images(labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """Deterministic indices: image i is the (i // k)-th image of class i % k in split order, so
    the first k images show one of each class."""
    if n < 1:
        raise UsageError(f"--images must be at least 1, got {n}")
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    picked = []
    for i in range(n):
        pool = by_class[i % num_classes]
        if i // num_classes < len(pool):
            picked.append(pool[i // num_classes])
    if len(picked) < n:
        raise UsageError(f"--images {n} is more than the held-out split offers ({len(picked)})")
    return np.array(picked)


def compute_cams(model: nn.Module, images: np.ndarray, labels: np.ndarray, method: str = "gradcam",
                 device: torch.device | str = "cpu") -> CamResult:
    """CAMs on the last residual stage of the network inside ``model``, for the class that
    ``model`` predicts: pass the model as exported (with flip TTA when the run used it), so the
    caption says what the exported model says; the CAM explains the unflipped image."""
    if method not in METHODS:
        raise UsageError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    model = model.to(device).eval()
    net = model.model if isinstance(model, FlipTTA) else model
    x = torch.tensor(images, device=device).float().div_(255)  # N x 3 x 32 x 32 in [0, 1]
    with torch.no_grad():
        probs = F.softmax(model(x).float(), dim=1)
    conf, preds = probs.max(dim=1)
    targets = [ClassifierOutputTarget(int(p)) for p in preds]
    with METHODS[method](model=net, target_layers=[last_stage(net)]) as cam:
        cams = cam(input_tensor=x, targets=targets)  # N x 32 x 32, each scaled to [0, 1]
    return CamResult(images=np.asarray(images), labels=np.asarray(labels),
                     preds=preds.cpu().numpy(), probs=conf.cpu().numpy(),
                     cams=np.asarray(cams, dtype=np.float32))


def overlay(image: np.ndarray, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(upscaled RGB image, upscaled heat-map overlay), both float H x W x 3 in [0, 1]."""
    size = 32 * UPSCALE
    rgb = Image.fromarray(image.transpose(1, 2, 0)).resize((size, size), Image.BICUBIC)
    rgb = np.asarray(rgb, dtype=np.float32) / 255
    heat = Image.fromarray(cam.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR)
    heat = np.clip(np.asarray(heat), 0, 1)
    return rgb, show_cam_on_image(rgb, heat, use_rgb=True, image_weight=0.55).astype(np.float32) / 255


def caption(result: CamResult, i: int, classes: tuple[str, ...]) -> tuple[str, bool]:
    true, pred = classes[result.labels[i]], classes[result.preds[i]]
    wrong = result.labels[i] != result.preds[i]
    return (f"{'WRONG: ' if wrong else ''}true {true}\npred {pred} ({result.probs[i]:.2f})", wrong)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def render_grid(result: CamResult, classes: tuple[str, ...], title: str = "") -> bytes:
    """A labelled grid: per image the original and the overlay side by side, up to 5 per row."""
    n = len(result.labels)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 1.9, rows * 2.7), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        rgb, cam = overlay(result.images[i], result.cams[i])
        left, right = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        left.imshow(rgb)
        right.imshow(cam)
        text, wrong = caption(result, i, classes)
        left.set_title(text, fontsize=9, color="red" if wrong else "black", loc="left")
        if wrong:  # a red frame marks a misclassified image
            for ax in (left, right):
                ax.axis("on")
                ax.set_xticks([]), ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_edgecolor("red"), spine.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _png(fig)


def render_single(result: CamResult, i: int, classes: tuple[str, ...]) -> bytes:
    fig, (left, right) = plt.subplots(1, 2, figsize=(4.2, 2.6))
    rgb, cam = overlay(result.images[i], result.cams[i])
    left.imshow(rgb), right.imshow(cam)
    left.axis("off"), right.axis("off")
    text, wrong = caption(result, i, classes)
    fig.suptitle(text.replace("\n", ", "), fontsize=9, color="red" if wrong else "black")
    return _png(fig)


def gradcam_files(model: nn.Module, images: np.ndarray, labels: np.ndarray,
                  classes: tuple[str, ...], n: int, method: str = "gradcam",
                  device: torch.device | str = "cpu", title: str = "") -> dict[str, bytes]:
    """Every output file by name: gradcam.png, NN_<class>.png per image, cams.npz."""
    idx = pick_images(labels, n, len(classes))
    result = compute_cams(model, images[idx], labels[idx], method, device)
    files = {"gradcam.png": render_grid(result, classes, title)}
    for i in range(n):
        files[f"{i:02d}_{classes[result.labels[i]]}.png"] = render_single(result, i, classes)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, index=idx, images=result.images, labels=result.labels,
                        preds=result.preds, probs=result.probs, cams=result.cams)
    files["cams.npz"] = buffer.getvalue()
    return files


@ray.remote
def gradcam_task(checkpoint, images: np.ndarray, labels: np.ndarray, n: int,
                 method: str = "gradcam", title: str = "") -> dict[str, bytes]:
    """Ray task (given a GPU when the cluster has one): Grad-CAM files of a checkpoint."""
    from resnet.train.checkpoint import inference_model, load_state
    state = load_state(checkpoint)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return gradcam_files(inference_model(state), images, labels, tuple(state["classes"]), n,
                         method, device, title)


def explain_checkpoint(checkpoint: str, data: str | None, n: int, out_dir: str,
                       method: str = "gradcam") -> list[str]:
    """Grad-CAM of a checkpoint on its held-out images, written to ``out_dir``; file names."""
    from resnet.data import load_splits
    from resnet.infra import storage
    from resnet.train.checkpoint import inference_model, load_state

    state = load_state(checkpoint)
    model = inference_model(state)  # predicts as the exported model does
    config = state["config"]
    # The checkpoint's own val_size and seed carve the same validation split it never trained on.
    _, splits = load_splits(data, config["val_size"], None, config["seed"])
    if tuple(splits.classes) != tuple(state["classes"]):
        raise UsageError(f"--data has classes {splits.classes}, the checkpoint {state['classes']}")
    x, y = (splits.test_x, splits.test_y) if splits.test_x is not None else (splits.val_x,
                                                                             splits.val_y)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    title = (f"{config['model']}, epoch {state['epoch']}, "
             f"val_acc {state['history'][-1]['val_acc']:.4f}, {method}")
    files = gradcam_files(model, x, y, tuple(state["classes"]), n, method, device, title)
    for name, blob in files.items():
        storage.write_bytes(storage.join(out_dir, name), blob)
    return sorted(files)
