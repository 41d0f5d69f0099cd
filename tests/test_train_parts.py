"""Pieces of the training loop that need no Ray: optimizer parameter groups, the EMA, the run
name check."""

import pytest
import torch

from resnet.config import make_config
from resnet.models import build_model
from resnet.train.loop import make_optimizer, param_groups


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
    from resnet.train.ema import EMA
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


def test_ema_equals_torchs_own_ema_once_its_decay_is_warmed_up():
    """Against torch's reference implementation (AveragedModel with get_ema_multi_avg_fn),
    BatchNorm buffers included: the first update copies, then each moves by 1 - decay."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from resnet.train.ema import EMA
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ours = EMA(net, 0.9)
    reference = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for step in range(30):
        with torch.no_grad():
            net[0].weight.add_(torch.randn_like(net[0].weight))
            net.train()(torch.randn(2, 3, 5, 5))  # moves the BatchNorm statistics
        ours.update_parameters(net)
        reference.update_parameters(net)
        if step == 0:  # past the warm-up: (1 + n) / (10 + n) >= 0.9 from n = 81 on
            ours.n_averaged = 81
    for (key, a), b in zip(ours.module.state_dict().items(), reference.module.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, atol=1e-5), key
        else:  # BatchNorm's batch counter is copied, not averaged (torch's fn averages it too)
            assert a == net.state_dict()[key] == 30, key
    assert not torch.allclose(ours.module[0].weight, net[0].weight)  # an average, not a copy


def test_a_run_name_is_reused_only_by_the_same_run(cifar, tmp_path):
    import json

    from resnet.train.driver import check_resumable
    from resnet.errors import UsageError
    config = make_config("fast", storage=str(tmp_path))
    run_dir = str(tmp_path / config.run_name)
    check_resumable(run_dir, config, cifar)  # a new run: writes run.json
    # Hardware and reporting may change between sessions; training settings may not.
    check_resumable(run_dir, config.replace(cpus_per_worker=1, eval_variants=True), cifar)
    with pytest.raises(UsageError, match=r"other settings \(lr\)"):
        check_resumable(run_dir, config.replace(lr=0.1), cifar)
    # Nor the worker count: BatchNorm normalises over each worker's local batch. Said why.
    with pytest.raises(UsageError, match=r"other settings \(num_workers\); BatchNorm normalises "
                                         r"over each worker's local batch"):
        check_resumable(run_dir, config.replace(num_workers=2), cifar)
    # A run.json from before a key existed: the missing key counts as its default.
    run_json = tmp_path / config.run_name / "run.json"
    stored = json.loads(run_json.read_text())
    del stored["flip"]
    run_json.write_text(json.dumps(stored))
    check_resumable(run_dir, config, cifar)
    with pytest.raises(UsageError, match=r"other settings \(flip\)"):
        check_resumable(run_dir, config.replace(flip="alternate"), cifar)


def test_evaluation_runs_in_the_exported_models_precision():
    from resnet.train.loop import EVAL_PRECISION, train_precision
    config = make_config("fast")
    # Training may use bf16 autocast on CUDA; val_acc and test_acc are fp32, as the export.
    assert train_precision(torch.device("cuda"), config) == "bf16"
    assert train_precision(torch.device("cuda"), config.replace(amp=False)) == "fp32"
    assert train_precision(torch.device("cpu"), config) == "fp32"
    assert EVAL_PRECISION == "fp32"


def test_optimizers_are_wired_as_configured():
    model = build_model("tiny")
    rmsprop = make_optimizer(make_config("keras"), param_groups(model, make_config("keras")))
    group = rmsprop.param_groups[0]
    assert isinstance(rmsprop, torch.optim.RMSprop)
    assert (group["alpha"], group["eps"], group["lr"], group["weight_decay"]) == (0.9, 1e-7, 0.003, 0)
    adam_config = make_config(optimizer="adam", lr=1e-3, eps=1e-6, weight_decay=1e-4)
    adam = make_optimizer(adam_config, param_groups(model, adam_config))
    assert isinstance(adam, torch.optim.Adam)
    assert (adam.param_groups[0]["eps"], adam.param_groups[0]["weight_decay"]) == (1e-6, 1e-4)
    sgd = make_optimizer(make_config(momentum=0.0), model.parameters())
    assert sgd.param_groups[0]["nesterov"] is False  # Nesterov needs momentum
    assert make_optimizer(make_config(), model.parameters()).param_groups[0]["nesterov"] is True


def test_bn_momentum_reaches_every_batchnorm():
    from resnet.models import set_bn_momentum
    model = set_bn_momentum(build_model("resnet18"), 0.03)
    momenta = {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert momenta == {0.03}
    x = torch.rand(8, 3, 32, 32)
    bn = model.stem[1]
    before = bn.running_mean.clone()
    model.train()(x)
    batch_mean = model.stem[0](model.normalize(x)).mean((0, 2, 3))
    assert torch.allclose(bn.running_mean, 0.97 * before + 0.03 * batch_mean.detach(), atol=1e-5)


def test_a_batch_larger_than_the_training_set_is_refused():
    import numpy as np

    from resnet.data import Splits
    from resnet.train.driver import check_batch_fits
    from resnet.errors import UsageError
    splits = Splits(("a", "b"), np.zeros((100, 3, 32, 32), np.uint8), np.zeros(100, np.int64),
                    np.zeros((10, 3, 32, 32), np.uint8), np.zeros(10, np.int64))
    check_batch_fits(make_config(batch_size=100), splits)
    with pytest.raises(UsageError, match="--batch-size 128 exceeds the 100 training images"):
        check_batch_fits(make_config(batch_size=128), splits)


def test_the_keras_preset_subtracts_the_training_images_mean_image_in_the_weights(cifar):
    # The Keras example subtracts the per-pixel mean of the training images (x_train_mean):
    # the loop takes it from what it trains on, the checkpoint and the export carry it.
    import io

    from resnet.data import make_splits
    from resnet.train.checkpoint import export_model, inference_model
    from resnet.train.loop import build_loop, state_dict
    config = make_config("keras", subset=1000, val_size=500, ema=0.9)
    splits = make_splits(cifar, 500, 1000, 0)
    loop = build_loop(config, splits, torch.device("cpu"))
    expected = torch.from_numpy(splits.train_x).double().mean(0, keepdim=True) / 255
    for net in (loop.net, loop.eval_net):  # the trained weights and their EMA alike
        assert torch.allclose(net.normalize.mean.double(), expected, atol=1e-6)
    assert expected.std() > 0.01  # a mean image, not a constant per channel
    state = {**state_dict(loop), "config": config.to_dict(), "classes": list(splits.classes)}
    assert "normalize.mean" in state["model"]
    x = torch.from_numpy(splits.val_x[:8]).float() / 255
    rebuilt = inference_model(state)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), loop.eval_net.eval()(x), atol=1e-5)
        exported = torch.export.load(io.BytesIO(export_model(rebuilt))).module()
        assert torch.allclose(exported(x), rebuilt(x), atol=1e-5)
    # Training shifts the mean image with the images (Keras shifts x - mean): the model sees
    # shifted(x) - shifted(mean); tests/test_augment.py checks augment() itself.
    from resnet.train.augment import augment
    from resnet.train.loop import plan, train_input
    epoch_plan, ids = plan(loop, 1), torch.arange(16)
    seen = loop.net.normalize(train_input(loop, epoch_plan, ids))
    means = (expected.float() * 255).round().to(torch.uint8).expand(16, -1, -1, -1)
    want = (augment(loop.train_x[ids], ids, epoch_plan, "keras")
            - augment(means, ids, epoch_plan, "keras"))
    assert torch.allclose(seen, want, atol=3e-3)  # the mean rounded to uint8: 1/510 at most
    # The other presets keep CIFAR-10's per-channel constants, outside the state dict.
    assert "normalize.mean" not in build_model("resnet20").state_dict()
    assert make_config("fast").normalize == "channel" and config.normalize == "pixel"


def test_a_cpu_worker_flushes_denormal_floats_to_zero():
    # Denormals made the keras recipe's CPU epochs 10x slower (82 s -> 900-1000 s from epoch 27).
    from resnet.train.loop import prepare_device
    threads = torch.get_num_threads()
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a denormal float32
    try:
        torch.set_flush_denormal(False)
        assert tiny.mul(1.0).item() != 0.0
        prepare_device(torch.device("cpu"), threads)
        assert tiny.mul(1.0).item() == 0.0
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)
