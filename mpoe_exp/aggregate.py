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

The table data model (`Table` of `Row`s of `Cell`s) is here too, so that tables.py and figures.py both read it.
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

from mpoe_exp.results import RESULTS_FILE, configured_identity

REQUIRED_KEYS = ("status", "experiment", "model", "method_label", "task", "seed", "hparams")
FINISHED_KEYS = ("main_metric", "greater_is_better", "validation", "test")
MIN_SEEDS = 3

GroupKey = tuple[str, str, str, str]  # experiment, model, method_label, task


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_record(data: Any) -> str | None:
    """Why this parsed results.json cannot be used, or None."""
    if not isinstance(data, dict):
        return f"not a JSON object ({type(data).__name__})"
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if data.get("status") == "finished":
        missing += [k for k in FINISHED_KEYS if k not in data]
    if missing:
        return f"missing required keys: {', '.join(missing)}"
    if data["status"] not in ("finished", "failed"):
        return f"unknown status {data['status']!r}"
    if not isinstance(data["hparams"], dict):
        return "hparams is not an object"
    if data["status"] == "finished":
        if not isinstance(data["validation"], dict) or not isinstance(data["test"], dict):
            return "validation/test are not objects"
        if not _is_number(data["validation"].get(data["main_metric"])):
            return f"validation has no numeric main metric {data['main_metric']!r}"
    return None


def load_results(runs_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every results.json under runs_dir (failed runs included), and the problems: "path: reason" of skipped files.

    Each record gets "_path". Unreadable or corrupt JSON and files missing required keys are skipped, never raised.
    """
    records: list[dict[str, Any]] = []
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
        reason = _check_record(data)
        if reason is not None:
            problems.append(f"{path}: {reason}")
            continue
        records.append({**data, "_path": str(path)})
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
    runs: list[dict[str, Any]]
    validation_mean: float
    settings: int  # hyperparameter settings tried (finished runs)
    n_failed: int  # failed runs of the group, all settings

    @property
    def seeds(self) -> list[Any]:
        return sorted((r["seed"] for r in self.runs), key=str)

    def stat(self, metric: str) -> Stat | None:
        values = [float(r["test"][metric]) for r in self.runs if _is_number(r["test"].get(metric))]
        if not values:
            return None
        std = float(np.std(values, ddof=1)) if len(values) > 1 else None
        return Stat(float(np.mean(values)), std, len(values))

    def wall_seconds(self) -> float | None:
        """Mean wall time per run of the selected setting (results' wall_time_s: training, evaluation, test)."""
        times = [r.get("wall_time_s") for r in self.runs]
        times = [float(t) for t in times if _is_number(t)]
        return float(np.mean(times)) if times else None

    def params_millions(self) -> float | None:
        totals = [r.get("parameters", {}).get("total") for r in self.runs if isinstance(r.get("parameters"), dict)]
        totals = [t for t in totals if _is_number(t)]
        return float(np.mean(totals)) / 1e6 if totals else None


def table_model(record: dict[str, Any]) -> str:
    """The paper's model a run counts for: its `table_model` (a tiny stand-in in smoke runs), else its model."""
    return str(record.get("table_model") or record["model"])


def hparams_key(hparams: dict[str, Any]) -> str:
    return json.dumps(hparams, sort_keys=True, default=str)


def _setting_key(record: dict[str, Any]) -> str:
    """The model that ran plus the run's config less its seed: runs of a tiny stand-in never pool seeds with runs of
    the model it stands in for."""
    return f"{record['model']} {record.get('config_hash') or hparams_key(record['hparams'])}"


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: json.dumps(tree, sort_keys=True, default=str)}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


# config keys the readable `hparams` already show (lr, bs = batch x accumulation, ep, steps)
_HPARAM_KEYS = {"train.lr", "train.batch_size", "train.grad_accum_steps", "train.epochs", "train.max_steps"}


def _shown_setting(chosen: dict[str, Any], settings: list[dict[str, Any]]) -> dict[str, Any]:
    """The chosen run's `hparams` plus each config key (dotted) whose value differs between the group's settings."""
    flats = []
    for run in [chosen, *settings]:
        config = run.get("config")
        flats.append(_flat(configured_identity(OmegaConf.create(config))) if isinstance(config, dict) else {})
    keys = sorted({k for f in flats for k in f} - _HPARAM_KEYS)
    differing = [k for k in keys if len({f.get(k) for f in flats[1:]}) > 1]
    return {**chosen["hparams"], **{k: json.loads(flats[0][k]) if k in flats[0] else None for k in differing}}


def select(records: list[dict[str, Any]]) -> dict[GroupKey, Selection]:
    """Per group, the setting (the config less the seed) with the best mean validation main metric over its seeds."""
    settings: dict[GroupKey, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    failed: Counter[GroupKey] = Counter()
    for r in records:
        key = (str(r["experiment"]), table_model(r), str(r["method_label"]), str(r["task"]))
        if r["status"] != "finished":
            failed[key] += 1
            continue
        settings[key][_setting_key(r)].append(r)

    selections: dict[GroupKey, Selection] = {}
    for key, by_setting in settings.items():
        best: tuple[float, str, float] | None = None  # (score, hparams key, validation mean)
        for hkey in sorted(by_setting):
            runs = by_setting[hkey]
            mean = float(np.mean([float(r["validation"][r["main_metric"]]) for r in runs]))
            score = mean if runs[0]["greater_is_better"] else -mean
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
class Table:
    name: str
    title: str
    experiment: str
    columns: list[str]
    rows: list[Row]
    figure_column: str | None = None  # plotted against parameters (figures.params_figure)
