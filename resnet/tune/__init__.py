"""The search: a sweep's settings, its search space, the scheduler and search algorithm, one trial
(a ``TorchTrainer`` under Tune), the Tuner run and its results as tables, the winner's schedule."""


def trial_dirname(trial) -> str:
    """Short trial folders (Tune's default name spells out every sampled value).

    Defined here, as ``resnet.tune.trial_dirname``: Tune pickles it by that path into every
    experiment's state, including sweeps written before resnet/ had sub-packages (when
    ``resnet.tune`` was the sweep's module), so that they still read and resume.
    """
    return f"trial_{trial.trial_id}"
