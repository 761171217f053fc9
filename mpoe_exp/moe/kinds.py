"""Expert-layer kinds: what replaces a dense FFN, what a method config may set for it, and what it needs from the
model around it.

- `ExpertLayer`: the base class of every module that replaces a dense FFN. A layer declares what it needs from the
  backbone as class (or instance) attributes, and the backbone and generation code read only these, never a
  method's name:
  - `uses_token_mask`: for each call of the stack the layer is in, the model hands the layer that call's token mask
    (B, S), 1 at real tokens and 0 at padding, in `token_mask`, and takes it back after the call
    (`hand_token_mask_to_layers`; which mask each stack has: mpoe_exp/models.py). Every routed layer declares it:
    padding is routed nowhere (moe/routers.py, `Router.route`);
  - `needs_full_sequence`: generation re-runs the whole prefix at each step instead of using the KV cache.
- `LayerKind`: one kind of layer (a method's `layer` key): the function that builds it from a dense FFN's weights
  (or empty-shaped) and what its method config may hold: its expert kinds, router types, own keys (their
  types), router keys it sets itself, and relations between keys. mpoe_exp/schema.py reads the method
  keys from here, so a config key a kind does not take is refused before a run starts.
- `LAYER_KINDS`: the registry, `method.layer` -> LayerKind. A new kind is its module and one line:
  `LAYER_KINDS["name"] = LayerKind(build=..., experts=(...), routers=(...))`.
- `router_of` and `placement`: what every builder does the same way (the router of `method.router`, the device and
  dtype the layer is built on).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpoe_exp.errors import UserError
from mpoe_exp.moe.routers import ROUTERS, Router
from mpoe_exp.registry import Registry


class ExpertLayer(nn.Module):
    """A module that replaces a dense FFN: (..., d) -> (..., d); `aux_loss` holds its last forward's weighted
    auxiliary loss (None if it has none). Declared needs (module docstring): `uses_token_mask`,
    `needs_full_sequence`."""

    uses_token_mask: bool = False
    needs_full_sequence: bool = False
    token_mask: torch.Tensor | None = None  # set by the model around each call when uses_token_mask
    aux_loss: torch.Tensor | None = None

    def real_tokens(self, shape: torch.Size) -> torch.Tensor | None:
        """(B S,) bool, True at the real tokens of hidden states of `shape` (B, S, d) flattened, from `token_mask`;
        None without a mask that fits (every token real). A mask longer than S (GPT-2 generating with a KV cache: it
        covers the cached prefix too) is read at its last S positions."""
        mask = self.token_mask
        if mask is None or len(shape) != 3 or mask.dim() != 2 or mask.shape[0] != shape[0] or mask.shape[1] < shape[1]:
            return None
        return mask[:, mask.shape[1] - shape[1] :].reshape(-1).bool()


def _no_keys(method: Mapping[str, Any]) -> dict[str, Any]:
    return {}


def _no_check(method: Mapping[str, Any]) -> str | None:
    return None


@dataclass(frozen=True)
class LayerKind:
    """One `method.layer`: how to build it and which method keys it takes."""

    # build(spec, method, weights=None, biases=None, *, causal, device, dtype) -> ExpertLayer; `weights` {name:
    # (out, in)} of the dense FFN to upcycle, or None for an empty-shaped layer (dry runs, loading a checkpoint)
    build: Callable[..., ExpertLayer]
    experts: tuple[str, ...]  # the method.experts values it takes
    routers: tuple[str, ...]  # the method.router.type values it takes (names in ROUTERS)
    # its own method.* keys, given the method: name -> type (bool, int, str, Literal[...], X | None); each may be left
    # out (the layer's default applies); mpoe_exp/schema.py adds ranges of known names
    keys: Callable[[Mapping[str, Any]], dict[str, Any]] = _no_keys
    fixed_router_keys: tuple[str, ...] = ()  # router constructor parameters it sets itself (not in the config)
    check: Callable[[Mapping[str, Any]], str | None] = _no_check  # a relation between keys broken, or None


LAYER_KINDS = Registry("expert layer kind (method.layer)")


def router_of(method: Mapping[str, Any], d_model: int, device=None, **fixed: Any) -> Router:
    """The router `method.router` describes (its type and constructor keywords), plus the keywords the layer fixes.
    A relation its constructor refuses (top_k > num_experts, ...) is a UserError in the config's words."""
    settings = {k: v for k, v in dict(method["router"]).items() if k != "type"}
    try:
        with torch.device(device or "cpu"):
            return ROUTERS[method["router"]["type"]](d_model, method["num_experts"], **settings, **fixed)
    except ValueError as err:
        raise UserError(in_config_words(str(err), settings)) from None


def in_config_words(message: str, router_keys: Mapping[str, Any]) -> str:
    """A router constructor's message with its parameter names as config keys: `top_k=9 ... (num_experts)` ->
    `method.router.top_k=9 ... (method.num_experts)`."""
    names = "|".join(re.escape(name) for name in (*router_keys, "num_experts"))
    return re.sub(
        rf"(?<![\w.])({names})\b",
        lambda m: f"method.{m[1]}" if m[1] == "num_experts" else f"method.router.{m[1]}",
        message,
    )


def placement(weights: Mapping[str, torch.Tensor] | None, device=None, dtype=None) -> tuple[Any, Any]:
    """The device and dtype to build on: the dense weights' when upcycling, else the ones asked for."""
    if weights:
        any_weight = next(iter(weights.values()))
        return any_weight.device, any_weight.dtype
    return device, dtype


def build_layer(spec, method, weights=None, biases=None, *, causal=False, device=None, dtype=None) -> ExpertLayer:
    """The expert layer of `method` (its `layer` key, default "moe") for one FFN; `causal`: the FFN sits in a causal
    stack (GPT-2, the T5 decoder), where a layer must not mix information across positions forward."""
    kind = LAYER_KINDS[method.get("layer", "moe")]
    refusal = kind.check(method)  # a relation between the layer's own keys
    if refusal:
        raise UserError(refusal)
    return kind.build(spec, method, weights, biases, causal=causal, device=device, dtype=dtype)


def expert_layers(model: nn.Module) -> list[ExpertLayer]:
    return [m for m in model.modules() if isinstance(m, ExpertLayer)]


def needs_full_sequence(model: nn.Module) -> bool:
    """Whether generation must re-run the whole prefix at each step: some layer of the model declares it."""
    return any(layer.needs_full_sequence for layer in expert_layers(model))


def hand_token_mask_to_layers(
    module: nn.Module | None, mask_of: Callable[[dict], Any] | None = None, layers_in: nn.Module | None = None
) -> None:
    """Hooks on `module` that give each call's token mask to the expert layers inside `layers_in` (default: module)
    that declare `uses_token_mask`, and take it back when the call returns. `mask_of(kwargs)` reads the mask (B, S)
    from the call's keyword arguments (default: its `attention_mask`). Nothing when no such layer is there; a
    second call on the same module updates its layers. The layers are kept on `module`, so a deep copy of the model
    hands masks to its own copies."""
    root = layers_in if layers_in is not None else module
    layers = [m for m in expert_layers(root) if m.uses_token_mask] if root is not None else []
    if not layers:
        return
    registered = "_token_mask_layers" in vars(module)
    module._token_mask_layers = layers
    if registered:
        return
    mask_of = mask_of or (lambda kwargs: kwargs.get("attention_mask"))

    def hand_over(module, args, kwargs):
        mask = mask_of(kwargs)
        for layer in module._token_mask_layers:
            layer.token_mask = mask

    def take_back(module, args, output):
        for layer in module._token_mask_layers:
            layer.token_mask = None

    module.register_forward_pre_hook(hand_over, with_kwargs=True)
    module.register_forward_hook(take_back, always_call=True)
