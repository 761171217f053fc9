"""What an experiment's runs cost: `<experiment>_cost.md` beside its tables (`make tables`).

Every run of the experiment that finished, every setting it tried (not only the one a table selects), grouped by
model, method and task: runs, mean wall time per run with its range, and run-hours, from each results.json's
`wall_time_s` (training, evaluation and test; summed across resumes). A table's reference runs (its `reference`'s
files, e.g. the plain fine-tune; mpoe_exp/reference.py) are counted from their own `wall_time_s`.

Run-hours add up one run's wall time after another's. Where runs shared the machine (JOBS at a time) the machine was
busy for less than that, and each run took longer than it would have alone; the records do not say how the runs
overlapped, so the page reports run-hours only.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from mpoe_exp.run_record import RunRecord, is_number


def run_times(records: list[RunRecord], experiment: str) -> dict[tuple[str, str, str], list[float]]:
    """{(model, method label, task): wall seconds of each finished run of `experiment` that has one}."""
    times: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for record in records:
        if str(record.experiment) == experiment and record.finished and is_number(record.wall_time_s):
            times[str(record.model), str(record.method_label), str(record.task)].append(float(record.wall_time_s))
    return dict(times)


def reference_times(directory: Path) -> dict[str, list[float]]:
    """{task: wall seconds of each reference file `<task>_seed<N>.json` in `directory` that has one}."""
    times: dict[str, list[float]] = defaultdict(list)
    for path in sorted(directory.glob("*_seed*.json")):
        try:
            value = json.loads(path.read_text()).get("wall_time_s")
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: `make tables` has refused it already (mpoe_exp/reference.py)
        if is_number(value):
            times[path.name.rsplit("_seed", 1)[0]].append(float(value))
    return dict(times)


def _row(model: str, method: str, task: str, seconds: list[float]) -> str:
    mean = sum(seconds) / len(seconds)
    return (
        f"| {model} | {method} | {task} | {len(seconds)} | {mean:,.0f} ({min(seconds):,.0f}-{max(seconds):,.0f}) "
        f"| {sum(seconds) / 3600:.2f} |"
    )


def render_cost(records: list[RunRecord], experiment: str, references: dict[str, Path]) -> str:
    """The cost page of `experiment`, as Markdown; `references` {label: directory of reference files}."""
    groups = {key: t for key, t in sorted(run_times(records, experiment).items())}
    groups.update(
        {
            ("", label, task): t
            for label, directory in references.items()
            for task, t in reference_times(directory).items()
        }
    )
    lines = [
        f"## What the runs of `{experiment}` cost",
        "",
        "| model | method | task | runs | s per run, mean (range) | run-hours |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [_row(*key, seconds) for key, seconds in groups.items()]
    every = [s for seconds in groups.values() for s in seconds]
    lines.append(f"| all | | | {len(every)} | | {sum(every) / 3600:.2f} |")
    note = (
        "From each run's `wall_time_s` (finished runs, every setting tried). Run-hours add the runs up one after "
        "another; runs that shared the machine took longer each and less machine time together."
    )
    return "\n".join([*lines, "", note]) + "\n"
