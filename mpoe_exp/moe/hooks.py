"""What training needs of an upcycled model, owned by the model.

`upcycle` (models.py) sets `model.training_hooks` to a `MoETrainingHooks`; the trainer reads it (training.py,
`TrainingHooks`) and so names no method, expert kind or layer class. What it gives:

- `aux_loss()`: the sum of the routed layers' auxiliary losses of the last forward (balance, z, importance/load),
  added to the task loss;
- `begin_step()` / `end_step(backward)`: the bounds of one optimizer step of several micro-batches; MPO experts
  contract each expert matrix once per step instead of once per micro-batch (`MPOExperts.begin_step`), and both MPO
  and dense experts add their micro-batches' weight gradients in place into one fp32 sum per matrix;
- `central_parameters()` and `gradient_mask_prob`: what the gradient mask acts on and how often (section 3.3 of
  the paper: MPOE's central tensors, p_b of the method; nothing, 0.0 for other methods);
- `reset_routing_stats()` / `routing_stats()`: the routing telemetry of one evaluation (moe/telemetry.py).

The hooks keep a reference to their model and walk it on each call, so a layer replaced after upcycling (tests do)
is seen, and `copy.deepcopy(model)` gives a copy whose hooks serve the copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpoe_exp.moe.experts import DenseExperts, MPOExperts
from mpoe_exp.moe.layer import MoEFeedForward, central_parameters, collect_aux_loss
from mpoe_exp.moe.telemetry import reset_routing_stats, routing_stats


def mask_probability(method: dict[str, Any]) -> float:
    """p_b of the gradient mask: the method's `gradient_mask_prob` for MPO experts, else 0 (nothing to mask)."""
    return float(method.get("gradient_mask_prob", 0.0)) if method.get("experts") == "mpo" else 0.0


class MoETrainingHooks:
    def __init__(self, model: nn.Module, gradient_mask_prob: float):
        self.model = model
        self.gradient_mask_prob = gradient_mask_prob
        self._in_step: list[MPOExperts] = []

    def aux_loss(self) -> torch.Tensor | None:
        return collect_aux_loss(self.model)

    def central_parameters(self) -> list[nn.Parameter]:
        return central_parameters(self.model)

    def begin_step(self) -> None:
        """MPO experts anywhere; dense experts where an MoEFeedForward runs them (through `layer.grouped_mm`, which
        adds their gradients in place), not where a layer merges or applies them otherwise (MEO, adapters)."""
        mpo = [m for m in self.model.modules() if isinstance(m, MPOExperts)]
        dense = [m.experts for m in self.model.modules() if isinstance(m, MoEFeedForward)]
        self._in_step = mpo + [e for e in dense if isinstance(e, DenseExperts)]
        for experts in self._in_step:
            experts.begin_step()

    def end_step(self, backward: bool = True) -> None:
        """backward=False: the step failed before its backward pass; drop what begin_step kept."""
        in_step, self._in_step = self._in_step, []
        for experts in in_step:
            experts.end_step(backward=backward)

    def reset_routing_stats(self) -> None:
        reset_routing_stats(self.model)

    def routing_stats(self) -> dict[str, dict[str, Any]]:
        return routing_stats(self.model)
