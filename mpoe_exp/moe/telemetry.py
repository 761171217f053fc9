"""Routing telemetry: where a model's routed layers sent the tokens of one pass (a validation evaluation, or the
training forwards between two evaluations: the trainer records both), and how far MPO experts moved from their
upcycled start.

`reset_routing_stats(model)` starts a recording in every routed layer (`RoutedLayer`): each forward then adds its
real tokens' choices to counts kept on the device (no host sync per forward). `routing_stats(model)` ends it and
returns, per layer (its qualified name in the model, in module order):

- `load`: the fraction of the kept (non-padding) token choices routed to each expert (sums to 1; top-k counts k);
- `entropy`: the entropy of `load` in nats (ln E is uniform);
- `dropped`: the fraction of the non-padding token choices dropped by capacity (0 without a capacity limit);
- `aux_drift` (MPO experts built by upcycling only): per expert, ||aux_e - aux_e(start)|| / ||aux_e(start)|| over
  all its auxiliary tensors, the start being the upcycled tensors (`MPOExperts.auxiliary_drift`).

A model without routed layers gives {}, as does a recording in which no layer saw a token. A layer that saw no token
is left out. Padding never counts: routed layers route it nowhere (`Router.route`).

- CartesianMoE: each of its two sub-layers (A and B, `<layer>.a` and `<layer>.b`) is a routed layer and reports on
  its own; their routers choose one expert in each of two groups, so each token counts two choices and each group's
  loads sum to 1/2. The always-active shared sub-experts are not routed and not reported.
- MEO: a sequence-level layer makes one choice per sequence, counted once for each real token of the sequence (its
  merged FFN computes every one of them); a token-level (or causal) one routes each token. No capacity: `dropped`
  is 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mpoe_exp.moe.experts import MPOExperts
from mpoe_exp.moe.layer import RoutedLayer


def _routed_layers(model: nn.Module) -> list[tuple[str, RoutedLayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedLayer)]


def reset_routing_stats(model: nn.Module) -> None:
    """Start recording the routing of every routed layer of `model` from zero."""
    for _, layer in _routed_layers(model):
        device = next(layer.router.parameters()).device
        layer.routing_counts = torch.zeros(layer.num_experts + 1, dtype=torch.float64, device=device)


def routing_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """End the recording `reset_routing_stats` started: {layer name: {load, entropy, dropped[, aux_drift]}}."""
    stats: dict[str, dict[str, Any]] = {}
    for name, layer in _routed_layers(model):
        counts, layer.routing_counts = layer.routing_counts, None
        if counts is None:
            continue
        dropped, kept = counts[0].item(), counts[1:].tolist()
        total = sum(kept)
        if total + dropped == 0:
            continue
        load = [c / total if total else 0.0 for c in kept]
        entry: dict[str, Any] = {
            "load": load,
            "entropy": -sum(p * math.log(p) for p in load if p > 0),
            "dropped": dropped / (total + dropped),
        }
        if isinstance(layer.experts, MPOExperts):
            drift = layer.experts.auxiliary_drift()
            if drift is not None:
                entry["aux_drift"] = drift.tolist()
        stats[name] = entry
    return stats


def routing_summary(routing: dict[str, dict[str, Any]] | None) -> list[str]:
    """One line on the most and least loaded expert over all layers of a `routing_stats` record ([] without one)."""
    if not routing:
        return []
    choices = [(share, expert, name) for name, entry in routing.items() for expert, share in enumerate(entry["load"])]
    most, least = max(choices), min(choices)
    return [
        f"routing: most loaded expert {most[1]} of layer {most[2]} ({most[0]:.0%}), "
        f"least loaded expert {least[1]} of layer {least[2]} ({least[0]:.0%})"
    ]
