"""MEO, Merging Experts into One (He et al., EMNLP 2023, arXiv 2310.09832), as an upcycled FFN.

Per FFN matrix there are E expert copies. A noisy top-k router (Shazeer's, zero-initialized, loss
0.01 x (CV^2 importance + CV^2 load)) picks k experts and their softmax gates g; the selected experts' matrices and
biases are merged, W = sum_j g_j W_{e_j}, and the FFN runs once with the merged weights: k experts for about the
cost of one (plus the merge, k |W| multiply-adds per matrix).

- Sequence level (`level: sequence`, default): the router sees the mean of the sequence's hidden states (padding
  excluded: the layer declares `uses_token_mask`, and the model hands it the mask of each call), one merged
  FFN per sequence. In causal stacks (GPT-2, the T5 decoder) the mean would see future tokens, so there token t is
  routed on the mean of tokens 1..t ("causal prefix mean"): training and step-by-step generation then agree, and a
  token's output never depends on later tokens. Tokens of one sequence then have different merged weights, so the
  merge is applied per token, as sum_j g_j (W_{e_j} x) before the activation and sum_j g_j (W_{e_j} h) after it,
  which equals the merged FFN exactly and costs k matmuls per token (a top-k MoE's cost). Generation must then see
  the whole prefix at every step: the layer declares `needs_full_sequence` (moe/kinds.py), and generation then
  runs without the KV cache.
- Token level (`level: token`): every token is routed on x + up(relu(down(x))), a bottleneck d -> d/64 -> d with
  the up-projection zero-initialized (the MEO paper's token-level block, in the adapter form; its exact form is not
  public), merged per token as above.
- Upcycling: every expert starts as a copy of the dense FFN, and the gates sum to 1, so the merged FFN is the dense
  FFN for any routing: the upcycled model equals the dense model at initialization.
- Padding: where a layer routes per token (token level, causal sequence level), padding is routed nowhere, as in
  the MoE layer (its merged FFN is zero, and the router's losses leave it out). Routing telemetry
  (moe/telemetry.py) counts a sequence-level choice once for each real token of its sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mpoe_exp.moe.experts import DenseExperts, FeedForwardSpec
from mpoe_exp.moe.kinds import placement, router_of
from mpoe_exp.moe.layer import Dispatch, RoutedLayer, add_expert_bias, combine, grouped_mm
from mpoe_exp.moe.routers import NoisyTopKRouter, Routing


class Bottleneck(nn.Module):
    """x -> x + up(relu(down(x))), d -> d / reduction -> d, up zero-initialized (identity at the start)."""

    def __init__(self, d_model: int, reduction: int = 64):
        super().__init__()
        self.down = nn.Linear(d_model, max(1, d_model // reduction))
        self.up = nn.Linear(max(1, d_model // reduction), d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


class MergedExpertsFeedForward(RoutedLayer):
    """MEO: the router's k experts merged into one FFN (module docstring). (B, S, d) -> (B, S, d)."""

    def __init__(
        self,
        spec: FeedForwardSpec,
        router: NoisyTopKRouter,
        experts: DenseExperts,
        *,
        level: str = "sequence",
        causal: bool = False,
        bottleneck: Bottleneck | None = None,
    ):
        super().__init__(spec, router, experts)
        if level not in ("sequence", "token"):
            raise ValueError(f"MEO level must be 'sequence' or 'token', got {level!r}")
        self.level, self.causal, self.bottleneck = level, causal, bottleneck
        self.needs_full_sequence = level == "sequence" and causal  # each token routes on its whole prefix
        self.token_mask: torch.Tensor | None = None  # (B, S) token mask of the current call, if any

    @property
    def per_sequence(self) -> bool:
        """One merged FFN per sequence (non-causal sequence level); else one per token."""
        return self.level == "sequence" and not self.causal

    def routing_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, S, d) -> (B, d) per sequence, or (B S, d) per token."""
        if self.level == "token":
            return self.bottleneck(x).reshape(-1, x.shape[-1])
        if self.causal:  # token t: mean of tokens 1..t
            positions = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)
            return (x.cumsum(dim=1) / positions[:, None]).reshape(-1, x.shape[-1])
        mask = self.token_mask
        if mask is None or mask.shape != x.shape[:2]:
            return x.mean(dim=1)
        weights = mask.to(x.dtype)[..., None]  # (B, S, 1)
        return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states if hidden_states.dim() == 3 else hidden_states.reshape(1, -1, shape[-1])  # (B, S, d)
        real = self.real_tokens(x.shape)  # (B S,) or None
        if self.per_sequence:  # one choice per sequence, standing for its real tokens
            routing = self.router(self.routing_inputs(x))
            full = torch.full(x.shape[:1], x.shape[1], device=x.device)
            self.record(routing.expert_index, full if real is None else real.view(x.shape[:2]).sum(1))
        else:  # one choice per token, padding routed nowhere
            routing = self.router.route(self.routing_inputs(x), real)
            self.record(routing.expert_index, real)
        self.aux_loss = routing.aux_loss
        kept = torch.bincount(routing.expert_index.reshape(-1) + 1, minlength=self.num_experts + 1)[1:]  # DROPPED: 0
        self.expert_counts = kept.detach()
        matrices, biases = self.experts.materialize()
        if self.per_sequence:
            out = self._per_sequence(x, routing, matrices, biases)
        else:
            out = self._per_token(x.reshape(-1, shape[-1]), routing, matrices, biases)
        return self.output_dropout(out).reshape(shape)

    def _per_sequence(self, x: torch.Tensor, routing: Routing, matrices: Mapping, biases: Mapping) -> torch.Tensor:
        """One merged FFN per sequence: W_b = sum_j g_bj W_{e_bj}, then x_b W_b^T.

        The merge is one matmul of the (B, E) gate matrix (zero where an expert is not chosen) with the (E, |W|)
        stacked experts: it reads every expert once and writes each merged matrix once, and its backward is two
        such matmuls. (Gathering the chosen experts first copies B k matrices and its backward scatters them back,
        3-5x slower on CPU.) The FFN runs feature-major, W_b x_b^T, so that backward's per-sequence weight
        gradients come out in the experts' (out, in) layout: x_b W_b^T would give them transposed, and copying B
        transposed matrices back cost 10-15% of the layer's time at 32 sequences of 512 tokens on CPU."""
        index, gate = routing.expert_index, routing.gate  # (B, k)
        gates = torch.zeros(index.shape[0], self.num_experts, dtype=gate.dtype, device=gate.device)
        gates = gates.scatter(1, index, gate)  # (B, E): g_bj at e_bj, 0 elsewhere

        def merged(stack: torch.Tensor) -> torch.Tensor:  # (E, ...) -> (B, ...)
            out = gates.to(stack.dtype) @ stack.reshape(stack.shape[0], -1)  # (B, numel)
            return out.view(index.shape[0], *stack.shape[1:])

        def linear(h_t: torch.Tensor, name: str) -> torch.Tensor:  # (B, in, S) -> (B, out, S)
            out = torch.bmm(merged(matrices[name]), h_t)
            bias_name = {"wi": "bi", "wo": "bo"}.get(name)
            return out + merged(biases[bias_name])[:, :, None] if bias_name in biases else out

        x_t = x.transpose(1, 2)  # (B, d, S)
        if self.spec.gated:
            h_t = self.act(linear(x_t, "wi_0")) * linear(x_t, "wi_1")
        else:
            h_t = self.act(linear(x_t, "wi"))
        return linear(self.inner_dropout(h_t), "wo").transpose(1, 2)  # (B, S, d)

    def _per_token(self, x: torch.Tensor, routing: Routing, matrices: Mapping, biases: Mapping) -> torch.Tensor:
        """One merged FFN per token, as gate-weighted sums of the k experts' matmuls (exact, k matmuls a token)."""
        dispatch = Dispatch.from_routing(routing, self.num_experts)

        def merged_linear(h: torch.Tensor, name: str, bias_name: str) -> torch.Tensor:
            rows = h.index_select(0, dispatch.token)  # (M, in), grouped by expert
            out = grouped_mm(rows, matrices[name], dispatch.offsets, dispatch.lazy_counts())
            return combine(add_expert_bias(out, biases.get(bias_name), dispatch), dispatch, h.shape[0])  # (N, out)

        if self.spec.gated:
            h = self.act(merged_linear(x, "wi_0", "")) * merged_linear(x, "wi_1", "")
        else:
            h = self.act(merged_linear(x, "wi", "bi"))
        return merged_linear(self.inner_dropout(h), "wo", "bo")


def build_meo_layer(
    spec: FeedForwardSpec,
    method: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor] | None = None,
    biases: Mapping[str, torch.Tensor] | None = None,
    *,
    causal: bool = False,
    device=None,
    dtype=None,
) -> MergedExpertsFeedForward:
    """Upcycle the dense FFN `weights` {name: (out, in)} into an MEO layer (or build it empty-shaped)."""
    level = method.get("level", "sequence")
    device, dtype = placement(weights, device, dtype)
    if weights is not None:
        experts = DenseExperts.from_dense(spec, method["num_experts"], dict(weights), dict(biases or {}))
    else:
        experts = DenseExperts(spec, method["num_experts"], device=device, dtype=dtype)
    router = router_of(method, spec.d_model, device)
    bottleneck = None
    if level == "token":
        with torch.device(device or "cpu"):
            bottleneck = Bottleneck(spec.d_model, method.get("bottleneck_reduction", 64))
        bottleneck = bottleneck.to(experts.matrices["wo"].dtype)
    return MergedExpertsFeedForward(spec, router, experts, level=level, causal=causal, bottleneck=bottleneck)
