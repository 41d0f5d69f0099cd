"""The typed config: presets, overrides, unknown keys and validation."""

import pytest

from resnet.config import TrainConfig, make_config, parse_milestones
from resnet.errors import UsageError


def test_preset_then_overrides():
    config = make_config("keras", epochs=12)
    assert (config.optimizer, config.batch_size, config.lr, config.epochs) == ("rmsprop", 32, 0.003, 12)
    assert config.milestones[0] == (10, 0.5) and config.augment == "keras" and config.l2 == 1e-4


def test_the_fast_preset_is_the_measured_recipe():
    # docs/results.md measured exactly this recipe on three seeds; a change here needs new runs.
    config = make_config("fast")
    assert (config.epochs, config.batch_size, config.lr, config.cutout, config.crop_pad) == \
        (50, 128, 0.2, 8, 4)
    assert (config.ema, config.tta, config.tta_shift, config.bn_bias_decay) == (0.995, True, 2, False)


def test_turning_tta_off_turns_the_presets_shift_tta_off_too():
    from resnet.tune.space import trial_config
    # `jobs.train --preset fast --no-tta`, and a sweep trial that samples tta False.
    assert (make_config("fast", tta=False).tta, make_config("fast", tta=False).tta_shift) == (False, 0)
    assert trial_config(make_config("fast"), {"tta": False}).tta_shift == 0
    assert make_config("fast", tta_shift=1).tta_shift == 1
    with pytest.raises(UsageError, match="--tta-shift needs --tta"):  # both given: a clash
        make_config("fast", tta=False, tta_shift=2)


def test_round_trip_through_a_plain_dict():
    config = make_config("keras")
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_unknown_keys_are_rejected():
    with pytest.raises(UsageError, match="unknown config key.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})


@pytest.mark.parametrize("overrides, message", [
    ({"epochs": 0}, "--epochs must be at least 1"),
    ({"lr": -0.1}, "--lr must be positive"),
    ({"batch_size": 30, "num_workers": 4}, "divisible by --num-workers"),
    ({"schedule": "step"}, "needs --milestones"),
    ({"name": "a/b"}, "no path separators"),
    ({"optimizer": "lbfgs"}, "choose one of sgd, adam, rmsprop"),
    ({"label_smoothing": 1.5}, "--label-smoothing must be in"),
    # NCCL cannot share one GPU between the ranks of a group.
    ({"gpus_per_worker": 0.25, "num_workers": 2}, "fractions below 1 need exactly 1 worker"),
    ({"gpus_per_worker": 1.5}, "a fraction up to 1 or a whole number"),
    ({"gpus_per_worker": 0}, r"--gpus-per-worker 0: to train without GPUs pass --cpu instead"),
    ({"ema": 1.0}, "--ema must be in"),
])
def test_invalid_values_are_usage_errors(overrides, message):
    with pytest.raises(UsageError, match=message):
        make_config(**overrides)


def test_a_quarter_gpu_per_single_worker_run_is_allowed():
    assert make_config(gpus_per_worker=0.25, num_workers=1).gpus_per_worker == 0.25


def test_run_name_has_no_timestamp():
    assert make_config(seed=3).run_name == "resnet20-default-seed3"
    assert make_config("keras").run_name == make_config("keras").run_name


def test_milestones_parse():
    assert parse_milestones("10:0.5,17:0.9") == ((10, 0.5), (17, 0.9))
    with pytest.raises(UsageError):
        parse_milestones("10-0.5")
