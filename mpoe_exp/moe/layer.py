"""The mixture-of-experts FFN layer: router -> dispatch -> experts, and its construction from a method config."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from transformers.activations import ACT2FN

from mpoe_exp import mpo
from mpoe_exp.errors import UserError
from mpoe_exp.moe.experts import GRADIENT_IN_PLACE, DenseExperts, FeedForwardSpec, MPOExperts, accumulates_in_place
from mpoe_exp.moe.kinds import ExpertLayer, placement, router_of
from mpoe_exp.moe.routers import DROPPED, ROUTERS, Routing
from mpoe_exp.registry import Registry

# method.experts -> the experts' class (ROUTERS, in routers.py, maps method.router.type to its router)
EXPERTS = Registry("expert kind (method.experts)", {"dense": DenseExperts, "mpo": MPOExperts})
__all__ = [
    "EXPERTS",
    "ROUTERS",
    "Dispatch",
    "MoEFeedForward",
    "RoutedLayer",
    "build_moe_layer",
    "combine",
    "grouped_mm",
]


def _has_grouped_mm(rows: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch.nn.functional.grouped_mm takes these operands (its kernels want 16-byte aligned rows)."""
    if any(n * rows.element_size() % 16 for n in weight.shape[1:]):
        return False
    if rows.device.type == "cpu":
        return rows.dtype in (torch.float32, torch.bfloat16, torch.float16)
    cuda = rows.device.type == "cuda" and rows.dtype == torch.bfloat16
    return cuda and torch.cuda.get_device_capability(rows.device)[0] >= 8


Counts = list[int] | Callable[[], list[int]]  # rows per expert, or how to read them back (Dispatch.lazy_counts)


def resolved(counts: Counts) -> list[int]:
    return counts() if callable(counts) else counts


def grouped_mm(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: Counts) -> torch.Tensor:
    """rows (M, in) grouped by expert, weight (E, out, in) -> (M, out): each expert's rows times its weight^T.

    One `torch.nn.functional.grouped_mm` where PyTorch has it for these inputs (CPU in fp32/bf16/fp16; CUDA in
    bf16 on sm80+), which reads the groups off `offsets` on the device; else one matmul per expert over
    `weight.unbind(0)` (backward stacks the weight gradient once), which needs `counts` on the host.
    """
    device = rows.device.type
    if torch.is_autocast_enabled(device):  # grouped_mm is not on autocast's lists: cast as matmul would be
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = torch.promote_types(rows.dtype, weight.dtype)
    if weight.dtype == dtype and accumulates_in_place(weight) and torch.is_grad_enabled():
        return _GradientInPlace.apply(rows.to(dtype), weight, offsets, counts)
    rows, weight = rows.to(dtype), weight.to(dtype)
    out = _grouped_product(rows, weight, offsets, counts)
    if out.requires_grad and _has_grouped_mm(rows, weight):  # its CPU backward refuses stride-0 gradients (.sum())
        out.register_hook(lambda grad: grad.contiguous())
    return out


def _grouped_product(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, counts: Counts):
    if _has_grouped_mm(rows, weight):
        return torch.nn.functional.grouped_mm(rows, weight.transpose(1, 2), offs=offsets)
    return torch.cat([chunk @ w.t() for chunk, w in zip(rows.split(resolved(counts)), weight.unbind(0))])


class _GradientInPlace(torch.autograd.Function):
    """`grouped_mm` whose backward adds each expert's weight gradient (grad_e^T @ rows_e) into the weight's gradient
    sum (`experts.accumulate_in_place`) in place and returns none for the weight. Autograd would instead allocate the
    whole (E, out, in) gradient of every micro-batch and then add it to .grad: the traffic of 2 E full matrices per
    matrix and micro-batch, into memory that on CPU is fresh, page-faulted anew each time. For the experts'
    `begin_step` leaves (MPO and dense experts), whose sum collects an optimizer step's micro-batches. The sum is fp32
    under bf16/fp16 autocast, and so are the products added to it (rows and gradient cast once per call); the first
    backward allocates it and writes its products over it (no pass of zeros first)."""

    @staticmethod
    def forward(ctx, rows, weight, offsets, counts):
        ctx.save_for_backward(rows, offsets)
        ctx.weight, ctx.counts = weight, counts  # a leaf: kept as itself, .grad included (a saved copy has none)
        return _grouped_product(rows, weight, offsets, counts)

    @staticmethod
    def backward(ctx, grad):
        (rows, offsets), weight = ctx.saved_tensors, ctx.weight
        grad = grad.contiguous()
        grad_rows = None
        if ctx.needs_input_grad[0]:  # grad (M, out) times each expert's (out, in)
            grad_rows = _grouped_product(grad, weight.transpose(1, 2), offsets, ctx.counts)
        marked, counts = getattr(weight, GRADIENT_IN_PLACE), resolved(ctx.counts)
        first = marked.total is None
        total = marked.start(weight) if first else marked.total
        wide_grad, wide_rows = grad.to(total.dtype), rows.to(total.dtype)  # no copy when the dtypes agree
        for total_e, grad_e, rows_e in zip(total, wide_grad.split(counts), wide_rows.split(counts)):
            if rows_e.shape[0]:
                total_e.addmm_(grad_e.t(), rows_e, beta=0 if first else 1)  # beta 0: the empty memory is ignored
            elif first:
                total_e.zero_()
        return grad_rows, None, None, None


def grouped_feed_forward(
    rows: torch.Tensor, dispatch: Dispatch, spec: FeedForwardSpec, matrices: Mapping, biases: Mapping, act, dropout
) -> torch.Tensor:
    """Every expert's FFN on its rows (grouped by expert). matrices {name: (E, out, in)}; biases {name: (E, out)},
    or (out,) when all experts share it."""

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        return grouped_mm(x, matrices[name], dispatch.offsets, dispatch.lazy_counts())

    if spec.gated:
        h = act(linear(rows, "wi_0")) * linear(rows, "wi_1")  # (M, d_ff)
    else:
        h = act(add_expert_bias(linear(rows, "wi"), biases.get("bi"), dispatch))
    return add_expert_bias(linear(dropout(h), "wo"), biases.get("bo"), dispatch)  # (M, d)


def add_expert_bias(h: torch.Tensor, bias: torch.Tensor | None, dispatch: Dispatch) -> torch.Tensor:
    """h (M, out), rows grouped by expert, plus each row's expert's bias: bias (E, out), or (out,) when every expert
    shares it; None adds nothing. The bias is cast to h's dtype, as a Linear's under autocast."""
    if bias is None:
        return h
    bias = bias.to(h.dtype)
    if bias.dim() == 1:
        return h + bias
    return h + bias.repeat_interleave(dispatch.counts_tensor, dim=0, output_size=h.shape[0])


@dataclass
class Dispatch:
    """Token choices grouped by expert (dropped ones left out): which token each row is, its gate, group sizes.

    The rows per expert live on the device (`counts_tensor`, `offsets`); `counts`, the same as a list, is read back
    only where it is used (the per-expert loop, the in-place gradient sum), once per dispatch: grouped matmuls take
    the offsets, so a router without a capacity limit dispatches with no host sync at all."""

    token: torch.Tensor  # (M,) index into the layer's tokens
    gate: torch.Tensor  # (M,)
    counts_tensor: torch.Tensor  # (E,) long on the device: rows per expert
    offsets: torch.Tensor  # (E,) int32: end of each expert's rows (grouped_mm's `offs`)
    known_counts: list[int] | None = None  # `counts` where the host has it already
    choices: int = 1  # rows a token can have (k of top-k): at 1, combining is a scatter, not a sum

    @property
    def counts(self) -> list[int]:
        """Rows per expert, on the host (one device-to-host read, the first time)."""
        if self.known_counts is None:
            self.known_counts = self.counts_tensor.tolist()
        return self.known_counts

    def lazy_counts(self) -> list[int] | Callable[[], list[int]]:
        """`counts` for grouped_mm: the list where known, else how to read it if needed."""
        return self.known_counts if self.known_counts is not None else (lambda: self.counts)

    @classmethod
    def every_token(cls, num_tokens: int, num_experts: int, device) -> Dispatch:
        """Every token to every expert, gate 1 (shared experts)."""
        counts_tensor = torch.full((num_experts,), num_tokens, device=device)
        return cls(
            token=torch.arange(num_tokens, device=device).repeat(num_experts),
            gate=torch.ones(num_tokens * num_experts, device=device),
            counts_tensor=counts_tensor,
            offsets=counts_tensor.cumsum(0).to(torch.int32),
            known_counts=[num_tokens] * num_experts,
            choices=num_experts,
        )

    @classmethod
    def from_routing(cls, routing: Routing, num_experts: int) -> Dispatch:
        """At most one host sync: reading the rows per expert back, only where the router cannot say how many
        choices it kept (a capacity limit)."""
        num_choices = routing.expert_index.shape[1]
        flat_expert = routing.expert_index.reshape(-1)  # (N k,)
        order = torch.argsort(flat_expert, stable=True)  # grouped by expert; dropped (-1) first
        counts_tensor = torch.bincount(flat_expert - DROPPED, minlength=num_experts + 1)[1:]  # dropped: bin 0
        known_counts = None if routing.kept is not None else counts_tensor.tolist()
        num_kept = routing.kept if routing.kept is not None else sum(known_counts)
        kept = order[flat_expert.numel() - num_kept :]
        return cls(
            token=torch.div(kept, num_choices, rounding_mode="floor"),
            gate=routing.gate.reshape(-1)[kept],
            counts_tensor=counts_tensor,
            offsets=counts_tensor.cumsum(0).to(torch.int32),
            known_counts=known_counts,
            choices=num_choices,
        )


def combine(rows: torch.Tensor, dispatch: Dispatch, num_tokens: int) -> torch.Tensor:
    """Each token's sum of gate x its experts' rows: rows (M, d) grouped by expert -> (num_tokens, d).

    Summed in the wider dtype of rows and gates (fp32 under autocast, where the gates are fp32 and the rows are
    the autocast dtype), returned in the rows' dtype: what a dense FFN returns, the autocast dtype under autocast.
    Dropped tokens get 0 (the residual carries them).
    """
    dtype = torch.promote_types(rows.dtype, dispatch.gate.dtype)
    weighted = rows.to(dtype) * dispatch.gate[:, None].to(dtype)
    if dispatch.choices == 1:  # each token has at most one row: a scatter (no atomic adds on a GPU), same values
        weighted = weighted.to(rows.dtype)
        return weighted.new_zeros(num_tokens, rows.shape[1]).index_copy(0, dispatch.token, weighted)
    out = weighted.new_zeros(num_tokens, rows.shape[1]).index_add(0, dispatch.token, weighted)
    return out.to(rows.dtype)


class RoutedLayer(ExpertLayer):
    """An expert layer made of one router and one set of experts computing the FFN `spec` (the MoE layer, MEO).
    After each forward, `aux_loss` holds the router's weighted auxiliary loss and `expert_counts` the number of
    token choices each expert received (dropped ones and padding excluded), for logging. It takes the token mask
    of each call (`uses_token_mask`): padding is routed nowhere. While `routing_counts` is a tensor (moe/telemetry.py
    starts and ends a recording), each forward adds its real tokens' choices to it, on the device: (E + 1,), the
    choices dropped by capacity first, then those kept per expert."""

    uses_token_mask = True

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
        self.routing_counts: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def record(self, expert_index: torch.Tensor, weight: torch.Tensor | None) -> None:
        """Add a forward's choices to `routing_counts` while it records: expert_index (T, k), DROPPED where dropped;
        weight (T,) the real tokens each row stands for (0 for padding), None for 1 each. No host sync."""
        if self.routing_counts is None:
            return
        choices = expert_index.detach().reshape(-1) + 1  # DROPPED -> 0
        if weight is None:
            weight = torch.ones((), device=choices.device).expand(expert_index.shape[0])
        weight = weight.detach().to(self.routing_counts.dtype).repeat_interleave(expert_index.shape[1])
        self.routing_counts.index_add_(0, choices, weight)


class MoEFeedForward(RoutedLayer):
    """Drop-in replacement for a dense FFN: (..., d) -> (..., d). Dropped tokens and padding get 0 (the residual
    carries them).

    Dispatch: the kept token choices are sorted by expert, gathered once into one (M, d) block, run through every
    expert's FFN as grouped matmuls, scaled by their gates and added back to their tokens once.
    """

    def __init__(self, spec: FeedForwardSpec, router: nn.Module, experts: nn.Module, recompute: bool = False):
        super().__init__(spec, router, experts)
        self.recompute = recompute  # True: backward recomputes the experts' matrices and FFN instead of storing them

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, d)
        real = self.real_tokens(shape)  # (N,) or None: padding is routed nowhere
        routing = self.router.route(x, real)
        self.aux_loss = routing.aux_loss
        self.record(routing.expert_index, real)
        dispatch = Dispatch.from_routing(routing, self.num_experts)
        self.expert_counts = dispatch.counts_tensor.detach()
        rows = x.index_select(0, dispatch.token)  # (M, d), grouped by expert

        def experts_ffn(rows: torch.Tensor) -> torch.Tensor:
            matrices, biases = self.experts.materialize()
            return grouped_feed_forward(rows, dispatch, self.spec, matrices, biases, self.act, self.inner_dropout)

        # recompute: rebuild the expert matrices in backward instead of storing them; nothing to rebuild while the
        # experts hold this optimizer step's matrices (MPOExperts.begin_step), where it would only redo the FFN
        if self.recompute and torch.is_grad_enabled() and not getattr(self.experts, "holds_step_matrices", False):
            y = torch.utils.checkpoint.checkpoint(experts_ffn, rows, use_reentrant=False)
        else:
            y = experts_ffn(rows)
        out = combine(y, dispatch, x.shape[0])
        return self.output_dropout(out).reshape(shape)


def build_moe_layer(
    spec: FeedForwardSpec,
    method: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor] | None = None,
    biases: Mapping[str, torch.Tensor] | None = None,
    *,
    causal: bool = False,
    device=None,
    dtype=None,
) -> MoEFeedForward:
    """The method's MoE layer, upcycled from dense `weights` {name: (out, in)} or, without them, empty-shaped.
    (Token-level routing never looks across tokens, so `causal` changes nothing here.)"""
    device, dtype = placement(weights, device, dtype)
    router = router_of(method, spec.d_model, device)
    expert_kind = method["experts"]
    kwargs: dict[str, Any] = {}
    if expert_kind == "mpo":
        mpo_cfg = method["mpo"]
        kwargs = {
            "factorizations": factorizations(spec, mpo_cfg),
            "max_bond": mpo_cfg.get("max_bond"),
            "share_central": mpo_cfg.get("share_central", True),
            "cache_in_eval": mpo_cfg.get("cache_in_eval", True),
        }
    experts_cls = EXPERTS[expert_kind]
    if weights is None:
        experts = experts_cls(spec, method["num_experts"], device=device, dtype=dtype, **kwargs)
    else:
        experts = experts_cls.from_dense(spec, method["num_experts"], dict(weights), dict(biases or {}), **kwargs)
    return MoEFeedForward(spec, router, experts, recompute=method.get("recompute", False))


def factorizations(spec: FeedForwardSpec, mpo_cfg: Mapping[str, Any]) -> dict[str, tuple]:
    """{matrix name: (row factors, col factors)} of `method.mpo` for each matrix of the FFN; a UserError naming the
    key when m or a given factorization does not fit."""
    overrides = dict(mpo_cfg.get("factorizations") or {})
    m = mpo_cfg["num_tensors"]
    try:
        return {n: mpo.factorization(*spec.matrix_shape(n), m, overrides) for n in spec.matrix_names}
    except ValueError as err:
        raise UserError(f"method.mpo.num_tensors={m}: {err}") from None


def moe_layers(model: nn.Module) -> list[RoutedLayer]:
    """Every router-and-experts layer of the model (a Cartesian layer's two sub-layers count as two)."""
    return [m for m in model.modules() if isinstance(m, RoutedLayer)]


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
