"""Run identity (mpoe_exp/results.py): everything that changes a run's numbers is in its directory and its hash, and a
finished run is skipped, or a checkpoint resumed, only when it was made by the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpoe_exp import results, tables
from mpoe_exp.config import compose_config
from mpoe_exp.errors import UserError
from mpoe_exp.runner import run

BASE = ["model=tiny-t5", "method=mpoe", "task=cola", "data_dir=${mpoe_demo_data:glue}"]


@pytest.mark.parametrize(
    "override",
    [
        "method.gradient_mask_prob=0.3",
        "method.num_experts=4",
        "method.mpo.num_tensors=3",
        "train.warmup_steps=7",
        "train.label_smoothing=0.0",
        "model.path=/somewhere/else",
        "train.weight_decay=0.01",
        "method.router.jitter=0.01",
    ],
)
def test_runs_that_differ_in_one_setting_get_different_directories(override):
    base = compose_config(BASE)
    other = compose_config([*BASE, override])
    assert results.config_hash(base) != results.config_hash(other)
    assert results.run_dir(base) != results.run_dir(other)
    # the readable tag stays, the short hash is added
    assert results.run_dir(other).parent.name.startswith("lr=0.0001,bs=32,ep=3,cfg=")


@pytest.mark.parametrize("override", ["seed=2", "runs_dir=elsewhere", "force=true", "logger=wandb", "device=cpu"])
def test_outputs_seed_and_logging_are_not_part_of_the_identity(override):
    assert results.config_hash(compose_config(BASE)) == results.config_hash(compose_config([*BASE, override]))


MEMORY_ONLY = ["method.recompute=false", "method.recompute=true", "method.mpo.cache_in_eval=false"]


@pytest.mark.parametrize("override", MEMORY_ONLY)
def test_memory_and_time_trades_are_not_part_of_the_identity(override):
    """Recomputing in backward and caching in evaluation trade memory for time; the run's numbers stay the same
    (next test), so a run made with either setting is the same run."""
    assert results.config_hash(compose_config(BASE)) == results.config_hash(compose_config([*BASE, override]))


def test_memory_and_time_trades_give_the_same_numbers(tmp_path):
    quick = [*BASE, "train.max_steps=4", "train.eval_every=2", "train.batch_size=8", "method.gradient_mask_prob=0.5"]
    found = []
    for i, override in enumerate(MEMORY_ONLY):
        cfg = compose_config([*quick, override, f"runs_dir={tmp_path / str(i)}"])
        result = json.loads((run(cfg) / results.RESULTS_FILE).read_text())
        found.append((result["history"], result["validation"], result["test"], result["central_updates"]))
    assert found[1] == found[0] and found[2] == found[0]


def test_identity_does_not_depend_on_where_the_package_is_installed():
    ident = results.identity(compose_config(BASE))
    assert ident["data_dir"] == "<demo_data>/glue"
    assert "seed" not in ident and "runs_dir" not in ident and "log_every" not in ident["train"]


QUICK = [*BASE, "train.max_steps=2", "train.eval_every=1", "train.batch_size=8"]


def test_finished_run_of_another_config_is_never_reported_as_this_one(tmp_path, capsys):
    cfg = compose_config([*QUICK, f"runs_dir={tmp_path}"])
    directory = run(cfg)
    saved = json.loads((directory / results.RESULTS_FILE).read_text())
    assert saved["config_hash"] == results.config_hash(cfg)
    run(cfg)
    assert "already finished" in capsys.readouterr().out
    # the same folder holding another config's results (an older version's file, or a short-hash collision)
    saved["config_hash"] = "0" * 64
    (directory / results.RESULTS_FILE).write_text(json.dumps(saved))
    with pytest.raises(UserError, match="holds the results of another config"):
        run(cfg)
    run(compose_config([*QUICK, f"runs_dir={tmp_path}", "force=true"]))
    assert json.loads((directory / results.RESULTS_FILE).read_text())["config_hash"] == results.config_hash(cfg)


def _record(runs: Path, seed: int, mask_prob: float, validation: float, test: float) -> None:
    cfg = compose_config([*BASE, f"seed={seed}", f"method.gradient_mask_prob={mask_prob}", "experiment_name=paper"])
    from omegaconf import OmegaConf

    directory = runs / f"p={mask_prob}" / f"seed={seed}"
    directory.mkdir(parents=True)
    record = {
        "status": "finished",
        "experiment": "paper",
        "model": "t5-base",
        "table_model": "t5-base",
        "method": "mpoe",
        "method_label": "mpoe",
        "ablation": "none",
        "task": "cola",
        "seed": seed,
        "hparams": results.hparams(cfg),
        "config_hash": results.config_hash(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "main_metric": "mcc",
        "greater_is_better": True,
        "validation": {"mcc": validation},
        "test": {"mcc": test},
        "parameters": {"total": 294_000_000},
    }
    (directory / results.RESULTS_FILE).write_text(json.dumps(record))


def test_tables_choose_between_settings_that_differ_beyond_the_learning_rate(tmp_path):
    """Two gradient-mask probabilities at the same learning rate are two settings, chosen on validation and shown."""
    for seed in (1, 2, 3):
        _record(tmp_path, seed, 0.5, validation=40.0, test=70.0)
        _record(tmp_path, seed, 0.3, validation=60.0, test=50.0 + seed)
    records, problems = tables.load_results(tmp_path)
    assert not problems
    selection = tables.select(records)[("paper", "t5-base", "mpoe", "cola")]
    assert selection.settings == 2
    assert selection.hparams["method.gradient_mask_prob"] == 0.3
    assert selection.stat("mcc").mean == pytest.approx(52.0)
    table = tables.build_tables(tables.select(records), "paper")[0]
    assert "method.gradient_mask_prob" in tables.render_markdown(table)


def test_make_tables_lists_runs_that_fit_no_row(tmp_path, capsys):
    for seed in (1, 2):
        _record(tmp_path, seed, 0.5, validation=40.0, test=70.0)
    record_path = next(tmp_path.rglob(results.RESULTS_FILE))
    stray = json.loads(record_path.read_text())
    stray.update(model="tiny-t5", table_model="tiny-t5")
    (record_path.parent.parent / "stray").mkdir()
    (record_path.parent.parent / "stray" / results.RESULTS_FILE).write_text(json.dumps(stray))
    assert tables.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-t5/mpoe/cola: 1 run(s) fit no table row: no table has a row for model tiny-t5" in out
    assert "table_model=" in out


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, monkeypatch):
    import torch
    from test_runner import killed_in_the_final_test_evaluation

    cfg = compose_config([*QUICK, f"runs_dir={tmp_path}", "train.checkpoint_every=1"])
    directory = killed_in_the_final_test_evaluation(cfg, monkeypatch)  # the next start resumes
    last = directory / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["config_hash"] == results.config_hash(cfg)
    checkpoint["config_hash"] = "f" * 64
    torch.save(checkpoint, last)
    with pytest.raises(UserError, match="saved by another config.*force=true"):
        run(cfg)
    run(compose_config([*QUICK, f"runs_dir={tmp_path}", "train.checkpoint_every=1", "force=true"]))
    assert json.loads((directory / results.RESULTS_FILE).read_text())["status"] == "finished"
