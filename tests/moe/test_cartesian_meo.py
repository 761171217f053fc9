"""CartesianMoE and MEO, the extra methods: function preservation at initialization, routing and merging against
straightforward per-token code written out here, causal routing, padding, generation without the KV cache."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mpoe_exp import build_model, compose_config
from mpoe_exp.config import run_spec
from mpoe_exp.moe import (
    CartesianFeedForward,
    FeedForwardSpec,
    MergedExpertsFeedForward,
    build_layer,
    collect_aux_loss,
    needs_full_sequence,
)

D_MODEL, D_FF = 8, 16
SPECS = {
    "t5": FeedForwardSpec(d_model=D_MODEL, d_ff=D_FF, activation="relu"),
    "t5-gated": FeedForwardSpec(d_model=D_MODEL, d_ff=D_FF, activation="gelu_new", gated=True),
    "gpt2": FeedForwardSpec(d_model=D_MODEL, d_ff=D_FF, activation="gelu_new", bias=True),
}


def method(name: str, *overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config(["model=tiny-t5", f"method={name}", *overrides]).method)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACT = {"relu": lambda x: torch.clamp(x, min=0.0), "gelu_new": gelu_new}


def dense_ffn(x, spec, w, b):
    """One FFN on rows x (n, d): the formula written out."""
    act = ACT[spec.activation]
    if spec.gated:
        h = act(x @ w["wi_0"].t()) * (x @ w["wi_1"].t())
    else:
        h = act(x @ w["wi"].t() + b.get("bi", 0))
    return h @ w["wo"].t() + b.get("bo", 0)


def dense_weights(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {n: torch.randn(*spec.matrix_shape(n), generator=g, dtype=torch.float64) / 3 for n in spec.matrix_names}
    b = {n: torch.randn(spec.bias_size(n), generator=g, dtype=torch.float64) / 3 for n in spec.bias_names}
    return w, b


def perturb(layer, seed=1):
    """Make experts differ and routers decisive, so a wrong choice or merge shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            scale = 1.0 if ("classifier" in name or "w_gate" in name or "w_noise" in name) else 0.3
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer.eval()


def expert(experts, e):
    return ({n: m[e] for n, m in experts.matrices.items()}, {n: v[e] for n, v in experts.biases.items()})


# --- CartesianMoE ------------------------------------------------------------------------------------------------


def reference_sublayer(layer, z):
    """Per token: in each half, the top-1 sub-expert by the in-group softmax; straight-through gates (value 1)."""
    router = layer.router
    per_group = router.num_experts // router.groups
    rows = []
    for t in range(z.shape[0]):
        logits = router.classifier.weight.to(z.dtype) @ z[t] + router.classifier.bias.to(z.dtype)
        out = torch.zeros_like(z[t])
        for g in range(router.groups):
            probs = torch.softmax(logits[g * per_group : (g + 1) * per_group], dim=0)
            j = int(probs.argmax())
            gate = probs[j] / probs[j].detach()
            out = out + gate * dense_ffn(z[t : t + 1], layer.spec, *expert(layer.experts, g * per_group + j))[0]
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_cartesian_layer_matches_the_per_token_reference(spec_name):
    spec = SPECS[spec_name]
    layer = perturb(build_layer(spec, method("cartesian", "method.num_experts=4"), *dense_weights(spec)))
    assert isinstance(layer, CartesianFeedForward)
    z = torch.randn(2, 5, D_MODEL, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z_ref = z.clone().requires_grad_(True)
    flat = z_ref.reshape(-1, D_MODEL)
    u = reference_sublayer(layer.a, flat)
    want = u + reference_sublayer(layer.b, flat + u)
    got_in = z.clone().requires_grad_(True)
    got = layer(got_in)
    torch.testing.assert_close(got.reshape(-1, D_MODEL), want)
    params = list(layer.parameters())
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=want.dtype)
    grads = torch.autograd.grad((got.reshape(-1, D_MODEL) * probe).sum(), [got_in, *params], allow_unused=True)
    ref_grads = torch.autograd.grad((want * probe).sum(), [z_ref, *params], allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
            continue
        torch.testing.assert_close(a, b)
    chosen = [layer.a.expert_counts, layer.b.expert_counts]
    assert all(c.sum() == 2 * 10 for c in chosen)  # two choices per token and sub-layer
    assert collect_aux_loss(layer) is not None


def test_cartesian_parameters_equal_a_top2_moe():
    """Expert parameters: 2 sub-layers x 8 half-width sub-experts = 8 full experts (GPT-2: each half-width
    sub-expert also has its own output bias, d more per sub-expert); active per token: 4 halves = 2 experts."""
    for model, extra_per_layer in (("t5-base", 0), ("gpt2", 8 * 768)):
        counts = {}
        for name in ("moe", "cartesian"):
            net, _ = build_model(run_spec(compose_config([f"model={model}", f"method={name}"])), meta=True)
            counts[name] = sum(p.numel() for n, p in net.named_parameters() if ".experts." in n)
        layers = 24 if model == "t5-base" else 12
        assert counts["cartesian"] == counts["moe"] + layers * extra_per_layer


def test_cartesian_shared_experts_start_silent_and_train():
    spec = SPECS["gpt2"]
    w, b = dense_weights(spec)
    layer = build_layer(spec, method("cartesian", "method.shared_experts=1"), w, b).eval()
    z = torch.randn(6, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(layer(z), dense_ffn(z, spec, w, b))
    layer.train()
    layer(z).square().sum().backward()
    assert layer.shared_a.experts.matrices["wo"].grad.abs().sum() > 0


# --- MEO ---------------------------------------------------------------------------------------------------------


def reference_meo(layer, x, mask=None):
    """Route (eval: no noise) on each sequence's (masked) mean, or per token on its prefix mean / bottleneck input;
    merge the top-k experts' weights and biases explicitly with their softmax gates; run the FFN with them."""
    router, k = layer.router, layer.router.top_k
    out = torch.zeros_like(x)
    for s in range(x.shape[0]):
        for t in range(x.shape[1]):
            if layer.level == "token":
                r = layer.bottleneck(x[s, t])
            elif layer.causal:
                r = x[s, : t + 1].mean(dim=0)
            elif mask is not None:
                r = (x[s] * mask[s, :, None]).sum(0) / mask[s].sum()
            else:
                r = x[s].mean(dim=0)
            logits = r @ router.w_gate.to(x.dtype)
            top = torch.topk(logits.detach(), k).indices.tolist()
            gates = torch.softmax(logits[top], dim=0)
            w = {n: sum(g * m[e] for g, e in zip(gates, top)) for n, m in layer.experts.matrices.items()}
            b = {n: sum(g * v[e] for g, e in zip(gates, top)) for n, v in layer.experts.biases.items()}
            out[s, t] = dense_ffn(x[s, t : t + 1], layer.spec, w, b)[0]
    return out


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("kind", ["sequence", "causal", "token"])
def test_meo_merging_matches_the_reference(spec_name, kind):
    spec = SPECS[spec_name]
    name = "meo_token" if kind == "token" else "meo"
    layer = build_layer(spec, method(name, "method.num_experts=4"), *dense_weights(spec), causal=kind == "causal")
    layer = perturb(layer)
    assert isinstance(layer, MergedExpertsFeedForward) and layer.per_sequence == (kind == "sequence")
    x = torch.randn(3, 5, D_MODEL, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.float64)
    layer.token_mask = mask if kind == "sequence" else None
    x_in = x.clone().requires_grad_(True)
    got = layer(x_in)
    x_ref = x.clone().requires_grad_(True)
    want = reference_meo(layer, x_ref, mask if kind == "sequence" else None)
    torch.testing.assert_close(got, want)
    params = [p for p in layer.parameters()]
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=want.dtype)
    grads = torch.autograd.grad((got * probe).sum(), [x_in, *params], allow_unused=True)
    ref_grads = torch.autograd.grad((want * probe).sum(), [x_ref, *params], allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b)
        else:
            assert (a is None or not a.any()) and (b is None or not b.any())


def test_meo_float32_fast_paths_match_float64():
    spec = SPECS["gpt2"]
    for kind in ("sequence", "causal"):
        layer64 = perturb(build_layer(spec, method("meo"), *dense_weights(spec), causal=kind == "causal"))
        layer32 = copy.deepcopy(layer64).float()
        x = torch.randn(3, 6, D_MODEL, dtype=torch.float64)
        torch.testing.assert_close(layer32(x.float()), layer64(x).float(), rtol=1e-4, atol=1e-5)


# --- whole models ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny-t5", "tiny-gpt2"])
@pytest.mark.parametrize("name", ["cartesian", "meo", "meo_token"])
def test_upcycled_models_equal_the_dense_model_at_initialization(model, name):
    torch.manual_seed(0)
    dense, _ = build_model(run_spec(compose_config([f"model={model}", "method=dense"])))
    torch.manual_seed(0)
    upcycled, _ = build_model(run_spec(compose_config([f"model={model}", f"method={name}"])))
    dense.eval(), upcycled.eval()
    ids = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if model == "tiny-t5":
        batch["labels"] = torch.randint(3, 200, (3, 4))
    with torch.no_grad():
        want, got = dense(**batch).logits, upcycled(**batch).logits
    if model == "tiny-gpt2":  # padding is routed nowhere: the logits there are not the dense model's
        want, got = want[mask.bool()], got[mask.bool()]
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-t5"])
def test_causal_meo_never_looks_at_later_tokens(model):
    torch.manual_seed(0)
    net, _ = build_model(run_spec(compose_config([f"model={model}", "method=meo"])))
    perturb(net)  # decisive routers and distinct experts, so a leak would show
    assert needs_full_sequence(net)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 200, (2, 10), generator=g)
    changed = ids.clone()
    changed[:, 6:] = torch.randint(3, 200, (2, 4), generator=g)  # later tokens only
    with torch.no_grad():
        if model == "tiny-gpt2":
            a, b = net(input_ids=ids).logits, net(input_ids=changed).logits
        else:
            src = torch.randint(3, 200, (2, 7), generator=g)
            a = net(input_ids=src, decoder_input_ids=ids).logits
            b = net(input_ids=src, decoder_input_ids=changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_t5_encoder_meo_ignores_padding():
    """The encoder's MEO layers route on the mean of real tokens: padding a sequence changes nothing."""
    torch.manual_seed(0)
    net, _ = build_model(run_spec(compose_config(["model=tiny-t5", "method=meo"])))
    perturb(net)
    g = torch.Generator().manual_seed(6)
    src = torch.randint(3, 200, (1, 5), generator=g)
    padded = torch.cat([src, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    labels = torch.randint(3, 200, (1, 3), generator=g)
    with torch.no_grad():
        a = net(input_ids=src, attention_mask=torch.ones_like(src), labels=labels).logits
        b = net(input_ids=padded, attention_mask=mask, labels=labels).logits
    # Padding changes the attention's summation order: the dense tiny-t5 moves by up to 2.4e-6 as well. Routing on
    # a mean that includes the padding moves these logits by 2.6.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generation_without_cache_agrees_with_the_training_forward():
    """Greedy generation of a causal-MEO GPT-2 re-runs the prefix; each generated token is the argmax of the
    one-pass (training-style) forward over the finished sequence."""
    torch.manual_seed(0)
    net, _ = build_model(run_spec(compose_config(["model=tiny-gpt2", "method=meo"])))
    perturb(net)
    start = torch.full((2, 1), 256)
    with torch.no_grad():
        out = net.generate(input_ids=start, attention_mask=torch.ones_like(start), do_sample=False, num_beams=1,
                           max_new_tokens=6, min_new_tokens=6, pad_token_id=256, use_cache=False)  # fmt: skip
        logits = net(input_ids=out).logits
    assert torch.equal(logits[:, :-1].argmax(-1), out[:, 1:])
