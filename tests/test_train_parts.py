"""Pieces of the training loop that need no Ray: optimizer parameter groups, the EMA, the run
name check."""

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


def test_ema_warms_its_decay_up_then_caps_it():
    from resnet.ema import EMA
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, 0.9)
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
    assert ema.n_averaged == 203 and not ema.module.weight.requires_grad


def test_ema_equals_torchs_averaged_model_with_the_same_decay():
    from torch.optim.swa_utils import AveragedModel

    from resnet.ema import EMA
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ours = EMA(net, 0.9)

    def warmed_up(averages, params, n) -> None:  # the same rule, one tensor at a time
        d = min(0.9, (1 + int(n)) / (10 + int(n)))
        for a, p in zip(averages, params):
            a.copy_(d * a + (1 - d) * p if a.is_floating_point() else p)

    reference = AveragedModel(net, multi_avg_fn=warmed_up, use_buffers=True)
    for _ in range(30):
        with torch.no_grad():
            net[0].weight.add_(torch.randn_like(net[0].weight))
            net.train()(torch.randn(2, 3, 5, 5))  # moves the BatchNorm statistics
        ours.update_parameters(net)
        reference.update_parameters(net)
    for (key, a), b in zip(ours.module.state_dict().items(), reference.module.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), key
    assert ours.n_averaged == int(reference.n_averaged) == 30


def test_a_run_name_is_reused_only_by_the_same_run(cifar, tmp_path):
    import json

    from resnet.driver import check_resumable
    from resnet.errors import UsageError
    config = make_config("fast", storage=str(tmp_path))
    run_dir = str(tmp_path / config.run_name)
    check_resumable(run_dir, config, cifar)  # a new run: writes run.json
    # Hardware and reporting may change between sessions; training settings may not.
    check_resumable(run_dir, config.replace(num_workers=2, eval_variants=True), cifar)
    with pytest.raises(UsageError, match=r"other settings \(lr\)"):
        check_resumable(run_dir, config.replace(lr=0.1), cifar)
    # A run.json from before a key existed: the missing key counts as its default.
    run_json = tmp_path / config.run_name / "run.json"
    stored = json.loads(run_json.read_text())
    del stored["cutout"]
    run_json.write_text(json.dumps(stored))
    check_resumable(run_dir, config, cifar)
    with pytest.raises(UsageError, match=r"other settings \(cutout\)"):
        check_resumable(run_dir, config.replace(cutout=8), cifar)
