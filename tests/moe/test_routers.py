"""Routers against hand-computed values.

Most tests use d = E with the router weight set to the identity and a zero bias, so the router logits ARE the
input rows: every expected value below is computed from those literal numbers with explicit formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

from mpoe_exp.moe.routers import DROPPED, NoisyTopKRouter, SwitchRouter

# ----------------------------------------------------------------------------------------------------------------
# helpers (plain Python, independent of the code under test)


def softmax_row(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def logsumexp_row(row: list[float]) -> float:
    return math.log(sum(math.exp(v) for v in row))


def argmax(row: list[float]) -> int:
    return max(range(len(row)), key=lambda i: row[i])


def pop_cv2(values: list[float]) -> float:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return var / mean**2


def identity_switch(num_experts: int, **kwargs) -> SwitchRouter:
    """A switch router with d = E, weight = I, bias = 0: logits == input."""
    router = SwitchRouter(num_experts, num_experts, **kwargs)
    with torch.no_grad():
        router.classifier.weight.copy_(torch.eye(num_experts))
        if router.classifier.bias is not None:
            router.classifier.bias.zero_()
    return router


# logits (= inputs) of 6 tokens over 3 experts; argmax per token: 0, 0, 0, 1, 0, 2
LOGITS_6x3 = [
    [2.0, 0.5, -1.0],
    [1.0, 0.0, 0.2],
    [0.3, -0.2, 0.1],
    [-1.0, 1.5, 0.5],
    [0.7, 0.6, 0.65],
    [0.0, 0.1, 1.2],
]
ARGMAX_6x3 = [0, 0, 0, 1, 0, 2]


# ----------------------------------------------------------------------------------------------------------------
# SwitchRouter


def test_switch_argmax_and_gate_is_top_probability():
    router = identity_switch(3, straight_through=False).eval()  # Fedus' gate
    x = torch.tensor(LOGITS_6x3)
    routing = router(x)
    assert [row[0] for row in routing.expert_index.tolist()] == ARGMAX_6x3
    assert routing.expert_index.shape == (6, 1) and routing.gate.shape == (6, 1)
    expected_gate = [max(softmax_row(row)) for row in LOGITS_6x3]
    assert routing.gate[:, 0].tolist() == pytest.approx(expected_gate, rel=1e-6)
    expected_probs = [softmax_row(row) for row in LOGITS_6x3]
    for got, want in zip(routing.router_probs.tolist(), expected_probs):
        assert got == pytest.approx(want, rel=1e-6)


def test_switch_bias_enters_the_logits():
    router = identity_switch(3, straight_through=False).eval()  # gate = p shows the logits
    with torch.no_grad():
        router.classifier.bias.copy_(torch.tensor([0.0, 3.0, 0.0]))
    routing = router(torch.tensor(LOGITS_6x3))
    shifted = [[a, b + 3.0, c] for a, b, c in LOGITS_6x3]
    assert [row[0] for row in routing.expert_index.tolist()] == [argmax(r) for r in shifted]
    assert routing.gate[:, 0].tolist() == pytest.approx([max(softmax_row(r)) for r in shifted], rel=1e-6)


def test_switch_general_weight_matrix():
    """d = 2, E = 3 with a non-identity weight: logits = x W^T + b by hand."""
    router = SwitchRouter(2, 3, straight_through=False).eval()  # gate = p shows the logits
    weight = [[1.0, -1.0], [0.5, 2.0], [-1.5, 0.25]]
    bias = [0.1, -0.2, 0.3]
    with torch.no_grad():
        router.classifier.weight.copy_(torch.tensor(weight))
        router.classifier.bias.copy_(torch.tensor(bias))
    xs = [[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [0.5, -2.0]]
    logits = [[sum(w[j] * x[j] for j in range(2)) + b for w, b in zip(weight, bias)] for x in xs]
    # token 0: [1.1, 0.3, -1.2] -> 0; token 1: [-0.9, 1.8, 0.55] -> 1; token 2: [0.1, -2.7, 1.55] -> 2
    assert [argmax(r) for r in logits] == [0, 1, 2, 0]
    routing = router(torch.tensor(xs))
    assert routing.expert_index[:, 0].tolist() == [0, 1, 2, 0]
    assert routing.gate[:, 0].tolist() == pytest.approx([max(softmax_row(r)) for r in logits], rel=1e-6)


def test_switch_straight_through_gate_is_one_and_router_gets_gradient():
    router = identity_switch(3, straight_through=True).eval()
    x = torch.tensor(LOGITS_6x3)
    routing = router(x)
    assert torch.equal(routing.gate, torch.ones(6, 1))
    # loss = sum_n c_n * gate_n; gate = p / p.detach() so d gate_n / d logits_n = onehot(k_n) - p_n
    c = [0.5, -1.0, 2.0, 1.5, -0.5, 1.0]
    (routing.gate[:, 0] * torch.tensor(c)).sum().backward()
    grad = router.classifier.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    expected = [[0.0] * 3 for _ in range(3)]
    for n, row in enumerate(LOGITS_6x3):
        p = softmax_row(row)
        k = ARGMAX_6x3[n]
        for e in range(3):
            d_logit = c[n] * ((1.0 if e == k else 0.0) - p[e])
            for j in range(3):
                expected[e][j] += d_logit * row[j]  # d logit_e / d W[e, j] = x_j
    for got, want in zip(grad.tolist(), expected):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    expected_bias = [
        sum(c[n] * ((1.0 if e == ARGMAX_6x3[n] else 0.0) - softmax_row(row)[e]) for n, row in enumerate(LOGITS_6x3))
        for e in range(3)
    ]
    assert router.classifier.bias.grad.tolist() == pytest.approx(expected_bias, rel=1e-5, abs=1e-6)


def test_switch_gate_gradient_without_straight_through():
    """gate = p_k: d gate / d logits = p_k (onehot(k) - p)."""
    router = identity_switch(3, straight_through=False).eval()
    x = torch.tensor(LOGITS_6x3)
    router(x).gate.sum().backward()
    expected_bias = [0.0, 0.0, 0.0]
    for n, row in enumerate(LOGITS_6x3):
        p = softmax_row(row)
        k = ARGMAX_6x3[n]
        for e in range(3):
            expected_bias[e] += p[k] * ((1.0 if e == k else 0.0) - p[e])
    assert router.classifier.bias.grad.tolist() == pytest.approx(expected_bias, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(
    ("capacity_factor", "expected"),
    [
        # N = 6, E = 3: capacity = ceil(cf * 2)
        (1.0, [0, 0, DROPPED, 1, DROPPED, 2]),  # capacity 2: third and fourth token of expert 0 dropped
        (0.5, [0, DROPPED, DROPPED, 1, DROPPED, 2]),  # capacity 1
        (0.75, [0, 0, DROPPED, 1, DROPPED, 2]),  # ceil(1.5) = 2
        (1.25, [0, 0, 0, 1, DROPPED, 2]),  # ceil(2.5) = 3
        (2.0, [0, 0, 0, 1, 0, 2]),  # capacity 4: nothing dropped
        (None, [0, 0, 0, 1, 0, 2]),  # no limit
    ],
)
def test_switch_capacity_first_come_first_served(capacity_factor, expected):
    router = identity_switch(3, capacity_factor_eval=capacity_factor, straight_through=False).eval()
    routing = router(torch.tensor(LOGITS_6x3))
    assert routing.expert_index[:, 0].tolist() == expected
    top_prob = [max(softmax_row(r)) for r in LOGITS_6x3]
    expected_gate = [0.0 if e == DROPPED else p for e, p in zip(expected, top_prob)]
    assert routing.gate[:, 0].tolist() == pytest.approx(expected_gate, rel=1e-6)
    for n, e in enumerate(expected):
        if e == DROPPED:
            assert routing.gate[n, 0].item() == 0.0


def test_switch_capacity_rounds_up():
    """N = 5 tokens all to expert 0, E = 2, cf = 1: capacity ceil(2.5) = 3 (not 2)."""
    router = identity_switch(2, capacity_factor_eval=1.0).eval()
    x = torch.tensor([[1.0, 0.0]] * 5)
    assert router(x).expert_index[:, 0].tolist() == [0, 0, 0, DROPPED, DROPPED]


def test_switch_capacity_scans_tokens_along_the_innermost_dimension():
    """The arrival order within each expert is a running count over the tokens. Scanned along dim 0 of the (N, E)
    one-hot, CUDA runs one sequential scan per expert (E threads over N tokens): 3.0 ms of a 7.2 ms Switch layer's
    step at 16,384 tokens on an H200 (BENCHMARKS.md, "GPU check"). Scanned along the last dimension of (E, N), it is
    a parallel scan per expert. Same positions either way (the capacity tests above)."""
    from torch.overrides import TorchFunctionMode

    class Scans(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__name__", "") == "cumsum":
                tensor, dim = args[0], kwargs.get("dim", args[1] if len(args) > 1 else None)
                self.calls.append(dim % tensor.dim() == tensor.dim() - 1)
            return func(*args, **kwargs)

    router = identity_switch(3, capacity_factor_eval=1.0).eval()
    with Scans() as scans:
        router(torch.tensor(LOGITS_6x3))
    assert scans.calls and all(scans.calls)  # every scan along the innermost dimension


def test_switch_dropped_tokens_with_straight_through_have_zero_gate():
    router = identity_switch(3, capacity_factor_eval=0.5, straight_through=True).eval()
    routing = router(torch.tensor(LOGITS_6x3))
    assert routing.gate[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_switch_training_and_eval_capacity_factors():
    router = identity_switch(3, capacity_factor_train=0.5, capacity_factor_eval=1.0)
    x = torch.tensor(LOGITS_6x3)
    router.train()
    assert router(x).expert_index[:, 0].tolist() == [0, DROPPED, DROPPED, 1, DROPPED, 2]
    router.eval()
    assert router(x).expert_index[:, 0].tolist() == [0, 0, DROPPED, 1, DROPPED, 2]
    # no eval limit while training is limited
    router = identity_switch(3, capacity_factor_train=0.5, capacity_factor_eval=None)
    assert router.eval()(x).expert_index[:, 0].tolist() == ARGMAX_6x3
    assert router.train()(x).expert_index[:, 0].tolist() == [0, DROPPED, DROPPED, 1, DROPPED, 2]


def test_switch_load_balancing_loss_counts_before_dropping():
    coef = 0.01
    router = identity_switch(3, balance_loss_coef=coef, capacity_factor_eval=0.5).eval()
    routing = router(torch.tensor(LOGITS_6x3))
    # f_e over the argmax BEFORE dropping: expert 0 has 4 of 6 tokens, experts 1 and 2 one each
    f = [4 / 6, 1 / 6, 1 / 6]
    probs = [softmax_row(r) for r in LOGITS_6x3]
    mean_p = [sum(p[e] for p in probs) / 6 for e in range(3)]
    expected = coef * 3 * sum(f[e] * mean_p[e] for e in range(3))
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-6)
    # counting after dropping would give f = [1/6, 1/6, 1/6]: a different number
    after_drop = coef * 3 * sum(mean_p[e] / 6 for e in range(3))
    assert abs(expected - after_drop) > 1e-3


def test_switch_load_balancing_loss_uniform_value():
    """Perfectly uniform routing and probabilities give alpha * E * E * (1/E)(1/E) = alpha."""
    router = identity_switch(2, balance_loss_coef=0.5).eval()
    # two tokens with mirrored logits: P = (0.5, 0.5), f = (0.5, 0.5)
    routing = router(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert routing.aux_loss.item() == pytest.approx(0.5, rel=1e-6)


def test_switch_z_loss():
    coef = 0.001
    router = identity_switch(3, z_loss_coef=coef).eval()
    routing = router(torch.tensor(LOGITS_6x3))
    expected = coef * sum(logsumexp_row(r) ** 2 for r in LOGITS_6x3) / 6
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-6)


def test_switch_both_losses_add_and_have_gradient():
    router = identity_switch(3, balance_loss_coef=0.01, z_loss_coef=0.001).eval()
    routing = router(torch.tensor(LOGITS_6x3))
    probs = [softmax_row(r) for r in LOGITS_6x3]
    f = [4 / 6, 1 / 6, 1 / 6]
    balance = 0.01 * 3 * sum(f[e] * sum(p[e] for p in probs) / 6 for e in range(3))
    z = 0.001 * sum(logsumexp_row(r) ** 2 for r in LOGITS_6x3) / 6
    assert routing.aux_loss.item() == pytest.approx(balance + z, rel=1e-6)
    routing.aux_loss.backward()
    assert router.classifier.weight.grad.abs().sum() > 0


def test_switch_losses_zero_when_coefficients_zero():
    router = identity_switch(3, balance_loss_coef=0.0, z_loss_coef=0.0).eval()
    routing = router(torch.tensor(LOGITS_6x3))
    assert routing.aux_loss.shape == ()
    assert routing.aux_loss.item() == 0.0


def test_switch_jitter_only_in_training():
    x = torch.tensor([[2.0, 0.0]] * 50)
    jittery = identity_switch(2, jitter=0.3)
    # eval: exactly the clean routing, whatever the RNG
    jittery.eval()
    torch.manual_seed(0)
    probs_eval = jittery(x).router_probs
    p0 = 1 / (1 + math.exp(-2.0))
    assert probs_eval[:, 0].tolist() == pytest.approx([p0] * 50, rel=1e-6)
    torch.manual_seed(1)
    assert torch.equal(jittery(x).router_probs, probs_eval)

    jittery.train()
    torch.manual_seed(0)
    probs_a = jittery(x).router_probs
    torch.manual_seed(0)
    probs_a_again = jittery(x).router_probs
    torch.manual_seed(1)
    probs_b = jittery(x).router_probs
    assert torch.equal(probs_a, probs_a_again)
    assert not torch.equal(probs_a, probs_b)
    assert not torch.allclose(probs_a, probs_eval)
    # logits = (2 u, 0) with u ~ U[1 - 0.3, 1 + 0.3]: log(p0 / p1) = 2 u lies in [1.4, 2.6] and varies by token
    for probs in (probs_a, probs_b):
        ratio = (probs[:, 0].double() / probs[:, 1].double()).log()
        assert ratio.min() >= 1.4 - 1e-5 and ratio.max() <= 2.6 + 1e-5
        assert ratio.max() - ratio.min() > 0.3


def test_switch_jitter_of_bfloat16_input_is_drawn_in_fp32():
    """With fp32 routing the jitter multiplies the fp32 input (as in Switch): not bfloat16-quantized noise."""
    x = torch.tensor([[2.0, 0.0]] * 50, dtype=torch.bfloat16)
    router = identity_switch(2, jitter=0.01, fp32=True).train()
    torch.manual_seed(0)
    probs = router(x).router_probs
    ratio = (probs[:, 0].double() / probs[:, 1].double()).log()  # = 2 u, u ~ U[0.99, 1.01]
    assert ratio.min() >= 1.98 - 1e-5 and ratio.max() <= 2.02 + 1e-5
    # bfloat16 resolves only ~3 values of u near 1 (steps of 2^-7): fp32 noise gives (almost) all distinct values
    assert len(set(ratio.tolist())) > 25


def test_switch_no_jitter_in_training_is_deterministic():
    router = identity_switch(3, jitter=0.0).train()
    x = torch.tensor(LOGITS_6x3)
    torch.manual_seed(0)
    a = router(x).router_probs
    torch.manual_seed(1)
    b = router(x).router_probs
    assert torch.equal(a, b)


def test_switch_routes_bfloat16_input_in_fp32():
    router = SwitchRouter(2, 3, fp32=True).eval()
    # weights that bfloat16 cannot represent: a bf16 computation would be off by ~1e-2
    weight = [[1.0013, -0.3337], [0.4571, 0.9123], [-0.7777, 0.1234]]
    bias = [0.0101, -0.0203, 0.0305]
    with torch.no_grad():
        router.classifier.weight.copy_(torch.tensor(weight))
        router.classifier.bias.copy_(torch.tensor(bias))
    w32 = router.classifier.weight.tolist()  # the float32 values actually stored
    b32 = router.classifier.bias.tolist()
    xs = [[0.5, 1.25], [-2.0, 0.75], [1.5, -0.375], [3.0, 2.0]]  # exactly representable in bfloat16
    x = torch.tensor(xs, dtype=torch.bfloat16)
    routing = router(x)
    assert routing.router_probs.dtype == torch.float32
    assert routing.gate.dtype == torch.bfloat16
    logits = [[sum(w[j] * xr[j] for j in range(2)) + b for w, b in zip(w32, b32)] for xr in xs]
    for got, want in zip(routing.router_probs.tolist(), [softmax_row(r) for r in logits]):
        assert got == pytest.approx(want, rel=2e-6, abs=1e-7)
    assert routing.expert_index[:, 0].tolist() == [argmax(r) for r in logits]


# ----------------------------------------------------------------------------------------------------------------
# NoisyTopKRouter


def identity_noisy(num_experts: int, **kwargs) -> NoisyTopKRouter:
    router = NoisyTopKRouter(num_experts, num_experts, **kwargs)
    with torch.no_grad():
        router.w_gate.copy_(torch.eye(num_experts))
    return router


LOGITS_5x4 = [
    [1.0, 0.5, -0.5, 0.0],  # top 2: 0, 1
    [0.2, 1.4, 0.9, -1.0],  # 1, 2
    [-0.3, 0.1, 0.0, 2.0],  # 3, 1
    [0.6, -0.6, 0.4, 0.5],  # 0, 3
    [1.1, 0.0, 1.0, 0.3],  # 0, 2
]
TOP2_5x4 = [[0, 1], [1, 2], [3, 1], [0, 3], [0, 2]]


def gates_by_expert(routing, n: int) -> dict[int, float]:
    return {int(e): float(g) for e, g in zip(routing.expert_index[n].tolist(), routing.gate[n].tolist())}


def test_noisy_top_k_zero_init():
    router = NoisyTopKRouter(3, 5)
    assert router.w_gate.shape == (3, 5) and router.w_noise.shape == (3, 5)
    assert torch.count_nonzero(router.w_gate) == 0
    assert torch.count_nonzero(router.w_noise) == 0


def test_noisy_top_k_eval_indices_and_renormalized_gates():
    router = identity_noisy(4, top_k=2).eval()
    routing = router(torch.tensor(LOGITS_5x4))
    assert routing.expert_index.shape == (5, 2) and routing.gate.shape == (5, 2)
    for n, (row, top) in enumerate(zip(LOGITS_5x4, TOP2_5x4)):
        assert sorted(routing.expert_index[n].tolist()) == sorted(top)
        a, b = row[top[0]], row[top[1]]
        expected = {
            top[0]: math.exp(a) / (math.exp(a) + math.exp(b)),
            top[1]: math.exp(b) / (math.exp(a) + math.exp(b)),
        }
        got = gates_by_expert(routing, n)
        assert got == pytest.approx(expected, rel=1e-6)
        assert sum(got.values()) == pytest.approx(1.0, abs=1e-6)


def test_noisy_top_k_eval_is_deterministic():
    router = identity_noisy(4, top_k=2)
    with torch.no_grad():
        router.w_noise.fill_(1.0)
    router.eval()
    x = torch.tensor(LOGITS_5x4)
    torch.manual_seed(0)
    a = router(x)
    torch.manual_seed(1)
    b = router(x)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.gate, b.gate)
    assert torch.equal(a.aux_loss, b.aux_loss)


def test_noisy_top_k_eval_importance_and_load_losses():
    router = identity_noisy(4, top_k=2, importance_loss_coef=0.1, load_loss_coef=0.3).eval()
    routing = router(torch.tensor(LOGITS_5x4))
    importance = [0.0] * 4
    load = [0.0] * 4
    for row, top in zip(LOGITS_5x4, TOP2_5x4):
        a, b = row[top[0]], row[top[1]]
        importance[top[0]] += 1 / (1 + math.exp(b - a))
        importance[top[1]] += 1 / (1 + math.exp(a - b))
        load[top[0]] += 1
        load[top[1]] += 1
    assert load == [3, 3, 2, 2]
    expected = 0.1 * pop_cv2(importance) + 0.3 * pop_cv2(load)
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    # load alone (importance coefficient 0): 0.3 * CV^2([3, 3, 2, 2]) = 0.3 * 0.25 / 2.5^2
    router.importance_loss_coef = 0.0
    assert router(torch.tensor(LOGITS_5x4)).aux_loss.item() == pytest.approx(0.3 * 0.25 / 6.25, rel=1e-5)


def test_noisy_top_k_top1_gate_is_one():
    router = identity_noisy(4, top_k=1).eval()
    routing = router(torch.tensor(LOGITS_5x4))
    assert routing.expert_index[:, 0].tolist() == [argmax(r) for r in LOGITS_5x4]
    assert torch.equal(routing.gate, torch.ones(5, 1))


def _expected_noisy_training(x, w_gate, w_noise, noise, k, noise_eps):
    """Independent float64 recomputation of Shazeer et al.'s noisy top-k routing from the same noise draw."""
    n_tokens, num_experts = noise.shape
    clean = (x.double() @ w_gate.double()).tolist()
    raw = (x.double() @ w_noise.double()).tolist()
    std = [[math.log1p(math.exp(v)) + noise_eps for v in row] for row in raw]  # softplus + eps
    noisy = [[clean[n][e] + noise[n, e].item() * std[n][e] for e in range(num_experts)] for n in range(n_tokens)]
    importance = [0.0] * num_experts
    load = [0.0] * num_experts
    top = []
    for n in range(n_tokens):
        order = sorted(range(num_experts), key=lambda e: -noisy[n][e])[:k]
        top.append(order)
        exps = [math.exp(noisy[n][e]) for e in order]
        for e, g in zip(order, exps):
            importance[e] += g / sum(exps)
        for e in range(num_experts):
            # P(x, e) = Phi((clean_e - kth_excluding(noisy, k, e)) / std_e)
            others = sorted((noisy[n][j] for j in range(num_experts) if j != e), reverse=True)
            load[e] += norm.cdf((clean[n][e] - others[k - 1]) / std[n][e])
    return top, importance, load


def test_noisy_top_k_training_smooth_load_estimator():
    torch.manual_seed(123)
    d, num_experts, k, n_tokens = 3, 4, 2, 6
    x = torch.randn(n_tokens, d)
    router = NoisyTopKRouter(d, num_experts, top_k=k, importance_loss_coef=0.0, load_loss_coef=0.7, noise_eps=0.01)
    with torch.no_grad():
        router.w_gate.copy_(torch.randn(d, num_experts))
        router.w_noise.copy_(0.5 * torch.randn(d, num_experts))
    router.train()
    torch.manual_seed(7)
    routing = router(x)
    torch.manual_seed(7)
    noise = torch.randn(n_tokens, num_experts)  # the router's randn_like(clean) draw
    top, _, load = _expected_noisy_training(x, router.w_gate.detach(), router.w_noise.detach(), noise, k, 0.01)
    for n in range(n_tokens):
        assert sorted(routing.expert_index[n].tolist()) == sorted(top[n])
    # the smooth load is not the hard count: fractional expected counts
    assert any(abs(v - round(v)) > 1e-3 for v in load)
    assert routing.aux_loss.item() == pytest.approx(0.7 * pop_cv2(load), rel=1e-4)


def test_noisy_top_k_training_loss_and_gradients():
    torch.manual_seed(321)
    d, num_experts, k, n_tokens = 3, 4, 2, 5
    x = torch.randn(n_tokens, d)
    router = NoisyTopKRouter(d, num_experts, top_k=k, importance_loss_coef=0.2, load_loss_coef=0.5, noise_eps=0.01)
    with torch.no_grad():
        router.w_gate.copy_(torch.randn(d, num_experts))
        router.w_noise.copy_(0.5 * torch.randn(d, num_experts))
    router.train()
    torch.manual_seed(11)
    routing = router(x)
    torch.manual_seed(11)
    noise = torch.randn(n_tokens, num_experts)
    top, importance, load = _expected_noisy_training(x, router.w_gate.detach(), router.w_noise.detach(), noise, k, 0.01)
    # gates are the softmax over the k kept NOISY logits
    for n in range(n_tokens):
        assert sorted(routing.expert_index[n].tolist()) == sorted(top[n])
        assert routing.gate[n].sum().item() == pytest.approx(1.0, abs=1e-6)
    expected = 0.2 * pop_cv2(importance) + 0.5 * pop_cv2(load)
    assert routing.aux_loss.item() == pytest.approx(expected, rel=1e-4)
    routing.aux_loss.backward()
    for param in (router.w_gate, router.w_noise):
        assert param.grad is not None
        assert torch.isfinite(param.grad).all()
        assert param.grad.abs().sum() > 0


def test_noisy_top_k_training_differs_from_eval_and_depends_on_seed():
    torch.manual_seed(5)
    x = torch.randn(40, 3)
    router = NoisyTopKRouter(3, 4, top_k=2)
    with torch.no_grad():
        router.w_gate.copy_(0.1 * torch.randn(3, 4))
        router.w_noise.copy_(torch.randn(3, 4))
    router.eval()
    clean = router(x)
    router.train()
    torch.manual_seed(0)
    a = router(x)
    torch.manual_seed(1)
    b = router(x)
    assert not torch.equal(a.gate, b.gate)
    assert not torch.equal(a.gate, clean.gate)
    # noisy=False: no noise in training either
    quiet = NoisyTopKRouter(3, 4, top_k=2, noisy=False)
    quiet.load_state_dict(router.state_dict())
    quiet.train()
    torch.manual_seed(0)
    q = quiet(x)
    assert torch.equal(q.gate, clean.gate) and torch.equal(q.expert_index, clean.expert_index)


@pytest.mark.parametrize("top_k", [0, -1, 5])
def test_noisy_top_k_rejects_invalid_top_k(top_k):
    with pytest.raises(ValueError, match="top_k"):
        NoisyTopKRouter(3, 4, top_k=top_k)


def test_noisy_top_k_accepts_top_k_equal_to_num_experts():
    router = identity_noisy(4, top_k=4, importance_loss_coef=0.0, load_loss_coef=1.0)
    routing = router.train()(torch.tensor(LOGITS_5x4))
    assert routing.expert_index.shape == (5, 4)
    # every expert gets every token: the load is uniform and its CV^2 is 0
    assert routing.aux_loss.item() == pytest.approx(0.0, abs=1e-7)


def test_switch_router_gate_is_straight_through_by_default():
    """The default gate is 1 (an upcycled Switch layer computes the dense FFN), with gradient to the router."""
    router = identity_switch(3).eval()
    routing = router(torch.tensor(LOGITS_6x3))
    assert torch.equal(routing.gate, torch.ones(6, 1))
    routing.gate.sum().backward()  # d(p/p.detach())/d logits = onehot(k) - p: zero sum over tokens only by chance
    assert router.classifier.bias.grad.abs().sum() > 0
