"""A study's reference runs and its convergence criterion: `<table>_reference.md` beside the table.

A table of conf/paper/tables.yaml may name a reference, runs made outside the pipeline that say what the task is
worth on this model (minilm_converged: `benchmarks/plain_finetune.py`, the plain fine-tune):

    reference:
      label: plain fine-tune      # how the page names it
      files: plain_finetune       # runs/<experiment>/<files>/<task>_seed<N>.json, each with a `test` dict
      row: dense                  # the table row held against it (a row's method label)
      margin: 1.5                 # the criterion: the row's mean test score >= the reference's mean - margin
      seeds: 5                    # the row's seeds the criterion is read on

Per column: the reference's mean test score (its seeds), the row's, their difference, and whether the criterion
holds: "holds" or "fails" once the row has `seeds` seeds and the reference at least one, else why it is not read
yet. Higher is better for every column read here (the criterion is a floor under the row's score).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mpoe_exp.aggregate import Table
from mpoe_exp.errors import UserError

KEYS = {"label", "files", "row", "margin", "seeds"}


def check_spec(name: str, spec: Any) -> None:
    """Refuse a `reference` that is not the mapping above, in one line."""
    ok = isinstance(spec, dict) and set(spec) == KEYS and isinstance(spec["margin"], int | float)
    if not ok or not isinstance(spec["seeds"], int) or spec["seeds"] < 1 or spec["margin"] < 0:
        raise UserError(
            f"{name}: reference {spec!r} is not {{label, files, row: a method label, margin: a number >= 0, "
            "seeds: an integer >= 1}"
        )


def reference_scores(directory: Path, task: str, metric: str) -> dict[int, float]:
    """Test `metric` by seed of the reference files `<task>_seed<N>.json` in `directory`."""
    scores = {}
    for path in sorted(directory.glob(f"{task}_seed*.json")):
        seed = re.fullmatch(rf"{re.escape(task)}_seed(\d+)\.json", path.name)
        value = _read(path).get("test", {}).get(metric) if seed else None
        if isinstance(value, int | float):
            scores[int(seed[1])] = float(value)
    return scores


def _read(path: Path) -> dict[str, Any]:
    """A reference file's JSON object; a UserError naming the file if it is not one (a truncated write, say)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable reference file ({err}); rerun it or remove it") from None
    if not isinstance(data, dict) or not isinstance(data.get("test", {}), dict):
        raise UserError(f"{path}: not a reference file (a JSON object with a 'test' object)")
    return data


def render_reference(table: Table, spec: dict[str, Any], columns: list[dict[str, Any]], runs_dir: str | Path) -> str:
    """The criterion per column of `table`, as Markdown."""
    row = next((r for r in table.rows if r.method == spec["row"]), None)
    if row is None:
        raise UserError(f"{table.name}: reference row {spec['row']!r} is not a row of the table")
    margin, seeds = float(spec["margin"]), int(spec["seeds"])
    header = f"| Column | {spec['label']} (n) | {row.label} (n) | Difference | Criterion: difference >= -{margin:g} |"
    lines = [f"## {table.title}: {row.label} against the {spec['label']}", "", header, "|---|---|---|---|---|"]
    runs_dir = Path(runs_dir)
    for col, cell in zip(columns, row.cells):
        if col.get("average"):
            continue
        scores = reference_scores(runs_dir / table.experiment / spec["files"], col["task"], col["metric"])
        ref = sum(scores.values()) / len(scores) if scores else None
        ours = cell.ours
        diff = ours.mean - ref if ours is not None and ref is not None else None
        if ref is None or ours is None:
            verdict = f"not read: {'the ' + spec['label'] if ref is None else row.label} has no runs"
        elif ours.n < seeds:
            verdict = f"not read yet: {row.label} has n = {ours.n} < {seeds}"
        else:
            verdict = "holds" if diff >= -margin else "fails"
        shown_ref = f"{ref:.2f} (n={len(scores)})" if ref is not None else "missing"
        shown_ours = f"{ours.mean:.2f} (n={ours.n})" if ours is not None else "missing"
        shown_diff = f"{diff:+.2f}" if diff is not None else ""
        lines.append(f"| {col['name']} | {shown_ref} | {shown_ours} | {shown_diff} | {verdict} |")
    note = (
        f"Experiment `{table.experiment}`: the {spec['label']}'s test scores from {spec['files']}/<task>_seed<N>.json, "
        f"{row.label}'s at its validation-selected setting (as in {table.name}.md); read once {row.label} has "
        f"{seeds} seeds."
    )
    return "\n".join([*lines, "", note]) + "\n"
