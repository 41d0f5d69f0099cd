"""The sweep's settings without Ray: trial packing from given cluster resources, and what
``--resume`` accepts and refuses against a stored ``sweep.json``."""

from __future__ import annotations

import json

import pytest

from resnet.config import make_config
from resnet.errors import UsageError
from resnet.tune.space import load_space
from resnet.tune.settings import SWEEP_FILE, SweepConfig, make_sweep, plan_resources, resume_sweep

GPU_NODE = {"CPU": 16.0, "GPU": 1.0, "memory": 1e11}


@pytest.mark.parametrize("fraction, trials", [(1, 1), (0.5, 2), (0.25, 4), (0.2, 5), (0.1, 10),
                                              (0.0625, 16), (1 / 3, 3)])
def test_fractional_gpus_pack_exactly(fraction, trials):
    base = make_config("fast", gpus_per_worker=fraction)
    planned, fits = plan_resources(base, None, GPU_NODE)
    assert fits == trials and planned.use_gpu
    # Each trial's share of the CPUs follows its share of the GPU.
    assert planned.cpus_per_worker == max(1, int(16 * fraction + 1e-9))


def test_gpu_packing_across_nodes_and_workers():
    base = make_config("fast", num_workers=2, gpus_per_worker=1)
    assert plan_resources(base, None, {"CPU": 32.0, "GPU": 4.0})[1] == 2
    assert plan_resources(base.replace(use_gpu=False, cpus_per_worker=3), None,
                          {"CPU": 32.0, "GPU": 4.0})[1] == 5  # --cpu: 32 // (2 x 3)


def test_a_trial_that_does_not_fit_is_refused_unless_the_cluster_may_grow():
    base = make_config("fast", num_workers=2, cpus_per_worker=2, use_gpu=False)
    with pytest.raises(UsageError, match="one trial needs 2 worker"):
        plan_resources(base, None, {"CPU": 2.0})
    assert plan_resources(base, 3, {"CPU": 2.0})[1] == 3  # --max-concurrent: an autoscaler adds


def stored_sweep(tmp_path, name="tune-resnet20-cpu-seed0", **overrides) -> SweepConfig:
    """A sweep.json as jobs.tune writes it when the CPU profile starts a sweep."""
    base = make_config("fast", epochs=3, subset=4000, val_size=2000, storage=str(tmp_path),
                       name=name, use_gpu=False, cpus_per_worker=1)
    sweep = SweepConfig(base=base, samples=1, profile="cpu", **overrides)
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / SWEEP_FILE).write_text(json.dumps({
        "sweep": sweep.to_dict(), "space": load_space(None, "sgd", "cpu"), "data_key": "k"}))
    return sweep


def flags(tmp_path, **given):
    """jobs.tune's flags as its parser hands them over (None: not given)."""
    train = dict.fromkeys(("epochs", "optimizer", "eval_variants", "data", "model", "subset",
                           "val_size", "seed", "num_workers", "use_gpu", "gpus_per_worker",
                           "cpus_per_worker", "name"))
    sweep = dict.fromkeys(("samples", "target", "scheduler", "grace_period", "max_concurrent",
                           "space", "keras_trial", "gradcam_images", "gradcam_method"))
    train["storage"] = str(tmp_path)
    for key, value in given.items():
        (train if key in train else sweep)[key] = value
    return train, {**sweep, "resume": True}


def test_resume_takes_the_stored_settings_whatever_todays_defaults(tmp_path):
    stored = stored_sweep(tmp_path)
    # No flag but --resume: the default name of the CPU or GPU profile is looked for.
    resumed = make_sweep(*flags(tmp_path))
    assert resumed.base == stored.base and resumed.resume
    assert make_sweep(*flags(tmp_path, name="tune-resnet20-cpu-seed0")).base == stored.base
    assert (resumed.samples, resumed.profile, resumed.scheduler) == (1, "cpu", "asha")
    # Flags equal to the stored values, and the ones a resume may change, are accepted
    # (not --max-concurrent: Tune restores its searcher with the limit it started with).
    again = make_sweep(*flags(tmp_path, epochs=3, subset=4000, cpus_per_worker=2,
                              gradcam_images=0))
    assert (again.base.epochs, again.base.cpus_per_worker, again.gradcam_images) == (3, 2, 0)


@pytest.mark.parametrize("given, named", [
    ({"epochs": 5}, "epochs 3 (now 5)"),
    ({"subset": 500}, "subset 4000 (now 500)"),
    ({"samples": 4}, "samples 1 (now 4)"),
    ({"scheduler": "fifo"}, "scheduler asha (now fifo)"),
    ({"num_workers": 2}, "num_workers 1 (now 2)"),
    ({"seed": 1, "name": "tune-resnet20-cpu-seed0"}, "seed 0 (now 1)"),
    ({"max_concurrent": 2}, "max_concurrent null (now 2: Tune restores"),
])
def test_resume_with_other_settings_is_refused_naming_them(tmp_path, given, named):
    stored_sweep(tmp_path)
    with pytest.raises(UsageError, match="was started with other settings") as info:
        resume_sweep(*flags(tmp_path, **given))
    assert named in str(info.value) and "\n" not in str(info.value)


def test_resume_with_another_space_is_refused_by_content(tmp_path):
    stored_sweep(tmp_path)
    same = tmp_path / "same.json"
    same.write_text("{}")  # lays nothing over the CPU profile's space: the stored one
    assert resume_sweep(*flags(tmp_path, space=str(same))).resume
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"lr": {"grid": [0.1, 0.2]}}))
    with pytest.raises(UsageError, match="space .*is not the one the sweep started with"):
        resume_sweep(*flags(tmp_path, space=str(other)))


def test_resume_with_nothing_to_resume_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="there is no sweep 'tune-resnet20-gpu-seed0' or "
                                         "'tune-resnet20-cpu-seed0' in .* to resume"):
        make_sweep(*flags(tmp_path))
    with pytest.raises(UsageError, match="no sweep 'mine'"):
        make_sweep(*flags(tmp_path, name="mine"))


def test_a_sampled_batch_that_the_workers_cannot_split_is_refused(tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"batch_size": {"choice": [64, 90]}}))
    train, sweep = flags(tmp_path, num_workers=4, space=str(space))
    with pytest.raises(UsageError, match="batch_size=90 is impossible.*divisible by --num-workers"):
        make_sweep(train, {**sweep, "resume": None})  # before Ray starts: no cluster needed
    space.write_text(json.dumps({"batch_size": {"randint": [64, 129]}}))
    with pytest.raises(UsageError, match="4 workers cannot split evenly; use choice or grid"):
        make_sweep(train, {**sweep, "resume": None})


def test_the_profile_follows_the_clusters_gpus_and_flags_win():
    train, sweep = flags("/nowhere")
    train["storage"] = None
    on_gpus = make_sweep(train, {**sweep, "resume": None}, resources=GPU_NODE)
    assert on_gpus.profile == "gpu" and (on_gpus.samples, on_gpus.keras_trial) == (16, True)
    assert (on_gpus.base.epochs, on_gpus.base.subset, on_gpus.base.val_size) == (50, None, 5000)
    assert on_gpus.base.run_name == "tune-resnet20-gpu-seed0" and on_gpus.grace == 10
    # --cpu on a GPU cluster is the CPU profile; given flags win over either profile.
    train.update(use_gpu=False, epochs=4, model="tiny")
    on_cpus = make_sweep(train, {**sweep, "resume": None, "samples": 2}, resources=GPU_NODE)
    assert on_cpus.profile == "cpu" and (on_cpus.samples, on_cpus.base.epochs) == (2, 4)
    assert on_cpus.base.run_name == "tune-tiny-cpu-seed0" and on_cpus.base.subset == 4000
    # --subset all: every training image on the CPU profile too (its own 4000 otherwise).
    train["subset"] = "all"
    full = make_sweep(train, {**sweep, "resume": None}, resources=GPU_NODE)
    assert full.profile == "cpu" and full.base.subset is None and full.base.val_size == 2000


def test_hardware_is_filled_from_the_cluster_and_refused_when_it_cannot_fit():
    from resnet.infra.cluster import resolve_hardware
    config = make_config(num_workers=2)
    resolved = resolve_hardware(config, True, {"CPU": 8.0}, node_cpus=8)
    assert (resolved.use_gpu, resolved.cpus_per_worker) == (False, 4)  # the node's CPUs, shared
    assert resolve_hardware(config, True, {"CPU": 8.0, "GPU": 2.0}, 8).use_gpu is True
    with pytest.raises(UsageError, match="needs 2 GPUs; this machine has 1"):
        resolve_hardware(config.replace(use_gpu=True), True, {"CPU": 8.0, "GPU": 1.0}, 8)
    with pytest.raises(UsageError, match="2 worker\\(s\\) x 3 CPU\\(s\\) do not fit the 4 CPUs"):
        resolve_hardware(config.replace(cpus_per_worker=3), True, {"CPU": 4.0}, 4)
    # A cluster (not embedded) may autoscale: nothing is refused up front.
    assert resolve_hardware(config.replace(cpus_per_worker=3), False, {"CPU": 4.0}, 4)
