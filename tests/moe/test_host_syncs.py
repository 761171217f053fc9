"""Device-to-host synchronizations of a routed layer's forward, counted on CPU: each call of a tensor method that
reads a value back to the host (on a GPU, a sync that stalls the launch queue) is seen by a TorchFunctionMode. A
router without a capacity limit dispatches with none (the number of kept choices is N k, known on the host, and
grouped matmuls read the groups off the device); one with a capacity limit reads the rows per expert back once."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from mpoe_exp.config import compose_config
from mpoe_exp.moe import FeedForwardSpec, build_layer

READS_BACK = {"tolist", "item", "__int__", "__float__", "__bool__", "nonzero", "masked_select", "argwhere", "unique"}


class HostReads(TorchFunctionMode):
    """Counts the calls that read a tensor's values back to the host (boolean-mask indexing and repeat_interleave
    without output_size among them: their output size depends on the values)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in READS_BACK:
            self.calls.append(name)
        elif name == "__getitem__" and isinstance(args[1], torch.Tensor) and args[1].dtype == torch.bool:
            self.calls.append("boolean index")
        elif name == "repeat_interleave" and "output_size" not in kwargs and isinstance(args[1], torch.Tensor):
            self.calls.append("repeat_interleave")
        return func(*args, **kwargs)


def test_the_counter_sees_host_reads():
    t = torch.arange(4)
    with HostReads() as reads:
        t.tolist(), int(t.sum()), t[t > 1], t.nonzero(), t.repeat_interleave(t), t + 1
    assert reads.calls == ["tolist", "__int__", "boolean index", "nonzero", "repeat_interleave"]


def method_layer(method: str):
    torch.manual_seed(0)
    spec = FeedForwardSpec(d_model=64, d_ff=256, activation="relu")
    weights = {"wi": torch.randn(256, 64), "wo": torch.randn(64, 256)}
    config = OmegaConf.to_container(compose_config(["model=tiny-t5", f"method={method}"]).method, resolve=True)
    return build_layer(spec, config, weights, {}).train()


def forward_reads(layer, padded: bool) -> list[str]:
    x = torch.randn(2, 16, 64)
    mask = torch.ones(2, 16)
    mask[1, 10:] = 0
    for sub in layer.modules():  # the model hands each routed layer its call's token mask (moe/kinds.py)
        sub.token_mask = mask if padded else None
    with HostReads() as reads:
        layer(x)
    return reads.calls


@pytest.mark.parametrize("method", ["mpoe", "mpoe++", "moe", "meo", "meo_token", "cartesian"])
def test_routers_without_a_capacity_limit_dispatch_with_no_host_sync(method):
    assert forward_reads(method_layer(method), padded=False) == []


def test_a_capacity_limit_costs_one_host_sync():
    assert forward_reads(method_layer("switch"), padded=False) == ["tolist"]  # the rows per expert


@pytest.mark.parametrize("method", ["mpoe", "switch", "meo_token"])
def test_padding_costs_one_more_the_index_of_the_real_tokens(method):
    """Padding is routed nowhere: the router runs on the real tokens, found with one nonzero (moe/routers.py,
    `Router.route`). Not yet at the one sync per layer a GPU wants for capacity routers (switch: two)."""
    plain = forward_reads(method_layer(method), padded=False)
    assert forward_reads(method_layer(method), padded=True) == ["nonzero", *plain]


def test_the_noisy_router_s_normal_cdf_is_torch_s_without_validation():
    from mpoe_exp.moe.routers import standard_normal_cdf

    z = torch.randn(1000) * 3
    assert torch.equal(standard_normal_cdf(z), torch.distributions.Normal(0.0, 1.0).cdf(z))


@pytest.mark.parametrize("method", ["mpoe", "switch"])
def test_recording_the_routing_adds_no_host_sync(method):
    """The trainer records the routing of every training forward (train_routing): on the device, no read back."""
    from mpoe_exp.moe import reset_routing_stats

    plain = forward_reads(method_layer(method), padded=False)
    layer = method_layer(method)
    reset_routing_stats(layer)
    assert forward_reads(layer, padded=False) == plain
