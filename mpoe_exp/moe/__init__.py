"""Mixture-of-experts pieces: routers, experts, the expert layers and helpers over a whole model.

An expert layer replaces one dense FFN. `LAYERS` maps a method's `layer` key to the function that builds it
(upcycled from the dense weights, or empty-shaped): the routed MoE layer of moe/switch/mpoe, CartesianMoE, MEO.
"""

from mpoe_exp.moe.cartesian import CartesianFeedForward, GroupTop1Router, build_cartesian_layer
from mpoe_exp.moe.experts import DenseExperts, FeedForwardSpec, MPOExperts
from mpoe_exp.moe.layer import (
    EXPERTS,
    ROUTERS,
    MoEFeedForward,
    build_moe_layer,
    central_parameters,
    collect_aux_loss,
    moe_layers,
)
from mpoe_exp.moe.meo import MergedExpertsFeedForward, build_meo_layer, needs_full_sequence
from mpoe_exp.moe.routers import DROPPED, NoisyTopKRouter, Routing, SwitchRouter

LAYERS = {"moe": build_moe_layer, "cartesian": build_cartesian_layer, "meo": build_meo_layer}
EXPERT_LAYERS = (MoEFeedForward, CartesianFeedForward)  # what replaces a dense FFN (MEO is an MoEFeedForward)


def build_layer(spec, method, weights=None, biases=None, *, causal=False, device=None, dtype=None):
    """The expert layer of `method` (its `layer` key, default "moe") for one FFN; `causal`: the FFN sits in a causal
    stack (GPT-2, the T5 decoder), where a layer must not mix information across positions forward."""
    build = LAYERS[method.get("layer", "moe")]
    return build(spec, method, weights, biases, causal=causal, device=device, dtype=dtype)


__all__ = [
    "DROPPED",
    "EXPERTS",
    "EXPERT_LAYERS",
    "LAYERS",
    "ROUTERS",
    "CartesianFeedForward",
    "DenseExperts",
    "FeedForwardSpec",
    "GroupTop1Router",
    "MPOExperts",
    "MergedExpertsFeedForward",
    "MoEFeedForward",
    "NoisyTopKRouter",
    "Routing",
    "SwitchRouter",
    "build_layer",
    "build_moe_layer",
    "central_parameters",
    "collect_aux_loss",
    "moe_layers",
    "needs_full_sequence",
]
