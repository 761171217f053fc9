"""The MPOE gradient mask (paper section 3.2, eq. 4): skip the central tensors' update on a random subset of steps.

Each optimizer step draws b ~ Bernoulli(p_b) from the mask's own generator (seedable, independent of the global
RNG), BEFORE the step's forward passes. When b = 1 the step is the step of a model whose central tensors are
frozen (eq. 4: the central update is multiplied by 1 - b):

- `frozen(masked)` turns the centrals' `requires_grad` off for the step's forward and backward passes, so no central
  gradient is computed at all (and none reaches gradient clipping, which then sees only the applied gradients);
- their gradients are None during the optimizer step, so torch's optimizers (AdamW included) neither move them, nor
  update their moments or step counts, nor apply weight decay to them. Zeroing the gradient instead would still move
  them through momentum and weight decay.

A step that applies nothing (the fp16 GradScaler skips steps with inf/nan gradients) is not counted, and its draw is
kept for the next step (`record(masked, applied=False)`): the updates actually applied follow the Bernoulli sequence
of the seed, whatever the overflows. p_b = 0 is plain training; p_b = 1 freezes the centrals.

`step(optimizer)` is the one-call form for code that has already computed every gradient (the central ones are then
hidden from the optimizer on a masked step; computing them was wasted work).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


class CentralGradientMask:
    """The per-step Bernoulli mask over the central tensors: `draw()` before the forward passes, `frozen(masked)`
    around them and the optimizer step, `record(masked, applied)` after it (or `step(optimizer)` in one call)."""

    def __init__(self, central_parameters: Iterable[torch.nn.Parameter], prob: float, seed: int = 0):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"gradient mask probability must be in [0, 1], got {prob}")
        self.params = list(central_parameters)
        self.prob = float(prob)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0  # optimizer steps applied
        self.central_updates = 0  # of those, the ones that updated the central tensors
        self.pending: bool | None = None  # the draw of the step under way (kept across a skipped step)

    def draw(self) -> bool:
        """b of the coming step (True: the centrals are masked); repeated until `record` says a step was applied."""
        if not self.params:
            return False
        if self.pending is None:
            self.pending = bool(torch.rand((), generator=self.generator) < self.prob)
        return self.pending

    @contextlib.contextmanager
    def frozen(self, masked: bool) -> Iterator[None]:
        """On a masked step: the centrals take no gradient (requires_grad off, gradients None), restored after."""
        if not masked:
            yield
            return
        trainable = [p.requires_grad for p in self.params]
        for p in self.params:
            p.grad = None
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in zip(self.params, trainable):
                p.requires_grad_(flag)

    def record(self, masked: bool, applied: bool = True) -> None:
        """Count the step just taken; a step that applied nothing keeps its draw for the next one."""
        if not applied:
            return
        self.steps += 1
        self.central_updates += not masked
        self.pending = None

    def step(self, optimizer: torch.optim.Optimizer, closure=None):
        """`optimizer.step()` with the centrals left out on a masked step (their gradients are handed back after)."""
        masked = self.draw()
        if not masked:
            self.record(masked)
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
            self.record(masked)
            return loss
        finally:
            for p, grad in zip(self.params, saved):
                p.grad = grad

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "steps": self.steps,
            "central_updates": self.central_updates,
            "pending": self.pending,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps, self.central_updates = state["steps"], state["central_updates"]
        self.pending = state.get("pending")
