"""The fast recipe's levers (issue 17), each checked against what it must compute, without Ray:
BatchNorm LR scale, Lookahead, alternating flip, translate TTA, dirac initialisation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnet.train.augment import augment, plan_epoch
from resnet.train.checkpoint import export_model
from resnet.config import make_config
from resnet.errors import UsageError
from resnet.train.lookahead import Lookahead
from resnet.train.loop import make_optimizer, param_groups
from resnet.models import FlipTTA, build_model, keras_param_count


def test_bn_lr_scale_multiplies_the_lr_of_1d_parameters_and_divides_their_decay():
    model = build_model("resnet20")
    config = make_config("default", bn_lr_scale=8.0, weight_decay=4e-4, lr=0.1)
    weights, vectors = make_optimizer(config, param_groups(model, config)).param_groups
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in vectors["params"])
    assert (weights["lr_scale"], weights["weight_decay"]) == (1.0, 4e-4)
    assert (vectors["lr_scale"], vectors["weight_decay"]) == (8.0, 5e-5)  # same decay per step
    # bn_bias_decay off keeps their decay at zero, whatever the scale.
    off = make_config("fast", bn_lr_scale=8.0)
    assert param_groups(model, off)[1]["weight_decay"] == 0.0
    # One SGD step without momentum: a 1-D parameter moves 8 times as far for the same gradient.
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    plain = make_config("default", bn_lr_scale=8.0, weight_decay=0.0, momentum=0.0)
    optimizer = make_optimizer(plain, param_groups(net, plain))
    for group in optimizer.param_groups:
        group["lr"] = 0.1 * group["lr_scale"]  # as train_step sets it
    before = [p.detach().clone() for p in net.parameters()]
    net(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    (w0, b0), (w1, b1) = before, [p.detach() for p in net.parameters()]
    assert torch.allclose(w0 - w1, 0.1 * torch.ones(2, 2))  # grad of a sum: x = 1
    assert torch.allclose(b0 - b1, 0.8 * torch.ones(2))


def test_lookahead_moves_the_slow_weights_every_k_steps():
    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(net.weight, 0.0)
    look = Lookahead(net, k=2, alpha=0.5)
    with torch.no_grad():
        for step in range(1, 5):  # the "optimizer" adds 1 per step
            net.weight.add_(1.0)
            look.step()
            # step 2: fast 2, slow 0 -> slow 1, fast restarts at 1; step 4: fast 3 -> slow 2
            assert net.weight.item() == {1: 1.0, 2: 1.0, 3: 2.0, 4: 2.0}[step]
    state = look.state_dict()
    again = Lookahead(net, k=2, alpha=0.5)
    again.load_state_dict(state)
    assert again.steps == 4 and again.slow[0].item() == 2.0


def test_alternating_flip_mirrors_each_image_on_alternate_epochs():
    plans = [plan_epoch(1000, 0, epoch, "crop", flip="alternate") for epoch in range(3)]
    assert torch.equal(plans[0].flip, ~plans[1].flip) and torch.equal(plans[0].flip, plans[2].flip)
    assert 0.4 < plans[0].flip.float().mean() < 0.6
    random = [plan_epoch(1000, 0, epoch, "crop") for epoch in range(2)]
    assert not torch.equal(random[0].flip, ~random[1].flip)  # the default draws afresh
    assert not plan_epoch(10, 0, 1, "none", flip="alternate").flip.any()


def test_crop_pad_bounds_the_shifts_and_reaches_them():
    for pad in (0, 2, 4):
        shift = plan_epoch(5000, 0, 1, "crop", pad=pad).shift
        assert shift.abs().max().item() == pad and set(shift.unique().tolist()) == set(
            float(v) for v in range(-pad, pad + 1))
    x = torch.arange(32.0).repeat(1, 3, 32, 1).to(torch.uint8)  # 1 x 3 x 32 x 32, value = column
    plan = plan_epoch(1, 0, 0, "crop", pad=2)
    plan.shift[:] = torch.tensor([[2.0, 0.0]])
    plan.flip[:] = False
    out = augment(x, torch.tensor([0]), plan, "crop") * 255
    assert out[0, 0, 0, :3].tolist() == [2.0, 3.0, 4.0] and out[0, 0, 0, -2:].tolist() == [0, 0]
    with pytest.raises(UsageError, match="--crop-pad must be 0-8"):
        make_config("fast", crop_pad=9)
    with pytest.raises(UsageError, match="--crop-pad is the padding of --augment crop"):
        make_config("keras", crop_pad=2)


def test_translate_tta_averages_six_views_and_exports_as_one_model():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    x = torch.rand(4, 3, 32, 32)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        out = FlipTTA(model, shift=2)(x)
        assert len(calls) == 6
        padded = F.pad(x, (2, 2, 2, 2), mode="reflect")

        def flip_mean(v):
            return (model(v) + model(v.flip(3))) / 2
        expected = (flip_mean(x) + (flip_mean(padded[..., :32, :32])
                                    + flip_mean(padded[..., 4:, 4:])) / 2) / 2
    assert torch.allclose(out, expected, atol=1e-6)
    exported = torch.export.load(io.BytesIO(export_model(FlipTTA(model, shift=2)))).module()
    with torch.no_grad():
        assert torch.allclose(exported(x), out, atol=1e-5)
    with pytest.raises(UsageError, match="--tta-shift needs --tta"):
        make_config("default", tta_shift=1)


def test_dirac_init_makes_the_residual_convs_identity_and_keeps_the_architecture():
    torch.manual_seed(0)
    model = build_model("resnet20", dirac_init=True)
    assert keras_param_count(model) == 274_442
    block = model.stage2[1]  # 32 -> 32 channels
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert torch.allclose(block.conv1(x), x, atol=1e-6)
        assert torch.allclose(block.conv2(x), x, atol=1e-6)
        down = model.stage2[0].conv1  # 16 -> 32, stride 2: the first 16 filters pass through
        y = down(torch.randn(2, 16, 16, 16))
        assert down.weight[16:].abs().sum() > 0  # the rest keep their he_normal draw
    torch.manual_seed(0)
    plain = build_model("resnet20")
    assert torch.equal(plain.stem[0].weight, model.stem[0].weight)  # the stem is untouched
    assert y.shape == (2, 32, 8, 8)
    with pytest.raises(UsageError, match="--dirac-init is for resnet20"):
        make_config("fast", model="resnet18", dirac_init=True)


def test_levers_are_search_space_keys(tmp_path):
    from resnet.tune.space import load_space
    path = tmp_path / "levers.yaml"
    path.write_text("bn_lr_scale: {grid: [1.0, 16.0]}\nlookahead_k: {choice: [0, 5]}\n"
                    "flip: alternate\ntta_shift: 1\ndirac_init: true\nlabel_smoothing: 0.2\n")
    space = load_space(str(path), "sgd")
    assert space["bn_lr_scale"] == {"grid": [1.0, 16.0]} and space["flip"] == "alternate"
    assert np.isclose(space["label_smoothing"], 0.2) and space["dirac_init"] is True
