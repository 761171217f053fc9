"""A study's record: every run's results.json (without samples; no checkpoints, no logs) copied into the repository,
so that its tables and comparisons can be rebuilt by anyone from what is committed.

    python -m mpoe_exp.record runs docs/minilm_converged/runs --experiment minilm_converged
    python -m mpoe_exp.tables docs/minilm_converged/runs --experiment minilm_converged   # the tables, from the record

The record is a runs directory itself: `<record>/<experiment>/<model>/<method>/<task>/<hparams>/seed=<s>/results.json`,
as under runs/, so `make tables` reads it as it reads runs/. JSON records beside the runs that are not results
(e.g. the plain fine-tunes under `<experiment>/plain_finetune/`) are copied as they are. A run's `test.samples`
(generated text, megabytes for the generation tasks) is left out; every number stays.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from mpoe_exp.results import atomic_write_text
from mpoe_exp.run_record import RESULTS_FILE, RunRecord


def slim(record: RunRecord) -> RunRecord:
    """The record less the generated samples (the numbers computed from them stay)."""
    if isinstance(record.test, dict):
        record.test = {k: v for k, v in record.test.items() if k != "samples"}
    return record


def copy_record(runs_dir: Path, record_dir: Path, experiment: str) -> list[Path]:
    """Copy the experiment's results files (slimmed) and its other JSON records into `record_dir`; returns them."""
    source = Path(runs_dir) / experiment
    written = []
    for path in sorted(source.rglob("*.json")):
        relative = path.relative_to(runs_dir)
        if "tables" in relative.parts or any(part.startswith(".") for part in relative.parts):
            continue
        target = Path(record_dir) / relative
        if path.name == RESULTS_FILE:
            atomic_write_text(target, slim(RunRecord.from_json(json.loads(path.read_text()))).dumps())
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpoe_exp.record", description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", help="the runs directory the study wrote")
    parser.add_argument("record_dir", help="where the record goes (a runs directory of its own)")
    parser.add_argument("--experiment", required=True)
    args = parser.parse_args(argv)
    if not (Path(args.runs_dir) / args.experiment).is_dir():
        print(f"error: {Path(args.runs_dir) / args.experiment}: no such directory", file=sys.stderr)
        return 2
    written = copy_record(Path(args.runs_dir), Path(args.record_dir), args.experiment)
    print(f"{len(written)} record(s) under {Path(args.record_dir) / args.experiment}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
