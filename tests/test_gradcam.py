"""Grad-CAM without Ray: captions say what the exported model predicts, image picking, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from resnet.train.checkpoint import export_model, inference_model, model_from_state, save_state
from resnet.config import make_config
from resnet.data.sources import CIFAR10_CLASSES
from resnet.errors import UsageError
from resnet.report.gradcam import explain_checkpoint, gradcam_files, pick_images
from resnet.models import build_model


def flip_tta_state(images: np.ndarray, labels: np.ndarray) -> dict:
    """A checkpoint of a run with flip TTA: the tiny model after 40 SGD steps on ``images``, so
    it predicts from the image but with close calls, and the flip changes some predictions."""
    torch.manual_seed(0)
    model = build_model("tiny")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.from_numpy(images).float() / 255, torch.from_numpy(labels)
    for step in range(40):
        batch = torch.randperm(len(y))[:128]
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"model": model.state_dict(), "classes": list(CIFAR10_CLASSES),
            "config": make_config("fast", model="tiny").to_dict(), "epoch": 1,
            "history": [{"val_acc": 0.1}]}


def test_captions_are_the_exported_models_predictions(cifar):
    every = np.arange(0, len(cifar.train_y), 125)  # 400 images, 40 of each class
    images, labels = cifar.train_x[every], cifar.train_y[every]
    state = flip_tta_state(images, labels)
    files = gradcam_files(inference_model(state), images, labels, CIFAR10_CLASSES, 40)
    cams = np.load(io.BytesIO(files["cams.npz"]))
    x = torch.from_numpy(cams["images"]).float() / 255
    exported = torch.export.load(io.BytesIO(export_model(inference_model(state)))).module()
    with torch.no_grad():
        by_export = exported(x).softmax(1)
        without_flip = model_from_state(state)(x).argmax(1)
    # The case that matters is there: for some image the flip changes the prediction.
    assert (without_flip != by_export.argmax(1)).any()
    assert cams["preds"].tolist() == by_export.argmax(1).tolist()
    np.testing.assert_allclose(cams["probs"], by_export.max(1).values.numpy(), rtol=1e-5)
    assert cams["cams"].shape == (40, 32, 32) and all(cam.std() > 0 for cam in cams["cams"])


def test_image_picking_is_one_per_class_first_then_refuses_too_many():
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    assert pick_images(labels, 5, 3).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(UsageError, match="--images 8 is more than the held-out split offers"):
        pick_images(labels, 8, 3)
    with pytest.raises(UsageError, match="--images must be at least 1"):
        pick_images(labels, 0, 3)


def test_a_checkpoint_of_other_classes_than_the_data_is_refused(cifar, shared_archive, tmp_path):
    state = {**flip_tta_state(cifar.train_x[:64], cifar.train_y[:64]), "classes": ["cat", "dog"],
             "model": build_model("tiny", num_classes=2).state_dict()}
    save_state(tmp_path, state)
    with pytest.raises(UsageError, match="--data has classes .* the checkpoint \\['cat', 'dog'\\]"):
        explain_checkpoint(str(tmp_path), str(shared_archive), 2, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
