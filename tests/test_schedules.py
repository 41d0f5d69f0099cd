"""Schedules are pure functions of the step: checked at chosen steps, without Ray."""

import pytest

from resnet.config import make_config
from resnet.train.schedules import cosine, make_schedule, onecycle, step_decay

KW = dict(total_steps=100, peak_lr=0.2, warmup_frac=0.1, final_lr_ratio=0.05)


def test_onecycle_warms_up_then_decays_linearly():
    assert onecycle(0, **KW) == pytest.approx(0.02)  # first of 10 warm-up steps
    assert onecycle(9, **KW) == pytest.approx(0.2)  # peak at the end of warm-up
    assert onecycle(10, **KW) == pytest.approx(0.2)
    assert onecycle(99, **KW) == pytest.approx(0.01)  # last step: peak * final ratio
    mid = onecycle(10 + 89 // 2, **KW)
    assert 0.01 < mid < 0.2
    lrs = [onecycle(s, **KW) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_has_its_midpoint_halfway():
    assert cosine(9, **KW) == pytest.approx(0.2)
    assert cosine(99, **KW) == pytest.approx(0.01)
    # Halfway through the decay the cosine is at the mean of peak and final.
    assert cosine(10 + 89 / 2, **KW) == pytest.approx((0.2 + 0.01) / 2)


def test_keras_step_schedule_matches_the_original():
    config = make_config("keras")
    lr_at = make_schedule(config, steps_per_epoch=1406)
    epoch_start = lambda epoch: (epoch - 1) * 1406  # noqa: E731 (1-based epoch -> first step)
    assert lr_at(epoch_start(1)) == pytest.approx(0.003)
    assert lr_at(epoch_start(9) + 1405) == pytest.approx(0.003)
    assert lr_at(epoch_start(10)) == pytest.approx(0.0015)
    assert lr_at(epoch_start(17)) == pytest.approx(0.00135)
    assert lr_at(epoch_start(24)) == pytest.approx(0.00108)
    assert lr_at(epoch_start(30)) == pytest.approx(0.0006048)
    assert lr_at(epoch_start(50) + 1405) == pytest.approx(0.000338688)


def test_step_decay_multiplies_from_each_milestone_epoch():
    kw = dict(steps_per_epoch=10, base_lr=1.0, milestones=((2, 0.5), (3, 0.1)))
    assert [step_decay(s, **kw) for s in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.5, 0.5, 0.05])
    # With a warm-up, the first steps ramp linearly up to the base LR.
    assert [step_decay(s, **kw, warmup_steps=4) for s in (0, 3, 4)] == pytest.approx([0.25, 1, 1])


def test_make_schedule_spans_the_whole_run():
    config = make_config(epochs=4, lr=0.4, warmup_frac=0.25, final_lr_ratio=0.0)
    lr_at = make_schedule(config, steps_per_epoch=25)
    assert lr_at(24) == pytest.approx(0.4)
    assert lr_at(99) == pytest.approx(0.0)
