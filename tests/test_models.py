"""Models: parameter counts, shapes, names."""

import math

import pytest
import torch
from torch import nn

from resnet.errors import UsageError
from resnet.models import FlipTTA, build_model, keras_param_count, trainable_param_count


def test_resnet20_matches_the_keras_model_summary():
    model = build_model("resnet20")
    assert keras_param_count(model) == 274_442  # Keras "Total params"
    assert trainable_param_count(model) == 273_066  # Keras "Trainable params"


def test_resnet18_parameter_count():
    assert trainable_param_count(build_model("resnet18")) == 11_173_962


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "tiny"])
def test_logits_shape_and_class_count(name):
    model = build_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 3, 32, 32)).shape == (3, 7)


def test_resnet20_keras_layers_and_init():
    model = build_model("resnet20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 21 and all(c.bias is not None for c in convs)  # 19 3x3 + 2 projections
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 19 and all(b.eps == 1e-3 and b.momentum == 0.01 for b in bns)
    # he_normal: sd sqrt(2 / fan_in) after truncation at 2 sd; biases zero.
    torch.manual_seed(0)
    wide = build_model("resnet20").stage3[1].conv1  # fan_in 64 * 9, 36,864 weights
    assert wide.weight.std().item() == pytest.approx(math.sqrt(2 / 576), rel=0.03)
    assert wide.weight.abs().max().item() <= 2 * math.sqrt(2 / 576) / 0.8796 + 1e-6
    assert torch.count_nonzero(wide.bias) == 0


def test_normalisation_is_inside_the_model():
    model = build_model("tiny")
    assert not any("normalize" in k for k in model.state_dict())  # constants, not weights
    x = torch.full((1, 3, 32, 32), 0.5)
    assert torch.allclose(model.normalize(x)[0, :, 0, 0],
                          (0.5 - torch.tensor([0.4914, 0.4822, 0.4465])) / torch.tensor([0.2470, 0.2435, 0.2616]))


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UsageError, match="resnet20, resnet18, tiny"):
        build_model("resnet50")


def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = build_model("resnet20").eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        both = FlipTTA(model)(x)
        assert torch.allclose(both, (model(x) + model(x.flip(3))) / 2, atol=1e-6)
        assert not torch.allclose(both, model(x), atol=1e-4)  # the mirror image counts
        assert torch.allclose(FlipTTA(model)(x.flip(3)), both, atol=1e-5)  # flip invariant
