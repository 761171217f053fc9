"""`make tables` (mpoe_exp/tables.py): results.json files written by hand, aggregated and rendered beside the paper."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from mpoe_exp import aggregate, tables
from mpoe_exp.run_record import RunRecord

ROOT = Path(__file__).resolve().parents[1]
EXP = "paper"


def write_run(
    runs: Path,
    model: str,
    method: str,
    task: str,
    seed: int,
    lr: float,
    validation: dict,
    test: dict,
    *,
    status: str = "finished",
    main_metric: str = "perplexity",
    greater_is_better: bool = False,
    total: int = 157_400_000,
    table_model: str | None = None,
    experiment: str = EXP,
    wall_time_s: float | None = None,
    extra: dict | None = None,
) -> Path:
    hp = {"lr": lr, "bs": 32, "ep": 3, "steps": None}
    model_dir = f"{model}-as-{table_model}" if table_model else model
    directory = runs / experiment / model_dir / method / task / f"lr={lr},bs=32,ep=3" / f"seed={seed}"
    directory.mkdir(parents=True)
    record = {
        "schema_version": 1,
        "status": status,
        "experiment": experiment,
        "model": model,
        "table_model": table_model or model,
        "method": method.split("-")[0],
        "method_label": method,
        "ablation": method.split("-")[1] if "-" in method else "none",
        "task": task,
        "seed": seed,
        "hparams": hp,
        "main_metric": main_metric,
        "greater_is_better": greater_is_better,
        "parameters": {"total": total, "trainable": total},
    }
    if wall_time_s is not None:
        record["wall_time_s"] = wall_time_s
    if status == "finished":
        record.update(validation=validation, test=test)
    else:
        record["error"] = "loss diverged"
    record.update(extra or {})
    path = directory / "results.json"
    path.write_text(json.dumps(record))
    return path


# gpt2/mpoe on wikitext2, lr 1e-4 (3 seeds): validation PPL 20 (the better, lower), test PPL 21, 22, 23 (mean 22).
# lr 1e-3 (3 seeds): validation PPL 25 (worse), test PPL 10: test-better, must NOT be chosen.
GOOD_TEST_PPL = [21.0, 22.0, 23.0]
GOOD_B2 = [28.0, 29.0, 30.5]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    for seed, ppl, b2 in zip((1, 2, 3), GOOD_TEST_PPL, GOOD_B2):
        write_run(runs, "gpt2", "mpoe", "wikitext2", seed, 1e-4, {"perplexity": 20.0}, {"perplexity": ppl, "bleu2": b2})
        write_run(runs, "gpt2", "mpoe", "wikitext2", seed, 1e-3, {"perplexity": 25.0}, {"perplexity": 10.0, "bleu2": 1})
    # A failed run in the selected setting: excluded from the means, counted.
    write_run(runs, "gpt2", "mpoe", "wikitext2", 4, 1e-4, {}, {}, status="failed")
    # gpt2/dense on wikitext2: only 2 seeds (must be marked).
    for seed, ppl in ((1, 21.0), (2, 22.0)):
        write_run(
            runs, "gpt2", "dense", "wikitext2", seed, 1e-4, {"perplexity": 30.0}, {"perplexity": ppl}, total=124e6
        )
    # t5-base/mpoe on CoLA (mcc, greater is better): lr 1e-4 validation 60 (best) -> test 50; lr 1e-3 val 40 -> 70.
    for seed in (1, 2, 3):
        for lr, val, tst in ((1e-4, 60.0, 50.0 + seed), (1e-3, 40.0, 70.0)):
            write_run(
                runs, "t5-base", "mpoe", "cola", seed, lr, {"mcc": val}, {"mcc": tst},
                main_metric="mcc", greater_is_better=True, total=294_000_000,
            )  # fmt: skip
    # A corrupt file and one missing required keys: reported and skipped.
    bad = runs / EXP / "gpt2" / "moe" / "wikitext2" / "lr=0.0001,bs=32,ep=3" / "seed=1"
    bad.mkdir(parents=True)
    (bad / "results.json").write_text('{"status": "finished", "experiment": ')
    partial = bad.parent / "seed=2"
    partial.mkdir()
    (partial / "results.json").write_text(json.dumps({"status": "finished", "experiment": EXP}))
    return runs


def test_selection_compares_settings_on_the_seeds_they_share(tmp_path: Path):
    """A sweep stopped part way: lr 1e-4 has seeds 1-3, lr 1e-3 only seed 1. Over all their seeds lr 1e-3 (validation
    85) beats lr 1e-4 (mean 83.3), but only because seeds 2 and 3 were hard for every setting; on seed 1, the one both
    ran, lr 1e-4 is better (90 against 85), and it is chosen. Its reported validation mean stays over all its seeds."""
    runs = tmp_path / "runs"
    for seed, val in ((1, 90.0), (2, 80.0), (3, 80.0)):
        write_run(runs, "t5-base", "mpoe", "cola", seed, 1e-4, {"mcc": val}, {"mcc": val},
                  main_metric="mcc", greater_is_better=True)  # fmt: skip
    write_run(runs, "t5-base", "mpoe", "cola", 1, 1e-3, {"mcc": 85.0}, {"mcc": 85.0},
              main_metric="mcc", greater_is_better=True)  # fmt: skip
    records, _ = tables.load_results(runs)
    chosen = tables.select(records)[(EXP, "t5-base", "mpoe", "cola")]
    assert chosen.hparams["lr"] == 1e-4 and chosen.settings == 2
    assert chosen.validation_mean == pytest.approx(250.0 / 3)


def test_load_results_reports_corrupt_and_incomplete_files(runs: Path):
    records, problems = tables.load_results(runs)
    assert len(records) == 6 + 1 + 2 + 6
    assert sum(not r.finished for r in records) == 1
    assert len(problems) == 2
    assert any("seed=1" in p and "unreadable JSON" in p for p in problems)
    assert any("seed=2" in p and "missing required keys" in p and "model" in p for p in problems)
    missing_dir_records, missing_dir_problems = tables.load_results(runs / "nowhere")
    assert missing_dir_records == [] and "no such directory" in missing_dir_problems[0]


def test_selection_uses_mean_validation_and_reports_test_mean_std(runs: Path):
    records, _ = tables.load_results(runs)
    sel = tables.select(records)
    mpoe = sel[(EXP, "gpt2", "mpoe", "wikitext2")]
    assert mpoe.hparams["lr"] == 1e-4 and mpoe.settings == 2 and mpoe.n_failed == 1
    ppl = mpoe.stat("perplexity")
    assert ppl.n == 3 and ppl.mean == pytest.approx(22.0) and ppl.std == pytest.approx(1.0)  # ddof=1
    b2 = mpoe.stat("bleu2")
    assert b2.mean == pytest.approx(np.mean(GOOD_B2)) and b2.std == pytest.approx(np.std(GOOD_B2, ddof=1))
    cola = sel[(EXP, "t5-base", "mpoe", "cola")].stat("mcc")  # greater is better: validation 60 beats 40
    assert cola.mean == pytest.approx(52.0) and cola.n == 3
    dense = sel[(EXP, "gpt2", "dense", "wikitext2")].stat("perplexity")
    assert dense.n == 2 and dense.few and dense.std == pytest.approx(np.std([21.0, 22.0], ddof=1))
    run = RunRecord("finished", "e", "m", "x", "t", 1, {}, main_metric="a", validation={"a": 1.0}, test={"a": 1.0})
    one = tables.Selection(("e", "m", "x", "t"), {}, [run], 0.0, 1, 0).stat("a")
    assert one.n == 1 and one.std is None


def test_tables_ours_beside_paper(runs: Path):
    records, _ = tables.load_results(runs)
    built = {t.name: t for t in tables.build_tables(tables.select(records), EXP)}
    t3 = built["table3"]
    mpoe = next(r for r in t3.rows if r.method == "mpoe")
    ppl = mpoe.cells[0]
    assert ppl.paper == 20.72 and ppl.diff == pytest.approx(22.0 - 20.72)
    assert mpoe.params_ours == [157.4] and mpoe.params_diff == pytest.approx(157.4 - 157)
    assert next(r for r in t3.rows if r.method == "moe").cells[0].status == "missing"
    # Table 1 NLU: only CoLA ran for t5-base/mpoe, so the average is incomplete, not a mean of one task.
    nlu = next(r for r in built["table1_nlu"].rows if (r.model, r.method) == ("t5-base", "mpoe"))
    assert nlu.cells[-1].ours is None and nlu.cells[-1].status == "incomplete (1/8)"
    hyper = next(r for r in built["table2"].rows if r.label == "Hyperformer")
    assert hyper.reference and all(c.status == "n/a" for c in hyper.cells)


def test_nlu_average_when_all_tasks_present(tmp_path: Path):
    runs = tmp_path / "runs"
    main = {"mnli": "accuracy", "qnli": "accuracy", "sst2": "accuracy", "rte": "accuracy", "qqp": "accuracy",
            "cola": "mcc", "mrpc": "accuracy", "stsb": "pearson"}  # fmt: skip
    for i, (task, metric) in enumerate(main.items()):
        for seed in (1, 2, 3):
            write_run(runs, "t5-base", "dense", task, seed, 1e-4, {metric: 1.0}, {metric: 80.0 + i},
                      main_metric=metric, greater_is_better=True)  # fmt: skip
    records, _ = tables.load_results(runs)
    nlu = tables.build_tables(tables.select(records), EXP)[0]
    row = next(r for r in nlu.rows if (r.model, r.method) == ("t5-base", "dense"))
    avg = row.cells[-1]
    assert avg.ours.mean == pytest.approx(83.5) and avg.ours.n == 3 and avg.diff == pytest.approx(83.5 - 84.12)


@pytest.mark.slow
def test_cli_writes_markdown_latex_csv(runs: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "mpoe_exp.tables", str(runs)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    tables_dir = runs / EXP / "tables"
    assert str(tables_dir) in out.stdout and "1 failed run(s) excluded" in out.stdout
    assert "2 problem(s)" in out.stderr and "unreadable JSON" in out.stderr
    for name in tables.TABLE_NAMES:
        for ext in ("md", "tex", "csv"):
            assert (tables_dir / f"{name}.{ext}").is_file()
    assert not list(tables_dir.glob(".*.tmp"))

    md = (tables_dir / "table3.md").read_text()
    lines = md.splitlines()
    ours = next(i for i, line in enumerate(lines) if line.startswith("| +MPOE | gpt2/mpoe | ours |"))
    assert "| 22.00 ± 1.00 (n=3) |" in lines[ours] and "| 157.4 |" in lines[ours]
    assert "| paper | 20.72 | 28.78 | 9.51 | 157 |" in lines[ours + 1]
    assert "| ours − paper | +1.28 | +0.39 |" in lines[ours + 2]  # bleu2 mean 29.1667 - 28.78
    assert "| +MoE^F | gpt2/moe | ours | missing | missing | missing | missing |" in md
    assert "failed run(s) excluded" in md

    md4 = (tables_dir / "table4.md").read_text()
    assert "| GPT-2 | gpt2/dense | ours | 21.50 ± 0.71 (n=2)† |" in md4  # 2 seeds: marked, not hidden

    tex = (tables_dir / "table3.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"22.00 $\pm$ 1.00 (n=3)" in tex
    assert r"mpoe-no\_sharing" in tex and r"\#To (M)" in tex
    assert r"21.50 $\pm$ 0.71 (n=2)$^\dagger$" in (tables_dir / "table4.tex").read_text()

    rows = list(csv.DictReader((tables_dir / "table3.csv").open()))
    ppl = next(r for r in rows if r["method"] == "mpoe" and r["column"] == "PPL")
    assert float(ppl["ours_mean"]) == pytest.approx(22.0) and float(ppl["ours_std"]) == pytest.approx(1.0)
    assert ppl["n"] == "3" and ppl["few_seeds"] == "0" and ppl["n_failed"] == "1"
    assert float(ppl["paper"]) == 20.72 and float(ppl["diff"]) == pytest.approx(1.28)
    assert json.loads(ppl["hparams"])["lr"] == 1e-4 and ppl["settings"] == "2"
    moe = next(r for r in rows if r["method"] == "moe" and r["column"] == "PPL")
    assert moe["status"] == "missing" and moe["ours_mean"] == "" and float(moe["paper"]) == 21.86
    params = next(r for r in rows if r["method"] == "mpoe" and r["column"] == "#To (M)")
    assert params["ours_mean"] == "157.4" and float(params["paper"]) == 157

    nlu = list(csv.DictReader((tables_dir / "table1_nlu.csv").open()))
    cola = next(r for r in nlu if (r["model"], r["method"], r["column"]) == ("t5-base", "mpoe", "CoLA"))
    assert float(cola["ours_mean"]) == pytest.approx(52.0) and float(cola["diff"]) == pytest.approx(52.0 - 65.53)
    avg = next(r for r in nlu if (r["model"], r["method"], r["column"]) == ("t5-base", "mpoe", "Avg"))
    assert avg["status"] == "incomplete (1/8)" and avg["ours_mean"] == ""


def test_cli_missing_runs_dir(tmp_path: Path):
    assert tables.main([str(tmp_path / "nope")]) == 2


def test_paper_values_transcribed():
    paper = tables.load_paper()
    assert set(tables.TABLE_NAMES) <= set(paper)
    for name in tables.TABLE_NAMES:
        columns = {c["name"] for c in paper[name]["columns"]}
        for row in paper[name]["rows"]:
            if row.get("extra"):  # not in the paper: no values to transcribe
                assert "values" not in row and "params" not in row, (name, row["label"])
                continue
            assert set(row["values"]) == columns, (name, row["label"])
    nlu = {(r["model"], r["method"]): r for r in paper["table1_nlu"]["rows"]}
    assert nlu[("t5-base", "mpoe")]["values"]["CoLA"] == 65.53 and nlu[("t5-large", "mpoe")]["params"] == 956
    # The NLU averages the paper prints are the means of its 8 tasks (to rounding).
    for row in [r for r in paper["table1_nlu"]["rows"] if not r.get("extra")]:
        values = [v for k, v in row["values"].items() if k != "Avg"]
        assert np.mean(values) == pytest.approx(row["values"]["Avg"], abs=0.02), row["label"]


def test_stand_in_models_and_method_aliases(tmp_path: Path):
    """A tiny model's runs fill the row of the model it stands in for, and say so; Table 4's m = 5 row takes an
    `ablation=m5` run when there is no plain mpoe run (the same model)."""
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        write_run(runs, "tiny-gpt2", "mpoe-m5", "wikitext2", seed, 1e-3, {"perplexity": 30.0},
                  {"perplexity": 40.0 + seed}, table_model="gpt2", total=200_000)  # fmt: skip
        write_run(runs, "tiny-gpt2", "dense", "wikitext2", seed, 1e-3, {"perplexity": 30.0},
                  {"perplexity": 50.0}, table_model="gpt2", total=100_000)  # fmt: skip
        write_run(runs, "gpt2", "dense", "wikitext2", seed, 1e-4, {"perplexity": 20.0}, {"perplexity": 21.0})
    records, problems = tables.load_results(runs)
    assert not problems
    selections = tables.select(records)
    # the real gpt2 and its tiny stand-in fill the same row, as two settings that never pool their seeds;
    # validation picks the real one here (PPL 20 < 30)
    dense = selections[(EXP, "gpt2", "dense", "wikitext2")]
    assert dense.settings == 2 and {r.model for r in dense.runs} == {"gpt2"} and dense.stat("perplexity").n == 3
    t4 = next(t for t in tables.build_tables(selections, EXP) if t.name == "table4")
    m5 = next(r for r in t4.rows if r.label == "MPOE (m=5)")
    assert m5.cells[0].ours.mean == pytest.approx(42.0) and m5.cells[0].ours.n == 3
    assert m5.ran_models == ["tiny-gpt2"] and tables._who(m5) == "gpt2/mpoe (ran tiny-gpt2)"
    assert next(r for r in t4.rows if r.label == "MPOE (m=3)").cells[0].status == "missing"
    md = tables.render_markdown(t4)
    assert "| MPOE (m=5) | gpt2/mpoe (ran tiny-gpt2) | ours | 42.00 ± 1.00 (n=3) |" in md


def test_cartesian_meo_and_adapter_runs_are_extra_rows_without_paper_values(tmp_path: Path):
    """Methods the paper did not run (CartesianMoE, MEO, adapter experts) get rows of their own in Table 1, with an
    empty paper column; the runs of a smoke sweep on tiny stand-ins fill them (end to end: test_experiments.py,
    slow)."""
    runs = tmp_path / "runs"
    accuracy = {"main_metric": "accuracy", "greater_is_better": True}
    for method in ("cartesian", "meo", "adapters"):
        write_run(runs, "tiny-t5", method, "rte", 1, 1e-3, {"accuracy": 55.0}, {"accuracy": 52.0},
                  table_model="t5-base", experiment="smoke", **accuracy)  # fmt: skip
        write_run(runs, "tiny-gpt2", method, "wikitext2", 1, 1e-3, {"perplexity": 30.0},
                  {"perplexity": 31.0, "bleu2": 1.0}, table_model="gpt2", experiment="smoke")  # fmt: skip
    written, problems, n_failed, unplaced = tables.make_tables(runs)
    assert not problems and not unplaced and n_failed == 0
    out = runs / "smoke" / "tables"
    nlu = {(r["method"], r["column"]): r for r in csv.DictReader((out / "table1_nlu.csv").open())}
    nlg = {(r["method"], r["column"]): r for r in csv.DictReader((out / "table1_nlg.csv").open())}
    for method in ("cartesian", "meo", "adapters"):
        rte, ppl = nlu[(method, "RTE")], nlg[(method, "WikiText-2 PPL")]
        assert (rte["status"], rte["n"], rte["paper"], float(rte["ours_mean"])) == ("ok", "1", "", 52.0)
        assert (ppl["status"], ppl["n"], ppl["paper"], float(ppl["ours_mean"])) == ("ok", "1", "", 31.0)


def test_an_experiment_with_its_own_table_renders_only_that_one(tmp_path: Path):
    """conf/paper/tables.yaml's real_minilm entry names its experiment: that experiment gets that table, filled,
    and none of the paper's; the paper's experiments never get it."""
    runs = tmp_path / "runs"
    methods = ("dense", "switch", "moe", "mpoe", "mpoe++", "mpoe-no_mask", "mpoe-no_sharing")
    for method in methods:
        for task in ("sst2", "rte"):
            for seed in (1, 2, 3):
                accuracy = {"accuracy": 80.0 + seed}
                kw = {"main_metric": "accuracy", "greater_is_better": True, "total": 22_700_000}
                kw["wall_time_s"] = 100.0 * seed
                write_run(runs, "minilm", method, task, seed, 1e-4, accuracy, accuracy, experiment="real_minilm", **kw)
    write_run(runs, "gpt2", "mpoe", "wikitext2", 1, 1e-4, {"perplexity": 20.0}, {"perplexity": 21.0})
    written, problems, n_failed, unplaced = tables.make_tables(runs)
    assert not problems and not unplaced and n_failed == 0
    markdown = sorted(p.name for p in written["real_minilm"] if p.suffix == ".md")
    assert markdown == ["real_minilm.md", "real_minilm_comparisons.md", "real_minilm_cost.md", "real_minilm_runs.md"]
    assert "real_minilm.md" not in {p.name for p in written[EXP]} and "table3.md" in {p.name for p in written[EXP]}
    rows = list(csv.DictReader((runs / "real_minilm" / "tables" / "real_minilm.csv").open()))
    assert len(rows) == len(methods) * 3  # SST-2, RTE, #To (M)
    assert all(r["status"] == "ok" for r in rows), rows
    md = (runs / "real_minilm" / "tables" / "real_minilm.md").read_text()
    assert "| missing" not in md and "200 s per run" in md  # mean wall time of seeds 1-3: 100, 200, 300 s
    assert "| paper |" not in md and md.count("| ours |") == len(methods)  # no paper values: one line per row
    assert {r["wall_time_s"] for r in rows if r["column"] == "SST-2"} == {"200.0"}
    assert "real_minilm" not in tables.TABLE_NAMES and "table1_nlu" in tables.TABLE_NAMES


# --- paired comparisons ----------------------------------------------------------------------------------------------


def _csv_rows(path: Path) -> dict[tuple[str, str], dict]:
    return {(r["comparison"], r["column"]): r for r in csv.DictReader(path.open())}


def test_paired_comparisons_match_scipy_with_a_seed_missing_from_one_row(tmp_path: Path):
    """Table 3's comparisons: per-seed differences over the seeds both rows ran, each row at its own selected
    learning rate; mean and 95% interval as scipy's paired t-test gives them; n = 1 has no interval."""
    runs = tmp_path / "runs"
    mpoe = {1: 21.0, 2: 22.5, 3: 23.0, 4: 24.0}  # seed 4 only here
    no_mask = {1: 22.0, 2: 22.0, 3: 25.5, 5: 30.0}  # seed 5 only here
    for seed, ppl in mpoe.items():
        write_run(
            runs, "gpt2", "mpoe", "wikitext2", seed, 1e-4, {"perplexity": 20.0}, {"perplexity": ppl, "bleu2": 28.0}
        )
        write_run(runs, "gpt2", "mpoe", "wikitext2", seed, 1e-3, {"perplexity": 25.0}, {"perplexity": 1.0, "bleu2": 1})
    for seed, ppl in no_mask.items():  # selected at its own learning rate (3e-4), not mpoe's
        write_run(runs, "gpt2", "mpoe-no_mask", "wikitext2", seed, 3e-4, {"perplexity": 19.0},
                  {"perplexity": ppl, "bleu2": 29.0 + seed})  # fmt: skip
        write_run(runs, "gpt2", "mpoe-no_mask", "wikitext2", seed, 1e-4, {"perplexity": 30.0},
                  {"perplexity": 99.0, "bleu2": 0.0})  # fmt: skip
    write_run(runs, "gpt2", "moe", "wikitext2", 2, 1e-4, {"perplexity": 20.0}, {"perplexity": 20.0, "bleu2": 27.0})
    written, problems, _, _ = tables.make_tables(runs)
    assert not problems
    out = runs / EXP / "tables"
    assert {out / f"table3_comparisons.{ext}" for ext in ("md", "tex", "csv")} <= set(written[EXP])
    rows = _csv_rows(out / "table3_comparisons.csv")

    ppl = rows[("mpoe-no_mask - mpoe", "PPL")]
    common = [1, 2, 3]
    left, right = [no_mask[s] for s in common], [mpoe[s] for s in common]
    ci = stats.ttest_rel(left, right).confidence_interval(0.95)
    assert ppl["n"] == "3" and ppl["seeds"] == "1 2 3" and ppl["status"] == "ok"
    assert [float(d) for d in ppl["differences"].split()] == pytest.approx(np.subtract(left, right))
    assert float(ppl["mean"]) == pytest.approx(np.mean(np.subtract(left, right)), abs=1e-4)
    assert float(ppl["ci_low"]) == pytest.approx(ci.low, abs=1e-4)
    assert float(ppl["ci_high"]) == pytest.approx(ci.high, abs=1e-4)
    assert (ppl["left_label"], ppl["right_label"], ppl["metric"]) == ("w/o GM", "+MPOE", "perplexity")
    b2 = rows[("mpoe-no_mask - mpoe", "B2")]
    assert [float(d) for d in b2["differences"].split()] == pytest.approx([2.0, 3.0, 4.0])  # 29 + seed - 28

    one = rows[("mpoe - moe", "PPL")]  # moe ran seed 2 only
    assert one["n"] == "1" and one["seeds"] == "2" and float(one["mean"]) == pytest.approx(2.5)
    assert one["ci_low"] == one["ci_high"] == "" and one["status"] == "n=1: no interval"
    absent = rows[("mpoe-no_sharing - mpoe", "PPL")]
    assert absent["n"] == "0" and absent["status"] == "missing: w/o PS has no runs"

    md = (out / "table3_comparisons.md").read_text()
    interval = f"[{ci.low:+.2f}, {ci.high:+.2f}]"
    assert f"| w/o GM − +MPOE (gpt2/mpoe-no_mask − gpt2/mpoe) | PPL | 3 | +1.00 | {interval} |" in md
    assert "| 1: +1.00, 2: -0.50, 3: +2.50 |" in md
    assert "| B4 | 0 |  | no common seed |" in md  # no run has bleu4
    assert "| PPL | 1 | +2.50 | n=1: no interval | 2: +2.50 |" in md
    tex = (out / "table3_comparisons.tex").read_text()
    assert r"\toprule" in tex and tex.count(r"\midrule") == 3 and "mpoe-no\\_mask" in tex
    t4 = _csv_rows(out / "table4_comparisons.csv")  # the m = 3 row did not run
    assert t4[("mpoe-m3 - mpoe", "PPL")]["status"] == "missing: MPOE (m=3) has no runs"


MINI_TABLE = """
mini:
  title: Mini
  columns:
    - {name: RTE, task: rte, metric: accuracy}
    - {name: CoLA, task: cola, metric: mcc}
    - {name: Avg, average: true}
  rows:
    - {label: Base, model: t5-base, method: dense, extra: true}
    - {label: Base MPOE, model: t5-base, method: mpoe, extra: true}
    - {label: Large, model: t5-large, method: dense, extra: true}
    - {label: Large MPOE, model: t5-large, method: mpoe, extra: true}
    - {label: Hyper, model: null, method: null}
  comparisons: [COMPARISONS]
"""


def test_comparisons_name_the_model_and_pair_an_average_column_per_seed(tmp_path: Path):
    paper = tmp_path / "paper.yaml"
    paper.write_text(MINI_TABLE.replace("COMPARISONS", '"t5-base/mpoe - dense", "t5-large/mpoe - t5-base/mpoe"'))
    runs = tmp_path / "runs"
    values = {("dense", "rte"): [70, 72, 71], ("dense", "cola"): [50, 55, 52],
              ("mpoe", "rte"): [74, 73, 76], ("mpoe", "cola"): [60, 58]}  # mpoe/cola: no seed 3  # fmt: skip
    for (method, task), tests in values.items():
        metric = "accuracy" if task == "rte" else "mcc"
        for seed, value in enumerate(tests, start=1):
            write_run(runs, "t5-base", method, task, seed, 1e-4, {metric: 1.0}, {metric: float(value)},
                      main_metric=metric, greater_is_better=True)  # fmt: skip
    written, _, _, _ = tables.make_tables(runs, paper_path=paper)
    rows = _csv_rows(runs / EXP / "tables" / "mini_comparisons.csv")
    rte = rows[("t5-base/mpoe - dense", "RTE")]
    assert rte["n"] == "3" and (rte["left_model"], rte["right_method"]) == ("t5-base", "dense")
    avg = rows[("t5-base/mpoe - dense", "Avg")]  # per seed, the mean over RTE and CoLA: seeds 1 and 2 only
    left = [np.mean([74, 60]), np.mean([73, 58])]
    right = [np.mean([70, 50]), np.mean([72, 55])]
    ci = stats.t.interval(0.95, 1, loc=np.mean(np.subtract(left, right)), scale=stats.sem(np.subtract(left, right)))
    assert avg["n"] == "2" and avg["seeds"] == "1 2" and avg["metric"] == "average"
    assert float(avg["mean"]) == pytest.approx(np.mean(np.subtract(left, right)), abs=1e-4)
    assert (float(avg["ci_low"]), float(avg["ci_high"])) == pytest.approx(ci, abs=1e-4)
    assert rows[("t5-large/mpoe - t5-base/mpoe", "RTE")]["status"] == "missing: Large MPOE has no runs"


@pytest.mark.parametrize(
    ("comparison", "message"),
    [
        ('"mpoe - dense"', "mpoe names rows of t5-base, t5-large: write model/mpoe"),
        ('"t5-base/mpoe - foo"', "no row is t5-base/foo"),
        ('"t5-base/mpoe-dense"', "is not 'LEFT - RIGHT'"),
        ('"t5-base/mpoe - t5-base/mpoe"', "compares a row with itself"),
        ('"t5-base/mpoe - null"', "no row is t5-base/null"),
        # with a decision rule
        ("{compare: t5-base/mpoe - dense, rule: better, delta: 1.0, seeds: 5}", "rule: at_least | equivalent"),
        ("{compare: t5-base/mpoe - dense, rule: at_least, delta: -1, seeds: 5}", "delta: a number >= 0"),
        ("{compare: t5-base/mpoe - dense, rule: at_least, delta: 1, seeds: 1}", "seeds=1 must be an integer >= 2"),
        ("{compare: t5-base/mpoe - dense, rule: at_least, delta: 1}", "seeds: an integer >= 2"),
        ("{compare: t5-base/mpoe - foo, rule: at_least, delta: 1, seeds: 5}", "no row is t5-base/foo"),
    ],
)
def test_a_comparison_that_names_no_single_row_is_a_one_line_error(tmp_path, capsys, comparison, message):
    paper = tmp_path / "paper.yaml"
    paper.write_text(MINI_TABLE.replace("COMPARISONS", comparison))
    write_run(tmp_path / "runs", "t5-base", "dense", "rte", 1, 1e-4, {"accuracy": 1.0}, {"accuracy": 1.0})
    assert tables.main([str(tmp_path / "runs"), "--paper", str(paper)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {paper}: mini: comparison ") and message in err and len(err.splitlines()) == 1


def test_the_papers_comparisons_name_rows_of_their_tables():
    paper = tables.load_paper()  # raises on a comparison that names no single row
    assert "mpoe-no_mask - mpoe" in paper["table3"]["comparisons"]
    for name in tables.TABLE_NAMES:
        assert paper[name].get("comparisons"), name


# --- routing telemetry -----------------------------------------------------------------------------------------------


def _history(loads_by_step: dict[int, dict[str, list[float]] | None]) -> list[dict]:
    history = []
    for step, loads in loads_by_step.items():
        entry = {"step": step, "loss": 3.0, "validation": {"perplexity": 20.0}}
        if loads is not None:
            entry["routing"] = {name: {"load": load, "entropy": 1.0, "dropped": 0.0} for name, load in loads.items()}
        history.append(entry)
    return history


def test_routing_heatmap_averages_the_best_checkpoints_load_over_seeds(tmp_path: Path):
    """The load of the history entry at best_step (not another evaluation's), the selected setting only, layers in
    module order; runs without telemetry (an older mpoe record, dense) are skipped."""
    runs = tmp_path / "runs"
    best = {1: {"h.2.mlp": [0.1, 0.2, 0.3, 0.4], "h.10.mlp": [0.25, 0.25, 0.25, 0.25]},
            2: {"h.2.mlp": [0.3, 0.2, 0.1, 0.4], "h.10.mlp": [0.5, 0.5, 0.0, 0.0]}}  # fmt: skip
    other = {"h.2.mlp": [1.0, 0.0, 0.0, 0.0], "h.10.mlp": [1.0, 0.0, 0.0, 0.0]}
    for seed in (1, 2):
        extra = {"best_step": 20, "history": _history({10: other, 20: best[seed], 30: other})}
        write_run(
            runs, "gpt2", "mpoe", "wikitext2", seed, 1e-4, {"perplexity": 20.0}, {"perplexity": 21.0}, extra=extra
        )
        worse = {"best_step": 10, "history": _history({10: other})}  # the setting validation does not select
        write_run(
            runs, "gpt2", "mpoe", "wikitext2", seed, 1e-3, {"perplexity": 25.0}, {"perplexity": 21.0}, extra=worse
        )
    old = {"best_step": 20, "history": _history({20: None})}  # written before the telemetry
    write_run(runs, "gpt2", "mpoe", "wikitext2", 3, 1e-4, {"perplexity": 20.0}, {"perplexity": 21.0}, extra=old)
    write_run(runs, "gpt2", "dense", "wikitext2", 1, 1e-4, {"perplexity": 20.0}, {"perplexity": 21.0}, extra=old)

    records, _ = tables.load_results(runs)
    selections = tables.select(records)
    load = aggregate.routing_load(selections[(EXP, "gpt2", "mpoe", "wikitext2")])
    assert load.layers == ["h.2.mlp", "h.10.mlp"] and load.seeds == [1, 2]
    assert load.load == pytest.approx(np.mean([list(best[s].values()) for s in (1, 2)], axis=0))
    assert aggregate.routing_load(selections[(EXP, "gpt2", "dense", "wikitext2")]) is None

    written, problems, _, _ = tables.make_tables(runs)
    assert not problems
    figure = runs / EXP / "tables" / "routing_gpt2_mpoe_wikitext2.png"
    assert figure in written[EXP] and figure.stat().st_size > 1000
    assert [p.name for p in (runs / EXP / "tables").glob("routing_*")] == [figure.name]  # none for dense


# --- pre-registered decision rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "differences", "verdict"),
    [
        ("at_least", [0.2, 0.4, 0.3, 0.5, 0.1], "supports"),  # interval above -1
        ("at_least", [-3.1, -2.9, -3.0, -3.2, -2.8], "contradicts"),  # below -1
        ("at_least", [-3.0, 1.0, -1.0, 0.5, -2.5], "inconclusive"),  # straddles -1
        ("equivalent", [0.2, -0.2, 0.1, 0.0, -0.1], "supports"),  # inside [-1, 1]
        ("equivalent", [2.0, 2.2, 1.9, 2.1, 2.0], "contradicts"),  # entirely above 1
        ("equivalent", [0.5, 1.5, 0.9, 1.2, 0.7], "inconclusive"),  # crosses 1
        ("positive", [0.2, 0.4, 0.3, 0.5, 0.1], "supports"),  # above 0
        ("positive", [-0.2, -0.4, -0.3, -0.5, -0.1], "contradicts"),  # below 0
        ("positive", [0.2, -0.2, 0.1, 0.0, -0.1], "inconclusive: no effect larger than 1"),  # inside [-1, 1]
        ("positive", [3.0, -2.0, 1.0, -1.5, 2.5], "inconclusive"),  # wide
    ],
)
def test_a_decision_rule_reads_the_95_percent_interval(kind, differences, verdict):
    from mpoe_exp.aggregate import DecisionRule, Paired

    pair = Paired(list(range(1, 6)), differences)
    low, high = stats.t.interval(0.95, 4, loc=np.mean(differences), scale=stats.sem(differences))
    assert pair.interval == pytest.approx((low, high))
    assert DecisionRule(kind, 1.0, 5).verdict(pair) == verdict
    assert DecisionRule(kind, 1.0, 6).verdict(pair) == "no verdict: n = 5 < 6"  # too few seeds: none
    assert DecisionRule(kind, 1.0, 5).verdict(pair, greater_is_better=False) == "no verdict: lower is better"


def test_a_comparison_with_a_rule_writes_its_verdict_per_column(tmp_path: Path):
    paper = tmp_path / "paper.yaml"
    rule = "{compare: t5-base/mpoe - dense, rule: at_least, delta: 1.0, seeds: 3}"
    paper.write_text(MINI_TABLE.replace("COMPARISONS", f'{rule}, "t5-large/mpoe - t5-base/mpoe"'))
    runs = tmp_path / "runs"
    values = {("dense", "rte"): [70, 72, 71], ("mpoe", "rte"): [74, 75, 74], ("dense", "cola"): [50, 55, 52],
              ("mpoe", "cola"): [60, 58]}  # fmt: skip
    for (method, task), tests in values.items():
        metric = "accuracy" if task == "rte" else "mcc"
        for seed, value in enumerate(tests, start=1):
            write_run(runs, "t5-base", method, task, seed, 1e-4, {metric: 1.0}, {metric: float(value)},
                      main_metric=metric, greater_is_better=True)  # fmt: skip
    tables.make_tables(runs, paper_path=paper)
    rows = _csv_rows(runs / EXP / "tables" / "mini_comparisons.csv")
    assert rows[("t5-base/mpoe - dense", "RTE")]["verdict"] == "supports"  # 4, 3, 3: [1.9, 4.8], above -1
    assert rows[("t5-base/mpoe - dense", "CoLA")]["verdict"] == "no verdict: n = 2 < 3"  # mpoe/cola: 2 seeds
    assert rows[("t5-large/mpoe - t5-base/mpoe", "RTE")]["verdict"] == ""  # no rule
    md = (runs / EXP / "tables" / "mini_comparisons.md").read_text()
    assert "| Verdict |" in md and "| supports (at_least, delta 1) |" in md
    tex = (runs / EXP / "tables" / "mini_comparisons.tex").read_text()
    assert r"\begin{tabular}{llrrlll}" in tex


# --- a study's reference runs: the convergence criterion ---------------------------------------------------------


def test_a_reference_says_whether_the_row_is_within_its_margin(tmp_path: Path):
    """mpoe_exp/reference.py: the reference's mean test score per column from <files>/<task>_seed<N>.json, the
    row's at its selected setting, and the criterion read once the row has its seeds."""
    paper = tmp_path / "paper.yaml"
    spec = "  reference: {label: plain fine-tune, files: plain, row: dense, margin: 1.5, seeds: 3}\n"
    paper.write_text(MINI_TABLE.replace("  comparisons: [COMPARISONS]\n", spec))
    runs = tmp_path / "runs"
    for (task, metric), tests in {("rte", "accuracy"): [70, 72, 71], ("cola", "mcc"): [50, 55]}.items():
        for seed, value in enumerate(tests, start=1):
            write_run(runs, "t5-base", "dense", task, seed, 1e-4, {metric: 1.0}, {metric: float(value)},
                      main_metric=metric, greater_is_better=True)  # fmt: skip
    (runs / EXP / "plain").mkdir()
    for seed, value in ((1, 73.0), (2, 73.6)):  # mean 73.3: dense's 71.0 is 2.3 below it
        (runs / EXP / "plain" / f"rte_seed{seed}.json").write_text(json.dumps({"test": {"accuracy": value}}))
    (runs / EXP / "plain" / "cola_seed1.json").write_text(json.dumps({"test": {"mcc": 50.0}}))
    written, _, _, _ = tables.make_tables(runs, paper_path=paper)
    text = (runs / EXP / "tables" / "mini_reference.md").read_text()
    assert runs / EXP / "tables" / "mini_reference.md" in written[EXP]
    assert "| RTE | 73.30 (n=2) | 71.00 (n=3) | -2.30 | fails |" in text
    assert "| CoLA | 50.00 (n=1) | 52.50 (n=2) | +2.50 | not read yet: Base has n = 2 < 3 |" in text
    (runs / EXP / "plain" / "rte_seed2.json").write_text(json.dumps({"test": {"accuracy": 71.8}}))  # mean 72.4
    tables.make_tables(runs, paper_path=paper)
    text = (runs / EXP / "tables" / "mini_reference.md").read_text()
    assert "| RTE | 72.40 (n=2) | 71.00 (n=3) | -1.40 | holds |" in text


def test_the_cost_page_adds_up_every_finished_runs_wall_time_and_the_reference_runs(tmp_path: Path):
    """<experiment>_cost.md: every finished run of every setting (not only the selected one), grouped by model,
    method and task, and the reference runs from their own files; failed runs and runs without a time left out."""
    paper = tmp_path / "paper.yaml"
    spec = "  reference: {label: plain fine-tune, files: plain, row: dense, margin: 1.5, seeds: 3}\n"
    paper.write_text(MINI_TABLE.replace("  comparisons: [COMPARISONS]\n", spec))
    runs = tmp_path / "runs"
    for seed, lr, seconds in ((1, 1e-4, 600.0), (2, 1e-4, 1200.0), (1, 1e-3, 900.0)):
        write_run(runs, "t5-base", "dense", "rte", seed, lr, {"accuracy": 1.0}, {"accuracy": 70.0},
                  main_metric="accuracy", greater_is_better=True, wall_time_s=seconds)  # fmt: skip
    write_run(runs, "t5-base", "mpoe", "rte", 1, 1e-4, {"accuracy": 1.0}, {"accuracy": 71.0},
              main_metric="accuracy", greater_is_better=True, wall_time_s=3600.0)  # fmt: skip
    write_run(runs, "t5-base", "mpoe", "rte", 2, 1e-4, {}, {}, status="failed", wall_time_s=50.0)
    write_run(
        runs,
        "t5-base",
        "mpoe",
        "rte",
        3,
        1e-4,
        {"accuracy": 1.0},
        {"accuracy": 71.0},
        main_metric="accuracy",
        greater_is_better=True,
    )  # fmt: skip  (no wall_time_s)
    (runs / EXP / "plain").mkdir()
    (runs / EXP / "plain" / "rte_seed1.json").write_text(json.dumps({"test": {"accuracy": 73.0}, "wall_time_s": 1800}))
    written, _, _, _ = tables.make_tables(runs, paper_path=paper)
    path = runs / EXP / "tables" / f"{EXP}_cost.md"
    assert path in written[EXP]
    text = path.read_text()
    assert "| t5-base | dense | rte | 3 | 900 (600-1,200) | 0.75 |" in text
    assert "| t5-base | mpoe | rte | 1 | 3,600 (3,600-3,600) | 1.00 |" in text
    assert "|  | plain fine-tune | rte | 1 | 1,800 (1,800-1,800) | 0.50 |" in text
    assert "| all | | | 5 | | 2.25 |" in text


def test_the_runs_page_gives_each_runs_curve_and_routing_at_its_best_checkpoint(tmp_path: Path):
    """<experiment>_runs.md (mpoe_exp/run_notes.py): the best evaluation out of n, the first evaluation with half the
    gain from the first evaluation to the best, and the routing of the best checkpoint over its layers."""
    runs = tmp_path / "runs"
    routing = {
        "layer.0": {"load": [0.5, 0.5], "entropy": 0.69, "dropped": 0.0, "aux_drift": [0.01, 0.02]},
        "layer.1": {"load": [0.9, 0.1], "entropy": 0.33, "dropped": 0.05, "aux_drift": [0.0, 0.015]},
    }
    scores = [10.0, 12.0, 50.0, 80.0, 78.0]  # gain 10 -> 80: halfway 45, first reached at the 3rd evaluation
    history = [{"step": 10 * (i + 1), "loss": 1.0, "validation": {"pearson": v}} for i, v in enumerate(scores)]
    history[3]["routing"] = routing  # the best checkpoint's
    history[4]["routing"] = {"layer.0": {"load": [1.0, 0.0], "entropy": 0.0, "dropped": 0.0}}  # not the best
    write_run(runs, "t5-base", "mpoe", "stsb", 1, 1e-4, {"pearson": 80.0}, {"pearson": 79.5}, main_metric="pearson",
              greater_is_better=True, extra={"history": history, "best_step": 40})  # fmt: skip
    curve = [{"step": 5 * (i + 1), "loss": 1.0, "validation": {"pearson": v}} for i, v in enumerate([40.0, 60, 70])]
    write_run(runs, "t5-base", "dense", "stsb", 1, 1e-4, {"pearson": 70.0}, {"pearson": 71.0}, main_metric="pearson",
              greater_is_better=True, extra={"history": curve, "best_step": 15})  # fmt: skip
    write_run(runs, "t5-base", "dense", "stsb", 2, 1e-4, {}, {}, status="failed")
    written, _, _, _ = tables.make_tables(runs)
    path = runs / EXP / "tables" / f"{EXP}_runs.md"
    assert path in written[EXP]
    rows = [line for line in path.read_text().splitlines() if line.startswith("| stsb")]
    assert rows == [
        "| stsb | t5-base | dense | lr=0.0001,bs=32,ep=3 | 1 | last of 3 | 2 | 70.00 | 71.00 |  |  |  |  |",
        "| stsb | t5-base | mpoe | lr=0.0001,bs=32,ep=3 | 1 | 4 of 5 | 3 | 80.00 | 79.50 | 0.33-0.69 | 10.0-90.0% "
        "| 5.0% | 2.0% |",
    ]


def test_a_corrupt_reference_file_is_a_one_line_error_naming_it(tmp_path, capsys):
    paper = tmp_path / "paper.yaml"
    spec = "  reference: {label: plain, files: plain, row: dense, margin: 1.5, seeds: 3}\n"
    paper.write_text(MINI_TABLE.replace("  comparisons: [COMPARISONS]\n", spec))
    write_run(tmp_path / "runs", "t5-base", "dense", "rte", 1, 1e-4, {"accuracy": 1.0}, {"accuracy": 1.0},
              main_metric="accuracy", greater_is_better=True)  # fmt: skip
    (tmp_path / "runs" / EXP / "plain").mkdir()
    corrupt = tmp_path / "runs" / EXP / "plain" / "rte_seed1.json"
    corrupt.write_text('{"test": {"accuracy": 7')  # a write cut short
    assert tables.main([str(tmp_path / "runs"), "--paper", str(paper)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {corrupt}: not a readable reference file") and "Traceback" not in err


def test_a_bad_reference_is_a_one_line_error(tmp_path, capsys):
    paper = tmp_path / "paper.yaml"
    spec = "  reference: {label: plain, files: plain, row: dense, margin: -1, seeds: 3}\n"
    paper.write_text(MINI_TABLE.replace("  comparisons: [COMPARISONS]\n", spec))
    write_run(tmp_path / "runs", "t5-base", "dense", "rte", 1, 1e-4, {"accuracy": 1.0}, {"accuracy": 1.0})
    assert tables.main([str(tmp_path / "runs"), "--paper", str(paper)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {paper}: mini: reference ") and "margin: a number >= 0" in err
