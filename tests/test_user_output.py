"""What a user sees: the plan before training, the summary with the metric's scale and unparsable predictions, quiet
exits when output is cut short, thread settings for small models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mpoe_exp.config import compose_config
from mpoe_exp.runner import SMALL_MODEL_PARAMETERS, describe_metric, run, set_cpu_threads

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_prints_its_plan_before_training_and_a_summary_with_the_scale(tmp_path, capsys):
    cfg = compose_config(
        ["model=tiny-t5", "method=mpoe", "task=cola", "data_dir=${mpoe_demo_data:glue}", f"runs_dir={tmp_path}"]
        + ["train.max_steps=2", "train.eval_every=1", "train.batch_size=8"]
    )
    run(cfg)
    out = capsys.readouterr().out
    plan = out[: out.index("results:")]
    assert f"run: {tmp_path}" in plan
    assert "device cpu, precision fp32" in plan
    assert "parameters: total" in plan and "trainable" in plan
    assert "plan: 2 optimizer steps" in plan and "validation every 1 steps (2 evaluations)" in plan
    assert "step 1: train loss" in out and "validation mcc" in out  # every evaluation reaches the console
    summary = out[out.index("results:") :]
    assert "mcc = " in summary and "x100, higher is better" in summary
    assert "predictions unparsable" in summary


def test_the_summary_names_unparsable_predictions():
    task = SimpleNamespace(main_metric="mcc", greater_is_better=True, split_sizes={"validation": 60})
    text = describe_metric(task, {"mcc": 0.0, "unparsable": 60}, "validation")
    assert text.startswith("mcc = 0.0000 (x100, higher is better, 60 of 60 predictions unparsable")
    assert "not learned the label strings" in text
    lm = SimpleNamespace(main_metric="perplexity", greater_is_better=False, split_sizes={"test": 4})
    assert describe_metric(lm, {"perplexity": 21.5}, "test") == "perplexity = 21.5000 (lower is better)"


@pytest.mark.slow
def test_dry_run_whose_reader_stops_early_exits_quietly():
    """`make dry-run` pipes each report into `head -2`: a closed pipe is no error."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpoe_exp", "model=tiny-gpt2", "method=mpoe", "dry_run=true"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_small_models_train_on_one_cpu_thread_unless_told_otherwise():
    before = torch.get_num_threads()
    small = torch.nn.Linear(10, 10)
    big = torch.nn.Linear(1, SMALL_MODEL_PARAMETERS)
    try:
        torch.set_num_threads(2)
        set_cpu_threads("auto", torch.device("cpu"), small)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        set_cpu_threads("auto", torch.device("cpu"), big)
        assert torch.get_num_threads() == 2
        set_cpu_threads(3, torch.device("cpu"), small)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_a_run_builds_its_model_on_the_cpu_threads_it_was_given(tmp_path, monkeypatch):
    """cpu_threads set to a number holds from the start: upcycling (the MPO decompositions' SVDs) runs on those
    threads too, so parallel sweeps with cpu_threads=1 do not oversubscribe the cores while building."""
    from mpoe_exp import runner

    seen = []
    build = runner.build_model
    monkeypatch.setattr(runner, "build_model", lambda spec: (seen.append(torch.get_num_threads()), build(spec))[1])
    cfg = compose_config(
        ["model=tiny-t5", "method=mpoe", "task=cola", "data_dir=${mpoe_demo_data:glue}", f"runs_dir={tmp_path}"]
        + ["train.max_steps=1", "train.batch_size=8", "cpu_threads=3"]
    )
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(cfg)
        assert seen == [3] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("old", ["huggingface-cli"])
def test_no_command_that_no_longer_exists_is_recommended(old):
    for path in [ROOT / "README.md", *(ROOT / "mpoe_exp").rglob("*.py")]:
        assert old not in path.read_text(), path
