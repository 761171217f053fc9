"""The mixture-of-experts FFN layer: router -> dispatch -> experts, and its construction from a method config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from mpoe_exp import mpo
from mpoe_exp.moe.experts import DenseExperts, FeedForwardSpec, MPOExperts
from mpoe_exp.moe.routers import DROPPED, NoisyTopKRouter, SwitchRouter

# Registries: a new method is a config file naming one of these (or a new entry here plus its small module).
ROUTERS = {"switch": SwitchRouter, "noisy_top_k": NoisyTopKRouter}
EXPERTS = {"dense": DenseExperts, "mpo": MPOExperts}


def feed_forward(
    x: torch.Tensor, spec: FeedForwardSpec, matrices: Mapping, biases: Mapping, act, dropout
) -> torch.Tensor:
    """One expert's FFN on its tokens. x: (n, d); matrices (out, in); biases (out,)."""
    if spec.gated:
        h = act(x @ matrices["wi_0"].t()) * (x @ matrices["wi_1"].t())  # (n, d_ff)
    else:
        h = x @ matrices["wi"].t()
        if "bi" in biases:
            h = h + biases["bi"]
        h = act(h)
    h = dropout(h)
    out = h @ matrices["wo"].t()  # (n, d)
    if "bo" in biases:
        out = out + biases["bo"]
    return out


class MoEFeedForward(nn.Module):
    """Drop-in replacement for a dense FFN: (..., d) -> (..., d). Dropped tokens get 0 (the residual carries them).

    After each forward, `aux_loss` holds the router's weighted auxiliary loss and `expert_counts` the number of
    token choices each expert received (dropped ones excluded), for logging.
    """

    def __init__(self, spec: FeedForwardSpec, router: nn.Module, experts: nn.Module):
        super().__init__()
        self.spec = spec
        self.router = router
        self.experts = experts
        self.act = ACT2FN[spec.activation]
        self.inner_dropout = nn.Dropout(spec.inner_dropout)
        self.output_dropout = nn.Dropout(spec.output_dropout)
        self.aux_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, d)
        routing = self.router(x)
        self.aux_loss = routing.aux_loss
        matrices, biases = self.experts.materialize()
        # unbind (not indexing in a loop): backward stacks the per-expert gradients once
        per_expert_matrices = {n: m.unbind(0) for n, m in matrices.items()}
        per_expert_biases = {n: b.unbind(0) for n, b in biases.items()}

        num_choices = routing.expert_index.shape[1]
        flat_expert = routing.expert_index.reshape(-1)  # (N k,)
        flat_gate = routing.gate.reshape(-1)
        flat_token = torch.arange(x.shape[0], device=x.device).repeat_interleave(num_choices)
        order = torch.argsort(flat_expert, stable=True)  # group choices by expert; dropped (-1) first
        counts = torch.bincount(flat_expert[flat_expert != DROPPED], minlength=self.num_experts)
        self.expert_counts = counts.detach()
        num_dropped = int((flat_expert == DROPPED).sum())

        out = torch.zeros_like(x)
        start = num_dropped
        for e, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            chosen = order[start : start + count]
            start += count
            tokens = flat_token[chosen]
            y = feed_forward(
                x[tokens],
                self.spec,
                {n: m[e] for n, m in per_expert_matrices.items()},
                {n: b[e] for n, b in per_expert_biases.items()},
                self.act,
                self.inner_dropout,
            )
            out = out.index_add(0, tokens, y * flat_gate[chosen, None].to(y.dtype))
        return self.output_dropout(out).reshape(shape)


def build_moe_layer(
    spec: FeedForwardSpec,
    method: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor] | None = None,
    biases: Mapping[str, torch.Tensor] | None = None,
    *,
    device=None,
    dtype=None,
) -> MoEFeedForward:
    """The method's MoE layer, upcycled from dense `weights` {name: (out, in)} or, without them, empty-shaped."""
    if weights is not None:
        device = next(iter(weights.values())).device
    router_cfg = dict(method["router"])
    router_cls = ROUTERS[router_cfg.pop("type")]
    with torch.device(device or "cpu"):
        router = router_cls(spec.d_model, method["num_experts"], **router_cfg)
    expert_kind = method["experts"]
    kwargs: dict[str, Any] = {}
    if expert_kind == "mpo":
        mpo_cfg = method["mpo"]
        overrides = dict(mpo_cfg.get("factorizations") or {})
        kwargs = {
            "factorizations": {
                n: mpo.factorization(*spec.matrix_shape(n), mpo_cfg["num_tensors"], overrides)
                for n in spec.matrix_names
            },
            "max_bond": mpo_cfg.get("max_bond"),
            "share_central": mpo_cfg.get("share_central", True),
        }
    experts_cls = EXPERTS[expert_kind]
    if weights is None:
        experts = experts_cls(spec, method["num_experts"], device=device, dtype=dtype, **kwargs)
    else:
        experts = experts_cls.from_dense(spec, method["num_experts"], dict(weights), dict(biases or {}), **kwargs)
    return MoEFeedForward(spec, router, experts)


def moe_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses of every MoE layer's last forward (None if the model has no MoE layer)."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack([loss.float() for loss in losses]).sum() if losses else None


def central_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every central MPO tensor in the model (what the gradient mask acts on)."""
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, MPOExperts):
            params += m.central_parameters()
    return params
