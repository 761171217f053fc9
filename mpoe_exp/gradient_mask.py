"""The MPOE gradient mask (paper section 3.2): skip the central tensors' update on a random subset of steps.

Each optimizer step draws b ~ Bernoulli(p_b) from the mask's own generator (seedable, independent of the global
RNG). When b = 1 the central tensors are left out of the step entirely: their gradients are set to None for that
step, so torch's optimizers (AdamW included) neither move them, nor update their moments or step counts, nor
apply weight decay to them. Zeroing the gradient instead would still move them through momentum and weight
decay (SPEC section 1). p_b = 0 is plain training; p_b = 1 freezes the centrals.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class CentralGradientMask:
    """Wraps `optimizer.step()`; use `mask.step(optimizer)` in place of it."""

    def __init__(self, central_parameters: Iterable[torch.nn.Parameter], prob: float, seed: int = 0):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"gradient mask probability must be in [0, 1], got {prob}")
        self.params = list(central_parameters)
        self.prob = float(prob)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.central_updates = 0

    def draw(self) -> bool:
        """One Bernoulli(p_b) draw: True means this step masks the central tensors."""
        return bool(torch.rand((), generator=self.generator) < self.prob)

    def step(self, optimizer: torch.optim.Optimizer, closure=None):
        masked = self.draw() if self.params else False
        self.steps += 1
        if not masked:
            self.central_updates += 1
            return optimizer.step(closure)
        # a closure would recompute the central gradients inside optimizer.step: evaluate it first, then hide them
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            optimizer.step()
            return loss
        finally:
            for p, grad in zip(self.params, saved):
                p.grad = grad

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps": self.steps, "central_updates": self.central_updates}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps, self.central_updates = state["steps"], state["central_updates"]
