"""MoE dispatch against a per-token reference written out here, for every expert kind, router and FFN style.

The reference routes each token itself (float64 logits from the router's parameters), builds each expert's
matrices explicitly (dense: its own slice; MPO: an einsum chain over its own auxiliary tensors and the central
tensor), applies the FFN formula with hand-written activations, multiplies by the gate and sums. Outputs and
gradients (input, router and expert parameters) must agree.
"""

from __future__ import annotations

import math
import string

import pytest
import torch
from torch import nn

from mpoe_exp.moe import (
    DROPPED,
    DenseExperts,
    FeedForwardSpec,
    MoEFeedForward,
    MPOExperts,
    build_moe_layer,
    collect_aux_loss,
    moe_layers,
)

D_MODEL, D_FF, NUM_EXPERTS = 8, 16, 4

SPECS = {
    "t5": FeedForwardSpec(d_model=D_MODEL, d_ff=D_FF, activation="relu"),
    "t5-gated": FeedForwardSpec(d_model=D_MODEL, d_ff=D_FF, activation="gelu_new", gated=True),
    "gpt2": FeedForwardSpec(d_model=D_MODEL, d_ff=D_FF, activation="gelu_new", bias=True),
}


def switch_method(experts: str, *, capacity_factor=None, straight_through=False, num_tensors=3, share_central=True):
    """Mirrors conf/method/switch.yaml and mpoe.yaml (fp32 off so that float64 routing is exact); straight_through
    False is Fedus' gate (the router probability), whose gradient path the reference checks too."""
    method = {
        "name": "switch",
        "experts": experts,
        "num_experts": NUM_EXPERTS,
        "router": {
            "type": "switch",
            "bias": True,
            "init_std": 0.02,
            "fp32": False,
            "jitter": 0.0,
            "capacity_factor_train": capacity_factor,
            "capacity_factor_eval": capacity_factor,
            "balance_loss_coef": 0.01,
            "z_loss_coef": 0.001,
            "straight_through": straight_through,
        },
    }
    if experts == "mpo":
        method["mpo"] = {
            "num_tensors": num_tensors,
            "max_bond": None,
            "share_central": share_central,
            "factorizations": None,
        }
    return method


def moe_method(experts: str):
    """Mirrors conf/method/moe.yaml."""
    method = {
        "name": "moe",
        "experts": experts,
        "num_experts": NUM_EXPERTS,
        "router": {
            "type": "noisy_top_k",
            "top_k": 2,
            "noisy": True,
            "importance_loss_coef": 0.01,
            "load_loss_coef": 0.01,
            "noise_eps": 0.01,
        },
    }
    if experts == "mpo":
        method["mpo"] = {"num_tensors": 3, "max_bond": None, "share_central": True, "factorizations": None}
    return method


# ----------------------------------------------------------------------------------------------------------------
# the reference


def relu(x):
    return torch.clamp(x, min=0.0)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {"relu": relu, "gelu_new": gelu_new}


def mpo_matrix(tensors: list[torch.Tensor], row_shape, col_shape) -> torch.Tensor:
    """W[(i_1..i_m), (j_1..j_m)] = T_1[:, i_1, j_1, :] ... T_m[:, i_m, j_m, :] as one einsum."""
    m = len(tensors)
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(m + 1)]
    rows = [next(letters) for _ in range(m)]
    cols = [next(letters) for _ in range(m)]
    operands = ",".join(bonds[k] + rows[k] + cols[k] + bonds[k + 1] for k in range(m))
    full = torch.einsum(f"{operands}->{bonds[0]}{''.join(rows)}{''.join(cols)}{bonds[m]}", *tensors)
    return full.reshape(math.prod(row_shape), math.prod(col_shape))


def expert_weights(experts, e: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Expert e's matrices and biases, straight from its own parameters."""
    spec = experts.spec
    if isinstance(experts, DenseExperts):
        return (
            {n: experts.matrices[n][e] for n in spec.matrix_names},
            {n: experts.biases[n][e] for n in spec.bias_names},
        )
    assert isinstance(experts, MPOExperts)
    mats = {}
    for n in spec.matrix_names:
        aux = [t[e] for t in experts.auxiliary[n]]
        central = experts.central[n] if experts.share_central else experts.central[n][e]
        left = len(aux) // 2  # m - 1 auxiliary tensors, the central one in the middle
        mats[n] = mpo_matrix(aux[:left] + [central] + aux[left:], *experts.factorizations[n])
    return mats, {n: experts.biases[n] for n in spec.bias_names}


def reference_ffn(x: torch.Tensor, spec: FeedForwardSpec, mats, biases) -> torch.Tensor:
    """One token (d,) through one expert."""
    act = ACTIVATIONS[spec.activation]
    if spec.gated:
        h = act(mats["wi_0"] @ x) * (mats["wi_1"] @ x)
    else:
        h = mats["wi"] @ x
        if spec.bias:
            h = h + biases["bi"]
        h = act(h)
    out = mats["wo"] @ h
    if spec.bias:
        out = out + biases["bo"]
    return out


def reference_switch_routing(x: torch.Tensor, router, capacity: int | None, straight_through: bool):
    """[(token, [(expert, gate)])] with first-come-first-served dropping; logits in x's dtype."""
    w = router.classifier.weight.to(x.dtype)
    b = router.classifier.bias.to(x.dtype)
    choices = []
    taken = [0] * NUM_EXPERTS
    for n in range(x.shape[0]):
        probs = torch.softmax(w @ x[n] + b, dim=0)
        e = int(probs.argmax())
        taken[e] += 1
        if capacity is not None and taken[e] > capacity:
            choices.append([])
            continue
        gate = probs[e] / probs[e].detach() if straight_through else probs[e]
        choices.append([(e, gate)])
    return choices


def reference_top_k_routing(x: torch.Tensor, router, k: int):
    choices = []
    for n in range(x.shape[0]):
        logits = x[n] @ router.w_gate.to(x.dtype)
        values = logits.detach()
        order = sorted(range(NUM_EXPERTS), key=lambda e: -values[e].item())[:k]
        kept = torch.stack([logits[e] for e in order])
        gates = torch.exp(kept) / torch.exp(kept).sum()
        choices.append(list(zip(order, gates)))
    return choices


def reference_layer(layer: MoEFeedForward, hidden: torch.Tensor, choices) -> torch.Tensor:
    x = hidden.reshape(-1, hidden.shape[-1])
    weights = [expert_weights(layer.experts, e) for e in range(NUM_EXPERTS)]
    rows = []
    for n in range(x.shape[0]):
        out = torch.zeros_like(x[n])
        for e, gate in choices[n]:
            out = out + gate * reference_ffn(x[n], layer.spec, *weights[e])
        rows.append(out)
    return torch.stack(rows).reshape(hidden.shape)


# ----------------------------------------------------------------------------------------------------------------
# building and perturbing layers


def dense_weights(spec: FeedForwardSpec, seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(*spec.matrix_shape(n), generator=g, dtype=torch.float64) / 3 for n in spec.matrix_names}
    biases = {n: torch.randn(spec.bias_size(n), generator=g, dtype=torch.float64) / 3 for n in spec.bias_names}
    return weights, biases


def make_layer(spec: FeedForwardSpec, method: dict, seed: int = 0) -> MoEFeedForward:
    weights, biases = dense_weights(spec, seed)
    layer = build_moe_layer(spec, method, weights, biases)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # experts must differ, so that dispatching a token to the wrong one shows
        for p in layer.experts.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        router = layer.router
        if isinstance(router, nn.Module) and hasattr(router, "classifier"):
            router.classifier.weight.copy_(torch.randn(router.classifier.weight.shape, generator=g))
            router.classifier.bias.copy_(0.5 * torch.randn(router.classifier.bias.shape, generator=g))
        else:
            router.w_gate.copy_(torch.randn(router.w_gate.shape, generator=g))
            router.w_noise.copy_(torch.randn(router.w_noise.shape, generator=g))
    return layer.eval()


def compare(layer: MoEFeedForward, hidden: torch.Tensor, choices, *, rtol: float, atol: float):
    params = [p for p in layer.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(42)
    probe = torch.randn(hidden.shape, generator=g, dtype=hidden.dtype)

    x = hidden.clone().requires_grad_(True)
    out = layer(x)
    got_grads = torch.autograd.grad((out * probe).sum(), [x, *params], allow_unused=True)

    x_ref = hidden.clone().requires_grad_(True)
    ref = reference_layer(layer, x_ref, choices(x_ref))
    ref_grads = torch.autograd.grad((ref * probe).sum(), [x_ref, *params], allow_unused=True)

    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    names = ["input"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, got, want in zip(names, got_grads, ref_grads):
        got = torch.zeros_like(want) if got is None and want is not None else got
        want = torch.zeros_like(got) if want is None and got is not None else want
        if got is None:
            continue
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    return out, ref, got_grads


# ----------------------------------------------------------------------------------------------------------------
# dispatch vs reference


@pytest.mark.parametrize("experts", ["dense", "mpo"])
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("straight_through", [False, True])
def test_switch_dispatch_matches_reference(experts, spec_name, straight_through):
    spec = SPECS[spec_name]
    layer = make_layer(spec, switch_method(experts, straight_through=straight_through))
    hidden = torch.randn(3, 4, D_MODEL, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def choices(x):
        return reference_switch_routing(x.reshape(-1, D_MODEL), layer.router, None, straight_through)

    routed = [c[0][0] for c in choices(hidden)]
    assert len(set(routed)) >= 3  # several experts in use, so a mix-up would show
    _, _, grads = compare(layer, hidden, choices, rtol=1e-9, atol=1e-10)
    # every parameter that a routed expert uses receives a gradient
    assert grads[0].abs().sum() > 0
    assert layer.expert_counts.tolist() == [routed.count(e) for e in range(NUM_EXPERTS)]


@pytest.mark.parametrize("experts", ["dense", "mpo"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_switch_dispatch_with_dropped_tokens(experts, spec_name):
    spec = SPECS[spec_name]
    # N = 12 tokens, E = 4, capacity factor 0.5: capacity ceil(1.5) = 2 per expert
    layer = make_layer(spec, switch_method(experts, capacity_factor=0.5), seed=3)
    hidden = torch.randn(2, 6, D_MODEL, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def choices(x):
        return reference_switch_routing(x.reshape(-1, D_MODEL), layer.router, 2, False)

    ref_choices = choices(hidden)
    dropped = [n for n, c in enumerate(ref_choices) if not c]
    assert dropped, "the case must drop tokens"
    out, _, _ = compare(layer, hidden, choices, rtol=1e-9, atol=1e-10)
    flat = out.reshape(-1, D_MODEL)
    for n in dropped:
        assert torch.equal(flat[n], torch.zeros(D_MODEL, dtype=flat.dtype))  # no bias either: the residual carries it
    kept = [n for n in range(12) if n not in dropped]
    assert all(flat[n].abs().sum() > 0 for n in kept)
    counts = [sum(1 for c in ref_choices if c and c[0][0] == e) for e in range(NUM_EXPERTS)]
    assert layer.expert_counts.tolist() == counts
    assert sum(counts) == 12 - len(dropped)
    assert max(counts) <= 2


@pytest.mark.parametrize("experts", ["dense", "mpo"])
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_noisy_top2_dispatch_matches_reference(experts, spec_name):
    spec = SPECS[spec_name]
    layer = make_layer(spec, moe_method(experts), seed=11)
    hidden = torch.randn(2, 5, D_MODEL, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def choices(x):
        return reference_top_k_routing(x.reshape(-1, D_MODEL), layer.router, 2)

    # the router computes in float32: tolerances to match
    compare(layer, hidden, choices, rtol=1e-5, atol=1e-6)
    ref_choices = choices(hidden)
    counts = [sum(1 for c in ref_choices for e, _ in c if e == expert) for expert in range(NUM_EXPERTS)]
    assert layer.expert_counts.tolist() == counts
    assert sum(counts) == 2 * 10


def test_mpo_dispatch_with_five_tensors_and_unshared_central():
    spec = SPECS["t5-gated"]
    method = switch_method("mpo", num_tensors=5, share_central=False)
    layer = make_layer(spec, method, seed=21)
    assert all(c.shape[0] == NUM_EXPERTS for c in layer.experts.central.values())
    hidden = torch.randn(3, 3, D_MODEL, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def choices(x):
        return reference_switch_routing(x.reshape(-1, D_MODEL), layer.router, None, False)

    compare(layer, hidden, choices, rtol=1e-9, atol=1e-10)


def test_mpo_shared_central_gets_gradient_from_every_used_expert():
    layer = make_layer(SPECS["t5"], switch_method("mpo"), seed=4)
    hidden = torch.randn(12, D_MODEL, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = layer(hidden)
    used = [e for e, c in enumerate(layer.expert_counts.tolist()) if c > 0]
    unused = [e for e, c in enumerate(layer.expert_counts.tolist()) if c == 0]
    out.pow(2).sum().backward()
    assert layer.experts.central["wi"].grad.abs().sum() > 0
    for e in used:
        assert layer.experts.auxiliary["wi"][0].grad[e].abs().sum() > 0
    for e in unused:
        assert layer.experts.auxiliary["wi"][0].grad[e].abs().sum() == 0


def test_upcycled_straight_through_layer_equals_dense_ffn():
    """No perturbation: every expert is the dense FFN and the gate is 1, so the layer is the dense FFN."""
    spec = SPECS["gpt2"]
    weights, biases = dense_weights(spec, seed=0)
    for experts in ("dense", "mpo"):
        layer = build_moe_layer(spec, switch_method(experts, straight_through=True), weights, biases).eval()
        x = torch.randn(6, D_MODEL, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        want = torch.stack([reference_ffn(x[n], spec, weights, biases) for n in range(6)])
        torch.testing.assert_close(layer(x), want, rtol=1e-9, atol=1e-10)


def test_float32_layer_output_dtype_and_shape():
    spec = SPECS["t5"]
    weights, _ = dense_weights(spec, 0)
    layer = build_moe_layer(spec, switch_method("dense"), {n: w.float() for n, w in weights.items()}, {})
    x = torch.randn(2, 3, D_MODEL)
    out = layer(x)
    assert out.shape == (2, 3, D_MODEL) and out.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# helpers over a model


class TwoLayers(nn.Module):
    def __init__(self, first: MoEFeedForward, second: MoEFeedForward):
        super().__init__()
        self.first = first
        self.mix = nn.Linear(D_MODEL, D_MODEL, dtype=torch.float64)
        self.block = nn.ModuleDict({"second": second})

    def forward(self, x):
        return self.block["second"](self.mix(self.first(x)))


def test_collect_aux_loss_sums_all_layers():
    spec = SPECS["t5"]
    first = make_layer(spec, switch_method("dense"), seed=1)
    second = make_layer(spec, moe_method("dense"), seed=2)
    model = TwoLayers(first, second)
    assert moe_layers(model) == [first, second]
    assert collect_aux_loss(model) is None  # no forward yet: no losses

    x = torch.randn(10, D_MODEL, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model(x)
    a, b = first.aux_loss, second.aux_loss
    assert a.item() > 0 and b.item() > 0
    total = collect_aux_loss(model)
    assert total.item() == pytest.approx(a.item() + b.item(), rel=1e-6)
    total.backward()
    assert first.router.classifier.weight.grad.abs().sum() > 0
    assert second.router.w_gate.grad.abs().sum() > 0

    # the sum of set values, independent of any router
    first.aux_loss = torch.tensor(0.25)
    second.aux_loss = torch.tensor(1.5, dtype=torch.float64)
    assert collect_aux_loss(model).item() == pytest.approx(1.75)


def test_switch_layer_aux_loss_is_the_balance_and_z_loss_by_hand():
    layer = make_layer(SPECS["t5"], switch_method("dense"), seed=6)
    x = torch.randn(9, D_MODEL, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    layer(x)
    w, b = layer.router.classifier.weight.double(), layer.router.classifier.bias.double()
    logits = [(w @ x[n] + b).tolist() for n in range(9)]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    f = [sum(1 for p in probs if max(range(NUM_EXPERTS), key=p.__getitem__) == e) / 9 for e in range(NUM_EXPERTS)]
    mean_p = [sum(p[e] for p in probs) / 9 for e in range(NUM_EXPERTS)]
    balance = 0.01 * NUM_EXPERTS * sum(fe * pe for fe, pe in zip(f, mean_p))
    z = 0.001 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 9
    # (f_e is counted in float32 by the router: 1/9 is not exact there)
    assert layer.aux_loss.item() == pytest.approx(balance + z, rel=1e-6)
    assert collect_aux_loss(nn.Sequential(layer)).item() == pytest.approx(balance + z, rel=1e-6)


def test_collect_aux_loss_none_without_moe_layers():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.randn(3, 4))
    assert moe_layers(model) == []
    assert collect_aux_loss(model) is None


def test_expert_counts_exclude_dropped_and_are_detached():
    layer = make_layer(SPECS["t5"], switch_method("dense", capacity_factor=0.25), seed=8)
    x = torch.randn(16, D_MODEL, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layer(x)
    # capacity ceil(0.25 * 16 / 4) = 1: at most one token per expert
    ref = reference_switch_routing(x, layer.router, 1, False)
    counts = [sum(1 for c in ref if c and c[0][0] == e) for e in range(NUM_EXPERTS)]
    assert layer.expert_counts.tolist() == counts
    assert max(counts) == 1
    assert not layer.expert_counts.requires_grad
    assert DROPPED == -1


def test_expert_counts_cover_unused_experts():
    layer = make_layer(SPECS["t5"], switch_method("dense"), seed=8)
    with torch.no_grad():
        layer.router.classifier.bias.copy_(torch.tensor([0.0, 0.0, -100.0, -100.0]))  # experts 2, 3 never chosen
    x = torch.randn(10, D_MODEL, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = layer(x)
    ref = reference_switch_routing(x, layer.router, None, False)
    counts = [sum(1 for c in ref if c[0][0] == e) for e in range(NUM_EXPERTS)]
    assert counts[2:] == [0, 0] and sum(counts) == 10
    assert layer.expert_counts.tolist() == counts
    torch.testing.assert_close(out, reference_layer(layer, x, ref), rtol=1e-9, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# the fast paths: grouped matmuls in float32, cached experts in evaluation, recomputation in backward


@pytest.mark.parametrize("experts", ["dense", "mpo"])
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("method", ["switch_dropping", "top2"])
def test_float32_grouped_path_matches_the_float64_reference_path(experts, spec_name, method):
    """float32 on CPU runs torch's grouped_mm; float64 the per-expert loop checked against the per-token reference
    above. Outputs and every gradient agree."""
    import copy

    spec = SPECS[spec_name]
    config = switch_method(experts, capacity_factor=0.5) if method == "switch_dropping" else moe_method(experts)
    layer64 = make_layer(spec, config, seed=13)
    layer32 = copy.deepcopy(layer64).float()
    hidden = torch.randn(3, 6, D_MODEL, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for layer, dtype in ((layer64, torch.float64), (layer32, torch.float32)):
        x = hidden.to(dtype).requires_grad_(True)
        out = layer(x)
        params = [p for p in layer.parameters() if p.requires_grad]
        probe = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        grads = torch.autograd.grad((out * probe).sum(), [x, *params], allow_unused=True)  # eval: no noise weights
        results.append((out, grads))
    (out64, grads64), (out32, grads32) = results
    torch.testing.assert_close(out32, out64.float(), rtol=1e-4, atol=1e-5)
    assert sum(g is not None for g in grads32) >= 4
    for got, want in zip(grads32, grads64):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


def test_grouped_mm_with_empty_and_uneven_groups_equals_a_loop():
    from mpoe_exp.moe.layer import grouped_mm

    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 7, 1, 0, 5]
    rows = torch.randn(sum(counts), 16, generator=g, requires_grad=True)
    weight = torch.randn(len(counts), 8, 16, generator=g, requires_grad=True)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    out = grouped_mm(rows, weight, offsets, counts)
    want = torch.cat([chunk @ w.t() for chunk, w in zip(rows.split(counts), weight.unbind(0))])
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.sum(), [rows, weight])  # .sum() gives a stride-0 gradient
    want_grads = torch.autograd.grad(want.sum(), [rows, weight])
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)


def test_micro_batch_gradients_added_in_place_are_summed_in_fp32_under_bf16_autocast():
    """With gradient accumulation (MPOExperts.begin_step) the micro-batches' expert-matrix gradients are summed in
    fp32 though the matrices are bf16 under autocast: 8 micro-batches give the fp32 sum of their products within 1e-3
    relative (a bf16 running sum, rounded at every addition, was 3.5e-3 away)."""
    from mpoe_exp.moe.experts import accumulate_in_place, gradient_sum
    from mpoe_exp.moe.layer import grouped_mm

    torch.manual_seed(0)
    counts = [40, 24, 0, 64]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    weight = torch.randn(4, 48, 32).to(torch.bfloat16).requires_grad_()
    accumulate_in_place(weight)
    expected = torch.zeros(4, 48, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(8):
            rows = torch.randn(sum(counts), 32).to(torch.bfloat16)
            grad = torch.randn(sum(counts), 48).to(torch.bfloat16)
            grouped_mm(rows, weight, offsets, counts).backward(grad)
            for e, (grad_e, rows_e) in enumerate(zip(grad.split(counts), rows.split(counts))):
                expected[e] += grad_e.double().t() @ rows_e.double()
    total = gradient_sum(weight)
    assert total.dtype == torch.float32 and weight.grad is None
    assert (total.double() - expected).norm() <= 1e-3 * expected.norm()


def test_evaluation_caches_mpo_experts_until_the_weights_change(monkeypatch):
    from mpoe_exp import mpo

    layer = make_layer(SPECS["gpt2"], switch_method("mpo")).float()
    x = torch.randn(2, 5, D_MODEL)
    with torch.no_grad():
        expected = layer(x)
    calls = {"n": 0}
    original = mpo.contract

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(mpo, "contract", counting)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer(x), expected)
    assert calls["n"] == 0  # both forwards used the cache filled by the first call above
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer.train()
    layer(x).sum().backward()  # with autograd: contracted, and the cache is dropped
    assert calls["n"] == 2 and layer.experts._cache is None
    optimizer.step()
    layer.eval()
    with torch.no_grad():
        changed = layer(x)
    assert calls["n"] == 4  # new weights: contracted again
    assert not torch.allclose(changed, expected)
    layer.experts.central["wi"].data.zero_()  # .data bypasses the version counter: documented as unsupported
    layer.experts.load_state_dict(layer.experts.state_dict())  # load_state_dict copies in place: cache invalid
    with torch.no_grad():
        layer(x)
    assert calls["n"] == 6


def test_recompute_gives_the_same_outputs_and_gradients_and_saves_less():
    import copy

    method = {**switch_method("mpo"), "recompute": True}
    layer = make_layer(SPECS["t5"], method).float().train()
    plain = copy.deepcopy(layer)
    plain.recompute = False
    x = torch.randn(4, 6, D_MODEL)
    saved = {}
    for name, net in (("recompute", layer), ("plain", plain)):
        sizes = []

        def pack(t, sizes=sizes):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.manual_seed(0)
            out = net(x)
        saved[name] = (out, torch.autograd.grad(out.square().sum(), list(net.parameters())), sum(sizes))
    torch.testing.assert_close(saved["recompute"][0], saved["plain"][0])
    for got, want in zip(saved["recompute"][1], saved["plain"][1]):
        torch.testing.assert_close(got, want)
    assert saved["recompute"][2] < saved["plain"][2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combining_top_1_rows_is_a_scatter_with_the_values_and_gradients_of_the_sum(dtype):
    """At top-1 each token has at most one row, so `combine` scatters instead of summing: bit-identical outputs and
    gradients (0 + x is x), dropped tokens 0."""
    from mpoe_exp.moe.layer import Dispatch, combine
    from mpoe_exp.moe.routers import DROPPED, Routing

    torch.manual_seed(0)
    expert_index = torch.tensor([[2], [0], [DROPPED], [2], [1], [0]])
    gate = torch.rand(6, 1)
    routing = Routing(expert_index, gate, torch.zeros(()), torch.rand(6, 3))
    dispatch = Dispatch.from_routing(routing, 3)
    assert dispatch.choices == 1
    rows = torch.randn(dispatch.token.numel(), 4, dtype=dtype, requires_grad=True)
    out = combine(rows, dispatch, 6)
    summed = combine(rows, Dispatch(**{**vars(dispatch), "choices": 2}), 6)  # the general path: index_add
    assert torch.equal(out, summed) and out.dtype == dtype and torch.equal(out[2], torch.zeros(4, dtype=dtype))
    grad = torch.randn(6, 4, dtype=dtype)
    (scattered,) = torch.autograd.grad(out, rows, grad)
    (added,) = torch.autograd.grad(summed, rows, grad)
    assert torch.equal(scattered, added)


def test_recompute_is_skipped_while_the_experts_hold_the_step_s_matrices(monkeypatch):
    """method.recompute rebuilds the expert matrices in backward; under gradient accumulation the experts hold the
    step's matrices (begin_step), so there is nothing to rebuild and the FFN is not run twice: no checkpoint, the
    same gradients as without recompute."""
    import copy

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    layer = make_layer(SPECS["t5"], {**switch_method("mpo"), "recompute": True}).float().train()
    plain = copy.deepcopy(layer)
    plain.recompute = False
    x = torch.randn(4, 6, D_MODEL)
    layer(x).sum().backward()
    assert len(calls) == 1  # outside a step: recomputed
    grads = {}
    for name, net in (("recompute", layer), ("plain", plain)):
        net.zero_grad(set_to_none=True)
        calls.clear()
        net.experts.begin_step()
        for micro_batch in x.split(2):
            net(micro_batch).square().sum().backward()
        net.experts.end_step()
        assert calls == []
        grads[name] = [p.grad for p in net.parameters()]
    for got, want in zip(grads["recompute"], grads["plain"]):
        torch.testing.assert_close(got, want)
