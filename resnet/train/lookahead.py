"""Lookahead (Zhang et al. 2019, "Lookahead Optimizer: k steps forward, 1 step back") around any
optimizer: every ``k`` steps the slow weights move ``alpha`` of the way towards the fast ones,
and the fast weights start again from there. Two fused ops every k steps; the slow weights are
part of the checkpoint."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Lookahead:
    def __init__(self, net: nn.Module, k: int, alpha: float) -> None:
        self.params = list(net.parameters())
        self.slow = [p.detach().clone() for p in self.params]
        self.k, self.alpha = k, alpha
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        """Call after each optimizer step."""
        self.steps += 1
        if self.steps % self.k == 0:
            torch._foreach_lerp_(self.slow, self.params, self.alpha)  # slow += a (fast - slow)
            torch._foreach_copy_(self.params, self.slow)

    def state_dict(self) -> dict[str, Any]:
        return {"slow": [t.clone() for t in self.slow], "steps": self.steps}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch._foreach_copy_(self.slow, [t.to(s.device) for t, s in zip(state["slow"], self.slow)])
        self.steps = state["steps"]
