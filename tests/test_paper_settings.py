"""Every run of the paper's table experiments trains with the settings of the paper and its reference code (AdamW,
warmup and linear decay, clipping, label smoothing on T5 targets only, lengths, batch, learning rates); what we
chose differently is listed in the README's "Deviations" section."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_experiments import PAPER, composed_run, distinct_runs, swept

from mpoe_exp import compose_config

ROOT = Path(__file__).resolve().parent.parent


def paper_runs():
    for experiment in PAPER:
        for overrides in distinct_runs(experiment).values():
            yield experiment, composed_run(tuple(overrides))  # composed once per test process (test_experiments.py)


@pytest.fixture(scope="module")
def runs():
    return list(paper_runs())


def test_every_run_of_every_paper_experiment_composes_and_fits_its_model(runs):
    """The fast tier's check of every full experiment's runs (test_experiments.py composes them again, slow)."""
    from mpoe_exp.runner import check_task_fits_model

    assert {experiment for experiment, _ in runs} == set(PAPER)
    for _, cfg in runs:
        check_task_fits_model(cfg)
        assert cfg.seed in (1, 2, 3)


def test_optimizer_and_schedule_are_the_references(runs):
    for experiment, cfg in runs:
        train = cfg.train
        assert (train.adam_eps, train.weight_decay, train.grad_clip) == (1e-8, 0.0, 1.0), experiment
        assert (train.warmup_steps or 0) > 0 or train.warmup_ratio > 0, f"{experiment}: no warmup"
        assert train.precision == "fp32"


def test_label_smoothing_on_t5_targets_only(runs):
    for experiment, cfg in runs:
        expected = 0.1 if cfg.model.family == "t5" else 0.0
        assert cfg.train.label_smoothing == expected, (experiment, cfg.model.name, cfg.task.name)


def test_lengths_and_batches(runs):
    for experiment, cfg in runs:
        batch = cfg.train.batch_size * cfg.train.grad_accum_steps
        if cfg.model.family == "t5":
            assert cfg.task.max_source_length == 128, experiment
            assert batch == (4 if cfg.model.name == "t5-large" else 32), experiment
        else:
            assert cfg.task.get("block_size", 1024) == 1024 or cfg.task.type == "generation"
            assert batch == 32, experiment


def test_learning_rates_cover_the_papers_range():
    """Single-task: a grid inside the paper's 1e-5..1e-4 reaching both ends (T5); multi-task: 3e-5 for 65,536 steps,
    warmup 500, as the reference."""
    for experiment in ("table1_t5_base", "table1_t5_large"):
        lrs = {float(lr) for lr in str(swept(experiment)["train.lr"]).split(",")}
        assert min(lrs) == 1e-5 and max(lrs) == 1e-4 and len(lrs) >= 3, experiment
    table2 = compose_config(["experiment=table2", "method=mpoe", "seed=1"])
    assert (table2.train.lr, table2.train.max_steps, table2.train.warmup_steps) == (3e-5, 65536, 500)


def test_every_deviation_is_listed_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Deviations from the paper") :]
    section = section[: section.index("\n## ")]
    for topic in ("warmup", "label smoothing", "learning rate", "epochs", "batch", "target length", "p_b"):
        assert topic in section.lower(), topic
