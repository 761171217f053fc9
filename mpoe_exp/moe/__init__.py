"""Mixture-of-experts pieces: routers, experts, the MoE FFN layer and helpers over a whole model."""

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
from mpoe_exp.moe.routers import DROPPED, NoisyTopKRouter, Routing, SwitchRouter

__all__ = [
    "DROPPED",
    "EXPERTS",
    "ROUTERS",
    "DenseExperts",
    "FeedForwardSpec",
    "MPOExperts",
    "MoEFeedForward",
    "NoisyTopKRouter",
    "Routing",
    "SwitchRouter",
    "build_moe_layer",
    "central_parameters",
    "collect_aux_loss",
    "moe_layers",
]
