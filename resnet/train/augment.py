"""Batched augmentation on the training device, planned per epoch and indexed by sample id.

Each epoch's sample order and every sample's shift, flip and cutout position are drawn up front
from (seed, epoch). A rank looks its samples' parameters up by id, so the augmented images, and
hence the result, do not depend on how many workers share the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CROP_PAD = 4  # default pixels of zero padding around the image before a random 32 x 32 crop
KERAS_SHIFT = 0.1  # Keras ImageDataGenerator width/height_shift_range, a fraction of the size


@dataclass
class EpochPlan:
    """One epoch's randomness, on the device. N = training samples."""

    order: torch.Tensor  # N, int64: a permutation of sample ids; the epoch's visiting order
    shift: torch.Tensor  # N x 2, float32: (dx, dy) in pixels
    flip: torch.Tensor  # N, bool: mirror left-right
    cutout: torch.Tensor  # N x 2, int64: (cx, cy) cutout centre in pixels

    def to(self, device: torch.device) -> "EpochPlan":
        return EpochPlan(*(t.to(device) for t in (self.order, self.shift, self.flip, self.cutout)))


def plan_epoch(n: int, seed: int, epoch: int, mode: str, size: int = 32,
               flip: str = "random", pad: int = CROP_PAD) -> EpochPlan:
    """Draw the epoch's order and per-sample augmentation parameters from (seed, epoch).
    ``pad``: crop's padding, so its shifts are whole pixels in [-pad, pad] (airbench uses 2).
    ``flip="alternate"``: each image's flip is drawn once (from the seed) and inverted on odd
    epochs, so over two epochs every image is seen both ways."""
    rng = np.random.default_rng([seed, epoch, 1])  # stream 0 is the data split's
    order = rng.permutation(n)
    if mode == "crop":  # integer offsets of a 32 x 32 window in the padded image (40 x 40 at 4)
        shift = rng.integers(-pad, pad + 1, size=(n, 2)).astype(np.float32)
    elif mode == "keras":  # Keras draws uniform(-0.1, 0.1) * size: fractional pixels
        shift = (rng.uniform(-KERAS_SHIFT, KERAS_SHIFT, size=(n, 2)) * size).astype(np.float32)
    else:
        shift = np.zeros((n, 2), np.float32)
    flips = rng.random(n) < 0.5 if mode != "none" else np.zeros(n, bool)
    if flip == "alternate" and mode != "none":
        flips = (np.random.default_rng([seed, 0, 2]).random(n) < 0.5) ^ bool(epoch % 2)
    cutout = rng.integers(0, size, size=(n, 2))
    return EpochPlan(torch.from_numpy(order), torch.from_numpy(shift), torch.from_numpy(flips),
                     torch.from_numpy(cutout))


def augment(images: torch.Tensor, ids: torch.Tensor, plan: EpochPlan, mode: str,
            cutout: int = 0, centre: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float B x 3 x H x W in [0, 1], augmented as planned for ``ids``.

    crop: zero padding (4 by default) and a random crop (integer shifts in [-pad, pad]) plus a flip.
    keras: fractional shifts up to 0.1 of the size with bilinear interpolation and nearest
    (edge-replicating) fill, as Keras' ImageDataGenerator, plus a flip.
    Both are one grid_sample over the batch; integer shifts sample pixel centres exactly.
    ``centre`` (1 x 3 x H x W in [0, 1], the mean image a ``PixelMean`` model subtracts): augment
    x - centre and add it back, so the model sees shifted(x) - shifted(mean) as the Keras example
    does (it subtracts the mean image before its generator shifts), not shifted(x) - mean.
    """
    x = images.float().div_(255)
    if centre is not None:
        x = x - centre
    if mode != "none":
        b, _, h, w = x.shape
        shift, flip = plan.shift[ids], plan.flip[ids]
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = 1.0 - 2.0 * flip.to(x.dtype)  # -1 mirrors x
        theta[:, 1, 1] = 1.0
        theta[:, 0, 2] = shift[:, 0] * (2.0 / w)  # pixels -> normalised [-1, 1] coordinates
        theta[:, 1, 2] = shift[:, 1] * (2.0 / h)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        if mode == "crop":
            x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        else:
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if cutout:
        x = apply_cutout(x, plan.cutout[ids], cutout)
    return x if centre is None else x + centre


def apply_cutout(x: torch.Tensor, centres: torch.Tensor, side: int) -> torch.Tensor:
    """Zero a side x side square around each centre (clipped at the border), as in DeVries &
    Taylor (2017)."""
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    cx, cy = centres[:, 0].view(-1, 1, 1), centres[:, 1].view(-1, 1, 1)
    lo, hi = side // 2, side - side // 2
    inside = (ys >= cy - lo) & (ys < cy + hi) & (xs >= cx - lo) & (xs < cx + hi)  # B x H x W
    return x.masked_fill(inside.unsqueeze(1), 0.0)
