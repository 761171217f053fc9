"""The experiment configs of the paper's tables (conf/experiment/table*.yaml), their smoke twins on tiny models,
the smoke path end to end (sweep -> results -> make tables -> figures), sweeps that survive a failed run, and the
GPU-hour estimates of mpoe_exp.cost."""

from __future__ import annotations

import csv
import functools
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mpoe_exp import compose_config, cost, mpo, tables
from mpoe_exp.config import CONFIG_DIR, DEMO_DATA_DIR, available, expand_sweep, method_label
from mpoe_exp.results import RESULTS_FILE, table_model
from mpoe_exp.runner import check_task_fits_model

ROOT = Path(__file__).resolve().parent.parent
PAPER = ["table1_t5_base", "table1_t5_large", "table1_gpt2", "table2", "table3", "table4", "extra_methods_t5_base",
         "extra_methods_gpt2"]  # fmt: skip
SMOKE = [f"{name}_smoke" for name in PAPER]
SWEPT = ("method", "task", "ablation")  # what a table's rows and columns are made of


@functools.cache  # per test process: several tests here read every run of every experiment
def distinct_runs(experiment: str) -> dict[tuple[str, ...], list[str]]:
    """The experiment's runs up to seed and learning rate (those change nothing about validity)."""
    runs = {}
    for overrides in expand_sweep([f"experiment={experiment}"]):
        key = tuple(o for o in overrides if o.partition("=")[0] not in ("seed", "train.lr"))
        runs.setdefault(key, list(key))
    return runs


@functools.cache
def composed_run(overrides: tuple[str, ...]):
    """compose_config of one run (composed, validated), once per test process; read only."""
    return compose_config(list(overrides))


def swept(experiment: str) -> dict[str, str]:
    params = OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml").get("hydra", {}).get("sweeper", {})
    return dict(params.get("params", {}))


def test_every_table_has_an_experiment_and_a_smoke_twin():
    assert set(PAPER) | set(SMOKE) <= set(available("experiment"))
    for paper, smoke in zip(PAPER, SMOKE):
        paper_cfg, smoke_cfg = (compose_config([f"experiment={e}"]) for e in (paper, smoke))
        assert paper_cfg.experiment_name == "paper" and smoke_cfg.experiment_name == "smoke"
        assert not paper_cfg.model.name.startswith("tiny") and smoke_cfg.model.name.startswith("tiny")
        assert table_model(smoke_cfg) == paper_cfg.model.name  # the tiny model stands in for the paper's
        paper_runs = {tuple(sorted(o for o in r if o.split("=")[0] in SWEPT)) for r in distinct_runs(paper).values()}
        smoke_runs = {tuple(sorted(o for o in r if o.split("=")[0] in SWEPT)) for r in distinct_runs(smoke).values()}
        assert paper_runs == smoke_runs, paper  # the smoke twin runs the same grid of methods/tasks/ablations


# The full experiments' runs are composed in the fast tier by test_paper_settings.py too (each run's settings against
# the paper's), so composing them here again is slow-tier work; their smoke twins stay fast.
@pytest.mark.parametrize("experiment", [pytest.param(e, marks=pytest.mark.slow) for e in PAPER] + SMOKE)
def test_every_run_of_every_experiment_composes(experiment):
    runs = distinct_runs(experiment)
    assert len(expand_sweep([f"experiment={experiment}"])) >= 3 * len(runs)  # seeds 1-3 at least
    for overrides in runs.values():
        cfg = composed_run(tuple(overrides))
        check_task_fits_model(cfg)
        assert cfg.seed in (1, 2, 3)
        if experiment.endswith("_smoke"):
            assert Path(cfg.data_dir).is_dir() and Path(cfg.data_dir).is_relative_to(DEMO_DATA_DIR)


def test_the_experiments_fill_every_row_of_the_paper_tables():
    """Every (model, method, task) a table row needs is a run of some experiment, for the paper and the smoke runs."""
    paper = tables.load_paper()
    for suffix in ("", "_smoke"):
        produced = set()
        for experiment in PAPER:
            for overrides in distinct_runs(experiment + suffix).values():
                cfg = composed_run(tuple(overrides))
                produced.add((table_model(cfg), method_label(cfg), cfg.task.name))
        for name in tables.TABLE_NAMES:
            for row in paper[name]["rows"]:
                if row["model"] is None:
                    continue
                for column in paper[name]["columns"]:
                    if column.get("average"):
                        continue
                    labels = [row["method"], *row.get("aliases", [])]
                    assert any((row["model"], m, column["task"]) in produced for m in labels), (suffix, name, row)


@pytest.mark.slow
def test_a_sweep_goes_on_after_a_failed_run_and_lists_it_at_the_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mpoe_exp", "-m", "model=tiny-t5", "method=dense,mpoe", "ablation=no_mask", "task=cola",
         f"data_dir={DEMO_DATA_DIR / 'glue'}", "train.max_steps=2", "train.eval_every=2", f"runs_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 1
    assert "1 run(s) of the sweep failed" in result.stderr and "method=dense" in result.stderr
    assert "only applies to MPO methods" in result.stderr and "Traceback" not in result.stderr
    assert [p.parts[-5] for p in tmp_path.rglob(RESULTS_FILE)] == ["mpoe-no_mask"]  # the other run finished


@pytest.mark.slow
def test_an_experiment_without_multirun_says_to_add_m(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mpoe_exp", "experiment=table3_smoke", f"runs_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert result.returncode == 2 and "add -m" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_smoke_experiment_then_make_tables(tmp_path):
    """Acceptance: a smoke sweep offline, then `make tables`: the table has its paper rows, ours (mean ± std, n)
    beside the paper's, selection by validation among two learning rates, and the figures."""
    sweep = subprocess.run(
        [sys.executable, "-m", "mpoe_exp", "-m", "experiment=table3_smoke", f"runs_dir={tmp_path}",
         "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2"],  # as `make smoke` runs them
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert len(list(tmp_path.rglob(RESULTS_FILE))) == 3 * 3 * 2  # ablations x seeds x learning rates
    make = subprocess.run(["make", "tables", f"RUNS={tmp_path}", f"PYTHON={sys.executable}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert make.returncode == 0, make.stderr[-3000:]
    out = tmp_path / "smoke" / "tables"
    for name in tables.TABLE_NAMES:
        for ext in ("md", "tex", "csv"):
            assert (out / f"{name}.{ext}").is_file()
    md = (out / "table3.md").read_text()
    for label in ("+MoE^F", "w/o PS", "w/o GM", "+MPOE"):
        assert f"| {label} |" in md
    assert "| PPL | B2 | B4 | #To (M) |" in md
    rows = {(r["method"], r["column"]): r for r in csv.DictReader((out / "table3.csv").open())}
    for method in ("mpoe", "mpoe-no_sharing", "mpoe-no_mask"):
        ppl = rows[(method, "PPL")]
        assert ppl["status"] == "ok" and ppl["n"] == "3" and ppl["ours_std"] != "" and ppl["paper"] != ""
        assert ppl["settings"] == "2" and ppl["models_ran"] == "tiny-gpt2"
        assert f"gpt2/{method} (ran tiny-gpt2) | ours | " in md
    assert rows[("moe", "PPL")]["status"] == "missing"  # the MoE row comes from table1_gpt2_smoke, not run here
    assert (out / "params_table3.png").stat().st_size > 1000
    assert (out / "curves_gpt2_wikitext2.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.sweep
def test_all_smoke_experiments_fill_every_table(tmp_path):
    """`make smoke` (every smoke experiment, then make tables): no row the experiments should fill is missing. Over
    600 tiny runs, so `make test-sweeps` runs it, not test-all: that one runs a smoke sweep and make tables on a part
    (test_smoke_experiment_then_make_tables, the extra methods' test), and the fast tier checks by composition that
    the experiments fill every row (test_the_experiments_fill_every_row_of_the_paper_tables)."""
    smoke = subprocess.run(["make", "smoke", f"RUNS={tmp_path}", f"PYTHON={sys.executable}"],
                           capture_output=True, text=True, cwd=ROOT, timeout=3600)  # fmt: skip
    assert smoke.returncode == 0, smoke.stderr[-3000:]
    written, problems, n_failed, unplaced = tables.make_tables(tmp_path)
    assert not problems and n_failed == 0 and not unplaced
    for name in tables.TABLE_NAMES:
        for row in csv.DictReader((tmp_path / "smoke" / "tables" / f"{name}.csv").open()):
            if row["model"]:
                assert row["status"] == "ok" and (row["n"] == "3" or row["column"] == tables.PARAMS_COLUMN), row


# --- GPU-hour estimates --------------------------------------------------------------------------------------------


def test_mpo_reconstruction_cost_is_the_contraction_of_every_expert_matrix():
    cfg = compose_config(["model=t5-base", "method=mpoe"])
    per_matrix = mpo.contraction_macs((4, 4, 8, 6, 4), (3, 4, 4, 4, 4))
    assert per_matrix == 3072 * 768 * 577.1875  # ~|W| (r2 + r3): docs/method.md, 'Cost model of GPU hours'
    both = per_matrix + mpo.contraction_macs((3, 4, 4, 4, 4), (4, 4, 8, 6, 4))
    assert cfg.method.recompute  # the matrices are contracted again in backward: forward twice, backward once
    assert cost._reconstruction_flops(cfg) == 2 * 4 * 8 * 24 * both
    stored = compose_config(["model=t5-base", "method=mpoe", "method.recompute=false"])
    assert cost._reconstruction_flops(stored) == 2 * 3 * 8 * 24 * both
    accumulated = compose_config(["model=t5-base", "method=mpoe", "method.recompute=false", "train.grad_accum_steps=2"])
    assert cost._reconstruction_flops(accumulated) == 2 * 4 * 8 * 24 * both  # MPOExperts.end_step contracts again
    assert cost._reconstruction_flops(compose_config(["model=t5-base", "method=switch"])) == 0


def test_run_cost_of_a_dense_gpt2_run_by_hand():
    cfg = compose_config(["model=gpt2", "method=dense", "task=imdb", "train.epochs=1", "train.batch_size=10"])
    workload = {"padding": 1.0, "tasks": {"imdb": {"train": 1000, "tokens": 20}}}
    tokens, flops = cost.run_cost(cfg, workload)
    body = 124_439_808 - 50257 * 768 - 1024 * 768  # without token and position embeddings
    per_example = 6 * (body + 768 * 50257) * 20 + 12 * 768 * 12 * 20**2
    assert tokens == 1000 * 20 and flops == pytest.approx(1000 * per_example)
    moe = compose_config(["model=gpt2", "method=moe", "task=imdb", "train.epochs=1", "train.batch_size=10"])
    extra = cost.run_cost(moe, workload)[1] - flops  # top-2: one more FFN per token and layer
    assert extra == pytest.approx(1000 * 6 * 2 * 768 * 3072 * 12 * 20)


def test_mpo_reconstruction_is_charged_once_per_optimizer_step():
    """With k micro-batches per optimizer step the experts are contracted once per step for all of them
    (MPOExperts.begin_step), not once per micro-batch."""
    workload = {"padding": 1.0, "tasks": {"imdb": {"train": 1000, "tokens": 20}}}
    base = ["model=gpt2", "task=imdb", "train.epochs=1", "train.batch_size=10"]
    costs = {}
    for method in ("switch", "mpoe"):
        for k in (1, 4):
            costs[method, k] = cost.run_cost(compose_config([*base, f"method={method}", f"train.grad_accum_steps={k}"]),
                                             workload)[1]  # fmt: skip
    reconstruction = cost._reconstruction_flops(compose_config([*base, "method=mpoe"]))
    assert costs["mpoe", 1] - costs["switch", 1] == pytest.approx(100 * reconstruction)  # 100 micro-batches
    assert costs["mpoe", 4] - costs["switch", 4] == pytest.approx(25 * reconstruction)  # 25 optimizer steps


@pytest.mark.slow
def test_readme_shows_the_estimates_the_command_prints():
    printed = cost.render(cost.estimate(list(cost.PAPER_EXPERIMENTS)), 60.0)
    readme = (ROOT / "README.md").read_text()
    assert printed in readme, printed


@pytest.mark.slow
def test_extra_method_smoke_runs_appear_in_the_tables(tmp_path):
    """The extra methods: a smoke sweep of each (CartesianMoE, MEO, adapter experts) runs offline, and make tables
    shows them as extra rows."""
    for experiment, extra in (("extra_methods_t5_base_smoke", ["task=rte"]),
                              ("extra_methods_gpt2_smoke", ["task=wikitext2", "train.lr=1e-3"])):  # fmt: skip
        sweep = subprocess.run(
            [sys.executable, "-m", "mpoe_exp", "-m", f"experiment={experiment}", "seed=1", *extra,
             f"runs_dir={tmp_path}"],
            capture_output=True, text=True, cwd=ROOT, timeout=900,
        )  # fmt: skip
        assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert len(list(tmp_path.rglob(RESULTS_FILE))) == 6
    tables.make_tables(tmp_path)
    out = tmp_path / "smoke" / "tables"
    nlu = {(r["method"], r["column"]): r for r in csv.DictReader((out / "table1_nlu.csv").open())}
    nlg = {(r["method"], r["column"]): r for r in csv.DictReader((out / "table1_nlg.csv").open())}
    for method in ("cartesian", "meo", "adapters"):
        assert nlu[(method, "RTE")]["status"] == "ok" and nlu[(method, "RTE")]["n"] == "1"
        assert nlu[(method, "RTE")]["paper"] == ""  # not in the paper
        assert (
            nlg[(method, "WikiText-2 PPL")]["status"] == "ok"
            and float(nlg[(method, "WikiText-2 PPL")]["ours_mean"]) > 1
        )
    md = (out / "table1_nlu.md").read_text()
    assert (
        "| +CartesianMoE | t5-base/cartesian (ran tiny-t5) | ours |" in md
        and "| +MEO | t5-base/meo (ran tiny-t5) |" in md
        and "| +Adapters | t5-base/adapters (ran tiny-t5) |" in md
    )
