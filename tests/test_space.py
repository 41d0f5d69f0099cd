"""The Tune search space: defaults, files, validation and how samples become TrainConfigs."""

from __future__ import annotations

import json

import pytest
from ray import tune

from resnet.config import make_config
from resnet.errors import UsageError
from resnet.tune.space import grid_size, keras_point, load_space, to_tune, trial_config
from tests.conftest import ROOT


def write(tmp_path, text: str, name: str = "space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_default_space_resolves_the_lr_range_of_the_optimizer():
    assert load_space(None, "sgd")["lr"] == {"loguniform": [0.05, 0.8]}
    assert load_space(None, "adam")["lr"] == {"loguniform": [3e-4, 3e-3]}
    assert set(load_space(None, "sgd")) == {"schedule", "lr", "warmup_frac", "final_lr_ratio",
                                            "weight_decay", "label_smoothing", "batch_size"}
    assert load_space(None, "sgd", "cpu")["batch_size"] == {"choice": [64, 128]}


def test_a_yaml_file_overrides_keys_and_fixes_constants(tmp_path):
    space = load_space(write(tmp_path, "schedule: cosine\nlr: {grid: [0.1, 0.2]}\ncutout: 8\n"),
                       "sgd")
    assert space["schedule"] == "cosine" and space["cutout"] == 8
    domains = to_tune(space)
    assert domains["lr"] == tune.grid_search([0.1, 0.2]) and domains["recipe"] == "search"
    assert isinstance(domains["weight_decay"], tune.search.sample.Float)


@pytest.mark.parametrize("text, message", [
    ('{"learning_rate": 0.1}', "unknown key 'learning_rate'"),
    ('{"storage": "/tmp"}', "unknown key 'storage'"),
    ('{"lr": {"loguniform": [0.0, 1.0]}}', "impossible"),
    ('{"lr": {"uniform": [0.5, 0.1]}}', "impossible"),
    ('{"label_smoothing": {"uniform": [0.0, 1.5]}}', "label_smoothing=1.5 is impossible"),
    ('{"schedule": {"choice": ["onecycle", "linear"]}}', "schedule='linear' is impossible"),
    ('{"batch_size": {"choice": []}}', "non-empty list"),
    ('{"lr": {"normal": [0, 1]}}', "must be a constant or one of"),
    ('[1, 2]', "must be a mapping"),
    ('{"lr": ', "not valid JSON"),
])
def test_bad_space_files_are_usage_errors(tmp_path, text, message):
    with pytest.raises(UsageError, match=message) as info:
        load_space(write(tmp_path, text, "space.json"), "sgd")
    assert "\n" not in str(info.value)


def test_a_value_is_checked_with_the_sweeps_model_and_constants_together(tmp_path):
    space = write(tmp_path, '{"dirac_init": true}', "space.json")
    assert load_space(space, "sgd", model="resnet20")["dirac_init"] is True
    with pytest.raises(UsageError, match="dirac_init=True is impossible .*not resnet18"):
        load_space(space, "sgd", model="resnet18")
    together = write(tmp_path, '{"tta": false, "tta_shift": 2}', "together.json")
    with pytest.raises(UsageError, match="tta=False, tta_shift=2 are impossible together"):
        load_space(together, "sgd")
    # A sampled value is checked alone: a trial that draws an impossible mix fails on its own
    # (tests/test_console.py), and its row is still described.
    assert load_space(write(tmp_path, '{"tta": {"grid": [false]}, "tta_shift": 2}', "g.json"),
                      "sgd")["tta"] == {"grid": [False]}
    row = trial_config(make_config("fast"), {"tta": False, "tta_shift": 2}, check=False)
    assert (row.tta, row.tta_shift) == (False, 2)
    with pytest.raises(UsageError, match="--tta-shift needs --tta"):
        trial_config(make_config("fast"), {"tta": False, "tta_shift": 2})


def test_missing_space_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read it"):
        load_space(str(tmp_path / "nope.yaml"), "sgd")


def test_trial_config_applies_samples_and_derives_step_milestones():
    base = make_config(epochs=20, data="somewhere", subset=1000)
    config = trial_config(base, {"recipe": "search", "schedule": "step", "lr": 0.3,
                                 "batch_size": 128})
    assert (config.lr, config.batch_size, config.subset, config.data) == (0.3, 128, 1000, "somewhere")
    assert config.milestones == ((11, 0.1), (16, 0.1))


def test_keras_trial_is_the_keras_recipe_with_the_sweeps_data_and_epochs():
    base = make_config(epochs=7, subset=3000, num_workers=2)
    point = keras_point(load_space(None, "sgd"), base)
    assert point["recipe"] == "keras" and point["batch_size"] == 32 and point["schedule"] == "step"
    config = trial_config(base, point)
    assert (config.optimizer, config.epochs, config.subset, config.num_workers) == \
        ("rmsprop", 7, 3000, 2)
    assert config.milestones == ((10, 0.5), (17, 0.9), (24, 0.8), (27, 0.8), (30, 0.7),
                                 (37, 0.7), (42, 0.8))  # the original Keras log's LR steps
    json.dumps(config.to_dict())  # plain JSON for summaries


def test_the_tricks_space_file_is_a_full_factorial_around_the_fast_recipe():
    space = load_space(str(ROOT / "jobs" / "spaces" / "tricks.yaml"), "sgd")
    assert grid_size(space) == 16 and grid_size(load_space(None, "sgd")) == 1
    assert (space["schedule"], space["lr"], space["batch_size"]) == ("onecycle", 0.2, 256)


def test_the_levers_space_file_crosses_the_five_training_levers():
    space = load_space(str(ROOT / "jobs" / "spaces" / "levers.yaml"), "sgd")
    assert grid_size(space) == 32 and space["crop_pad"] == {"grid": [4, 2]}
    assert (space["schedule"], space["lr"], space["batch_size"]) == ("onecycle", 0.2, 256)


def test_the_batch_space_file_crosses_batch_size_with_peak_lr():
    space = load_space(str(ROOT / "jobs" / "spaces" / "batch.yaml"), "sgd")
    assert grid_size(space) == 16 and space["crop_pad"] == 2
    assert space["batch_size"] == {"grid": [128, 256, 512, 1024]}
    assert space["lr"] == {"grid": [0.1, 0.2, 0.4, 0.8]}


def test_pbt_perturbs_a_grid_or_choice_as_a_list_and_a_fixed_lr_within_4x():
    from ray.tune.search.sample import Domain

    from resnet.tune.search import mutations
    grid = mutations({"lr": {"grid": [0.2, 1e-5]}, "momentum": {"choice": [0.9, 0.8]},
                      "weight_decay": {"loguniform": [1e-4, 1e-3]}})
    assert grid["lr"] == [1e-5, 0.2] and grid["momentum"] == [0.8, 0.9]
    assert isinstance(grid["weight_decay"], Domain)
    fixed = mutations({"lr": 0.1})["lr"]
    assert (fixed.lower, fixed.upper) == (0.025, 0.4) and set(mutations({"lr": 0.1})) == {"lr"}
