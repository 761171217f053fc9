"""An upcycled model owns what training needs of it (`model.training_hooks`, moe/hooks.py): the trainer reads the
gradient mask's tensors and probability, the aux loss, the per-step contraction and the telemetry from there."""

from __future__ import annotations

import copy

import pytest
import torch

from mpoe_exp import build_model, compose_config
from mpoe_exp.config import run_spec
from mpoe_exp.moe import MPOExperts, central_parameters, collect_aux_loss
from mpoe_exp.training import NO_EXPERTS, training_hooks


def built(*overrides: str):
    cfg = compose_config(["model=tiny-t5", *overrides])
    return build_model(run_spec(cfg))[0], cfg


def batch(vocab: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(3, vocab, (2, 7), generator=g),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
        "labels": torch.randint(3, vocab, (2, 3), generator=g),
    }


@pytest.mark.parametrize(
    ("overrides", "prob"),
    [(["method=mpoe"], 0.5), (["method=mpoe++"], 0.5), (["method=mpoe", "ablation=no_mask"], 0.0),
     (["method=switch"], 0.0), (["method=moe"], 0.0)],
)  # fmt: skip
def test_the_mask_probability_and_tensors_come_from_the_model(overrides, prob):
    model, cfg = built(*overrides)
    hooks = training_hooks(model)
    assert hooks is model.training_hooks and hooks.gradient_mask_prob == prob
    if cfg.method.experts == "mpo":
        assert prob == cfg.method.gradient_mask_prob
    centrals = hooks.central_parameters()
    assert [id(p) for p in centrals] == [id(p) for p in central_parameters(model)]
    assert bool(centrals) == any(isinstance(m, MPOExperts) for m in model.modules())


def test_a_dense_model_trains_without_hooks():
    model, _ = built("method=dense")
    assert not hasattr(model, "training_hooks") and training_hooks(model) is NO_EXPERTS
    assert NO_EXPERTS.aux_loss() is None and NO_EXPERTS.central_parameters() == []
    assert NO_EXPERTS.gradient_mask_prob == 0.0 and NO_EXPERTS.routing_stats() == {}


def test_the_aux_loss_is_the_routed_layers_sum():
    model, _ = built("method=switch")
    model.train()(**batch())
    aux = model.training_hooks.aux_loss()
    assert aux is not None and torch.equal(aux, collect_aux_loss(model))


def test_a_copied_model_has_hooks_of_its_own():
    model, _ = built("method=mpoe")
    twin = copy.deepcopy(model)
    assert twin.training_hooks is not model.training_hooks and twin.training_hooks.model is twin
    assert [id(p) for p in twin.training_hooks.central_parameters()] == [id(p) for p in central_parameters(twin)]


def test_begin_and_end_step_bracket_the_contraction_of_every_mpo_layer():
    model, _ = built("method=mpoe")
    experts = [m for m in model.modules() if isinstance(m, MPOExperts)]
    torch.manual_seed(0)  # the same dropout in both forwards
    plain = model.train()(**batch()).loss
    model.training_hooks.begin_step()
    assert experts and all(e._step is not None for e in experts)
    torch.manual_seed(0)
    loss = model(**batch()).loss
    loss.backward()
    model.training_hooks.end_step()
    assert all(e._step is None for e in experts)
    assert torch.allclose(loss, plain)
    assert all(p.grad is not None for p in central_parameters(model))


@pytest.mark.parametrize("method", ["switch", "moe"])
def test_begin_and_end_step_hand_dense_experts_one_leaf_per_step(method):
    """Dense experts run by an MoEFeedForward get this step's leaves between begin_step and end_step; end_step puts
    the gradients on the matrices' .grad, equal to a plain backward's. A step whose backward never ran (end_step
    without backward, or nothing reached the matrices) leaves .grad None, as autograd would."""
    from mpoe_exp.moe import DenseExperts, MoEFeedForward

    model, _ = built(f"method={method}")
    experts = [m.experts for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert experts and all(isinstance(e, DenseExperts) for e in experts)
    torch.manual_seed(0)
    model.train()(**batch()).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.training_hooks.begin_step()
    assert all(e.holds_step_matrices for e in experts)
    torch.manual_seed(0)
    model(**batch()).loss.backward()
    assert all(p.grad is None for e in experts for p in e.matrices.values())
    model.training_hooks.end_step()
    assert not any(e.holds_step_matrices for e in experts)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == plain.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)
    model.zero_grad(set_to_none=True)
    for backward in (True, False):
        model.training_hooks.begin_step()
        model(**batch())  # no backward
        model.training_hooks.end_step(backward=backward)
        assert all(p.grad is None for e in experts for p in e.matrices.values())


def test_layers_that_apply_dense_experts_otherwise_keep_their_parameters():
    """MEO merges its experts' matrices (no grouped matmul): begin_step leaves them alone."""
    from mpoe_exp.moe import DenseExperts

    model, _ = built("method=meo")
    experts = [m for m in model.modules() if isinstance(m, DenseExperts)]
    model.training_hooks.begin_step()
    assert experts and not any(e.holds_step_matrices for e in experts)
    model.training_hooks.end_step()
