"""Models. Every model takes float RGB in [0, 1], N x 3 x 32 x 32, and returns N x classes logits.

Normalisation is the first layer, so an exported model needs no preprocessing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from resnet.errors import UsageError

# CIFAR-10 training-set channel statistics, for inputs in [0, 1].
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """(x - mean) / std per channel; constants, so not part of the state dict."""

    def __init__(self, mean=CIFAR_MEAN, std=CIFAR_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class PixelMean(nn.Module):
    """x minus the training images' mean image (1 x 3 x H x W, in [0, 1]): the Keras example's
    input. A persistent buffer, zero until training sets it (``set_pixel_mean``), so the
    checkpoint and the export carry it."""

    def __init__(self, size: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, 3, size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.mean


# --- ResNet20v1, the Keras example model (keras-team/keras examples/cifar10_resnet.py) ---------

def _keras_bn(channels: int) -> nn.BatchNorm2d:
    # Keras BatchNormalization defaults: epsilon 1e-3, moving-average momentum 0.99.
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class KerasBlock(nn.Module):
    """conv-BN-ReLU, conv-BN, add the (projected) input, ReLU. Convs carry biases, as in Keras."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1)
        self.bn1 = _keras_bn(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, padding=1)
        self.bn2 = _keras_bn(out_ch)
        # Keras projects with a 1x1 strided conv (with bias, without BN) when the shape changes.
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride) if stride != 1 or in_ch != out_ch
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(self.shortcut(x) + y)


class ResNet20(nn.Module):
    """Keras ResNet20v1: stem 16, three stages of 3 blocks (16, 32, 64), pool, dense.

    274,442 parameters as Keras counts them (273,066 trainable plus 1,376 BatchNorm moving
    statistics). One difference: Keras pads stride-2 'same' convs bottom/right only, torch pads
    symmetrically; shapes and parameter counts are identical.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _keras_bn(16), nn.ReLU())
        stages, in_ch = [], 16
        for out_ch, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [KerasBlock(in_ch, out_ch, stride)]
            blocks += [KerasBlock(out_ch, out_ch, 1) for _ in range(2)]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)  # Keras AveragePooling2D(8) on the 8 x 8 map
        self.fc = nn.Linear(64, num_classes)
        self._keras_init()

    def _keras_init(self) -> None:
        # Keras he_normal: truncated normal (cut at 2 sd) with sd sqrt(2 / fan_in) after
        # truncation; biases zero. Applied to every conv and the dense layer.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
                nn.init.trunc_normal_(module.weight, 0.0, std, -2 * std, 2 * std)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))  # N x 16 x 32 x 32
        x = self.stage3(self.stage2(self.stage1(x)))  # N x 64 x 8 x 8
        return self.fc(torch.flatten(self.pool(x), 1))


# --- ResNet18, the CIFAR variant (3x3 stem, no max-pool) ----------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 for 32 x 32 inputs: 11,173,962 parameters with 10 classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU())
        layers, in_ch = [], 64
        for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(in_ch, out_ch, stride),
                                        BasicBlock(out_ch, out_ch, 1)))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))  # N x 64 x 32 x 32
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # N x 512 x 4 x 4
        return self.fc(torch.flatten(self.pool(x), 1))


# --- A tiny model without BatchNorm, for smoke runs and exact DDP-equivalence checks ------------

class TinyNet(nn.Module):
    """Two convs and a dense layer, no BatchNorm: DDP on any worker count computes the same
    update as one worker with the same global batch."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.normalize = Normalize()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # N x 8 x 16 x 16
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # N x 16 x 8 x 8
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(self.normalize(x))), 1))


_BUILDERS = {"resnet20": ResNet20, "resnet18": ResNet18, "tiny": TinyNet}
# The last residual stage (the last feature stage for tiny): Grad-CAM's target layer.
LAST_STAGE = {ResNet20: "stage3", ResNet18: "layer4", TinyNet: "features"}


def build_model(name: str, num_classes: int = 10, dirac_init: bool = False,
                normalize: str = "channel") -> nn.Module:
    """Build a model by name; an unknown name is a usage error listing the known ones.
    ``normalize="pixel"``: the input minus a per-pixel mean image instead of per-channel
    constants (``set_pixel_mean`` fills it in)."""
    if name not in _BUILDERS:
        raise UsageError(f"unknown model {name!r}; known models: {', '.join(_BUILDERS)}")
    model = _BUILDERS[name](num_classes)
    if normalize == "pixel":
        model.normalize = PixelMean()
    if dirac_init:
        init_residual_identity(model)
    return model


@torch.no_grad()
def set_pixel_mean(model: nn.Module, mean: torch.Tensor) -> None:
    """Set a ``PixelMean`` model's mean image: 1 x 3 x H x W in [0, 1]."""
    model.normalize.mean.copy_(mean.to(model.normalize.mean))


@torch.no_grad()
def init_residual_identity(model: nn.Module) -> None:
    """Dirac (identity) initialisation of every residual branch's two 3x3 convolutions, as
    airbench initialises its convolutions: the first C_in filters of each pass their input
    channel through (a strided conv: subsampled), the rest keep their he_normal draw. Biases
    stay zero. An initialisation only: layers and parameter counts are unchanged."""
    for block in model.modules():
        if isinstance(block, KerasBlock):
            for conv in (block.conv1, block.conv2):
                nn.init.dirac_(conv.weight[:conv.in_channels])


def last_stage(model: nn.Module) -> nn.Module:
    """The last residual stage of an unwrapped model (N x C x 8 x 8 for resnet20)."""
    return getattr(model, LAST_STAGE[type(model)])


class FlipTTA(nn.Module):
    """Flip test-time augmentation: the mean of the logits of the image and its mirror image;
    with ``shift``, averaged half and half with the same for the image shifted by ``shift``
    pixels down-right and up-left (reflect padding), as airbench's translate TTA.

    Part of the exported model, so the exported file gives the evaluated accuracy as it is.
    """

    def __init__(self, model: nn.Module, shift: int = 0) -> None:
        super().__init__()
        self.model = model
        self.shift = shift

    def flipped(self, x: torch.Tensor) -> torch.Tensor:
        return (self.model(x) + self.model(torch.flip(x, dims=[3]))) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # N x 3 x H x W -> N x classes
        if not self.shift:
            return self.flipped(x)
        s, (h, w) = self.shift, x.shape[-2:]
        padded = F.pad(x, (s, s, s, s), mode="reflect")  # N x 3 x (H + 2s) x (W + 2s)
        shifted = (self.flipped(padded[..., :h, :w]) + self.flipped(padded[..., 2 * s:, 2 * s:])) / 2
        return (self.flipped(x) + shifted) / 2


def set_bn_momentum(model: nn.Module, momentum: float) -> nn.Module:
    """Set every BatchNorm's running-statistics momentum (torch convention: weight of the batch)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return model


def conv_kernels(model: nn.Module) -> list[torch.Tensor]:
    """The conv kernels Keras' kernel_regularizer=l2(...) applies to."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


def trainable_param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def keras_param_count(model: nn.Module) -> int:
    """Parameters as a Keras model summary counts them: trainable weights plus the
    BatchNorm moving mean and variance (Keras' non-trainable parameters)."""
    moving = sum(m.running_mean.numel() + m.running_var.numel()
                 for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return trainable_param_count(model) + moving
