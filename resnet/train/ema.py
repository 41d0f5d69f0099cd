"""An exponential moving average (EMA) of a model's weights and BatchNorm statistics, evaluated
and exported instead of the raw weights.

Same semantics as ``torch.optim.swa_utils.AveragedModel(use_buffers=True)`` with an EMA update:
the first update copies the model, the n-th after it moves the average towards the model by
1 - d, with TensorFlow's warm-up of the decay d = min(decay, (1 + n) / (10 + n)), so a short run
is not stuck near its random initial weights. AveragedModel keeps its counter in a device tensor
and reads it twice per update (two host syncs per step on CUDA) and dispatches a few ops per
tensor; here the counter is a Python int and an update is two fused foreach ops.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``module``: the averaged copy (eval it, save its state_dict); ``n_averaged``: updates so far."""

    def __init__(self, net: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(net).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.n_averaged = 0
        # Pairs (average, source) fixed once: the optimizer updates the source tensors in place.
        pairs = list(zip([*self.module.parameters(), *self.module.buffers()],
                         [*net.parameters(), *net.buffers()], strict=True))
        self._float = [pair for pair in pairs if pair[0].is_floating_point()]
        # BatchNorm's num_batches_tracked: integers are copied, not averaged.
        self._other = [pair for pair in pairs if not pair[0].is_floating_point()]

    def decay_at(self, n: int) -> float:
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update_parameters(self, net: nn.Module | None = None) -> None:
        """One step of the average (``net`` is accepted for AveragedModel's signature; the
        tensors were bound at construction)."""
        averages, sources = ([a for a, _ in self._float], [s for _, s in self._float])
        if self.n_averaged == 0:
            torch._foreach_copy_(averages, sources)
        else:  # average += (1 - d) * (source - average); d is a host float: no sync
            torch._foreach_lerp_(averages, sources, 1.0 - self.decay_at(self.n_averaged))
        if self._other:
            torch._foreach_copy_([a for a, _ in self._other], [s for _, s in self._other])
        self.n_averaged += 1
