"""Routers: map tokens (N, d) to expert indices and gates, plus their auxiliary loss.

A router returns a `Routing`; experts and dispatch only consume it (narrow interfaces:
docs/method.md, 'Code structure').

- `SwitchRouter`: top-1 (Fedus et al. 2021). fp32 logits, optional multiplicative input jitter, capacity with
  token dropping (first come, first served over the real tokens of the call, flattened), load-balancing loss
  alpha * E * sum_e f_e P_e and router z-loss. The gate is straight-through by default, p / p.detach(): value 1,
  gradient still reaches the router, so an upcycled model equals the dense one (the MPOE reference's routing);
  `straight_through=False` gives Fedus et al.'s gate, the router probability p.
- `GroupTop1Router`: top-1 within each of G equal groups of experts, k = G choices (CartesianMoE's sub-layers),
  with Switch's balance loss per group.
- `NoisyTopKRouter`: noisy top-k gating (Shazeer et al. 2017) with importance and load CV^2 losses.

All are `Router`s: `forward(x) -> Routing`, built as `Router(d_model, num_experts, **method.router less type)`.
Layers call `route(x, real)`: padding (real False) is routed nowhere (expert DROPPED, gate 0) and the router only
sees the real tokens, so capacity, every auxiliary loss's statistics, the jitter and the noise are those of the same
tokens without padding (as transformers' `router_ignore_padding_tokens` keeps padding out of the losses).
Switch and group-top-1 share a linear classifier (`LinearRouter`: init, logits in fp32, the straight-through gate,
Switch's balance loss); `ROUTERS` maps a config's `router.type` to its class. Routers compute in (at least) fp32
with autocast off: mixed precision lowers the experts, not the routing.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from mpoe_exp.registry import Registry

DROPPED = -1  # expert index of a token that exceeded its expert's capacity


@dataclass
class Routing:
    """Where each token goes. N tokens, k choices each."""

    expert_index: torch.Tensor  # (N, k) long; DROPPED where the token was dropped (or is padding: `route`)
    gate: torch.Tensor  # (N, k) multiplier of each chosen expert's output (0 where dropped)
    aux_loss: torch.Tensor  # scalar, already weighted by its coefficients
    router_probs: torch.Tensor  # (N, E) softmax of the router logits, for logging and tests
    # the number of choices kept (not DROPPED), where the host knows it without asking the device: N k for a router
    # without a capacity limit; None where it depends on the routing (capacity), so the dispatch must read it back
    kept: int | None = None


def no_autocast(x: torch.Tensor):
    """Autocast off on x's device: a router's logits, softmax and losses stay in the dtype it chose (fp32) under
    mixed precision, as Switch keeps its router in fp32 (an fp16 z-loss overflows a scaled backward)."""
    return torch.autocast(x.device.type, enabled=False)


def check_top_k(top_k: int, num_experts: int) -> None:
    """A top-k router's one relation between its arguments, in words a config key can be put in front of."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} is not allowed: it must be in 1..{num_experts} (num_experts)")


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """ceil(capacity_factor * tokens / experts); None means no limit."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_tokens / num_experts))


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, population variance (tensor2tensor's definition)."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


class Router(nn.Module):
    """What every router is: `num_experts`, and `forward(x: (N, d)) -> Routing`."""

    num_experts: int

    def forward(self, x: torch.Tensor) -> Routing:
        raise NotImplementedError

    def route(self, x: torch.Tensor, real: torch.Tensor | None = None) -> Routing:
        """x (N, d), real (N,) bool or None (every token real) -> Routing over the N tokens: the router's forward on
        the real tokens alone, padding given no expert (DROPPED, gate 0, router_probs 0)."""
        if real is None:
            return self(x)
        index = real.nonzero().squeeze(1)  # one host sync; the dispatch that follows has one anyway
        num_real = index.numel()
        if num_real == x.shape[0]:
            return self(x)
        routing = self(x.index_select(0, index))
        num_tokens, k = x.shape[0], routing.expert_index.shape[1]
        aux = routing.aux_loss if num_real else torch.zeros_like(routing.aux_loss)  # means over no token are NaN
        return Routing(
            routing.expert_index.new_full((num_tokens, k), DROPPED).index_copy(0, index, routing.expert_index),
            routing.gate.new_zeros(num_tokens, k).index_copy(0, index, routing.gate),
            aux,
            routing.router_probs.new_zeros(num_tokens, self.num_experts).index_copy(0, index, routing.router_probs),
            kept=routing.kept,  # the real tokens' choices: padding adds none
        )


class LinearRouter(Router):
    """A router whose logits are one linear map of the token (normal init, zero bias), computed in fp32 by default."""

    def __init__(self, d_model: int, num_experts: int, *, bias: bool, init_std: float, fp32: bool):
        super().__init__()
        self.num_experts = num_experts
        self.classifier = nn.Linear(d_model, num_experts, bias=bias)
        nn.init.normal_(self.classifier.weight, std=init_std)
        if bias:
            nn.init.zeros_(self.classifier.bias)
        self.fp32 = fp32

    def routing_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.promote_types(x.dtype, torch.float32) if self.fp32 else x.dtype

    def logits(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(N, d) -> (N, E) in `dtype` (call under `no_autocast`: weights cast, not autocast)."""
        bias = None if self.classifier.bias is None else self.classifier.bias.to(dtype)
        return nn.functional.linear(x.to(dtype), self.classifier.weight.to(dtype), bias)

    @staticmethod
    def gate(prob: torch.Tensor, straight_through: bool) -> torch.Tensor:
        """The chosen expert's gate: p / p.detach() (value 1, gradient reaches the router), or p itself."""
        return prob / prob.detach() if straight_through else prob

    @staticmethod
    def balance_loss(one_hot: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Switch's n * sum_e f_e P_e over the last dim: f_e the fraction of tokens routed to e (one_hot (N, ..., n)),
        P_e the mean router probability of e (probs, same shape), summed over any group dims (unweighted)."""
        n = one_hot.shape[-1]
        return n * (one_hot.float().mean(dim=0) * probs.mean(dim=0)).sum()


class SwitchRouter(LinearRouter):
    """Top-1 router with optional capacity, jitter, load-balancing loss and z-loss."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        bias: bool = True,
        init_std: float = 0.02,
        jitter: float = 0.0,
        capacity_factor_train: float | None = None,
        capacity_factor_eval: float | None = None,
        balance_loss_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        straight_through: bool = True,
        fp32: bool = True,
    ):
        super().__init__(d_model, num_experts, bias=bias, init_std=init_std, fp32=fp32)
        self.jitter = jitter
        self.capacity_factor_train = capacity_factor_train
        self.capacity_factor_eval = capacity_factor_eval
        self.balance_loss_coef = balance_loss_coef
        self.z_loss_coef = z_loss_coef
        self.straight_through = straight_through

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (N, d) -> Routing with k = 1."""
        with no_autocast(x) if self.fp32 else contextlib.nullcontext():
            dtype = torch.float32 if self.fp32 else x.dtype
            x_route = x.to(dtype)  # jitter in the routing dtype too (as in Switch): bf16 would quantize it
            if self.training and self.jitter > 0:
                x_route = x_route * torch.empty_like(x_route).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = self.logits(x_route, dtype)  # (N, E)
            probs = logits.softmax(dim=-1)
            top_prob, top_index = probs.max(dim=-1)  # (N,)

            capacity = expert_capacity(
                x.shape[0],
                self.num_experts,
                self.capacity_factor_train if self.training else self.capacity_factor_eval,
            )
            one_hot = nn.functional.one_hot(top_index, self.num_experts)  # (N, E)
            if capacity is not None:
                # 1-based arrival order within each expert: a running count per expert, scanned along the tokens as
                # the innermost dimension (E, N) (over dim 0 of (N, E) a GPU runs E sequential scans of N tokens)
                arrivals = one_hot.t().contiguous().cumsum(dim=-1)  # (E, N)
                position_in_expert = arrivals.gather(0, top_index[None]).squeeze(0)
                kept = position_in_expert <= capacity
            else:
                kept = torch.ones_like(top_index, dtype=torch.bool)

            gate = torch.where(kept, self.gate(top_prob, self.straight_through), torch.zeros_like(top_prob))
            expert_index = torch.where(kept, top_index, torch.full_like(top_index, DROPPED))

            aux = logits.new_zeros(())
            if self.balance_loss_coef:  # f_e counted before dropping (as in Switch)
                aux = aux + self.balance_loss_coef * self.balance_loss(one_hot, probs)
            if self.z_loss_coef:
                aux = aux + self.z_loss_coef * (torch.logsumexp(logits, dim=-1) ** 2).mean()
            kept_count = x.shape[0] if capacity is None else None
            return Routing(expert_index[:, None], gate[:, None].to(x.dtype), aux, probs, kept=kept_count)


class GroupTop1Router(LinearRouter):
    """Top-1 in each of `groups` equal groups of experts: k = groups choices per token, one per group; softmax and
    Switch's balance loss within each group (summed over the groups)."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        groups: int = 2,
        init_std: float = 0.02,
        balance_loss_coef: float = 0.01,
        straight_through: bool = True,
    ):
        super().__init__(d_model, num_experts, bias=True, init_std=init_std, fp32=True)
        if num_experts % groups:
            raise ValueError(f"num_experts={num_experts} is not allowed: the {groups} groups must split it evenly")
        self.groups = groups
        self.balance_loss_coef = balance_loss_coef
        self.straight_through = straight_through

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (N, d) -> Routing with k = groups."""
        with no_autocast(x):
            per_group = self.num_experts // self.groups
            logits = self.logits(x, self.routing_dtype(x))
            probs = logits.view(-1, self.groups, per_group).softmax(dim=-1)  # (N, G, E/G), softmax within each group
            top_prob, top_index = probs.max(dim=-1)  # (N, G)
            expert_index = top_index + torch.arange(self.groups, device=x.device) * per_group
            gate = self.gate(top_prob, self.straight_through)
            one_hot = nn.functional.one_hot(top_index, per_group)  # (N, G, E/G)
            aux = self.balance_loss_coef * self.balance_loss(one_hot, probs)
            return Routing(
                expert_index, gate.to(x.dtype), aux, probs.reshape(-1, self.num_experts), kept=x.shape[0] * self.groups
            )


class NoisyTopKRouter(Router):
    """Noisy top-k gating: H = x W_g + N(0, 1) * softplus(x W_noise) in training; softmax over the top k."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        top_k: int = 2,
        noisy: bool = True,
        importance_loss_coef: float = 0.01,
        load_loss_coef: float = 0.01,
        noise_eps: float = 1e-2,
    ):
        super().__init__()
        check_top_k(top_k, num_experts)
        self.num_experts = num_experts
        self.top_k = top_k
        self.noisy = noisy
        self.importance_loss_coef = importance_loss_coef
        self.load_loss_coef = load_loss_coef
        self.noise_eps = noise_eps
        # zero-initialized as in Shazeer et al.: uniform routing at the start
        self.w_gate = nn.Parameter(torch.zeros(d_model, num_experts))
        self.w_noise = nn.Parameter(torch.zeros(d_model, num_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        """x: (N, d) -> Routing with k = top_k; gates are the softmax over the k kept logits."""
        with no_autocast(x):  # at least fp32, also under mixed precision
            dtype = torch.promote_types(x.dtype, torch.float32)  # at least fp32
            x32 = x.to(dtype)
            clean = x32 @ self.w_gate.to(dtype)  # (N, E)
            use_noise = self.noisy and self.training
            if use_noise:
                noise_std = nn.functional.softplus(x32 @ self.w_noise.to(dtype)) + self.noise_eps
                logits = clean + torch.randn_like(clean) * noise_std
            else:
                logits = clean
            k = self.top_k
            top_logits, top_index = logits.topk(min(k + 1, self.num_experts), dim=-1)  # (N, k+1)
            gate = top_logits[:, :k].softmax(dim=-1)  # (N, k)
            gates_full = torch.zeros_like(logits).scatter(1, top_index[:, :k], gate)  # (N, E)

            importance = gates_full.sum(dim=0)
            if use_noise and k < self.num_experts:
                load = self._smooth_load(clean, logits, noise_std, top_logits)
            else:
                load = (gates_full > 0).float().sum(dim=0)
            aux = self.importance_loss_coef * cv_squared(importance) + self.load_loss_coef * cv_squared(load)
            return Routing(top_index[:, :k], gate.to(x.dtype), aux, clean.softmax(dim=-1), kept=x.shape[0] * k)

    def _smooth_load(self, clean, noisy, noise_std, top_logits) -> torch.Tensor:
        """Sum over tokens of P(expert e is in the top k under fresh noise): Shazeer et al. 2017, eq. 8-10."""
        k = self.top_k
        threshold_if_in = top_logits[:, k : k + 1]  # k+1-th largest: what e must beat if it is in
        threshold_if_out = top_logits[:, k - 1 : k]  # k-th largest: what e must beat if it is out
        is_in = noisy > threshold_if_in
        prob_if_in = standard_normal_cdf((clean - threshold_if_in) / noise_std)
        prob_if_out = standard_normal_cdf((clean - threshold_if_out) / noise_std)
        return torch.where(is_in, prob_if_in, prob_if_out).sum(dim=0)


def standard_normal_cdf(z: torch.Tensor) -> torch.Tensor:
    """Phi(z), the formula of torch.distributions.Normal(0, 1).cdf (same bits) without its argument validation,
    which reads a boolean back from the device (a host sync) on every call."""
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


# method.router.type -> router class (a new router: its class above, and one line here)
ROUTERS = Registry(
    "router type", {"switch": SwitchRouter, "group_top1": GroupTop1Router, "noisy_top_k": NoisyTopKRouter}
)
