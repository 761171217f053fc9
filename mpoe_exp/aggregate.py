"""Results of finished runs, loaded and aggregated: what `make tables` (mpoe_exp/tables.py) and its figures
(mpoe_exp/figures.py) read. Imports no model or training code.

Aggregation, per (experiment, model, method[-ablation], task):
  * runs with status "failed" are counted (`n_failed`) and never enter a mean;
  * the finished runs are split by setting: everything in the run's config but the seed (its `config_hash`; the
    `hparams` dict for results files without one). The setting with the best MEAN validation main metric over its
    seeds wins (greater_is_better respected; ties: the first setting in sorted order), whatever differs between
    settings (the learning rate, `method.gradient_mask_prob`, `train.warmup_steps`, ...): "Selected settings" shows
    the readable hyperparameters plus every config key that differs between the group's settings. Selection never
    looks at test metrics;
  * each test metric is reported as mean and sample standard deviation (ddof=1) over that setting's seeds, with the
    number of seeds n. With one seed there is no standard deviation: it is left blank. Fewer than 3 seeds is marked
    with a dagger and "(n=...)", never hidden.

Paired comparisons (`paired`): one row's test metric minus another's, seed by seed, over the seeds both rows ran
(each row at its own selected setting), with the mean and a 95% t-interval (scipy.stats.t, n - 1 degrees of freedom;
none with one seed).

Routing telemetry (`routing_load`): the expert load of each routed layer at a run's best checkpoint (the history
entry whose step is `best_step`; its "routing" key, written for models with routed expert layers), averaged over
the selected setting's seeds.

The table data model (`Table` of `Row`s of `Cell`s, its `Comparison`s) is here too, so that tables.py and
figures.py both read it.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from scipy import stats

from mpoe_exp.results import configured_identity
from mpoe_exp.run_record import HPARAM_KEYS, RESULTS_FILE, BadRecord, RunRecord, is_number

MIN_SEEDS = 3

GroupKey = tuple[str, str, str, str]  # experiment, model, method_label, task


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_results(runs_dir: str | Path) -> tuple[list[RunRecord], list[str]]:
    """Every results.json under runs_dir (failed runs included), and the problems: "path: reason" of skipped files.

    Unreadable or corrupt JSON and files that are not a run's record (`RunRecord.from_json`) are skipped, never
    raised.
    """
    records: list[RunRecord] = []
    problems: list[str] = []
    root = Path(runs_dir)
    if not root.is_dir():
        return records, [f"{root}: no such directory"]
    for path in sorted(root.rglob(RESULTS_FILE)):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            problems.append(f"{path}: unreadable JSON ({type(err).__name__}: {err})")
            continue
        try:
            records.append(RunRecord.from_json(data, path))
        except BadRecord as err:
            problems.append(f"{path}: {err}")
    return records, problems


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Stat:
    mean: float
    std: float | None  # sample std (ddof=1); None with one seed
    n: int

    @property
    def few(self) -> bool:
        return self.n < MIN_SEEDS


@dataclass
class Selection:
    """One (experiment, model, method_label, task) group at its validation-selected hyperparameter setting."""

    key: GroupKey
    hparams: dict[str, Any]
    runs: list[RunRecord]
    validation_mean: float
    settings: int  # hyperparameter settings tried (finished runs)
    n_failed: int  # failed runs of the group, all settings

    @property
    def seeds(self) -> list[Any]:
        return sorted((r.seed for r in self.runs), key=str)

    def stat(self, metric: str) -> Stat | None:
        values = [v for v in (r.metric("test", metric) for r in self.runs) if v is not None]
        if not values:
            return None
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        return Stat(float(np.mean(values)), std, len(values))

    def values_by_seed(self, metric: str) -> dict[Any, float]:
        """Test `metric` per seed of the selected setting (runs without a numeric value left out)."""
        return {r.seed: r.metric("test", metric) for r in self.runs if r.metric("test", metric) is not None}

    def wall_seconds(self) -> float | None:
        """Mean wall time per run of the selected setting (results' wall_time_s: training, evaluation, test)."""
        times = [float(r.wall_time_s) for r in self.runs if is_number(r.wall_time_s)]
        return float(np.mean(times)) if times else None

    def params_millions(self) -> float | None:
        totals = [r.parameters.get("total") for r in self.runs if isinstance(r.parameters, dict)]
        totals = [t for t in totals if is_number(t)]
        return float(np.mean(totals)) / 1e6 if totals else None


def group_key(record: RunRecord) -> GroupKey:
    """(experiment, the paper's model it counts for, method label, task): a table row's runs of one task."""
    return str(record.experiment), record.paper_model, str(record.method_label), str(record.task)


def hparams_key(hparams: dict[str, Any]) -> str:
    return json.dumps(hparams, sort_keys=True, default=str)


def _setting_key(record: RunRecord) -> str:
    """The model that ran plus the run's config less its seed: runs of a tiny stand-in never pool seeds with runs of
    the model it stands in for."""
    return f"{record.model} {record.config_hash or hparams_key(record.hparams)}"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: json.dumps(tree, sort_keys=True, default=str)}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _shown_setting(chosen: RunRecord, settings: list[RunRecord]) -> dict[str, Any]:
    """The chosen run's `hparams` plus each config key (dotted) whose value differs between the group's settings."""
    flats = []
    for run in [chosen, *settings]:
        config = run.config
        flats.append(_flat(configured_identity(OmegaConf.create(config))) if isinstance(config, dict) else {})
    keys = sorted({k for f in flats for k in f} - HPARAM_KEYS)  # those the readable hparams show
    differing = [k for k in keys if len({f.get(k) for f in flats[1:]}) > 1]
    return {**chosen.hparams, **{k: json.loads(flats[0][k]) if k in flats[0] else None for k in differing}}


def select(records: list[RunRecord]) -> dict[GroupKey, Selection]:
    """Per group, the setting (the config less the seed) with the best mean validation main metric, compared over
    the seeds every setting of the group has (all of each setting's seeds where they share none): a sweep stopped
    part way does not pick a setting for which seeds it happened to reach. `validation_mean` is the chosen
    setting's mean over all its seeds."""
    settings: dict[GroupKey, dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    failed: Counter[GroupKey] = Counter()
    for r in records:
        key = group_key(r)
        if not r.finished:
            failed[key] += 1
            continue
        settings[key][_setting_key(r)].append(r)

    selections: dict[GroupKey, Selection] = {}
    for key, by_setting in settings.items():
        best: tuple[float, str, float] | None = None  # (score, hparams key, validation mean)
        shared = set.intersection(*({r.seed for r in runs} for runs in by_setting.values()))
        for hkey in sorted(by_setting):
            runs = by_setting[hkey]
            mean = float(np.mean([r.metric("validation", r.main_metric) for r in runs]))
            compared = [r for r in runs if r.seed in shared] or runs
            score = float(np.mean([r.metric("validation", r.main_metric) for r in compared]))
            score = score if runs[0].greater_is_better else -score
            score = score if math.isfinite(score) else -math.inf
            if best is None or score > best[0]:
                best = (score, hkey, mean)
        assert best is not None
        runs = by_setting[best[1]]
        shown = _shown_setting(runs[0], [group[0] for group in by_setting.values()])
        selections[key] = Selection(key, shown, runs, best[2], len(by_setting), failed[key])
    for key, count in failed.items():
        if key not in selections:  # only failed runs: nothing to report, but keep the count visible
            selections[key] = Selection(key, {}, [], math.nan, 0, count)
    return selections


def seed_order(seed: Any) -> tuple:
    return (0, seed, "") if is_number(seed) else (1, 0, str(seed))


@dataclass
class Paired:
    """Per-seed differences (left minus right) over the seeds both sides have, and their t-interval."""

    seeds: list[Any]
    differences: list[float]
    confidence: float = 0.95

    @property
    def n(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.differences)) if self.differences else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The t-interval of the mean difference (n - 1 degrees of freedom); None with fewer than two seeds."""
        if self.n < 2:
            return None
        mean, sem = float(np.mean(self.differences)), float(stats.sem(self.differences))
        if sem == 0.0:  # every seed the same difference: scipy would give nan
            return mean, mean
        low, high = stats.t.interval(self.confidence, self.n - 1, loc=mean, scale=sem)
        return float(low), float(high)


def paired(left: list[dict[Any, float]], right: list[dict[Any, float]]) -> Paired:
    """Left minus right per seed, averaged over the parts (one per column; an average column's tasks): only the
    seeds present in every part of both sides."""
    common = set.intersection(*(set(values) for values in [*left, *right]))
    seeds = sorted(common, key=seed_order)
    diffs = [float(np.mean([lv[s] - rv[s] for lv, rv in zip(left, right)])) for s in seeds]
    return Paired(seeds, diffs)


def best_routing(run: RunRecord) -> dict[str, Any] | None:
    """The routing telemetry of the run's best checkpoint (the history entry whose step is best_step), or None."""
    if run.best_step is None:
        return None
    for entry in run.history or []:
        if isinstance(entry, dict) and entry.get("step") == run.best_step:
            routing = entry.get("routing")
            return routing if isinstance(routing, dict) and routing else None
    return None


def _has_load(layer: Any) -> bool:
    load = layer.get("load") if isinstance(layer, dict) else None
    return isinstance(load, list) and bool(load) and all(map(is_number, load))


@dataclass
class RoutingLoad:
    """Expert load of one selection: load[layer, expert], the mean over `seeds` (NaN where no seed has a value)."""

    layers: list[str]
    load: np.ndarray  # (layers, experts)
    seeds: list[Any]


def routing_load(sel: Selection) -> RoutingLoad | None:
    """The fraction of token choices per layer and expert at the best checkpoint, averaged over the selected
    setting's seeds; None when no run of it has routing telemetry (dense models, older results files)."""
    per_run: list[tuple[Any, dict[str, list[float]]]] = []
    for run in sel.runs:
        routing = best_routing(run)
        loads = {str(name): layer["load"] for name, layer in (routing or {}).items() if _has_load(layer)}
        if loads:
            per_run.append((run.seed, loads))
    if not per_run:
        return None
    layers = list(dict.fromkeys(name for _, loads in per_run for name in loads))  # module order, first seen
    experts = max(len(load) for _, loads in per_run for load in loads.values())
    stack = np.full((len(per_run), len(layers), experts), np.nan)
    for i, (_, loads) in enumerate(per_run):
        for j, name in enumerate(layers):
            if name in loads:
                stack[i, j, : len(loads[name])] = loads[name]
    counts = np.sum(~np.isnan(stack), axis=0)
    mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
    return RoutingLoad(layers, mean, sorted((seed for seed, _ in per_run), key=seed_order))


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    column: str
    task: str | None
    metric: str | None
    paper: float | None
    ours: Stat | None = None
    status: str = "ok"  # ok | missing | incomplete (k/n) | n/a
    selection: Selection | None = None

    @property
    def diff(self) -> float | None:
        if self.ours is None or self.paper is None:
            return None
        return self.ours.mean - float(self.paper)


@dataclass
class Row:
    label: str
    model: str | None
    method: str | None
    cells: list[Cell] = field(default_factory=list)
    params_paper: float | None = None
    params_ours: list[float] = field(default_factory=list)  # distinct values (millions) over the row's tasks
    ran_models: list[str] = field(default_factory=list)  # the models that actually ran (tiny stand-ins in smoke runs)

    @property
    def reference(self) -> bool:
        return self.model is None

    @property
    def params_diff(self) -> float | None:
        if len(self.params_ours) != 1 or self.params_paper is None:
            return None
        return self.params_ours[0] - float(self.params_paper)


@dataclass
class PairedCell:
    column: str
    task: str | None
    metric: str | None  # None for an average column
    paired: Paired | None = None
    status: str = "ok"  # ok | n=1: no interval | no common seed | missing: <row label> has no runs
    verdict: str = ""  # the comparison's decision rule read on this cell ("" without a rule)


RULES = ("at_least", "equivalent", "positive")


@dataclass(frozen=True)
class DecisionRule:
    """A pre-registered reading of a comparison's 95% interval [low, high] of left − right (higher is better),
    with a practical margin `delta` and the seeds a verdict needs:
    - at_least ("left is at least as good as right"): supports if low > −delta, contradicts if high < −delta;
    - equivalent ("left matches right"): supports if the interval lies inside [−delta, +delta], contradicts if it
      lies entirely outside;
    - positive ("left is better"): supports if low > 0, contradicts if high < 0; an interval inside
      [−delta, +delta] is "no effect larger than delta";
    anything else is inconclusive. With fewer than `seeds` paired seeds there is no verdict."""

    kind: str
    delta: float
    seeds: int

    def verdict(self, paired: Paired | None, greater_is_better: bool = True) -> str:
        if paired is None or paired.n < self.seeds:
            return f"no verdict: n = {paired.n if paired else 0} < {self.seeds}"
        if not greater_is_better or paired.interval is None:
            return "no verdict: " + ("lower is better" if not greater_is_better else "no interval")
        (low, high), d = paired.interval, self.delta
        inside = -d <= low and high <= d
        if self.kind == "at_least":
            return "supports" if low > -d else "contradicts" if high < -d else "inconclusive"
        if self.kind == "equivalent":
            return "supports" if inside else "contradicts" if high < -d or low > d else "inconclusive"
        if low > 0 or high < 0:
            return "supports" if low > 0 else "contradicts"
        return f"inconclusive: no effect larger than {d:g}" if inside else "inconclusive"


@dataclass
class Comparison:
    """One entry of a table's `comparisons` ("LEFT - RIGHT", with or without a decision rule): a PairedCell per
    column of the table."""

    text: str
    left: Row
    right: Row
    cells: list[PairedCell] = field(default_factory=list)
    rule: DecisionRule | None = None


@dataclass
class Table:
    name: str
    title: str
    experiment: str
    columns: list[str]
    rows: list[Row]
    figure_column: str | None = None  # plotted against parameters (figures.params_figure)
    comparisons: list[Comparison] = field(default_factory=list)
