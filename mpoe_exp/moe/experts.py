"""Experts: the parameters of E feed-forward networks, handed to dispatch as per-expert matrices.

Every expert is the same FFN function (see `FeedForwardSpec`) with its own matrices:

- `DenseExperts`: E full copies of each matrix, stored stacked as (E, out, in) Parameters.
- `MPOExperts`: each matrix of each expert is an MPO (`mpoe_exp.mpo`); the central tensor is ONE Parameter per
  matrix shared by all experts (MPOE), or one per expert (`share_central=False`, the "w/o PS" ablation), and
  each expert owns its auxiliary tensors, stored stacked over experts as (E, r, i, j, r').
  Biases (GPT-2's Conv1D has them) are shared by all experts like the central tensor; this matches the
  reference code's parameter count (GPT-2 MPOE n = 8 -> 160.0M; docs/method.md, 'Parameter counts').

Both are built either from the dense FFN's weights (upcycling: every expert starts equal to the dense FFN) or
from shapes alone (`empty`: for the meta-device dry run and for loading a checkpoint).

Upcycled MPO experts keep the auxiliary tensors they started from (one copy: every expert starts from the same
ones), for the routing telemetry's drift of each expert from its start (`auxiliary_drift`). The copy is a plain
attribute, not a buffer: no parameter, not in the state dict (checkpoints keep their keys, and older ones load),
never broadcast by DistributedDataParallel. A run resumed from a checkpoint builds its model by upcycling the same
backbone again before loading the weights, so the copy is the run's upcycled start there too; experts built empty
(`load_model`) have none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mpoe_exp import mpo

# The attribute of a matrix whose weight gradient the experts' grouped matmul adds in place into a sum (the experts'
# `begin_step` leaves, for an optimizer step of several micro-batches): a `_GradientSum`.
GRADIENT_IN_PLACE = "gradient_in_place"


class _GradientSum:
    """The in-place gradient sum of a marked matrix: allocated by the first backward that adds to it (`start`), so a
    matrix no backward reached has none, as a parameter without gradient has .grad None."""

    def __init__(self, dtype: torch.dtype):
        self.dtype, self.total = dtype, None

    def start(self, like: torch.Tensor) -> torch.Tensor:
        """The sum, uninitialized: its first addition overwrites (`addmm_(beta=0)`), saving a pass of zeros."""
        self.total = torch.empty_like(like, dtype=self.dtype, memory_format=torch.contiguous_format)
        return self.total


def accumulate_in_place(leaf: torch.Tensor) -> None:
    """Mark the matrix stack `leaf` (E, out, in) so that `layer.grouped_mm` adds its weight gradients in place into
    a sum (`gradient_sum`): in fp32 at least, so that the micro-batches of a bf16 or fp16 step are summed as an fp32
    optimizer step sums them, not rounded to 8 or 11 bits at every addition."""
    setattr(leaf, GRADIENT_IN_PLACE, _GradientSum(torch.promote_types(leaf.dtype, torch.float32)))


def accumulates_in_place(leaf: torch.Tensor) -> bool:
    return hasattr(leaf, GRADIENT_IN_PLACE)


def gradient_sum(leaf: torch.Tensor) -> torch.Tensor | None:
    """The in-place gradient sum of a matrix marked by `accumulate_in_place`; None while no backward has added to it
    (or when the matrix is not marked)."""
    marked = getattr(leaf, GRADIENT_IN_PLACE, None)
    return None if marked is None else marked.total


def step_leaf(weight: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` for one optimizer step's forwards, detached, its gradients added in place: in the autocast
    dtype under autocast (as the forward would cast it), else the weight itself detached (no copy)."""
    device = weight.device.type
    if torch.is_autocast_enabled(device) and weight.is_floating_point():
        weight = weight.to(torch.get_autocast_dtype(device))
    leaf = weight.detach().requires_grad_()
    accumulate_in_place(leaf)
    return leaf


def add_gradient(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.grad += grad (cast to the parameter's dtype), or = grad where it has none (no copy when they agree)."""
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad
    else:
        param.grad.add_(grad)


@dataclass(frozen=True)
class FeedForwardSpec:
    """The dense FFN function every expert computes, read off the backbone.

    gated=False: out = W_o drop(act(W_i x + b_i)) + b_o
    gated=True:  out = W_o drop(act(W_i0 x) * (W_i1 x))               (T5 v1.1)
    Matrices are (out_features, in_features), as nn.Linear stores them.
    """

    d_model: int
    d_ff: int
    activation: str
    gated: bool = False
    bias: bool = False
    inner_dropout: float = 0.0  # after the activation (T5)
    output_dropout: float = 0.0  # after the output projection (GPT-2)

    @property
    def matrix_names(self) -> tuple[str, ...]:
        return ("wi_0", "wi_1", "wo") if self.gated else ("wi", "wo")

    def matrix_shape(self, name: str) -> tuple[int, int]:
        return (self.d_model, self.d_ff) if name == "wo" else (self.d_ff, self.d_model)

    @property
    def bias_names(self) -> tuple[str, ...]:
        return ("bi", "bo") if self.bias else ()

    def bias_size(self, name: str) -> int:
        return self.d_model if name == "bo" else self.d_ff


class DenseExperts(nn.Module):
    """E independent copies of every FFN matrix: (E, out, in) per matrix, (E, out) per bias."""

    def __init__(self, spec: FeedForwardSpec, num_experts: int, device=None, dtype=None):
        super().__init__()
        self.spec, self.num_experts = spec, num_experts
        kw = {"device": device, "dtype": dtype}
        self.matrices = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(num_experts, *spec.matrix_shape(n), **kw)) for n in spec.matrix_names}
        )
        self.biases = nn.ParameterDict(
            {n: nn.Parameter(torch.empty(num_experts, spec.bias_size(n), **kw)) for n in spec.bias_names}
        )
        self._step: dict[str, torch.Tensor] | None = None  # begin_step..end_step: {name: this step's leaf}

    @classmethod
    def from_dense(cls, spec: FeedForwardSpec, num_experts: int, weights: dict, biases: dict) -> DenseExperts:
        """Every expert a copy of the dense FFN."""
        any_weight = next(iter(weights.values()))
        experts = cls(spec, num_experts, device=any_weight.device, dtype=any_weight.dtype)
        with torch.no_grad():
            for name, w in weights.items():
                experts.matrices[name].copy_(w.expand(num_experts, *w.shape))
            for name, b in biases.items():
                experts.biases[name].copy_(b.expand(num_experts, *b.shape))
        return experts

    def materialize(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Matrices {name: (E, out, in)} and biases {name: (E, out)}, one per expert (between begin_step and end_step,
        with autograd: the step's leaves in place of the trainable matrices)."""
        matrices = dict(self.matrices)
        if self._step is not None and torch.is_grad_enabled():
            matrices.update(self._step)
        return matrices, dict(self.biases)

    def begin_step(self) -> None:
        """For an optimizer step of several micro-batches: the forwards get one leaf per trainable matrix
        (`step_leaf`: cast once per step to the autocast dtype, not once per call), whose weight gradients the
        grouped matmuls add in place into an fp32 sum (`layer.grouped_mm`); `end_step` adds the sums to .grad.
        Autograd would instead allocate each micro-batch's (E, out, in) weight gradient and then add it to .grad.
        Only for a consumer whose products go through `layer.grouped_mm` (MoEFeedForward; moe/hooks.py): a gradient
        that reaches a leaf by plain autograd is kept too, but summed in the leaf's dtype."""
        self._step = {n: step_leaf(w) for n, w in self.matrices.items() if w.requires_grad}

    def end_step(self, backward: bool = True) -> None:
        """Add the step's gradient sums to the matrices' .grad (`backward=False`: drop them, after a failed step). A
        matrix no backward reached keeps .grad as it was, None after `zero_grad`."""
        leaves, self._step = self._step or {}, None
        if not backward:
            return
        for name, leaf in leaves.items():
            total = gradient_sum(leaf)
            if leaf.grad is not None:  # reached by plain autograd (outside grouped_mm)
                total = leaf.grad.to(total.dtype) if total is None else total.add_(leaf.grad)
            if total is not None:
                add_gradient(self.matrices[name], total)

    @property
    def holds_step_matrices(self) -> bool:
        """Whether `materialize` hands out this optimizer step's leaves (begin_step..end_step)."""
        return self._step is not None

    def shared_parameters(self) -> list[nn.Parameter]:
        return []


class MPOExperts(nn.Module):
    """E experts whose matrices are MPOs sharing one central tensor per matrix (or not, for the ablation)."""

    def __init__(
        self,
        spec: FeedForwardSpec,
        num_experts: int,
        factorizations: dict[str, tuple[tuple[int, ...], tuple[int, ...]]],
        *,
        max_bond: int | None = None,
        share_central: bool = True,
        cache_in_eval: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.spec, self.num_experts, self.share_central = spec, num_experts, share_central
        self.cache_in_eval = cache_in_eval
        self._cache: tuple[tuple, dict[str, torch.Tensor]] | None = None  # (parameter versions, matrices)
        self._step: tuple[tuple, dict[str, torch.Tensor]] | None = None  # (autocast of begin_step, leaves)
        self.factorizations = {n: (tuple(r), tuple(c)) for n, (r, c) in factorizations.items()}
        self.max_bond = max_bond
        kw = {"device": device, "dtype": dtype}
        self.central = nn.ParameterDict()
        self.auxiliary = nn.ModuleDict()
        for name in spec.matrix_names:
            row_shape, col_shape = self.factorizations[name]
            mpo.check_shapes(spec.matrix_shape(name), row_shape, col_shape)
            shapes = mpo.tensor_shapes(row_shape, col_shape, max_bond)
            centre = len(shapes) // 2
            central_shape = shapes[centre] if share_central else (num_experts, *shapes[centre])
            self.central[name] = nn.Parameter(torch.empty(central_shape, **kw))
            self.auxiliary[name] = nn.ParameterList(
                [nn.Parameter(torch.empty(num_experts, *s, **kw)) for k, s in enumerate(shapes) if k != centre]
            )
        self.biases = nn.ParameterDict({n: nn.Parameter(torch.empty(spec.bias_size(n), **kw)) for n in spec.bias_names})
        self.auxiliary_start: dict[str, list[torch.Tensor]] | None = None  # upcycled: every expert's start

    @classmethod
    def from_dense(
        cls,
        spec: FeedForwardSpec,
        num_experts: int,
        weights: dict,
        biases: dict,
        factorizations: dict,
        *,
        max_bond: int | None = None,
        share_central: bool = True,
        cache_in_eval: bool = True,
    ) -> MPOExperts:
        """Decompose each dense matrix once; every expert gets the same auxiliary tensors (upcycling)."""
        any_weight = next(iter(weights.values()))
        experts = cls(
            spec,
            num_experts,
            factorizations,
            max_bond=max_bond,
            share_central=share_central,
            cache_in_eval=cache_in_eval,
            device=any_weight.device,
            dtype=any_weight.dtype,
        )
        with torch.no_grad():
            for name, w in weights.items():
                # decompose in float64: float32 LAPACK SVDs of the wide first unfolding lose ~1e-3 per entry
                decomposition = mpo.decompose(w.double(), *experts.factorizations[name], max_bond=max_bond)
                central = decomposition.central
                experts.central[name].copy_(central if share_central else central.expand(num_experts, *central.shape))
                for param, tensor in zip(experts.auxiliary[name], decomposition.auxiliary):
                    param.copy_(tensor.expand(num_experts, *tensor.shape))
            for name, b in biases.items():
                experts.biases[name].copy_(b)
        experts.auxiliary_start = {n: [p[0].detach().clone() for p in aux] for n, aux in experts.auxiliary.items()}
        return experts

    def auxiliary_drift(self) -> torch.Tensor | None:
        """(E,): per expert, ||aux_e - aux_e(start)|| / ||aux_e(start)||, the norms over all its auxiliary tensors
        (every matrix), from the upcycled start; None for experts not built by upcycling."""
        if self.auxiliary_start is None:
            return None
        change, start_norm = 0.0, 0.0
        with torch.no_grad():
            for name, starts in self.auxiliary_start.items():
                for param, start in zip(self.auxiliary[name], starts):
                    start = start.to(param.device, torch.float32)
                    change = change + (param.float() - start).pow(2).flatten(1).sum(1)
                    start_norm = start_norm + start.pow(2).sum()
        return (change / start_norm).sqrt()

    def local_tensors(self, name: str) -> list[torch.Tensor]:
        """The m tensors of matrix `name` in order: auxiliary (E, ...) with the central in the middle."""
        aux = list(self.auxiliary[name])
        centre = (len(aux) + 1) // 2
        return aux[:centre] + [self.central[name]] + aux[centre:]

    def materialize(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Contract every expert's matrices: {name: (E, out, in)}; biases {name: (out,)}, shared by all experts.

        Without autograd (evaluation, generation) the matrices are cached, keyed by the version counters of the
        local tensors, which every in-place change (optimizer step, load_state_dict) bumps: they are contracted
        once per set of weights and then cost nothing, as a Switch layer's stored matrices. With autograd the cache
        is dropped, so it holds no memory while training.
        """
        if torch.is_grad_enabled() or not self.cache_in_eval:
            self._cache = None
            if self._step is not None and torch.is_grad_enabled():  # inside one_contraction_per_step
                return dict(self._step[1]), dict(self.biases)
            return self._contract(), dict(self.biases)
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._contract())
        return dict(self._cache[1]), dict(self.biases)

    def begin_step(self) -> None:
        """Contract every matrix once for an optimizer step of several micro-batches: their forwards get detached
        copies (leaves) that collect the micro-batches' gradients, added in place into fp32 sums allocated here, and
        `end_step` sends the sums back through the contraction once. The gradients are those of contracting per
        micro-batch (the contraction is the same function of the same weights within a step); the work is done once
        instead of k times. The contraction's graph is not kept through the step (its intermediates are about as
        large as the matrices): `end_step` contracts once more, under the autocast of this call, and backpropagates
        through that, one module at a time."""
        device = self.central[self.spec.matrix_names[0]].device.type
        autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        leaves = {}
        for name in self.spec.matrix_names:
            matrix = mpo.contract(self.local_tensors(name), *self.factorizations[name])  # as the forward would
            leaves[name] = matrix.detach().requires_grad_(matrix.requires_grad)  # its graph freed here
            if matrix.requires_grad:  # the micro-batches add their gradients in place, in fp32 (layer.grouped_mm)
                accumulate_in_place(leaves[name])
        self._step = (autocast, leaves)

    @property
    def holds_step_matrices(self) -> bool:
        """Whether `materialize` hands out matrices contracted for the whole optimizer step (begin_step..end_step):
        free to use, nothing for method.recompute to rebuild."""
        return self._step is not None

    def end_step(self, backward: bool = True) -> None:
        """One backward through the contraction, contracted again as begin_step did, with the gradient sums the
        step's micro-batches left (`backward=False`: drop them, after a failed step)."""
        if self._step is None:
            return
        (device, enabled, dtype), leaves = self._step
        self._step = None
        sums = {n: gradient_sum(leaf) for n, leaf in leaves.items() if gradient_sum(leaf) is not None}
        if not backward or not sums:
            return
        del leaves
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            contracted = {n: mpo.contract(self.local_tensors(n), *self.factorizations[n]) for n in sums}
        if any(w.requires_grad for w in contracted.values()):  # the sums enter the backward in the matrices' dtype
            torch.autograd.backward(list(contracted.values()), [sums[n].to(w.dtype) for n, w in contracted.items()])

    def _contract(self) -> dict[str, torch.Tensor]:
        return {n: mpo.contract(self.local_tensors(n), *self.factorizations[n]) for n in self.spec.matrix_names}

    def _cache_key(self) -> tuple:
        tensors = [t for n in self.spec.matrix_names for t in self.local_tensors(n)]
        device = tensors[0].device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        return (autocast, *((t.data_ptr(), t._version, t.dtype) for t in tensors))

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters every expert uses (central tensors when shared, and biases)."""
        shared = list(self.biases.values())
        if self.share_central:
            shared += list(self.central.values())
        return shared

    def central_parameters(self) -> list[nn.Parameter]:
        """The central tensors, shared or not: what the gradient mask acts on."""
        return list(self.central.values())
