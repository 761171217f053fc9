"""The trainer's plan (evaluation and checkpoint cadence), its checkpoints (safe to load, temporary files cleaned up,
elapsed time kept) and what it counts (tokens)."""

from __future__ import annotations

import functools
import json
import math
import random
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from test_gradient_mask import RandomSeq2SeqTask, tiny_trainer

from mpoe_exp.config import CONFIG_DIR, available, compose_config, expand_sweep, run_spec, train_spec
from mpoe_exp.spec import TrainSpec
from mpoe_exp.training import (
    BEST,
    LAST,
    evaluation_interval,
    length_grouped_order,
    plan_steps,
    processed_tokens,
    replaces_best,
    rng_state,
    set_rng_state,
    truncate_log,
)


def train_cfg(**values):
    """The default `train` spec with `values` changed."""
    base = OmegaConf.to_container(compose_config(["model=tiny-t5"]).train, resolve=True)
    base.update(batch_size=32, grad_accum_steps=1, epochs=3, max_steps=None, eval_every=None)
    return TrainSpec.from_mapping({**base, "evals_per_epoch": 4, "min_evals": 5, "checkpoint_every": 200, **values})


@pytest.mark.parametrize(
    "examples,values,interval,evaluations",
    [
        (2490, {}, 19, 13),  # RTE, T5-base: 78 steps per epoch, 234 steps: 4 per epoch (12), and the last step
        (3668, {}, 28, 13),  # MRPC: 115 per epoch, 345 steps
        (392702, {}, 3068, 12),  # MNLI: 12272 per epoch, 36816 steps
        (3200, {"epochs": 1}, 20, 5),  # one epoch of 100 steps: 4 per epoch would be too few, min_evals wins
        (64, {"max_steps": 3}, 1, 3),  # shorter than min_evals: every step
        (2490, {"eval_every": 100}, 100, 3),  # explicit: 100, 200 and the last step, 234
        (2490, {"batch_size": 8, "grad_accum_steps": 4}, 19, 13),  # accumulation: steps are optimizer steps
    ],
)
def test_evaluation_cadence_follows_the_run_length(examples, values, interval, evaluations):
    plan = plan_steps(examples, train_cfg(**values))
    assert plan.eval_interval == interval
    steps = plan.evaluation_steps()
    assert len(steps) == evaluations
    assert steps[-1] == plan.total_steps  # always at the end
    assert all(b - a <= interval for a, b in zip([0, *steps], steps))


def test_evaluation_interval_is_a_pure_function_of_the_run():
    assert evaluation_interval(234, 78) == 19
    assert evaluation_interval(234, 78, eval_every=500) == 500
    assert evaluation_interval(234, 78, evals_per_epoch=1, min_evals=2) == 78
    assert evaluation_interval(234, 78, evals_per_epoch=1, min_evals=5) == 46


@pytest.mark.parametrize("key", ["eval_every", "evals_per_epoch", "min_evals", "checkpoint_every"])
def test_nonpositive_cadence_is_refused(key):
    from mpoe_exp.errors import UserError

    with pytest.raises(
        UserError, match=f"^train.{key}=0 is not allowed: train.{key} must be (null or )?an integer >= 1$"
    ):
        train_cfg(**{key: 0})


def test_a_batch_larger_than_the_training_split_is_refused():
    from mpoe_exp.errors import UserError

    with pytest.raises(UserError, match=r"train.batch_size=401 is more than the 400 training examples"):
        plan_steps(400, train_cfg(batch_size=401))
    assert plan_steps(400, train_cfg(batch_size=400)).micro_batches_per_epoch == 1  # the whole split: allowed


# --- every run of every experiment is evaluated on validation at least 5 times -------------------------------------


@functools.cache
def paper_workload() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "paper" / "cost.yaml"), resolve=True)["tasks"]


def training_examples(cfg) -> int:
    """Training examples of a run: the hub data's sizes from conf/paper/cost.yaml (the paper's splits, nothing
    downloaded), or the task built from its local data (the bundled demo data) as the runner builds it."""
    from mpoe_exp.models import load_tokenizer
    from mpoe_exp.tasks.tasks import build_task

    task = cfg.task
    if cfg.data_dir is not None:
        return len(build_task(run_spec(cfg), load_tokenizer(run_spec(cfg).model)).train_features())
    if task.type == "glue_multitask":
        return task.mixture_size
    if task.type == "lm":
        block = min(task.block_size, cfg.model.architecture.n_positions)
        return math.ceil(paper_workload()[task.name]["train_tokens"] / block)
    return paper_workload()[task.name]["train"]


def test_methods_and_ablations_leave_the_training_schedule_alone():
    """What lets the next test compose one run per experiment and task: no method or ablation sets train.*, and
    seeds and learning rates change no step count."""
    for group in ("method", "ablation"):
        for name in available(group):
            assert "train" not in OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml"), (group, name)


@pytest.mark.slow
def test_every_run_of_every_experiment_is_evaluated_at_least_five_times():
    from hydra import compose, initialize_config_dir

    sweeps = {experiment: expand_sweep([f"experiment={experiment}"]) for experiment in available("experiment")}
    checked = 0
    evaluations: dict[tuple[str, ...], list[int]] = {}  # one composition per experiment and task (see above)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for experiment, runs in sweeps.items():
            for overrides in runs:
                key = tuple(o for o in overrides if not o.startswith(("seed=", "train.lr=", "method=", "ablation=")))
                if key not in evaluations:
                    cfg = compose(config_name="config", overrides=list(key))
                    evaluations[key] = plan_steps(training_examples(cfg), train_spec(cfg)).evaluation_steps()
                assert len(evaluations[key]) >= 5, (experiment, overrides, evaluations[key])
                checked += 1
    assert checked > 1000  # every table, extra and smoke experiment, and the quickstart


# --- checkpoints ------------------------------------------------------------------------------------------------


class UpAndDownTask(RandomSeq2SeqTask):
    """Validation scores 1, 3, 2, 4, ... : best.pt must be written at the 1st, 2nd and 4th evaluation only."""

    def evaluate(self, model, split, batch_size, device):
        self.evaluations += 1
        return {"score": [1.0, 3.0, 2.0, 4.0, 0.0, 0.0][self.evaluations - 1]}


def test_checkpoints_have_their_own_cadence_and_best_follows_validation(tmp_path, monkeypatch):
    from mpoe_exp import training

    trainer, _ = tiny_trainer(tmp_path, "train.max_steps=9", "train.eval_every=2", "train.checkpoint_every=4")
    trainer.task = UpAndDownTask()
    saved: list[tuple[str, int]] = []
    original = training.atomic_torch_save

    def recording_save(obj, path):
        saved.append((path.name, trainer.state.step))
        original(obj, path)

    monkeypatch.setattr(training, "atomic_torch_save", recording_save)
    state = trainer.fit()
    assert [h["step"] for h in state.history] == [2, 4, 6, 8, 9]
    assert [step for name, step in saved if name == BEST] == [2, 4, 8]
    assert [step for name, step in saved if name == LAST] == [4, 8, 9]
    assert state.best_step == 8


def test_last_checkpoint_loads_with_weights_only_and_holds_no_pickled_objects(tmp_path):
    trainer, _ = tiny_trainer(tmp_path, "train.max_steps=2", "train.checkpoint_every=1")
    random.random(), np.random.rand()  # RNG states that are not the seeded ones
    trainer.fit()
    checkpoint = torch.load(tmp_path / "checkpoints" / LAST, weights_only=True)
    assert checkpoint["state"]["step"] == 2
    assert set(checkpoint) == {"model", "optimizer", "scheduler", "scaler", "mask", "rng", "state", "config_hash"}


def test_rng_states_round_trip_through_plain_values():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    expected = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(2))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_state(state)
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


class TiedScoresTask(RandomSeq2SeqTask):
    """Validation (score, unparsable) per evaluation: a tie on the score goes to fewer unparsable predictions, then to
    the later checkpoint."""

    scores = [(50.0, 60), (50.0, 0), (50.0, 0), (40.0, 0), (50.0, 3)]

    def evaluate(self, model, split, batch_size, device):
        self.evaluations += 1
        score, unparsable = self.scores[self.evaluations - 1]
        return {"score": score, "unparsable": unparsable}


def test_best_checkpoint_ties_go_to_fewer_unparsable_then_to_the_later_step(tmp_path, monkeypatch):
    from mpoe_exp import training

    trainer, _ = tiny_trainer(tmp_path, "train.max_steps=5", "train.eval_every=1", "train.checkpoint_every=5")
    trainer.task = TiedScoresTask()
    saved: list[int] = []
    original = training.atomic_torch_save

    def recording_save(obj, path):
        if path.name == BEST:
            saved.append(trainer.state.step)
        original(obj, path)

    monkeypatch.setattr(training, "atomic_torch_save", recording_save)
    state = trainer.fit()
    assert saved == [1, 2, 3]  # 60 -> 0 unparsable; equal on both, the later; then worse, then more unparsable
    assert state.best_step == 3 and state.best_metric == 50.0


@pytest.mark.parametrize(
    "metrics,best,greater_is_better,replaces",
    [
        ({"mcc": 10.0}, None, True, True),  # the first evaluation
        ({"mcc": 10.0}, {"mcc": 9.0}, True, True),
        ({"mcc": 8.0}, {"mcc": 9.0}, True, False),
        ({"perplexity": 8.0}, {"perplexity": 9.0}, False, True),
        ({"perplexity": 10.0}, {"perplexity": 9.0}, False, False),
        ({"mcc": 10.0, "unparsable": 5}, {"mcc": 9.0, "unparsable": 0}, True, True),  # the metric comes first
        ({"mcc": 0.0, "unparsable": 0}, {"mcc": 0.0, "unparsable": 60}, True, True),  # tie: fewer unparsable
        ({"mcc": 0.0, "unparsable": 60}, {"mcc": 0.0, "unparsable": 0}, True, False),
        ({"mcc": 0.0, "unparsable": 3}, {"mcc": 0.0, "unparsable": 3}, True, True),  # tie on both: the later
        ({"perplexity": 9.0}, {"perplexity": 9.0}, False, True),  # no unparsable count: the later
        (
            {"glue_average": 50.0, "cola/unparsable": 1, "rte/unparsable": 0},
            {"glue_average": 50.0, "cola/unparsable": 2, "rte/unparsable": 0},
            True,
            True,
        ),
        (
            {"glue_average": 50.0, "cola/unparsable": 1, "rte/unparsable": 2},
            {"glue_average": 50.0, "cola/unparsable": 2, "rte/unparsable": 0},
            True,
            False,
        ),
        ({"perplexity": 9.0}, {"perplexity": math.nan}, False, True),  # a number beats NaN
        ({"perplexity": math.nan}, {"perplexity": 9.0}, False, False),
    ],
)
def test_replaces_best_rule(metrics, best, greater_is_better, replaces):
    main = next(k for k in metrics if "unparsable" not in k)
    assert replaces_best(metrics, best, main, greater_is_better) is replaces


@pytest.mark.parametrize("resumed", [True, False])
def test_leftover_temporary_files_are_removed_on_resume_and_on_start(tmp_path, resumed):
    trainer, _ = tiny_trainer(tmp_path, "train.max_steps=2", "train.checkpoint_every=1")
    trainer.fit()
    if not resumed:
        (tmp_path / "checkpoints" / LAST).unlink()
    folder = tmp_path / "checkpoints"
    leftovers = [
        folder / ".last.pt.k1ll3d.tmp",  # as kills during torch.save, results.json and train.log writes leave them
        folder / ".best.pt.abc_12.tmp",
        tmp_path / ".results.json.x9y8z7w6.tmp",
        tmp_path / ".train.log.q1w2e3r4.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"half a file")
    kept = [folder / "notes.txt", tmp_path / "notes.tmp", tmp_path / "train.log"]
    for path in kept[:2]:
        path.write_text("not ours")
    again, _ = tiny_trainer(tmp_path, "train.max_steps=2", "train.checkpoint_every=1")
    assert again.try_resume() is resumed
    assert [path for path in leftovers if path.exists()] == []
    assert all(path.exists() for path in kept)


# --- the history across resumes ---------------------------------------------------------------------------------


class Killed(BaseException):
    """As if the process got SIGKILL."""


class WeightsTask(RandomSeq2SeqTask):
    """Validation scores the weights (equal records mean equal models); `kill_at`: the process dies in that
    evaluation."""

    def __init__(self, kill_at: int | None = None):
        super().__init__()
        self.kill_at = kill_at

    def evaluate(self, model, split, batch_size, device):
        self.evaluations += 1
        if self.evaluations == self.kill_at:
            raise Killed
        return {"score": sum(float(p.double().square().sum()) for p in model.parameters())}


class RecordingLogger:
    def __init__(self):
        self.resumed_at, self.steps = [], []

    def resume(self, step):
        self.resumed_at.append(step)

    def log(self, record):
        self.steps.append(record["step"])


def test_a_resumed_run_logs_each_evaluation_once_as_an_uninterrupted_run_does(tmp_path):
    args = ("train.max_steps=4", "train.eval_every=1", "train.checkpoint_every=2")
    reference, _ = tiny_trainer(tmp_path / "reference", *args)
    reference.task = WeightsTask()
    reference.fit()
    killed, _ = tiny_trainer(tmp_path / "killed", *args)
    killed.task = WeightsTask(kill_at=4)
    with pytest.raises(Killed):
        killed.fit()
    log = tmp_path / "killed" / "train.log"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]  # 3: past last.pt's 2
    with open(log, "a") as f:
        f.write('{"step": 4, "lo')  # a record cut by the kill
    resumed, _ = tiny_trainer(tmp_path / "killed", *args)
    resumed.task, resumed.logger = WeightsTask(), RecordingLogger()
    resumed.fit()
    assert log.read_text() == (tmp_path / "reference" / "train.log").read_text()
    assert resumed.logger.resumed_at == [2] and resumed.logger.steps == [3, 4]


def test_truncate_log_keeps_the_records_up_to_a_step(tmp_path):
    path = tmp_path / "train.log"
    lines = [json.dumps({"step": step, "loss": step / 10}) for step in (2, 4, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 8, "lo')
    assert truncate_log(path, 4) == 2  # step 6 and the cut line
    assert path.read_text() == "\n".join(lines[:2]) + "\n"
    assert truncate_log(path, 4) == 0 and path.read_text() == "\n".join(lines[:2]) + "\n"
    assert truncate_log(path, 0) == 2 and path.read_text() == ""
    assert truncate_log(tmp_path / "absent.log", 0) == 0 and not (tmp_path / "absent.log").exists()
    assert list(tmp_path.glob(".*.tmp")) == []


def test_elapsed_time_adds_up_across_resumes(tmp_path):
    trainer, _ = tiny_trainer(tmp_path, "train.max_steps=4", "train.checkpoint_every=2")
    trainer.fit()
    path = tmp_path / "checkpoints" / LAST
    checkpoint = torch.load(path, weights_only=True)
    first = checkpoint["state"]["elapsed_seconds"]
    assert 0 < first <= trainer.wall_seconds()
    checkpoint["state"]["elapsed_seconds"] = 1000.0  # as if the killed process had trained 1000 s
    torch.save(checkpoint, path)
    resumed, _ = tiny_trainer(tmp_path, "train.max_steps=4", "train.checkpoint_every=2")
    begun = time.perf_counter()
    resumed.fit()
    assert 1000.0 <= resumed.wall_seconds() <= 1000.0 + (time.perf_counter() - begun)  # 1000 s + this process's


def test_results_wall_time_includes_the_time_before_a_resume(tmp_path, monkeypatch):
    from test_runner import LM_RUN, killed_in_the_final_test_evaluation

    from mpoe_exp.results import RESULTS_FILE
    from mpoe_exp.runner import run

    cfg = compose_config([*LM_RUN, f"runs_dir={tmp_path}", "train.max_steps=2"])
    directory = killed_in_the_final_test_evaluation(cfg, monkeypatch)
    path = directory / "checkpoints" / LAST
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state"]["elapsed_seconds"] = 1000.0
    torch.save(checkpoint, path)
    begun = time.perf_counter()
    results = json.loads((run(cfg) / RESULTS_FILE).read_text())
    assert 1000.0 <= results["wall_time_s"] <= 1000.0 + (time.perf_counter() - begun)  # 1000 s + this process's


# --- tokens -----------------------------------------------------------------------------------------------------


def test_processed_tokens_count_encoder_and_decoder_tokens():
    batch = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[7, 1, -100], [7, 8, 1]]),
    }
    assert processed_tokens(batch, encoder_decoder=True) == 8 + 5
    assert processed_tokens(batch, encoder_decoder=False) == 8  # a causal LM's labels are its inputs


def test_trainer_counts_source_and_target_tokens_of_t5(tmp_path):
    trainer, _ = tiny_trainer(tmp_path, "train.max_steps=2", "train.batch_size=4")
    state = trainer.fit()
    assert state.tokens == 2 * 4 * (6 + 3)  # RandomSeq2SeqTask: 6 source and 3 target tokens per example
    assert state.history[-1]["tokens"] == state.tokens


def padded_tokens(order: list[int], lengths: list[int], batch_size: int) -> int:
    batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


def test_length_grouped_order_pads_less_and_keeps_batches_in_random_order():
    rng = random.Random(0)
    lengths = [rng.randint(1, 128) for _ in range(1000)]
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).tolist()
    grouped = length_grouped_order(order, lengths, 32, torch.Generator().manual_seed(1))
    assert sorted(grouped) == list(range(1000))
    assert padded_tokens(grouped, lengths, 32) < 0.7 * padded_tokens(order, lengths, 32)
    assert length_grouped_order(order, lengths, 32, torch.Generator().manual_seed(1)) == grouped
    batches = [grouped[k : k + 32] for k in range(0, 1000, 32)]
    assert len(batches[-1]) == 1000 % 32  # the short batch stays last: batch boundaries do not move
    maxima = [max(lengths[i] for i in b) for b in batches[:-1]]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_trainer_groups_batches_by_length_only_when_asked(tmp_path):
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(200)]
    orders = {}
    for grouped in (False, True):
        trainer, _ = tiny_trainer(tmp_path / str(grouped), f"train.group_by_length={str(grouped).lower()}")
        trainer.features = [{"input_ids": [1] * n} for n in lengths]
        orders[grouped] = [trainer.epoch_order(0), trainer.epoch_order(1)]
        assert trainer.epoch_order(0) == orders[grouped][0]  # a pure function of (seed, epoch): resumable
        assert orders[grouped][0] != orders[grouped][1]
        assert sorted(orders[grouped][0]) == list(range(200))
    assert padded_tokens(orders[True][0], lengths, 4) < 0.7 * padded_tokens(orders[False][0], lengths, 4)


def seq2seq_batches(k: int, vocab: int = 100) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        {
            "input_ids": torch.randint(3, vocab, (2, 7), generator=g),
            "labels": torch.randint(3, vocab, (2, 4), generator=g),
        }
        for _ in range(k)
    ]


@pytest.mark.parametrize(
    "method,masked,precision",
    [("mpoe", False, "fp32"), ("mpoe", True, "fp32"), ("mpoe++", False, "fp32"), ("mpoe", False, "bf16"),
     ("switch", False, "fp32"), ("switch", False, "bf16"), ("moe", False, "fp32")],
)  # fmt: skip
def test_one_contraction_per_step_gives_the_gradients_of_one_per_micro_batch(monkeypatch, method, masked, precision):
    """k = 3 micro-batches: every MPO matrix is contracted twice per optimizer step, once for the micro-batches and
    once more for the backward (begin_step keeps no graph; not 3 x (1 + recompute) times), and every parameter's
    gradient equals that of contracting per micro-batch; on a masked step (centrals frozen) and under bf16 autocast
    too. Dense experts (switch, moe) hand out their matrices once per step too (DenseExperts.begin_step): the same
    gradients."""
    from mpoe_exp import build_model, compose_config, mpo
    from mpoe_exp.moe import MPOExperts, central_parameters
    from mpoe_exp.training import autocast, one_contraction_per_step

    cpu = torch.device("cpu")
    cfg = compose_config(["model=tiny-t5", f"method={method}"])
    calls = []
    contract = mpo.contract
    monkeypatch.setattr(mpo, "contract", lambda *a: calls.append(1) or contract(*a))
    grads = {}
    for once in (True, False):
        model, _ = build_model(run_spec(cfg))
        model.train()
        torch.manual_seed(0)  # the same dropout in both runs
        for p in central_parameters(model):
            p.requires_grad_(not masked)
        calls.clear()
        with one_contraction_per_step(model, cpu, precision, model, 3 if once else 1):
            for batch in seq2seq_batches(3):
                with autocast(cpu, precision):
                    loss = model(**batch).loss / 3
                loss.backward()
        matrices = sum(len(m.spec.matrix_names) for m in model.modules() if isinstance(m, MPOExperts))
        per_micro_batch = 2 if cfg.method.get("recompute") else 1  # recompute contracts again in backward
        assert len(calls) == (2 * matrices if once else 3 * per_micro_batch * matrices)
        grads[once] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert not masked or not any("central" in n for n in grads[True])
    for name, grad in grads[True].items():
        if precision == "fp32":
            torch.testing.assert_close(grad, grads[False][name], rtol=1e-5, atol=1e-7, msg=name)
        else:  # bf16 matmuls summed in another order: agreement to bf16's precision (measured <= 0.5%)
            assert (grad - grads[False][name]).norm() <= 1e-2 * grads[False][name].norm(), name


@pytest.mark.parametrize("method", ["mpoe", "switch"])
def test_trainer_with_accumulation_applies_the_gradients_of_one_contraction_per_micro_batch(
    tmp_path, monkeypatch, method
):
    """Two optimizer steps of 2 x 2 micro-batches (one of them masked, for mpoe): the gradients each optimizer step
    applies equal those of handing out the expert matrices per micro-batch (the experts' begin_step disabled)."""
    from mpoe_exp.moe import DenseExperts, MPOExperts
    from mpoe_exp.training import TrainingStep

    args = ("train.max_steps=2", "train.batch_size=2", "train.grad_accum_steps=2", f"method={method}")
    args += ("method.gradient_mask_prob=0.5",) if method == "mpoe" else ()
    applied = {"once": [], "each": []}
    optimizer_step = TrainingStep.optimizer_step

    def recording(which):
        def step(self):
            applied[which].append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
            return optimizer_step(self)

        return step

    monkeypatch.setattr(TrainingStep, "optimizer_step", recording("once"))
    tiny_trainer(tmp_path / "once", *args)[0].fit()
    monkeypatch.setattr(TrainingStep, "optimizer_step", recording("each"))
    monkeypatch.setattr(MPOExperts, "begin_step", lambda self: None)
    monkeypatch.setattr(DenseExperts, "begin_step", lambda self: None, raising=False)
    tiny_trainer(tmp_path / "each", *args)[0].fit()
    assert len(applied["once"]) == len(applied["each"]) == 2
    first_once, first_each = applied["once"][0], applied["each"][0]  # the same weights: comparable gradients
    assert first_once.keys() == first_each.keys()
    for name, grad in first_once.items():
        torch.testing.assert_close(grad, first_each[name], rtol=1e-5, atol=1e-7, msg=name)


def test_the_trainer_steps_with_fused_adamw(tmp_path):
    """One pass over each parameter: foreach AdamW took 4x the time and a temporary copy of every parameter."""
    trainer, _ = tiny_trainer(tmp_path)
    assert trainer.optimizer.defaults["fused"] is True


def test_fused_adamw_moves_parameters_as_the_foreach_one():
    """The project's AdamW (fused) against torch's default (foreach): weight decay, a parameter without gradient
    on some steps (the gradient mask's centrals), the same parameters after every step."""
    from mpoe_exp.training import adamw

    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32), torch.randn(8, 8)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(6)]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    torchs = [torch.nn.Parameter(p.clone()) for p in start]
    optimizers = [adamw(ours, lr=1e-2, eps=1e-6, weight_decay=0.1)]
    optimizers.append(torch.optim.AdamW(torchs, lr=1e-2, eps=1e-6, weight_decay=0.1, foreach=True))
    for step, step_grads in enumerate(grads):
        for params, optimizer in zip((ours, torchs), optimizers):
            for i, (p, g) in enumerate(zip(params, step_grads)):
                p.grad = None if i == 2 and step % 2 else g.clone()
            optimizer.step()
        for a, b in zip(ours, torchs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours[2], start[2])


@pytest.mark.parametrize("recompute", [True, False])
def test_with_accumulation_expert_weight_gradients_add_up_in_place(recompute):
    """Within an optimizer step of k micro-batches, each micro-batch's backward adds its experts' weight gradients
    into the step's buffers in place, expert by expert: it allocates no (E, out, in) gradient stack per matrix to
    add afterwards (on CPU that allocation, page-faulted anew per micro-batch under glibc's default allocator, made
    the experts' weight gradient cost several times the dense FFN's)."""
    from torch.profiler import ProfilerActivity, profile

    from mpoe_exp import build_model, compose_config
    from mpoe_exp.moe import MPOExperts
    from mpoe_exp.training import one_contraction_per_step

    cpu = torch.device("cpu")
    model, _ = build_model(run_spec(compose_config(["model=tiny-t5", "method=mpoe", f"method.recompute={recompute}"])))
    model.train()
    experts = [m for m in model.modules() if isinstance(m, MPOExperts)]
    stack_bytes = min(
        e.num_experts * math.prod(e.spec.matrix_shape(n)) * 4 for e in experts for n in e.spec.matrix_names
    )
    first, second = seq2seq_batches(2)
    with one_contraction_per_step(model, cpu, "fp32", model, 2):
        model(**first).loss.backward()
        loss = model(**second).loss
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss.backward()
    large = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= stack_bytes]
    assert not large, large
    assert all(p.grad is not None for e in experts for p in e.auxiliary.parameters())


@pytest.mark.parametrize(("method", "precision"), [("switch", "fp32"), ("switch", "bf16"), ("moe", "fp32")])
def test_with_accumulation_dense_expert_weight_gradients_add_up_in_place(method, precision):
    """Dense experts (E full copies of each matrix: switch, moe) too: within an optimizer step of k micro-batches a
    micro-batch's forward and backward allocate no (E, out, in) stack, neither a weight gradient to add to .grad
    afterwards (that, and adding its transpose, made Switch's t5-base step take 1.34x its counted FLOPs at k = 8)
    nor, under bf16 autocast, a cast of the stack (cast once per step instead). The step's gradients reach .grad
    when it ends, not before."""
    from torch.profiler import ProfilerActivity, profile

    from mpoe_exp import build_model, compose_config
    from mpoe_exp.moe import DenseExperts, MoEFeedForward
    from mpoe_exp.training import autocast, one_contraction_per_step

    cpu = torch.device("cpu")
    model, _ = build_model(run_spec(compose_config(["model=tiny-t5", f"method={method}"])))
    model.train()
    experts = [m.experts for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert experts and all(isinstance(e, DenseExperts) for e in experts)
    itemsize = 2 if precision == "bf16" else 4
    stack_bytes = min(e.num_experts * math.prod(e.spec.matrix_shape(n)) * itemsize for e in experts for n in e.matrices)
    first, second = seq2seq_batches(2)
    with one_contraction_per_step(model, cpu, precision, model, 2):
        with autocast(cpu, precision):
            loss = model(**first).loss
        loss.backward()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with autocast(cpu, precision):
                loss = model(**second).loss
            loss.backward()
        assert all(p.grad is None for e in experts for p in e.matrices.values())
    large = [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage >= stack_bytes]
    assert not large, large
    assert all(p.grad is not None and p.grad.dtype == p.dtype for e in experts for p in e.matrices.values())


def test_evaluation_after_a_fused_adamw_step_sees_the_new_weights():
    """MPOE's evaluation cache is keyed by the tensors' version counters, which torch's fused AdamW kernel does not
    move (torch 2.13, CPU); the project's AdamW moves them, so evaluation never reuses matrices from before a step."""
    from mpoe_exp import mpo
    from mpoe_exp.moe import FeedForwardSpec, MPOExperts
    from mpoe_exp.training import adamw

    torch.manual_seed(0)
    spec = FeedForwardSpec(d_model=8, d_ff=16, activation="relu")
    weights = {"wi": torch.randn(16, 8), "wo": torch.randn(8, 16)}
    factorizations = {"wi": mpo.factorization(16, 8, 3), "wo": mpo.factorization(8, 16, 3)}
    experts = MPOExperts.from_dense(spec, 2, weights, {}, factorizations)
    optimizer = adamw(experts.parameters(), lr=0.1)
    with torch.no_grad():
        before = experts.materialize()[0]["wi"].clone()  # cached
    for p in experts.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    with torch.no_grad():
        after = experts.materialize()[0]["wi"]
        fresh = mpo.contract(experts.local_tensors("wi"), *factorizations["wi"])
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, fresh)


def test_training_with_accumulation_drops_the_evaluation_cache():
    """The cache of contracted matrices that evaluation fills holds no memory while training, with gradient
    accumulation (one contraction per step) as without it."""
    from mpoe_exp import build_model, compose_config
    from mpoe_exp.moe import MPOExperts
    from mpoe_exp.training import one_contraction_per_step

    model, _ = build_model(run_spec(compose_config(["model=tiny-t5", "method=mpoe"])))
    batch = seq2seq_batches(1)[0]
    model.eval()
    with torch.no_grad():
        model(**batch)
    experts = [m for m in model.modules() if isinstance(m, MPOExperts)]
    assert all(e._cache is not None for e in experts)
    model.train()
    with one_contraction_per_step(model, torch.device("cpu"), "fp32", model, 2):
        model(**batch).loss.backward()
        assert all(e._cache is None for e in experts)
