"""Pieces of the training loop that need no Ray: optimizer parameter groups."""

import pytest
import torch

from resnet.config import make_config
from resnet.models import build_model
from resnet.train import make_optimizer, param_groups


@pytest.mark.parametrize("bn_bias_decay", [True, False])
def test_weight_decay_skips_batchnorm_and_biases_when_asked(bn_bias_decay):
    model = build_model("resnet20")
    config = make_config(weight_decay=5e-4, bn_bias_decay=bn_bias_decay)
    optimizer = make_optimizer(config, param_groups(model, config))
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    every = list(model.parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(every)
    if bn_bias_decay:
        assert decayed == {id(p) for p in every}
        return
    bn_and_bias = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
                   if isinstance(m, torch.nn.BatchNorm2d) or name == "bias"}
    assert decayed == {id(p) for p in every} - bn_and_bias
    assert len(bn_and_bias) == 19 * 2 + 21 + 1  # BN weight+bias, conv biases, dense bias


def test_ema_update_warms_its_decay_up_then_caps_it():
    from torch.optim.swa_utils import AveragedModel

    from resnet.train import ema_update
    net = torch.nn.Linear(2, 1)
    ema = AveragedModel(net, multi_avg_fn=ema_update(0.9), use_buffers=True)
    w0 = net.weight.detach().clone()
    for _ in range(3):  # the weights move by +1 per step
        with torch.no_grad():
            net.weight.add_(1.0)
        ema.update_parameters(net)
    # 1st update copies (w0 + 1); then decay 2/11 and 3/12, both under the 0.9 cap.
    d1, d2 = 2 / 11, 3 / 12
    expected = d2 * (d1 * 1 + (1 - d1) * 2) + (1 - d2) * 3
    assert torch.allclose(ema.module.weight, w0 + expected)
    for _ in range(200):
        ema.update_parameters(net)  # the weights stay put: the average converges on them
    assert torch.allclose(ema.module.weight, net.weight, atol=1e-6)
    assert int(ema.n_averaged) == 203
