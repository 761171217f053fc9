"""`RunRecord`: one run's results.json, the one definition of its schema. The runner writes it, the aggregator,
the tables, the figures and the study records (mpoe_exp/record.py) read it; nothing else spells its keys.

results.json (schema_version 1):
    status            "finished" | "failed"
    experiment, model, method, method_label, ablation, task, seed, hparams (the readable hyperparameters:
                      `HPARAMS`)
    table_model       the paper's model the run stands in for in `make tables` (the model itself unless set)
    config_hash       sha256 of the run's identity (mpoe_exp/results.py); checkpoints carry it too
    data_fingerprint, model_files_fingerprint   what the identity holds of the files read (mpoe_exp/fingerprints.py)
    main_metric       name of the task's selection metric; greater_is_better
    split_sizes       examples per split; world_size (processes that trained)
    parameters        total, trainable (and router / expert_shared / expert_specific for expert methods)
    code_version, library_versions, config (the resolved config)
  finished runs also:
    validation        metrics of the best checkpoint on the validation split (selection uses only these)
    test              metrics of that checkpoint on the test split: numbers, except in generation and WikiText-2
                      runs "samples" (every sample scored) and "sacrebleu_signature" (the string sacreBLEU gives
                      for its "sacrebleu" score); tables and loggers read the numbers only
    best_step, steps  optimizer step of the best checkpoint; steps trained
    central_updates   optimizer steps that updated the central tensors (gradient mask)
    history           [{"step", "loss", "validation": {...}, ...}] one entry per evaluation; with routed expert
                      layers also "routing": {layer: {load, entropy, dropped[, aux_drift]}} (mpoe_exp/moe/telemetry.py)
                      of the validation pass and "train_routing": {layer: {load, entropy, dropped}} of the training
                      forwards since the previous evaluation (this process's, under several processes)
    wall_time_s, tokens_per_second
  failed runs also:
    error             why it stopped

Keys a reader does not know (a newer version's) are kept in `extra` and written back as they were.
Imports no model code: `make tables` reads records without torch.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"

# The readable hyperparameters of a run (its directory's <hparams> level and results.json's "hparams"): label ->
# the config keys it is computed from ("bs" is the batch per optimizer step: batch_size x grad_accum_steps).
HPARAMS: dict[str, tuple[str, ...]] = {
    "lr": ("train.lr",),
    "bs": ("train.batch_size", "train.grad_accum_steps"),
    "ep": ("train.epochs",),
    "steps": ("train.max_steps",),
}
HPARAM_KEYS = frozenset(k for keys in HPARAMS.values() for k in keys)

FINISHED_ONLY = ("validation", "test", "best_step", "steps", "central_updates", "history", "wall_time_s",
                 "tokens_per_second")  # fmt: skip
FAILED_ONLY = ("error",)


class BadRecord(ValueError):
    """A results.json that cannot be used; the message says why."""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class RunRecord:
    status: str
    experiment: str
    model: str
    method_label: str
    task: str
    seed: Any
    hparams: dict[str, Any]
    method: str | None = None
    ablation: str | None = None
    table_model: str | None = None
    config_hash: str | None = None
    data_fingerprint: Any = None
    model_files_fingerprint: Any = None
    main_metric: str | None = None
    greater_is_better: bool = True
    split_sizes: dict[str, int] | None = None
    world_size: int = 1
    parameters: dict[str, int] = field(default_factory=dict)
    code_version: str | None = None
    library_versions: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    validation: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    best_step: int | None = None
    steps: int | None = None
    central_updates: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float | None = None
    tokens_per_second: float | None = None
    error: str | None = None
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys this version does not know
    path: Path | None = None  # the file it was read from (not written)

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def paper_model(self) -> str:
        """The paper's model the run counts for: its `table_model` (a tiny stand-in in smoke runs), else its model."""
        return str(self.table_model or self.model)

    def metric(self, split: str, name: str) -> float | None:
        """The numeric `name` of the validation or test metrics, else None."""
        value = (getattr(self, split) or {}).get(name)
        return float(value) if is_number(value) else None

    @classmethod
    def from_json(cls, data: Any, path: Path | None = None) -> RunRecord:
        """The record of a parsed results.json; BadRecord says why it cannot be used."""
        if not isinstance(data, dict):
            raise BadRecord(f"not a JSON object ({type(data).__name__})")
        required = ["status", "experiment", "model", "method_label", "task", "seed", "hparams"]
        if data.get("status") == "finished":
            required += ["main_metric", "greater_is_better", "validation", "test"]
        missing = [k for k in required if k not in data]
        if missing:
            raise BadRecord(f"missing required keys: {', '.join(missing)}")
        if data["status"] not in ("finished", "failed"):
            raise BadRecord(f"unknown status {data['status']!r}")
        if not isinstance(data["hparams"], dict):
            raise BadRecord("hparams is not an object")
        if data["status"] == "finished":
            if not isinstance(data["validation"], dict) or not isinstance(data["test"], dict):
                raise BadRecord("validation/test are not objects")
            if not is_number(data["validation"].get(data["main_metric"])):
                raise BadRecord(f"validation has no numeric main metric {data['main_metric']!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "path"}
        fields = {k: v for k, v in data.items() if k in known and v is not None}
        return cls(**fields, extra={k: v for k, v in data.items() if k not in known}, path=path)

    def to_json(self) -> dict[str, Any]:
        """results.json's object: schema_version first, then the fields this status has, then `extra`."""
        left_out = {"extra", "path", "schema_version", *(FAILED_ONLY if self.finished else FINISHED_ONLY)}
        out = {"schema_version": self.schema_version}
        out.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in left_out})
        return {**out, **self.extra}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, default=str) + "\n"
