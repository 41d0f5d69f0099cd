"""One training run: the worker loop (``worker.py`` under Ray Train, ``loop.py`` without Ray), its
driver (``driver.py``: the ``TorchTrainer`` and a run's outputs), checkpoints and the export, and the
pieces the loop is made of (schedules, augmentation, EMA, Lookahead)."""
