"""The MPOE gradient mask: masked steps leave the central tensors AND their AdamW state bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpoe_exp.config import run_spec, train_spec
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
    model, _ = build_model(run_spec(cfg))
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


# ----------------------------------------------------------------------------------------------------------------
# inside the trainer (eq. 4 of the paper, section 3.2): the mask is drawn before the step's forward passes, a masked
# step computes no central gradient, clipping sees only the gradients that are applied


class RandomSeq2SeqTask:
    """A task for the trainer without data: random byte sequences for tiny-t5, evaluation returns the step count."""

    name, main_metric, greater_is_better = "random", "score", True
    split_sizes = {"train": 8, "validation": 0, "test": 0}

    def __init__(self, num_examples: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.features = [
            {
                "input_ids": torch.randint(3, 259, (6,), generator=g).tolist(),
                "labels": torch.randint(3, 259, (3,), generator=g).tolist(),
            }
            for _ in range(num_examples)
        ]
        self.evaluations = 0

    def train_features(self) -> list[dict]:
        return self.features

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = torch.tensor([f["input_ids"] for f in features])
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "labels": torch.tensor([f["labels"] for f in features]),
        }

    def loss(self, model, batch: dict, label_smoothing: float) -> torch.Tensor:
        from mpoe_exp.tasks.losses import token_loss

        return token_loss(model(**batch).logits, batch["labels"], label_smoothing)

    def evaluate(self, model, split: str, batch_size: int, device) -> dict[str, float]:
        self.evaluations += 1
        return {"score": float(self.evaluations)}


def tiny_trainer(tmp_path, *overrides: str, freeze_centrals: bool = False, model_seed: int = 0):
    """A Trainer on tiny-t5 MPOE and the random task; `freeze_centrals`: the centrals are not trainable at all."""
    from mpoe_exp import build_model, compose_config
    from mpoe_exp.moe import central_parameters
    from mpoe_exp.training import Trainer

    cfg = compose_config(
        ["model=tiny-t5", "method=mpoe", "train.batch_size=4", "train.lr=1e-2", "train.max_steps=1", *overrides]
    )
    torch.manual_seed(model_seed)
    model, _ = build_model(run_spec(cfg))
    if freeze_centrals:
        for p in central_parameters(model):
            p.requires_grad_(False)
    tmp_path.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, RandomSeq2SeqTask(), train_spec(cfg), tmp_path, cfg.seed, torch.device("cpu"))
    return trainer, model


def test_masked_step_equals_training_with_the_centrals_frozen(tmp_path):
    """One masked step (p_b = 1) moves every parameter exactly as training with the centrals frozen does: clipping
    (active here, and with an eps large enough that its scale shows through AdamW) sees only the applied gradients."""
    clip = ["train.grad_clip=1e-3", "train.adam_eps=1e-3", "train.max_steps=2"]
    masked, masked_model = tiny_trainer(tmp_path / "masked", *clip, "method.gradient_mask_prob=1.0")
    frozen, frozen_model = tiny_trainer(
        tmp_path / "frozen", *clip, "method.gradient_mask_prob=0.0", freeze_centrals=True
    )
    initial = {n: p.detach().clone() for n, p in masked_model.named_parameters()}
    torch.manual_seed(1)
    masked.fit()
    torch.manual_seed(1)
    frozen.fit()
    frozen_params = dict(frozen_model.named_parameters())
    moved = 0
    for name, p in masked_model.named_parameters():
        assert torch.equal(p, frozen_params[name]), name
        moved += not torch.equal(p, initial[name])
    assert moved > 0
    from mpoe_exp.moe import central_parameters

    for p, name in (
        (p, n) for n, p in masked_model.named_parameters() if any(p is c for c in central_parameters(masked_model))
    ):
        assert torch.equal(p, initial[name]) and len(masked.optimizer.state.get(p, {})) == 0
        assert p.requires_grad  # trainable again after the masked step
    assert masked.mask.central_updates == 0


def test_masked_step_computes_no_central_gradient(tmp_path):
    from mpoe_exp.moe import central_parameters

    trainer, model = tiny_trainer(tmp_path, "method.gradient_mask_prob=1.0", "train.max_steps=3")
    computed = []
    for p in central_parameters(model):
        p.register_hook(lambda grad: computed.append(grad))
    trainer.fit()
    assert computed == []


def central_snapshots_per_step(trainer, model) -> list[list[torch.Tensor]]:
    """Registers an optimizer hook: the central tensors after every optimizer step (the initial ones first)."""
    from mpoe_exp.moe import central_parameters

    centrals = central_parameters(model)
    snapshots = [[p.detach().clone() for p in centrals]]
    trainer.optimizer.register_step_post_hook(lambda *_: snapshots.append([p.detach().clone() for p in centrals]))
    return snapshots


def test_no_mask_ablation_updates_every_central_tensor_at_every_step(tmp_path):
    trainer, model = tiny_trainer(tmp_path, "ablation=no_mask", "train.max_steps=6")
    assert trainer.mask.prob == 0.0
    snapshots = central_snapshots_per_step(trainer, model)
    trainer.fit()
    assert len(snapshots) == 7
    for before, after in zip(snapshots, snapshots[1:]):
        assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert trainer.mask.central_updates == 6


class OneMPOLayer(nn.Module):
    """One upcycled MPOE layer (8 experts, m = 5) on random inputs: the mask's statistics at little cost."""

    def __init__(self, method_cfg, d_model: int = 32, d_ff: int = 64):
        from mpoe_exp.moe import FeedForwardSpec, MoETrainingHooks, build_moe_layer, mask_probability

        super().__init__()
        g = torch.Generator().manual_seed(0)
        weights = {"wi": torch.randn(d_ff, d_model, generator=g), "wo": torch.randn(d_model, d_ff, generator=g)}
        self.ffn = build_moe_layer(FeedForwardSpec(d_model, d_ff, "relu"), method_cfg, weights)
        self.training_hooks = MoETrainingHooks(self, mask_probability(method_cfg))  # as upcycle gives a model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x)


class RegressionTask(RandomSeq2SeqTask):
    """Regress random targets from random inputs through the model (attention_mask: one token per row)."""

    def __init__(self, num_examples: int = 16, d_model: int = 32):
        g = torch.Generator().manual_seed(0)
        self.features = [
            {"x": torch.randn(d_model, generator=g), "y": torch.randn(d_model, generator=g)}
            for _ in range(num_examples)
        ]
        self.evaluations = 0

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        x = torch.stack([f["x"] for f in features])
        return {"x": x, "y": torch.stack([f["y"] for f in features]), "attention_mask": torch.ones(len(x), 1)}

    def loss(self, model, batch: dict, label_smoothing: float) -> torch.Tensor:
        return (model(batch["x"]) - batch["y"]).pow(2).mean()


def test_default_mask_updates_the_centrals_on_about_half_of_200_steps(tmp_path):
    from mpoe_exp import compose_config
    from mpoe_exp.training import Trainer

    cfg = compose_config(["method=mpoe", "train.max_steps=200", "train.batch_size=4", "train.lr=1e-3"])
    model = OneMPOLayer(cfg.method)
    trainer = Trainer(model, RegressionTask(), train_spec(cfg), tmp_path, cfg.seed, torch.device("cpu"))
    assert trainer.mask.prob == 0.5
    snapshots = central_snapshots_per_step(trainer, model)
    trainer.fit()
    changed = [
        [not torch.equal(a, b) for a, b in zip(before, after)] for before, after in zip(snapshots, snapshots[1:])
    ]
    assert len(changed) == 200 and len(changed[0]) == 2
    assert all(all(step) or not any(step) for step in changed)  # all centrals move together, or none
    updates = sum(all(step) for step in changed)
    # Binomial(200, 0.5): mean 100, sd 7.1; [70, 130] is +-4.2 sd (two-sided probability 3e-5 for a fair mask)
    assert 70 <= updates <= 130
    assert trainer.mask.central_updates == updates and trainer.mask.steps == 200


@pytest.fixture(scope="module")
def mpoe_method():
    from mpoe_exp import compose_config

    return compose_config(["method=mpoe"]).method


def one_layer_step(method_cfg, prob: float, seed: int, scaler=None, fused: bool = False):
    """A TrainingStep over OneMPOLayer with AdamW (weight decay; torch's default, or the trainer's fused one),
    clipping, and the given GradScaler."""
    from mpoe_exp.moe import central_parameters
    from mpoe_exp.training import TrainingStep, adamw

    model = OneMPOLayer(method_cfg)
    make = adamw if fused else torch.optim.AdamW
    optimizer = make(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    mask = CentralGradientMask(central_parameters(model), prob, seed=seed)
    return TrainingStep(model, optimizer, scheduler, scaler, mask, grad_clip=1.0), model


def test_the_mask_is_drawn_before_the_forward_passes(mpoe_method):
    """During every forward pass of a step the centrals take gradients exactly when the step is not masked."""
    step, model = one_layer_step(mpoe_method, 0.5, seed=4)
    task = RegressionTask()
    batches = [task.collate(task.features[:4]), task.collate(task.features[4:8])]
    trainable_in_forward: list[list[bool]] = []

    def loss(m, batch):
        trainable_in_forward.append([p.requires_grad for p in step.mask.params])
        return task.loss(m, batch, 0.0)

    masked = [step(model, batches, loss).masked for _ in range(NUM_STEPS)]
    assert masked == mask_sequence(0.5, seed=4)
    assert len(trainable_in_forward) == 2 * NUM_STEPS
    for i, flags in enumerate(trainable_in_forward):
        assert flags == [not masked[i // 2]] * 2
    assert all(p.requires_grad for p in step.mask.params)


def overflowing_loss(loss: torch.Tensor, overflow: bool) -> torch.Tensor:
    """`loss`, or (overflow) a finite loss of 1e38 whose gradients overflow once the GradScaler scales them."""
    return loss * (1e38 / loss.detach()) if overflow else loss


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_steps_the_fp16_scaler_skips_are_not_central_updates_and_keep_their_draw(mpoe_method, fused):
    """Overflowing steps (inf gradients) apply nothing and are not counted; the applied updates follow the mask's
    Bernoulli sequence exactly, as if the skipped steps had not happened. A fused AdamW skips inside its kernel."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    step, model = one_layer_step(mpoe_method, 0.5, seed=4, scaler=scaler, fused=fused)
    task = RegressionTask()
    batch = task.collate(task.features[:4])
    overflow_at = {1, 2, 5, 9}
    applied_masks = []
    for i in range(NUM_STEPS + len(overflow_at)):
        overflow = i in overflow_at
        before = [p.detach().clone() for p in model.parameters()]
        outcome = step(model, [batch], lambda m, b, overflow=overflow: overflowing_loss(task.loss(m, b, 0.0), overflow))
        assert outcome.applied == (i not in overflow_at)
        if outcome.applied:
            applied_masks.append(outcome.masked)
        else:
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert applied_masks == mask_sequence(0.5, seed=4)
    assert step.mask.steps == NUM_STEPS
    assert step.mask.central_updates == applied_masks.count(False)


def test_a_skipped_step_keeps_its_draw_across_a_checkpoint():
    central = nn.Parameter(torch.zeros(2))
    mask = CentralGradientMask([central], prob=0.5, seed=4)
    first = mask.draw()
    mask.record(first, applied=False)
    resumed = CentralGradientMask([central], prob=0.5, seed=0)
    resumed.load_state_dict(mask.state_dict())
    assert resumed.draw() == first == mask.draw()
    assert resumed.steps == 0 and resumed.central_updates == 0
