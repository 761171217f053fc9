"""The record of each study (docs/<experiment>/runs/, written by `python -m mpoe_exp.record`) rebuilds the tables,
comparisons and cost that REPRODUCTION.md shows: every number there can be recomputed from what is committed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from mpoe_exp import record, tables
from mpoe_exp.results import RESULTS_FILE
from mpoe_exp.run_record import RunRecord

ROOT = Path(__file__).resolve().parent.parent
RECORDS = sorted(p for p in (ROOT / "docs").glob("*/runs") if (p / p.parent.name).is_dir())


@pytest.mark.parametrize("record_dir", RECORDS, ids=lambda p: p.parent.name)
def test_a_study_record_rebuilds_the_tables_and_comparisons_reproduction_shows(record_dir, tmp_path):
    experiment = record_dir.parent.name
    rebuilt = tmp_path / "runs"
    shutil.copytree(record_dir / experiment, rebuilt / experiment, ignore=shutil.ignore_patterns("tables"))
    written, problems, _, _ = tables.make_tables(rebuilt, experiment)
    assert not problems
    reproduction = (ROOT / "REPRODUCTION.md").read_text()
    names = [f"{experiment}.md", f"{experiment}_comparisons.md", f"{experiment}_cost.md", f"{experiment}_reference.md"]
    made = [name for name in names if (rebuilt / experiment / "tables" / name).exists()]
    assert made[:3] == names[:3]  # the table, its comparisons and the cost; the reference where the table names one
    for name in made:
        text = (rebuilt / experiment / "tables" / name).read_text()
        assert text == (record_dir / experiment / "tables" / name).read_text(), f"{name}: the committed one is stale"
        rows = [line for line in text.splitlines() if line.startswith("|")]
        missing = [line for line in rows if line not in reproduction]
        assert rows and not missing, f"REPRODUCTION.md lacks these lines of {name}: {missing[:3]}"


def test_the_record_keeps_every_number_and_drops_samples_and_checkpoints(tmp_path):
    run = tmp_path / "runs" / "study" / "m" / "dense" / "sst2" / "lr=1,cfg=x" / "seed=1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.pt").write_bytes(b"weights")
    (run / "train.log").write_text("{}\n")
    results = RunRecord("finished", "study", "m", "dense", "sst2", 1, {"lr": 1}, main_metric="accuracy",
                        validation={"accuracy": 89.0}, test={"accuracy": 90.0, "samples": ["a", "b"]},
                        history=[{"step": 1}]).to_json()  # fmt: skip
    (run / RESULTS_FILE).write_text(json.dumps(results))
    (tmp_path / "runs" / "study" / "plain_finetune").mkdir()
    (tmp_path / "runs" / "study" / "plain_finetune" / "sst2_seed1.json").write_text('{"test": {"accuracy": 88}}')
    written = record.copy_record(tmp_path / "runs", tmp_path / "record", "study")
    assert sorted(p.name for p in written) == [RESULTS_FILE, "sst2_seed1.json"]
    copied = json.loads((tmp_path / "record" / run.relative_to(tmp_path / "runs") / RESULTS_FILE).read_text())
    assert copied == {**results, "test": {"accuracy": 90.0}}
    assert not list((tmp_path / "record").rglob("*.pt")) and not list((tmp_path / "record").rglob("train.log"))


def test_the_verdicts_at_a_glance_are_those_of_the_records_comparisons():
    """REPRODUCTION.md's summary table copies each verdict from its study's comparisons: every copied mean, interval
    and verdict is a row of that study's committed comparisons table."""
    text = (ROOT / "REPRODUCTION.md").read_text()
    glance = text[text.index("The verdicts at a glance") :]
    glance = glance[: glance.index("\n\n", glance.index("| the paper's claim"))]
    checked = 0
    for line in glance.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        found = re.search(r"\(`(\w+)`\)", cells[1]) if len(cells) == 5 else None
        if found is None or "[" not in cells[3]:
            continue
        study = found.group(1)
        comparisons = (ROOT / "docs" / study / "runs" / study / "tables" / f"{study}_comparisons.md").read_text()
        mean, interval = cells[3].replace("−", "-").split(" ", 1)
        left, right = cells[2].split(" − ")
        rows = [r for r in comparisons.splitlines() if f"| {mean} | {interval} |" in r]
        assert len(rows) == 1, (study, cells)
        task = cells[1].split(" ")[0]
        assert f"(minilm/{left} − minilm/{right}) | {task} |" in rows[0] and f"| {cells[4]} (" in rows[0], rows[0]
        checked += 1
    assert checked == 6
