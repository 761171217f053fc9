"""The MPOE gradient mask: masked steps leave the central tensors AND their AdamW state bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpoe_exp.gradient_mask import CentralGradientMask

NUM_STEPS = 20


class Tiny(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.central = nn.Parameter(torch.randn(4, 3, generator=g))
        self.other = nn.Parameter(torch.randn(5, generator=g))


def random_grads(num_steps: int = NUM_STEPS, seed: int = 99) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"central": torch.randn(4, 3, generator=g), "other": torch.randn(5, generator=g)} for _ in range(num_steps)]


def adamw(model: nn.Module, weight_decay: float = 0.1) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=weight_decay)


def snapshot_state(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> dict[str, torch.Tensor]:
    """A deep copy of the optimizer state of `param` ({} when it has none; never creates an entry)."""
    state = optimizer.state.get(param, {})
    return {k: (v.clone() if torch.is_tensor(v) else torch.tensor(v)) for k, v in state.items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def set_grads(model: Tiny, grads: dict[str, torch.Tensor]) -> None:
    model.central.grad = grads["central"].clone()
    model.other.grad = grads["other"].clone()


class RecordingOptimizer:
    """Stands in for an optimizer: records, per step, whether the central parameter's gradient was hidden."""

    def __init__(self, central: nn.Parameter):
        self.central = central
        self.masked: list[bool] = []

    def step(self, closure=None):
        self.masked.append(self.central.grad is None)


def mask_sequence(prob: float, seed: int, num_steps: int = NUM_STEPS) -> list[bool]:
    central = nn.Parameter(torch.zeros(2))
    mask = CentralGradientMask([central], prob=prob, seed=seed)
    recorder = RecordingOptimizer(central)
    for _ in range(num_steps):
        central.grad = torch.ones(2)
        mask.step(recorder)
    return recorder.masked


def test_masked_steps_leave_central_and_its_adamw_state_bit_identical():
    model = Tiny()
    opt = adamw(model, weight_decay=0.1)
    mask = CentralGradientMask([model.central], prob=0.5, seed=3)
    masked_steps = unmasked_steps = 0
    for step, grads in enumerate(random_grads()):
        set_grads(model, grads)
        central_before = model.central.detach().clone()
        other_before = model.other.detach().clone()
        state_before = snapshot_state(opt, model.central)
        updates_before = mask.central_updates
        mask.step(opt)
        other_state = opt.state[model.other]
        assert int(other_state["step"]) == step + 1  # the other parameter is stepped every time
        assert not torch.equal(model.other, other_before)
        state_after = snapshot_state(opt, model.central)
        central_moved = not torch.equal(model.central, central_before)
        if states_equal(state_before, state_after):
            # masked: nothing about the central tensor changed, weight decay included
            assert torch.equal(model.central, central_before)
            assert mask.central_updates == updates_before
            masked_steps += 1
        else:
            assert central_moved
            assert int(state_after["step"]) == int(state_before.get("step", torch.tensor(0))) + 1
            assert mask.central_updates == updates_before + 1
            unmasked_steps += 1
        # the caller's gradient is handed back after the step
        assert torch.equal(model.central.grad, grads["central"])
    assert masked_steps > 0 and unmasked_steps > 0
    assert mask.steps == NUM_STEPS
    assert mask.central_updates == unmasked_steps
    assert int(opt.state[model.central]["step"]) == unmasked_steps


def test_masked_steps_follow_the_drawn_sequence():
    """The masked steps of a real AdamW run are exactly those of the mask's sequence for that seed."""
    expected = mask_sequence(0.5, seed=4)
    model = Tiny()
    opt = adamw(model)
    mask = CentralGradientMask([model.central], prob=0.5, seed=4)
    observed = []
    for grads in random_grads():
        set_grads(model, grads)
        before = model.central.detach().clone()
        mask.step(opt)
        observed.append(torch.equal(model.central, before))
    assert observed == expected
    assert mask.central_updates == expected.count(False)


def test_zeroed_gradient_would_not_be_enough():
    """Sanity of the setting: with AdamW and weight decay, a zero gradient still moves the parameter."""
    model = Tiny()
    opt = adamw(model)
    set_grads(model, random_grads()[0])
    opt.step()
    before = model.central.detach().clone()
    model.central.grad = torch.zeros_like(model.central)
    opt.step()
    assert not torch.equal(model.central, before)


def test_prob_zero_equals_plain_adamw():
    grads = random_grads()
    plain, masked = Tiny(), Tiny()
    opt_plain, opt_masked = adamw(plain), adamw(masked)
    mask = CentralGradientMask([masked.central], prob=0.0, seed=1)
    for g in grads:
        set_grads(plain, g)
        set_grads(masked, g)
        opt_plain.step()
        mask.step(opt_masked)
    assert torch.equal(plain.central, masked.central)
    assert torch.equal(plain.other, masked.other)
    for p_plain, p_masked in ((plain.central, masked.central), (plain.other, masked.other)):
        assert states_equal(snapshot_state(opt_plain, p_plain), snapshot_state(opt_masked, p_masked))
    assert mask.central_updates == NUM_STEPS == mask.steps


def test_prob_one_freezes_the_central_tensor():
    model = Tiny()
    initial = model.central.detach().clone()
    other_initial = model.other.detach().clone()
    opt = adamw(model)
    mask = CentralGradientMask([model.central], prob=1.0, seed=0)
    for g in random_grads():
        set_grads(model, g)
        mask.step(opt)
        assert torch.equal(model.central, initial)
        assert len(opt.state.get(model.central, {})) == 0
    assert not torch.equal(model.other, other_initial)
    assert mask.central_updates == 0 and mask.steps == NUM_STEPS


def test_masking_applies_to_every_central_parameter():
    centrals = [nn.Parameter(torch.randn(3)) for _ in range(3)]
    other = nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([*centrals, other], lr=1e-2, weight_decay=0.1)
    mask = CentralGradientMask(centrals, prob=1.0)
    initial = [c.detach().clone() for c in centrals]
    for _ in range(3):
        for p in (*centrals, other):
            p.grad = torch.randn(3)
        mask.step(opt)
    assert all(torch.equal(c, c0) for c, c0 in zip(centrals, initial))


def test_same_seed_same_sequence_different_seeds_differ():
    a = mask_sequence(0.5, seed=11)
    assert a == mask_sequence(0.5, seed=11)
    assert any(a) and not all(a)
    others = [mask_sequence(0.5, seed=s) for s in (12, 13, 14)]
    assert all(o != a for o in others)  # 20 fair draws: a coincidence has probability 2^-20


def test_mask_frequency_matches_probability():
    draws = mask_sequence(0.3, seed=0, num_steps=4000)
    assert sum(draws) / len(draws) == pytest.approx(0.3, abs=0.03)


def test_mask_generator_is_independent_of_the_global_rng():
    torch.manual_seed(0)
    a = mask_sequence(0.5, seed=21)
    torch.manual_seed(1)
    b = mask_sequence(0.5, seed=21)
    assert a == b


def test_state_dict_resumes_the_mask_sequence():
    full = mask_sequence(0.5, seed=8, num_steps=NUM_STEPS)
    central = nn.Parameter(torch.zeros(2))
    first = CentralGradientMask([central], prob=0.5, seed=8)
    recorder = RecordingOptimizer(central)
    for _ in range(10):
        central.grad = torch.ones(2)
        first.step(recorder)
    state = first.state_dict()

    resumed = CentralGradientMask([central], prob=0.5, seed=12345)
    resumed.load_state_dict(state)
    assert resumed.steps == 10
    assert resumed.central_updates == recorder.masked.count(False)
    for _ in range(10):
        central.grad = torch.ones(2)
        resumed.step(recorder)
    assert recorder.masked == full
    assert resumed.steps == NUM_STEPS
    assert resumed.central_updates == full.count(False)
    # the saved state is a snapshot: running the original further does not change it
    first.step(recorder)
    again = CentralGradientMask([central], prob=0.5, seed=0)
    again.load_state_dict(state)
    assert again.steps == 10


def test_masked_step_with_closure_keeps_the_central_frozen():
    """A closure recomputes the gradients inside the step: the mask must still hide the central tensor's."""
    model = Tiny()
    initial = model.central.detach().clone()
    opt = adamw(model)
    mask = CentralGradientMask([model.central], prob=1.0)
    target = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def closure():
        opt.zero_grad()
        loss = ((model.central - target) ** 2).sum() + (model.other**2).sum()
        loss.backward()
        return loss

    other_before = model.other.detach().clone()
    for _ in range(3):
        loss = mask.step(opt, closure)
        assert torch.is_tensor(loss) and loss.item() > 0
    assert torch.equal(model.central, initial)
    assert len(opt.state.get(model.central, {})) == 0
    assert not torch.equal(model.other, other_before)


def test_unmasked_step_with_closure_equals_plain_step():
    plain, masked = Tiny(), Tiny()
    opt_plain, opt_masked = adamw(plain), adamw(masked)
    mask = CentralGradientMask([masked.central], prob=0.0)

    def make_closure(model, opt):
        def closure():
            opt.zero_grad()
            loss = (model.central.sin() ** 2).sum() + model.other.pow(2).sum()
            loss.backward()
            return loss

        return closure

    for _ in range(3):
        want = opt_plain.step(make_closure(plain, opt_plain))
        got = mask.step(opt_masked, make_closure(masked, opt_masked))
        assert torch.equal(got, want)
    assert torch.equal(plain.central, masked.central) and torch.equal(plain.other, masked.other)


@pytest.mark.parametrize("prob", [-0.1, 1.5, 2.0])
def test_invalid_probability_raises(prob):
    with pytest.raises(ValueError):
        CentralGradientMask([nn.Parameter(torch.zeros(1))], prob=prob)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_boundary_probabilities_accepted(prob):
    CentralGradientMask([nn.Parameter(torch.zeros(1))], prob=prob)


# ----------------------------------------------------------------------------------------------------------------
# on a real upcycled tiny T5 with MPO experts


def test_mask_on_upcycled_tiny_t5():
    from mpoe_exp import build_model, compose_config
    from mpoe_exp.moe import central_parameters

    torch.manual_seed(0)
    cfg = compose_config(["model=tiny-t5", "method=mpoe"])
    model, _ = build_model(cfg)
    model.train()
    centrals = central_parameters(model)
    assert len(centrals) == 2 * 2 * 2  # encoder + decoder layers (2 + 2), 2 matrices each
    central_ids = {id(p) for p in centrals}
    others = [p for p in model.parameters() if id(p) not in central_ids]

    num_steps = 5
    seed = next(s for s in range(100) if len(set(mask_sequence(0.5, s, num_steps))) == 2)
    expected = mask_sequence(0.5, seed, num_steps)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    mask = CentralGradientMask(centrals, prob=0.5, seed=seed)
    g = torch.Generator().manual_seed(0)
    for step in range(num_steps):
        input_ids = torch.randint(3, 259, (2, 7), generator=g)
        labels = torch.randint(3, 259, (2, 5), generator=g)
        opt.zero_grad()
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        assert all(p.grad is not None for p in centrals)
        before = [p.detach().clone() for p in centrals]
        states = [snapshot_state(opt, p) for p in centrals]
        others_before = [p.detach().clone() for p in others]
        mask.step(opt)
        if expected[step]:
            for p, b, s in zip(centrals, before, states):
                assert torch.equal(p, b)
                assert states_equal(s, snapshot_state(opt, p))
        else:
            for p, b, s in zip(centrals, before, states):
                assert not torch.equal(p, b)
                assert int(snapshot_state(opt, p)["step"]) == int(s.get("step", torch.tensor(0))) + 1
        assert any(not torch.equal(p, b) for p, b in zip(others, others_before))
    assert mask.steps == num_steps
    assert mask.central_updates == expected.count(False)
