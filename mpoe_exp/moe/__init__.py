"""Mixture-of-experts pieces: routers, experts, the expert layers and helpers over a whole model.

An expert layer (`ExpertLayer`) replaces one dense FFN. `LAYER_KINDS` maps a method's `layer` key to its
`LayerKind`: the function that builds it (upcycled from the dense weights, or empty-shaped) and the method keys it
takes (moe/kinds.py). The kinds: the routed MoE layer of moe/switch/mpoe, CartesianMoE, MEO, adapter experts
(moe/adapters.py). A new kind is one module and one line here. Routing telemetry over a model's routed layers:
moe/telemetry.py. What the trainer needs of an upcycled model (aux loss, the per-step contraction, the centrals
for the gradient mask, telemetry) is the model's `training_hooks` (moe/hooks.py).
"""

from typing import Literal

from mpoe_exp.moe.adapters import AdapterFeedForward, TopKRouter, adapter_check, adapter_keys, build_adapter_layer
from mpoe_exp.moe.cartesian import CartesianFeedForward, build_cartesian_layer
from mpoe_exp.moe.experts import DenseExperts, FeedForwardSpec, MPOExperts
from mpoe_exp.moe.hooks import MoETrainingHooks, mask_probability
from mpoe_exp.moe.kinds import (
    LAYER_KINDS,
    ExpertLayer,
    LayerKind,
    build_layer,
    expert_layers,
    hand_token_mask_to_layers,
    needs_full_sequence,
    placement,
    router_of,
)
from mpoe_exp.moe.layer import (
    EXPERTS,
    MoEFeedForward,
    RoutedLayer,
    build_moe_layer,
    central_parameters,
    collect_aux_loss,
    moe_layers,
)
from mpoe_exp.moe.meo import MergedExpertsFeedForward, build_meo_layer
from mpoe_exp.moe.routers import (
    DROPPED,
    ROUTERS,
    GroupTop1Router,
    LinearRouter,
    NoisyTopKRouter,
    Router,
    Routing,
    SwitchRouter,
)
from mpoe_exp.moe.telemetry import reset_routing_stats, routing_stats, routing_summary


def _meo_keys(method) -> dict:
    keys: dict = {"level": Literal["sequence", "token"]}
    if method.get("level") == "token":  # the routing bottleneck exists only for token-level MEO
        keys["bottleneck_reduction"] = int
    return keys


LAYER_KINDS["moe"] = LayerKind(
    build_moe_layer, ("dense", "mpo"), ("switch", "noisy_top_k"), lambda m: {"recompute": bool}
)
LAYER_KINDS["cartesian"] = LayerKind(
    build_cartesian_layer,
    ("dense",),
    ("group_top1",),
    lambda m: {"shared_experts": int},
    fixed_router_keys=("groups",),  # two groups, one per half of the FFN; the router refuses an odd num_experts
)
LAYER_KINDS["meo"] = LayerKind(build_meo_layer, ("dense",), ("noisy_top_k",), _meo_keys)
ROUTERS["switch_top_k"] = TopKRouter  # Switch's router, top-k (moe/adapters.py)
LAYER_KINDS["adapter_moe"] = LayerKind(
    build_adapter_layer, ("dense",), ("switch_top_k",), adapter_keys, check=adapter_check
)

__all__ = [
    "DROPPED",
    "EXPERTS",
    "LAYER_KINDS",
    "ROUTERS",
    "AdapterFeedForward",
    "CartesianFeedForward",
    "DenseExperts",
    "ExpertLayer",
    "FeedForwardSpec",
    "GroupTop1Router",
    "LayerKind",
    "LinearRouter",
    "MPOExperts",
    "MergedExpertsFeedForward",
    "MoEFeedForward",
    "MoETrainingHooks",
    "NoisyTopKRouter",
    "RoutedLayer",
    "Router",
    "Routing",
    "SwitchRouter",
    "TopKRouter",
    "build_layer",
    "build_moe_layer",
    "central_parameters",
    "collect_aux_loss",
    "expert_layers",
    "hand_token_mask_to_layers",
    "mask_probability",
    "moe_layers",
    "needs_full_sequence",
    "placement",
    "reset_routing_stats",
    "router_of",
    "routing_stats",
    "routing_summary",
]
