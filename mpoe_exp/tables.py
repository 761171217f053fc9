"""`make tables`: the paper's Tables 1-4 from finished runs, ours beside the paper's numbers.

    python -m mpoe_exp.tables [runs_dir] [--experiment NAME] [--paper conf/paper/tables.yaml]

Reads only results.json files (their schema: mpoe_exp/run_record.py; their layout: mpoe_exp/results.py) and the
paper's values (conf/paper/tables.yaml); imports no model or training code (tests/test_structure.py).

Loading and aggregation (which runs count, how a setting is selected on validation, mean ± std) are in
mpoe_exp/aggregate.py.

Tables (written atomically to <runs_dir>/<experiment>/tables/<table>.{md,tex,csv}, with the PNG figures of
mpoe_exp/figures.py beside them). The tables are the entries of conf/paper/tables.yaml: an entry that names an
`experiment` is rendered for that experiment only (and that experiment renders only its own); the others (the
paper's Tables 1-4: table1_nlu, table1_nlg, table2, table3, table4) for every other experiment:
  * Markdown and LaTeX keep the paper's shape; each paper row becomes three lines, "ours" (mean ± std (n=...)),
    "paper" and "ours − paper", so our value sits directly above the paper's and the difference;
  * CSV is long (one line per paper row and column, "#To (M)" included) with mean, std, n, paper, diff, the
    selected hyperparameters and the number of settings tried: the machine-readable form;
  * a row the paper has and we have not run reads "missing"; Table 1's NLU average is the mean of the 8 tasks'
    (main metric) means, only when all 8 are there ("incomplete (k/8)" otherwise), with n the smallest task n and no
    standard deviation (seeds are not paired across tasks);
  * "#To (M)" is our results' parameters.total in millions (a range "a-b" if the row's tasks differ) beside the
    paper's; reference rows (model null, e.g. Hyperformer) show the paper's values only ("n/a").
Metrics are used as results store them: GLUE and BLEU already x100, perplexity as is.

Paired comparisons (<table>_comparisons.{md,tex,csv} beside the table, for a table with `comparisons:` in
conf/paper/tables.yaml). Each comparison is a string "LEFT - RIGHT", the two sides separated by " - " (spaces
around the hyphen: labels such as mpoe-no_mask have hyphens of their own). A side is a row's `method` label
(method[-ablation], e.g. mpoe, mpoe++, mpoe-no_mask), or model/method where the table has that method for several
models (Table 1: t5-large/mpoe, t5-base/mpoe); a side without a model takes the other side's, so
"t5-base/mpoe - dense" compares t5-base's two rows. A side must name exactly one row, not a reference row; anything
else is an error when the YAML is loaded. For every column: LEFT's test metric minus RIGHT's, seed by seed over the
seeds both rows ran, each row at its own selected setting (the very runs of its table cell); their mean, the 95%
t-interval (none with n = 1) and n. An average column (Table 1's Avg) pairs the per-seed mean over its tasks, over
the seeds both rows ran on every task. An item {compare: "LEFT - RIGHT", rule, delta, seeds} also reads the
interval by a pre-registered decision rule (aggregate.DecisionRule: at_least, equivalent, positive) and writes its
verdict in a last column. A table with a `reference:` also gets <table>_reference.md (mpoe_exp/reference.py).
Every experiment also gets <experiment>_cost.md, the run-hours of its runs and reference runs (mpoe_exp/run_cost.py),
and <experiment>_runs.md, each run in one line: its training curve and its experts (mpoe_exp/run_notes.py).

Routing figures: `routing_<model>_<method>_<task>.png`, expert load per layer at the best checkpoint, for every
selection with routing telemetry (mpoe_exp/figures.py).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from mpoe_exp import reference, run_cost, run_notes
from mpoe_exp.aggregate import (
    MIN_SEEDS,
    RULES,
    Cell,
    Comparison,
    DecisionRule,
    GroupKey,
    PairedCell,
    Row,
    Selection,
    Stat,
    Table,
    group_key,
    hparams_key,
    load_results,
    paired,
    select,
)
from mpoe_exp.errors import UserError
from mpoe_exp.results import atomic_write_text
from mpoe_exp.run_record import RunRecord

PAPER_TABLES = Path(__file__).resolve().parents[1] / "conf" / "paper" / "tables.yaml"
# The paper's tables: every table of conf/paper/tables.yaml that names no `experiment` (see `tables_for`).
TABLE_NAMES = tuple(
    name for name, spec in OmegaConf.to_container(OmegaConf.load(PAPER_TABLES)).items() if "experiment" not in spec
)
DAGGER = "†"
PARAMS_COLUMN = "#To (M)"
COMPARISON_SEPARATOR = " - "


def load_paper(path: str | Path = PAPER_TABLES) -> dict[str, Any]:
    """The tables' spec; a comparison that names no row (or several) is a UserError."""
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert isinstance(spec, dict)
    for name, table in spec.items():
        try:
            if "reference" in table:
                reference.check_spec(name, table["reference"])
            for entry in table.get("comparisons") or []:
                comparison_rows(name, table, comparison_entry(name, entry)[0])
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
    return spec


def comparison_entry(name: str, entry: Any) -> tuple[str, DecisionRule | None]:
    """A `comparisons` item: "LEFT - RIGHT", or {compare: "LEFT - RIGHT", rule: at_least|equivalent|positive,
    delta: D, seeds: N} with a pre-registered decision rule (aggregate.DecisionRule)."""
    if not isinstance(entry, dict):
        return entry, None
    keys = {"compare", "rule", "delta", "seeds"}
    rule, delta, seeds = entry.get("rule"), entry.get("delta"), entry.get("seeds")
    if set(entry) != keys or rule not in RULES or not isinstance(delta, int | float) or delta < 0:
        raise UserError(
            f"{name}: comparison {entry!r} is not {{compare: 'LEFT - RIGHT', rule: {' | '.join(RULES)}, "
            "delta: a number >= 0, seeds: an integer >= 2}"
        )
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 2:
        raise UserError(f"{name}: comparison {entry['compare']!r}: seeds={seeds!r} must be an integer >= 2")
    return entry["compare"], DecisionRule(rule, float(delta), seeds)


def comparison_rows(name: str, spec: dict[str, Any], text: Any) -> tuple[int, int]:
    """The indices in spec["rows"] of the rows "LEFT - RIGHT" names (sides: method or model/method)."""
    parts = str(text).split(COMPARISON_SEPARATOR)
    if not isinstance(text, str) or len(parts) != 2:
        raise UserError(f"{name}: comparison {text!r} is not 'LEFT - RIGHT' (sides: method or model/method)")
    sides = [tuple(p.strip().split("/", 1)) if "/" in p else (None, p.strip()) for p in parts]
    rows = spec["rows"]
    found = []
    for (model, method), (other_model, _) in zip(sides, sides[::-1]):
        model = model or other_model
        matches = [i for i, r in enumerate(rows) if r.get("model") is not None and r.get("method") == method
                   and model in (None, r["model"])]  # fmt: skip
        who = f"{model}/{method}" if model else method
        if not matches:
            have = ", ".join(f"{r['model']}/{r['method']}" for r in rows if r.get("model") is not None)
            raise UserError(f"{name}: comparison {text!r}: no row is {who} (the rows: {have})")
        if len(matches) > 1:
            models = ", ".join(rows[i]["model"] for i in matches)
            raise UserError(f"{name}: comparison {text!r}: {who} names rows of {models}: write model/{method}")
        found.append(matches[0])
    if found[0] == found[1]:
        raise UserError(f"{name}: comparison {text!r} compares a row with itself")
    return found[0], found[1]


def tables_for(experiment: str, paper: dict[str, Any]) -> list[str]:
    """The tables an experiment renders, in file order: those whose `experiment:` names it, if any; else every
    table that names no experiment (the paper's tables, rendered for the paper and smoke experiments)."""
    own = [name for name, spec in paper.items() if spec.get("experiment") == experiment]
    return own or [name for name, spec in paper.items() if "experiment" not in spec]


def _find_selection(
    selections: dict[GroupKey, Selection], experiment: str, row_spec: dict[str, Any], task: str
) -> Selection | None:
    """The row's selection for a task: its method label, else the first of its `aliases` (same model) with runs."""
    for method in [row_spec["method"], *row_spec.get("aliases", [])]:
        sel = selections.get((experiment, row_spec["model"], method, task))
        if sel is not None and sel.runs:
            return sel
    return selections.get((experiment, row_spec["model"], row_spec["method"], task))


def build_table(name: str, spec: dict[str, Any], selections: dict[GroupKey, Selection], experiment: str) -> Table:
    columns = spec["columns"]
    rows = []
    for row_spec in spec["rows"]:
        values = row_spec.get("values") or {}
        row = Row(row_spec["label"], row_spec.get("model"), row_spec.get("method"), params_paper=row_spec.get("params"))
        params: set[float] = set()
        ran: set[str] = set()
        for col in columns:
            cell = Cell(col["name"], col.get("task"), col.get("metric"), values.get(col["name"]))
            if row.reference:
                cell.status = "n/a"
            elif not col.get("average"):
                sel = _find_selection(selections, experiment, row_spec, col["task"])
                cell.selection = sel
                cell.ours = sel.stat(col["metric"]) if sel is not None else None
                if cell.ours is None:
                    cell.status = "missing"
                if sel is not None and sel.params_millions() is not None:
                    params.add(round(sel.params_millions(), 1))
                ran.update(str(r.model) for r in (sel.runs if sel is not None else []))
            row.cells.append(cell)
        row.ran_models = sorted(ran)
        for cell, col in zip(row.cells, columns):
            if col.get("average") and not row.reference:
                parts = [c.ours for c, cc in zip(row.cells, columns) if not cc.get("average")]
                present = [p for p in parts if p is not None]
                if present and len(present) == len(parts):
                    cell.ours = Stat(float(np.mean([p.mean for p in present])), None, min(p.n for p in present))
                else:
                    cell.status = f"incomplete ({len(present)}/{len(parts)})" if present else "missing"
        row.params_ours = sorted(params)
        rows.append(row)
    comparisons = []
    for entry in spec.get("comparisons") or []:
        text, rule = comparison_entry(name, entry)
        left, right = comparison_rows(name, spec, text)
        comparisons.append(build_comparison(text, rows[left], rows[right], columns, rule))
    title, names = spec.get("title", name), [c["name"] for c in columns]
    return Table(name, title, experiment, names, rows, spec.get("figure"), comparisons)


def _has_runs(cell: Cell) -> bool:
    return cell.selection is not None and bool(cell.selection.runs)


def _per_seed(row: Row, index: list[int], columns: list[dict[str, Any]]) -> list[dict[Any, float]]:
    """The row's test metric per seed, for each of the columns `index` (its cells' selections)."""
    return [row.cells[i].selection.values_by_seed(columns[i]["metric"]) for i in index]


def build_comparison(
    text: str, left: Row, right: Row, columns: list[dict[str, Any]], rule: DecisionRule | None = None
) -> Comparison:
    """Per column, left's test metric minus right's, paired by seed, each row's cells as its table selected them;
    with a decision rule, its verdict on each column."""
    comparison = Comparison(text, left, right, rule=rule)
    for k, col in enumerate(columns):
        cell = PairedCell(col["name"], col.get("task"), col.get("metric"))
        # the columns paired: this one, or an average column's tasks
        index = [i for i, c in enumerate(columns) if not c.get("average")] if col.get("average") else [k]
        absent = [row.label for row in (left, right) if not all(_has_runs(row.cells[i]) for i in index)]
        if absent:
            cell.status = f"missing: {' and '.join(absent)} {'have' if len(absent) > 1 else 'has'} no runs"
        else:
            cell.paired = paired(_per_seed(left, index, columns), _per_seed(right, index, columns))
            cell.status = {0: "no common seed", 1: "n=1: no interval"}.get(cell.paired.n, "ok")
        if rule is not None:
            cell.verdict = rule.verdict(cell.paired, _greater_is_better(left, index, columns))
        comparison.cells.append(cell)
    return comparison


def _greater_is_better(row: Row, index: list[int], columns: list[dict[str, Any]]) -> bool:
    """False where a paired column's metric is its runs' main metric and lower is better (perplexity)."""
    for i in index:
        runs = row.cells[i].selection.runs if row.cells[i].selection is not None else []
        if any(r.main_metric == columns[i]["metric"] and not r.greater_is_better for r in runs):
            return False
    return True


def build_tables(
    selections: dict[GroupKey, Selection], experiment: str, paper: dict[str, Any] | None = None
) -> list[Table]:
    paper = load_paper() if paper is None else paper
    return [build_table(name, paper[name], selections, experiment) for name in tables_for(experiment, paper)]


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _num(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def format_ours(cell: Cell) -> str:
    if cell.ours is None:
        return cell.status
    s = cell.ours
    text = _num(s.mean) + (f" ± {_num(s.std)}" if s.std is not None else "") + f" (n={s.n})"
    return text + DAGGER if s.few else text


def _params_ours(row: Row) -> str:
    if row.reference:
        return "n/a"
    if not row.params_ours:
        return "missing"
    low, high = row.params_ours[0], row.params_ours[-1]
    return _num(low, 1) if low == high else f"{_num(low, 1)}-{_num(high, 1)}"


def _who(row: Row) -> str:
    """model/method, and the models that ran when they are stand-ins: "t5-base/mpoe (ran tiny-t5)"."""
    if row.reference:
        return "(reference)"
    stand_ins = [m for m in row.ran_models if m != row.model]
    return f"{row.model}/{row.method}" + (f" (ran {', '.join(row.ran_models)})" if stand_ins else "")


def _has_paper_values(table: Table) -> bool:
    return any(r.params_paper is not None or any(c.paper is not None for c in r.cells) for r in table.rows)


def _lines_per_row(table: Table) -> int:
    """Three lines per row (ours, paper, ours − paper), or one for a table the paper does not have."""
    return 3 if _has_paper_values(table) else 1


def _lines(table: Table) -> tuple[list[str], list[list[str]]]:
    """Header and body of the wide layout (`_lines_per_row` lines per row), as plain strings."""
    header = ["Row", "Model/method", ""] + table.columns + [PARAMS_COLUMN]
    body = []
    for row in table.rows:
        who = [row.label, _who(row)]
        paper_params = "" if row.params_paper is None else f"{row.params_paper:g}"
        body.append(who + ["ours"] + [format_ours(c) for c in row.cells] + [_params_ours(row)])
        if _lines_per_row(table) == 1:
            continue
        body.append(["", "", "paper"] + [_num(c.paper) for c in row.cells] + [paper_params])
        body.append(
            ["", "", "ours − paper"] + [_num(c.diff, sign=True) for c in row.cells] + [_num(row.params_diff, 1, True)]
        )
    return header, body


def _footnote(table: Table) -> list[str]:
    notes = [
        f"Experiment `{table.experiment}`. Ours: mean ± sample std (ddof=1) of the TEST metric over the seeds of the "
        "hyperparameter setting with the best mean validation main metric (compared over the seeds every setting has); "
        "n = seeds; no std with one seed.",
        f"{DAGGER} fewer than {MIN_SEEDS} seeds. missing: not run (or no finished run). "
        "ours − paper: signed difference of means (for PPL lower is better). Rows the paper does not have "
        "(CartesianMoE, MEO, adapter experts) leave the paper's lines blank.",
    ]
    chosen = []
    for row in table.rows:
        seen = set()
        for cell in row.cells:
            sel = cell.selection
            if sel is None or not sel.runs or sel.key in seen:
                continue
            seen.add(sel.key)
            failed = f", {sel.n_failed} failed run(s) excluded" if sel.n_failed else ""
            wall = sel.wall_seconds()
            wall_text = f", {wall:.0f} s per run" if wall is not None else ""
            chosen.append(
                f"{row.label} ({row.model}/{row.method}) {sel.key[3]}: {hparams_key(sel.hparams)} "
                f"(validation mean {sel.validation_mean:.2f}, {sel.settings} setting(s), seeds {sel.seeds}"
                f"{wall_text}{failed})"
            )
    return notes + (["Selected settings:"] + chosen if chosen else [])


def render_markdown(table: Table) -> str:
    header, body = _lines(table)
    out = [f"## {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in body]
    notes = _footnote(table)
    out += ["", notes[0], "", notes[1]]
    if len(notes) > 2:
        out += ["", notes[2]] + [f"- {n}" for n in notes[3:]]
    return "\n".join(out) + "\n"


_LATEX_ESCAPES = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "^": r"\^{}"}


def _tex(text: str) -> str:
    text = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)
    return text.replace("±", r"$\pm$").replace(DAGGER, r"$^\dagger$").replace("−", "$-$")


def render_latex(table: Table) -> str:
    header, body = _lines(table)
    out = [
        f"% {table.title} (experiment {table.experiment}); generated by mpoe_exp.tables",
        r"% needs \usepackage{booktabs}",
        r"\begin{tabular}{lll" + "r" * (len(header) - 3) + "}",
        r"\toprule",
        " & ".join(_tex(h) for h in header) + r" \\",
        r"\midrule",
    ]
    for i, line in enumerate(body):
        if i and i % _lines_per_row(table) == 0 and _lines_per_row(table) > 1:
            out.append(r"\midrule")
        out.append(" & ".join(_tex(x) for x in line) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    out += ["% " + _tex(n) for n in _footnote(table)[:2]]
    return "\n".join(out) + "\n"


CSV_FIELDS = (
    "table", "label", "model", "method", "column", "task", "metric", "ours_mean", "ours_std", "n", "few_seeds",
    "n_failed", "status", "paper", "diff", "hparams", "settings", "models_ran", "wall_time_s",
)  # fmt: skip


def render_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in table.rows:
        base = {"table": table.name, "label": row.label, "model": row.model or "", "method": row.method or "",
                "models_ran": " ".join(row.ran_models)}  # fmt: skip
        for cell in row.cells:
            s, sel = cell.ours, cell.selection
            writer.writerow(
                {
                    **base,
                    "column": cell.column,
                    "task": cell.task or "",
                    "metric": cell.metric or "average",
                    "ours_mean": _num(s.mean, 4) if s else "",
                    "ours_std": _num(s.std, 4) if s else "",
                    "n": s.n if s else 0,
                    "few_seeds": int(bool(s and s.few)),
                    "n_failed": sel.n_failed if sel else 0,
                    "status": cell.status,
                    "paper": "" if cell.paper is None else cell.paper,
                    "diff": _num(cell.diff, 4),
                    "hparams": hparams_key(sel.hparams) if sel and sel.runs else "",
                    "settings": sel.settings if sel else 0,
                    "wall_time_s": _num(sel.wall_seconds(), 1) if sel and sel.runs else "",
                }
            )
        params_status = "n/a" if row.reference else ("ok" if row.params_ours else "missing")
        writer.writerow(
            {
                **base,
                "column": PARAMS_COLUMN,
                "metric": "parameters.total",
                "ours_mean": _params_ours(row) if row.params_ours else "",
                "status": params_status,
                "paper": "" if row.params_paper is None else row.params_paper,
                "diff": _num(row.params_diff, 4),
            }
        )
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Paired comparisons
# ----------------------------------------------------------------------------------------------------------------


def _sides(comparison: Comparison) -> str:
    left, right = comparison.left, comparison.right
    return f"{left.label} − {right.label} ({left.model}/{left.method} − {right.model}/{right.method})"


def _comparison_lines(table: Table) -> tuple[list[str], list[list[str]]]:
    """Header and body: one line per comparison and column (the comparison named on its first line)."""
    header = ["Comparison", "Column", "n", "Mean", "95% CI", "Per-seed differences (seed: left − right)"]
    ruled = any(c.rule is not None for c in table.comparisons)
    header += ["Verdict"] if ruled else []
    body = []
    for comparison in table.comparisons:
        for k, cell in enumerate(comparison.cells):
            line = [_sides(comparison) if k == 0 else "", cell.column]
            pair = cell.paired
            if pair is None:
                line += ["0", "", cell.status, ""]
            else:
                interval = pair.interval
                ci = f"[{_num(interval[0], sign=True)}, {_num(interval[1], sign=True)}]" if interval else cell.status
                diffs = ", ".join(f"{s}: {_num(d, sign=True)}" for s, d in zip(pair.seeds, pair.differences))
                line += [str(pair.n), _num(pair.mean, sign=True), ci, diffs]
            body.append(line + ([_rule_words(comparison, cell)] if ruled else []))
    return header, body


def _rule_words(comparison: Comparison, cell) -> str:
    """`supports (at_least, delta 1)` or `` for a comparison without a rule."""
    rule = comparison.rule
    return f"{cell.verdict} ({rule.kind}, delta {rule.delta:g})" if rule is not None else ""


def _comparison_notes(table: Table) -> list[str]:
    return [
        f"Experiment `{table.experiment}`. Left row's TEST metric minus right row's, paired by seed over the seeds "
        f"both rows ran, each row at its own validation-selected setting (as in {table.name}.md); mean, 95% "
        "t-interval (scipy.stats.t, n − 1 degrees of freedom; none with n = 1) and n = common seeds. "
        "An average column pairs each seed's mean over the averaged tasks. For PPL lower is better.",
        *(
            ["Verdict: the comparison's pre-registered decision rule read on the interval (mpoe_exp.aggregate."
             "DecisionRule): at_least supports if the interval lies above −delta; equivalent if inside [−delta, "
             "+delta]; positive if above 0; none with fewer seeds than the rule needs."]
            if any(c.rule is not None for c in table.comparisons) else []
        ),
    ]  # fmt: skip


def render_comparisons_markdown(table: Table) -> str:
    header, body = _comparison_lines(table)
    out = [f"## {table.title}: paired comparisons", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(out + ["", *_comparison_notes(table)]) + "\n"


def render_comparisons_latex(table: Table) -> str:
    header, body = _comparison_lines(table)
    out = [
        f"% {table.title}: paired comparisons (experiment {table.experiment}); generated by mpoe_exp.tables",
        r"% needs \usepackage{booktabs}",
        r"\begin{tabular}{llrrll" + "l" * (len(header) - 6) + "}",
        r"\toprule",
        " & ".join(_tex(h) for h in header) + r" \\",
    ]
    for line in body:
        if line[0]:
            out.append(r"\midrule")
        out.append(" & ".join(_tex(x) for x in line) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(out + ["% " + _tex(n) for n in _comparison_notes(table)]) + "\n"


COMPARISON_CSV_FIELDS = (
    "table", "comparison", "left_label", "left_model", "left_method", "right_label", "right_model", "right_method",
    "column", "task", "metric", "n", "mean", "ci_low", "ci_high", "seeds", "differences", "status", "verdict",
)  # fmt: skip


def render_comparisons_csv(table: Table) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COMPARISON_CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for comparison in table.comparisons:
        left, right = comparison.left, comparison.right
        base = {"table": table.name, "comparison": comparison.text, "left_label": left.label, "left_model": left.model,
                "left_method": left.method, "right_label": right.label, "right_model": right.model,
                "right_method": right.method}  # fmt: skip
        for cell in comparison.cells:
            pair = cell.paired
            interval = pair.interval if pair is not None else None
            writer.writerow(
                {
                    **base,
                    "column": cell.column,
                    "task": cell.task or "",
                    "metric": cell.metric or "average",
                    "n": pair.n if pair is not None else 0,
                    "mean": _num(pair.mean, 4) if pair is not None else "",
                    "ci_low": _num(interval[0], 4) if interval else "",
                    "ci_high": _num(interval[1], 4) if interval else "",
                    "seeds": " ".join(str(seed) for seed in pair.seeds) if pair is not None else "",
                    "differences": " ".join(_num(d, 4) for d in pair.differences) if pair is not None else "",
                    "status": cell.status,
                    "verdict": cell.verdict,
                }
            )
    return buf.getvalue()


def write_tables(tables: list[Table], out_dir: Path) -> list[Path]:
    """Each table as <name>.{md,tex,csv}, and its paired comparisons (if any) as <name>_comparisons.{md,tex,csv}."""
    renderers = (("md", render_markdown), ("tex", render_latex), ("csv", render_csv))
    comparison_renderers = (
        ("md", render_comparisons_markdown), ("tex", render_comparisons_latex), ("csv", render_comparisons_csv),
    )  # fmt: skip
    written = []
    for table in tables:
        outputs = [(f"{table.name}.{ext}", render) for ext, render in renderers]
        if table.comparisons:
            outputs += [(f"{table.name}_comparisons.{ext}", render) for ext, render in comparison_renderers]
        for filename, render in outputs:
            atomic_write_text(out_dir / filename, render(table))
            written.append(out_dir / filename)
    return written


def unplaced_runs(records: list[RunRecord], tables: list[Table], experiment: str) -> list[str]:
    """Why each group of `experiment`'s runs fills no cell of `tables`: one line per (model, method, task)."""
    used = {c.selection.key for t in tables for r in t.rows for c in r.cells if c.selection is not None}
    rows = [r for t in tables for r in t.rows if not r.reference]
    tasks_of = {(r.model, r.method): {c.task for c in r.cells if c.task} for r in rows}
    counts: Counter[GroupKey] = Counter(group_key(r) for r in records if str(r.experiment) == experiment)
    lines = []
    for key, n in sorted(counts.items()):
        if key in used:
            continue
        _, model, method, task = key
        if not any(r.model == model for r in rows):
            models = ", ".join(sorted({str(r.model) for r in rows}))
            why = f"no table has a row for model {model} (rows are for {models}; a stand-in needs table_model=...)"
        elif (model, method) not in tasks_of:
            why = f"no table has a row for {model} with method {method}"
        elif task not in tasks_of[(model, method)]:
            why = f"the rows of {model}/{method} have no column for task {task}"
        else:
            why = "its row took another label's runs (aliases in conf/paper/tables.yaml)"
        lines.append(f"{model}/{method}/{task}: {n} run(s) fit no table row: {why}")
    return lines


def make_tables(
    runs_dir: str | Path, experiment: str | None = None, paper_path: str | Path = PAPER_TABLES
) -> tuple[dict[str, list[Path]], list[str], int, list[str]]:
    """Write the tables of `experiment` (default: every experiment with results). Returns the files per experiment,
    the problems found, the number of failed runs excluded and the runs that fit no table row (with why)."""
    records, problems = load_results(runs_dir)
    selections = select(records)
    n_failed = sum(not r.finished for r in records)
    experiments = [experiment] if experiment else sorted({str(r.experiment) for r in records})
    paper = load_paper(paper_path)
    written, unplaced = {}, []
    for exp in experiments:
        tables = build_tables(selections, exp, paper)
        out_dir = Path(runs_dir) / exp / "tables"
        written[exp] = write_tables(tables, out_dir) + write_figures(tables, selections, exp, out_dir)
        for table in tables:  # a study's reference runs and its convergence criterion (mpoe_exp/reference.py)
            spec = paper[table.name]
            if "reference" in spec:
                path = out_dir / f"{table.name}_reference.md"
                atomic_write_text(path, reference.render_reference(table, spec["reference"], spec["columns"], runs_dir))
                written[exp].append(path)
        references = {
            paper[t.name]["reference"]["label"]: Path(runs_dir) / exp / paper[t.name]["reference"]["files"]
            for t in tables
            if "reference" in paper[t.name]
        }
        cost_path = out_dir / f"{exp}_cost.md"  # what the runs cost (mpoe_exp/run_cost.py)
        atomic_write_text(cost_path, run_cost.render_cost(records, exp, references))
        notes_path = out_dir / f"{exp}_runs.md"  # each run in one line (mpoe_exp/run_notes.py)
        atomic_write_text(notes_path, run_notes.render_run_notes(records, exp))
        written[exp] += [cost_path, notes_path]
        unplaced += [f"{exp}: {line}" for line in unplaced_runs(records, tables, exp)]
    return written, problems, n_failed, unplaced


def write_figures(tables: list[Table], selections: dict[GroupKey, Selection], experiment: str, out_dir: Path):
    """PNG figures (mpoe_exp/figures.py): each table's headline column against parameters, training curves, the
    experts' load."""
    from mpoe_exp import figures  # Matplotlib only when figures are drawn

    written = [figures.params_figure(t, t.figure_column, out_dir) for t in tables if t.figure_column]
    written = [p for p in written if p is not None] + figures.curves_figures(selections, experiment, out_dir)
    return written + figures.routing_figures(selections, experiment, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpoe_exp.tables", description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", nargs="?", default="runs", help="the runs directory (default: runs)")
    parser.add_argument("--experiment", help="only this experiment (default: every experiment with results)")
    parser.add_argument("--paper", default=str(PAPER_TABLES), help="the paper's values (YAML)")
    args = parser.parse_args(argv)
    if not Path(args.runs_dir).is_dir():
        print(f"error: {args.runs_dir}: no such directory", file=sys.stderr)
        return 2
    try:
        written, problems, n_failed, unplaced = make_tables(args.runs_dir, args.experiment, args.paper)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not written:
        print(f"no results.json under {args.runs_dir}: nothing to tabulate")
    for exp, paths in written.items():
        print(f"experiment {exp}: wrote {len(paths)} files to {paths[0].parent if paths else '-'}")
        for path in paths:
            print(f"  {path}")
    if n_failed:
        print(f"{n_failed} failed run(s) excluded from the means")
    if unplaced:
        print(f"{len(unplaced)} group(s) of runs are in no table:")
        for line in unplaced:
            print(f"  {line}")
    if problems:
        print(f"{len(problems)} problem(s) found (files skipped):", file=sys.stderr)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
