"""The search: a sweep's settings, its search space, the scheduler and search algorithm, one trial
(a ``TorchTrainer`` under Tune), the Tuner run and its results as tables, the winner's schedule."""
