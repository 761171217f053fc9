"""Each run of an experiment in one line: how its training went and what its experts did (`<experiment>_runs.md`,
written by `make tables` beside the tables).

For reading a study run by run, every finished run (every setting tried), ordered by task, method, learning rate and
seed:
- best: the evaluation of the best checkpoint (by the task's selection metric) out of the run's evaluations, "last"
  when it was the last one (the run may still have been improving when it stopped);
- start: the first evaluation that made half of the run's gain in validation score, from its first evaluation to its
  best: a run that learns late sits near its first value for several evaluations;
- validation, test: the selection metric at the best checkpoint;
- routing at the best checkpoint, over the routed layers: the lowest and highest entropy of a layer's expert load
  (nats; ln E is uniform), the largest and the smallest share of a layer's token choices one expert received, the
  largest share dropped by capacity, and the largest drift of an MPO expert's auxiliary tensors from their upcycled
  start (relative norm); empty for runs without telemetry (dense models).
"""

from __future__ import annotations

import math
from typing import Any

from mpoe_exp.aggregate import best_routing, seed_order
from mpoe_exp.run_record import RunRecord, is_number


def _validation_curve(run: RunRecord) -> list[tuple[Any, float]]:
    """(step, validation selection metric) of each evaluation in the run's history that has one."""
    curve = []
    for entry in run.history or []:
        value = (entry.get("validation") or {}).get(run.main_metric) if isinstance(entry, dict) else None
        if is_number(value):
            curve.append((entry.get("step"), float(value)))
    return curve


def training_notes(run: RunRecord) -> dict[str, str]:
    """'best' (evaluation i of n, or last) and 'start' (first evaluation with half the gain to the best) of one run."""
    curve = _validation_curve(run)
    steps = [step for step, _ in curve]
    if run.best_step not in steps:
        return {"best": "", "start": ""}
    best_index = steps.index(run.best_step) + 1
    best = f"last of {len(curve)}" if best_index == len(curve) else f"{best_index} of {len(curve)}"
    sign = 1.0 if run.greater_is_better else -1.0
    first, best_value = sign * curve[0][1], sign * curve[best_index - 1][1]
    halfway = first + (best_value - first) / 2
    start = next(i for i, (_, value) in enumerate(curve, start=1) if sign * value >= halfway)
    return {"best": best, "start": str(start)}


def routing_notes(run: RunRecord) -> dict[str, str]:
    """Entropy range, largest / smallest expert share, largest dropped share and drift at the best checkpoint."""
    layers = [layer for layer in (best_routing(run) or {}).values() if isinstance(layer, dict)]
    loads = [v for layer in layers for v in layer.get("load") or [] if is_number(v)]
    if not loads:
        return {}
    entropies = [layer["entropy"] for layer in layers if is_number(layer.get("entropy"))]
    dropped = [layer["dropped"] for layer in layers if is_number(layer.get("dropped"))]
    drift = [v for layer in layers for v in layer.get("aux_drift") or [] if is_number(v)]
    notes = {"load": f"{100 * min(loads):.1f}-{100 * max(loads):.1f}%"}
    if entropies:
        notes["entropy"] = f"{min(entropies):.2f}-{max(entropies):.2f}"
    if dropped:
        notes["dropped"] = f"{100 * max(dropped):.1f}%"
    if drift:
        notes["drift"] = f"{100 * max(drift):.1f}%"
    return notes


def _num(value: Any) -> str:
    return f"{value:.2f}" if is_number(value) and math.isfinite(value) else ""


def render_run_notes(records: list[RunRecord], experiment: str) -> str:
    """The page, as Markdown: one row per finished run of `experiment`."""
    runs = [r for r in records if str(r.experiment) == experiment and r.finished]
    runs.sort(key=lambda r: (str(r.task), str(r.model), str(r.method_label), str(r.hparams), seed_order(r.seed)))
    lines = [
        f"## The runs of `{experiment}`, one by one",
        "",
        "| task | model | method | hparams | seed | best | start | validation | test | entropy | expert share "
        "| dropped | drift |",
        "|---|---|---|---|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for run in runs:
        hparams = ",".join(f"{k}={v}" for k, v in run.hparams.items() if v is not None)
        train, routing = training_notes(run), routing_notes(run)
        metric = run.main_metric
        cells = [str(run.task), str(run.model), str(run.method_label), hparams, str(run.seed), train["best"],
                 train["start"], _num((run.validation or {}).get(metric)), _num((run.test or {}).get(metric)),
                 routing.get("entropy", ""), routing.get("load", ""), routing.get("dropped", ""),
                 routing.get("drift", "")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        "best: the evaluation of the best checkpoint out of the run's evaluations; start: the first evaluation with "
        "half the run's gain in validation score from its first evaluation to its best; validation, test: the "
        "selection metric there; routing at the best checkpoint over the routed layers: entropy (nats) "
        "lowest-highest, one expert's share of a layer's token choices smallest-largest, the largest share dropped "
        "by capacity, the largest drift of an expert's auxiliary tensors from their start (mpoe_exp/run_notes.py)."
    )
    return "\n".join([*lines, "", note]) + "\n"
