"""Adapter experts: the parameter-matched "cheap experts" baseline for MPOE. The upcycled dense FFN is kept whole and
shared by every token; n small bottleneck adapters are the experts, chosen per token by a top-k router and added to
the FFN's output:

    y = FFN(x) + sum_{e in top-k(x)} g_e(x) U_e act(D_e a),    a = FFN(x) (sequential, default) or x (parallel)

with D_e: d -> r and U_e: r -> d. MPOE's experts differ in small auxiliary tensors around one shared central tensor;
these differ in small adapters around one shared FFN: the same budget, spent the now-standard way.

The two reference points:

- PESC (Wu et al. 2024, arXiv 2401.02731, "parameter-efficient sparsity crafting") turns each FFN into an MoE layer
  whose experts all use the one copied FFN and each add their own adapter (a bottleneck d -> r -> d) on the FFN's
  output; a top-2 router on the layer's input (softmax over the two chosen logits), Switch's load-balancing loss.
- MoLoRA (Zadouri et al., ICLR 2024, arXiv 2309.05444) adds to frozen linear maps (attention and FFN) a mixture of
  LoRA experts (linear, rank r, B zero-initialized), merged softly: every expert, weighted by the router's softmax
  over all experts (no top-k, no balance loss).

We follow PESC: its layer is exactly a shared upcycled FFN plus routed adapter experts, and it is sparse (a token pays
for k small experts), as MPOE is. MoLoRA runs every expert for every token, and adapts attention, which no method
here touches. Every choice:

- Where. One adapter bank per FFN, nothing in attention (every method here changes the FFNs only). The adapters read
  the FFN's output (`placement: sequential`, PESC's) or the FFN's input (`placement: parallel`, the parallel adapter
  of He et al. 2022, which reads what every other method's experts read). Their sum is added to the FFN's output
  before the FFN's output dropout (GPT-2's), so the layer is a drop-in FFN. The shared FFN runs on every token,
  padding included, as the dense FFN does; the adapters on the routed (real) tokens only.
- The adapter: down d -> r, the FFN's own activation (T5: relu or gelu_new, GPT-2: gelu_new, BERT: gelu), up r -> d;
  no biases and no scaling factor (PESC and LoRA have no biases; a constant scale on a zero-initialized up projection
  only rescales its learning rate under Adam); no dropout of its own. Down starts as nn.Linear's default (uniform,
  bound 1/sqrt(d)), up at zero: the layer is the dense FFN at initialization for any routing, and up gets gradients
  from the first step.
- The router (`switch_top_k`, `TopKRouter` here): a linear classifier (normal init, std 0.02, zero bias; fp32
  logits under mixed precision, as every router here), softmax, top-k. Default top-1 (MPOE routes top-1, so both
  spend the same routing budget and differ only in how the experts are parameterized); PESC's top-2 is
  `method.router.top_k=2`. Gate: straight-through, value 1 and gradient p / p.detach() reaching the router (as this
  repository's switch and mpoe), `straight_through: false` for the probability p itself, `renormalize: true` to
  divide the k chosen probabilities by their sum (PESC's gate, a softmax over the chosen logits; at top-1 that gate
  is 1 and only the balance loss trains the router). Loss: Switch's alpha n sum_e f_e P_e, alpha = 0.01, f_e the
  fraction of the token choices routed to e (a token's k choices count 1/k each: Switch's loss at k = 1, and 1 at
  uniform routing for every k). No capacity limit and no token dropping (adapters are cheap; MPOE's reference
  routing has none either); padding is routed nowhere (moe/routers.py, `Router.route`).
- What trains: everything, the shared FFN included, as every method here fine-tunes the whole upcycled model (PESC
  tunes its FFN through QLoRA, MoLoRA freezes it). No gradient mask: there is no central tensor.
- The rank: `rank: r`, or `match_params: <method>` (`adapters.yaml`: mpoe), which picks
  r = round((P_method - P_fixed) / (2 n d)): P_method the parameters that method's layer has on the same FFN (built
  empty on the meta device, from conf/method/<method>.yaml as it is), P_fixed the shared FFN's and the router's. Every
  method changes the FFN layers only, so the totals then match within n d parameters per layer (rounding r):
  t5-base r = 241, gpt2 r = 241, minilm r = 139 against mpoe (`dry_run=true` prints both totals). The matched
  method's settings are part of the run's identity (`method.matched`, which the config layer adds:
  mpoe_exp.conf_files.with_matched), so editing its file makes new
  runs rather than reusing finished ones; a checkpoint saved with `match_params` is reloaded with the rank the
  method file gives then.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from mpoe_exp.errors import UserError
from mpoe_exp.moe.experts import DenseExperts, FeedForwardSpec
from mpoe_exp.moe.kinds import build_layer, placement, router_of
from mpoe_exp.moe.layer import Dispatch, RoutedLayer, combine, grouped_mm
from mpoe_exp.moe.routers import LinearRouter, Routing, check_top_k, no_autocast

LAYER = "adapter_moe"  # this kind's name in LAYER_KINDS (moe/__init__.py)


class TopKRouter(LinearRouter):
    """Top-k of a linear router's softmax, gates straight-through (or p, or renormalized over the k chosen), Switch's
    balance loss over the token choices (module docstring)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        top_k: int = 1,
        init_std: float = 0.02,
        balance_loss_coef: float = 0.01,
        straight_through: bool = True,
        renormalize: bool = False,
    ):
        super().__init__(d_model, num_experts, bias=True, init_std=init_std, fp32=True)
        check_top_k(top_k, num_experts)
        self.top_k, self.balance_loss_coef = top_k, balance_loss_coef
        self.straight_through, self.renormalize = straight_through, renormalize

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (N, d) -> Routing with k = top_k."""
        with no_autocast(x):
            logits = self.logits(x, self.routing_dtype(x))
            probs = logits.softmax(dim=-1)  # (N, E)
            top_prob, top_index = probs.topk(self.top_k, dim=-1)  # (N, k)
            if self.renormalize:
                top_prob = top_prob / top_prob.sum(dim=-1, keepdim=True)
            gate = self.gate(top_prob, self.straight_through)
            share = nn.functional.one_hot(top_index, self.num_experts).sum(dim=1) / self.top_k  # (N, E)
            aux = self.balance_loss_coef * self.balance_loss(share, probs)
            return Routing(top_index, gate.to(x.dtype), aux, probs, kept=x.shape[0] * self.top_k)


class AdapterExperts(nn.Module):
    """The shared FFN (`ffn`, one copy) and n bottleneck adapters stacked: `down` (E, r, d), `up` (E, d, r)."""

    def __init__(self, spec: FeedForwardSpec, num_experts: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.spec, self.num_experts, self.rank = spec, num_experts, rank
        self.ffn = DenseExperts(spec, 1, device=device, dtype=dtype)
        self.down = nn.Parameter(torch.empty(num_experts, rank, spec.d_model, device=device, dtype=dtype))
        self.up = nn.Parameter(torch.zeros(num_experts, spec.d_model, rank, device=device, dtype=dtype))
        bound = 1 / math.sqrt(spec.d_model)  # nn.Linear's default for down; up stays zero (the dense FFN at the start)
        nn.init.uniform_(self.down, -bound, bound)

    def shared_parameters(self) -> list[nn.Parameter]:
        """What every expert uses: the FFN."""
        return list(self.ffn.parameters())


class AdapterFeedForward(RoutedLayer):
    """The shared FFN plus the routed adapters' sum (module docstring): (..., d) -> (..., d)."""

    def __init__(self, spec: FeedForwardSpec, router: TopKRouter, experts: AdapterExperts, *, position: str):
        super().__init__(spec, router, experts)
        self.position = position  # "sequential": the adapters read the FFN's output; "parallel": its input

    def shared_ffn(self, x: torch.Tensor) -> torch.Tensor:
        """The upcycled dense FFN on rows x (N, d)."""
        matrices, biases = self.experts.ffn.materialize()

        def linear(h: torch.Tensor, name: str, bias: str) -> torch.Tensor:
            return nn.functional.linear(h, matrices[name][0], biases[bias][0] if bias in biases else None)

        if self.spec.gated:
            h = self.act(linear(x, "wi_0", "")) * linear(x, "wi_1", "")
        else:
            h = self.act(linear(x, "wi", "bi"))
        return linear(self.inner_dropout(h), "wo", "bo")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, d)
        ffn = self.shared_ffn(x)
        real = self.real_tokens(shape)  # padding is routed nowhere
        routing = self.router.route(x, real)
        self.aux_loss = routing.aux_loss
        self.record(routing.expert_index, real)
        dispatch = Dispatch.from_routing(routing, self.num_experts)
        self.expert_counts = dispatch.counts_tensor.detach()
        rows = (ffn if self.position == "sequential" else x).index_select(0, dispatch.token)  # grouped by expert
        h = self.act(grouped_mm(rows, self.experts.down, dispatch.offsets, dispatch.lazy_counts()))  # (M, r)
        y = grouped_mm(h, self.experts.up, dispatch.offsets, dispatch.lazy_counts())  # (M, d)
        out = ffn + combine(y, dispatch, x.shape[0]).to(ffn.dtype)
        return self.output_dropout(out).reshape(shape)


# --- the rank: set, or matched to another method's parameter count ----------------------------------------------


def _matched(method: Mapping[str, Any]) -> dict:
    """The matched method's config, which the config layer adds as `method.matched` (conf_files.with_matched)."""
    if method.get("matched") is None:
        raise UserError(
            f"method.match_params={method['match_params']}: the matched method's config is missing (build the model "
            f"from mpoe_exp.compose_config, or add it as method.matched)"
        )
    return dict(method["matched"])


def _matched_refusal(method: Mapping[str, Any]) -> str | None:
    target, name = _matched(method), method["match_params"]
    if target.get("experts", "none") == "none" or target.get("layer") == LAYER:
        return f"method.match_params={name}: match the parameters of a method with other experts (mpoe, mpoe++, ...)"
    return None


@functools.cache
def _matched_rank(spec: FeedForwardSpec, num_experts: int, name: str, matched: str) -> int:
    """The rank for `name`'s parameter count; `matched` its config as JSON (so that the cache can key on it)."""
    with torch.device("meta"):
        try:
            target = build_layer(spec, json.loads(matched), device="meta")
        except (ValueError, UserError) as err:  # the matched method cannot be built for this FFN (its factorization)
            raise UserError(f"method.match_params={name}: {err}") from None
        router = TopKRouter(spec.d_model, num_experts)
    budget = sum(p.numel() for p in target.parameters())
    shared = sum(math.prod(spec.matrix_shape(n)) for n in spec.matrix_names)
    fixed = shared + sum(spec.bias_size(n) for n in spec.bias_names) + sum(p.numel() for p in router.parameters())
    rank = round((budget - fixed) / (2 * num_experts * spec.d_model))
    if rank < 1:
        raise UserError(
            f"method.match_params={name}: its layer has {budget:,} parameters, too few for the shared FFN and router "
            f"({fixed:,}) plus {num_experts} adapters of rank 1; set method.rank instead"
        )
    return rank


def adapter_rank(spec: FeedForwardSpec, method: Mapping[str, Any]) -> int:
    """The adapters' rank r: `method.rank`, or the one that matches `method.match_params`'s parameter count."""
    if method.get("match_params"):
        matched = json.dumps(_matched(method), sort_keys=True)
        return _matched_rank(spec, method["num_experts"], method["match_params"], matched)
    return method["rank"]


# --- the layer kind -------------------------------------------------------------------------------------------------


def adapter_keys(method: Mapping[str, Any]) -> dict:
    return {"rank": int | None, "match_params": str | None, "placement": Literal["sequential", "parallel"]}


def adapter_check(method: Mapping[str, Any]) -> str | None:
    rank, matched = method.get("rank"), method.get("match_params")
    if rank is not None and matched is not None:
        return (
            f"method.rank={rank} and method.match_params={matched} both pick the adapters' rank; set one of them to "
            f"null (method.match_params=null to set the rank yourself)"
        )
    if rank is None and matched is None:
        return f"method.layer={LAYER} needs the adapters' rank: set method.rank or method.match_params (e.g. mpoe)"
    return _matched_refusal(method) if matched is not None else None


def build_adapter_layer(
    spec: FeedForwardSpec,
    method: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor] | None = None,
    biases: Mapping[str, torch.Tensor] | None = None,
    *,
    causal: bool = False,
    device=None,
    dtype=None,
) -> AdapterFeedForward:
    """Upcycle the dense FFN `weights` {name: (out, in)} into the shared FFN plus adapter experts (or build it
    empty-shaped). Token-level routing never looks across tokens, so `causal` changes nothing here."""
    device, dtype = placement(weights, device, dtype)
    experts = AdapterExperts(spec, method["num_experts"], adapter_rank(spec, method), device=device, dtype=dtype)
    if weights is not None:
        experts.ffn = DenseExperts.from_dense(spec, 1, dict(weights), dict(biases or {}))
    router = router_of(method, spec.d_model, device)
    return AdapterFeedForward(spec, router, experts, position=method.get("placement", "sequential"))
