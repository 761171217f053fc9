"""CartesianMoE (Su et al. 2024, arXiv 2410.16077) as an upcycled FFN: two expert sub-layers in sequence.

    u = A(z)                      sub-layer A: E half-width experts, its own router and balance loss
    v = B(z + u)                  sub-layer B: the same, fed z plus A's output
    FFN'(z) = u + v               a token's composite expert is a pair (a, b): the Cartesian product A x B

The paper gives no code; every choice here is ours, and documented:

- Width and count. Each sub-layer has `num_experts` sub-experts of width d_ff / 2 (the FFN's function, half its
  hidden units). With two choices per sub-layer, total and active parameters equal a top-2 MoE of `num_experts`
  full experts: E x FFN in all, 2 x FFN per token.
- Routing. The sub-experts of a sub-layer form two groups, one per half of the dense FFN's hidden units (experts
  [0, E/2) from the first half, [E/2, E) from the second). Each sub-layer's router (a linear map, fp32, as
  Switch's) chooses the top-1 sub-expert of each group: k = 2 choices per token and sub-layer, one per half.
  Gates are straight-through (value 1, gradient p / p.detach() reaching the router, as MPOE's reference routing),
  or the in-group softmax probability with `straight_through: false`. Balance loss per sub-layer: Switch's
  alpha * n * sum_e f_e P_e within each group, summed over the groups (`balance_loss_coef`).
- Upcycling (the model equals the dense model at initialization, for any routing): B's sub-experts are the two
  halves of the dense FFN (input projections and biases split by hidden unit, the output projection split by
  column, the output bias halved between the halves), so one sub-expert per half gives exactly the dense FFN;
  A's sub-experts get the same input projections and zero output projections and biases, so u = 0 and B sees z.
- Optional shared sub-experts (`shared_experts: s`): s always-active half-width sub-experts per sub-layer, added to
  the routed output, upcycled like A's (zero output projections), so they start silent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from mpoe_exp.moe.experts import DenseExperts, FeedForwardSpec
from mpoe_exp.moe.kinds import ExpertLayer, placement, router_of
from mpoe_exp.moe.layer import Dispatch, MoEFeedForward, grouped_feed_forward


class SharedExperts(nn.Module):
    """Always-active experts: every token goes through each of them; their outputs are summed."""

    def __init__(self, experts: DenseExperts):
        super().__init__()
        self.experts = experts

    def forward(self, z: torch.Tensor, act, dropout) -> torch.Tensor:
        """z: (N, d) -> (N, d)."""
        dispatch = Dispatch.every_token(z.shape[0], self.experts.num_experts, z.device)
        matrices, biases = self.experts.materialize()
        rows = z.index_select(0, dispatch.token)
        out = grouped_feed_forward(rows, dispatch, self.experts.spec, matrices, biases, act, dropout)
        return out.view(self.experts.num_experts, *z.shape).sum(dim=0)


class CartesianFeedForward(ExpertLayer):
    """A then B, each an MoE layer of half-width sub-experts; output u + v (module docstring)."""

    def __init__(self, a: MoEFeedForward, b: MoEFeedForward, shared_a=None, shared_b=None):
        super().__init__()
        self.a, self.b = a, b
        self.shared_a, self.shared_b = shared_a, shared_b

    def _sublayer(self, layer: MoEFeedForward, shared: SharedExperts | None, z: torch.Tensor) -> torch.Tensor:
        out = layer(z)
        if shared is not None:
            flat = z.reshape(-1, z.shape[-1])
            out = out + layer.output_dropout(shared(flat, layer.act, layer.inner_dropout)).view(z.shape)
        return out

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        u = self._sublayer(self.a, self.shared_a, hidden_states)
        v = self._sublayer(self.b, self.shared_b, hidden_states + u)
        return u + v


def _halves(spec: FeedForwardSpec, weights: Mapping, biases: Mapping) -> list[tuple[dict, dict]]:
    """The dense FFN as two half-width FFNs whose outputs sum to it: split by hidden unit."""
    half = spec.d_ff // 2
    parts = []
    for k in range(2):
        rows = slice(k * half, (k + 1) * half)
        w = {n: (m[:, rows] if n == "wo" else m[rows]) for n, m in weights.items()}
        b = {n: (v / 2 if n == "bo" else v[rows]) for n, v in biases.items()}
        parts.append((w, b))
    return parts


def _experts(spec: FeedForwardSpec, count: int, halves, *, silent: bool, device, dtype) -> DenseExperts:
    """`count` half-width experts, the first half of them from halves[0], the rest from halves[1]; `silent`:
    zero output projection and biases (the expert adds nothing until trained)."""
    experts = DenseExperts(spec, count, device=device, dtype=dtype)
    with torch.no_grad():
        for e in range(count):
            w, b = halves[e * 2 // count] if count > 1 else halves[0]
            for name, matrix in experts.matrices.items():
                matrix[e].copy_(torch.zeros_like(w[name]) if silent and name == "wo" else w[name])
            for name, bias in experts.biases.items():
                bias[e].copy_(torch.zeros_like(b[name]) if silent and name == "bo" else b[name])
    return experts


def build_cartesian_layer(
    spec: FeedForwardSpec,
    method: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor] | None = None,
    biases: Mapping[str, torch.Tensor] | None = None,
    *,
    causal: bool = False,
    device=None,
    dtype=None,
) -> CartesianFeedForward:
    """Upcycle the dense FFN `weights` {name: (out, in)} into a Cartesian layer (or build it empty-shaped)."""
    if spec.d_ff % 2:
        raise ValueError(f"CartesianMoE splits d_ff in halves; d_ff = {spec.d_ff} is odd")
    num_experts = method["num_experts"]
    half_spec = replace(spec, d_ff=spec.d_ff // 2)
    device, dtype = placement(weights, device, dtype)
    halves = _halves(spec, weights, biases or {}) if weights is not None else None

    def experts(count: int, silent: bool) -> DenseExperts:
        if halves is None:
            return DenseExperts(half_spec, count, device=device, dtype=dtype)
        return _experts(half_spec, count, halves, silent=silent, device=device, dtype=dtype)

    def sublayer(silent: bool) -> MoEFeedForward:
        router = router_of(method, spec.d_model, device, groups=2)  # one group per half of the FFN
        return MoEFeedForward(half_spec, router, experts(num_experts, silent))

    shared = method.get("shared_experts", 0)
    shared_a = SharedExperts(experts(shared, silent=True)) if shared else None
    shared_b = SharedExperts(experts(shared, silent=True)) if shared else None
    return CartesianFeedForward(sublayer(silent=True), sublayer(silent=False), shared_a, shared_b)
