"""Experiment loggers: none (default) or Weights & Biases (`logger=wandb`).

W&B runs are grouped by experiment/model/method/task with one run per seed; the run id is made fresh when a run
starts and kept in its directory (`wandb_run_id`), so a resumed run continues the same W&B run and a run started
again with force=true (which deletes the file) gets a new one. `logger.wandb.mode=offline` writes under the run
directory and needs no network (`wandb sync` uploads it later).

A logger opens its run in `resume(step)`, which the trainer calls once it knows where training continues: 0 on a
fresh start, the resume checkpoint's step on a resume. A W&B run that an earlier process of the same run directory
started is rewound to that step (`resume_from="<id>?_step=<step>"`, W&B's rewind), so the evaluations a killed
process logged past its last checkpoint are replaced by the resumed run's, as in train.log. In offline mode the
rewind is recorded in the run and applied when `wandb sync` uploads it. When W&B refuses the rewind (a killed run
that the server has not yet marked crashed, a run it never received) the run is resumed as it stands and only the
records after its last logged step are sent: by exact resume they equal the ones it has.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mpoe_exp.errors import UserError
from mpoe_exp.registry import Registry

WANDB_RUN_ID_FILE = "wandb_run_id"


def wandb_run_id(directory: Path) -> str:
    """The W&B run id of a run directory: the stored one, else a new one (stored for the run's resumes)."""
    path = directory / WANDB_RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


@dataclass(frozen=True)
class RunLabels:
    """What a logger files a run under: its directory, its group (experiment/model/method/task), its name (the
    seed), its parameter counts and its whole config."""

    directory: Path
    group: str = ""
    name: str = ""
    parameters: dict[str, int] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


class NullLogger:
    """`logger=none`: takes no settings."""

    def __init__(self, labels: RunLabels | None = None):
        pass

    def resume(self, step: int) -> None:
        pass

    def log(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"validation": {"mcc": 1}} -> {"validation/mcc": 1}; a list's items by index ({"load": [0.5, 0.5]} ->
    "load/0", "load/1": a routed layer's per-expert numbers); non-numeric leaves are dropped."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, (list, tuple)):
            value = {str(i): v for i, v in enumerate(value)}
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


class WandbLogger:
    """`logger=wandb`: its keyword-only parameters are the logger section's keys (the schema reads them)."""

    def __init__(
        self,
        labels: RunLabels,
        *,
        project: str,
        entity: str | None,
        mode: Literal["online", "offline", "disabled"],  # offline: no network; `wandb sync` uploads later
        tags: list[str],
    ):
        try:
            import wandb
        except ImportError:
            raise UserError("logger=wandb needs the wandb package: pip install wandb") from None
        self.wandb, self.labels, self.directory, self.parameters = wandb, labels, labels.directory, labels.parameters
        self.settings = {"project": project, "entity": entity, "mode": mode, "tags": list(tags or [])}
        self.run = None
        self.first_step = 0  # records of earlier steps are in the W&B run already

    def resume(self, step: int) -> None:
        """Open the W&B run to continue after `step`: a new run, or this directory's earlier one rewound to `step`."""
        wandb, directory = self.wandb, self.directory
        earlier = (directory / WANDB_RUN_ID_FILE).is_file()
        run_id = wandb_run_id(directory)
        try:
            if earlier:
                try:
                    self.run = self._init(resume_from=f"{run_id}?_step={step}")
                except wandb.errors.Error as err:
                    print(f"W&B did not rewind run {run_id} to step {step} ({str(err).strip()}); resuming it as is")
            if self.run is None:
                self.run = self._init(id=run_id, resume="allow")
        except wandb.errors.Error as err:  # no API key, no network, a bad entity or project
            raise UserError(
                f"logger=wandb could not start a W&B run: {str(err).strip()} Log in once with `wandb login` (or set "
                f"WANDB_API_KEY), or log locally with logger.mode=offline (upload later with `wandb sync`), or use "
                f"logger=none"
            ) from None
        self.first_step = self.run.starting_step
        self.run.summary.update({f"parameters/{k}": v for k, v in self.parameters.items()})

    def _init(self, **resumption):
        labels = self.labels
        return self.wandb.init(
            **self.settings,
            group=labels.group,
            name=labels.name,
            dir=str(self.directory),
            config=labels.config,
            **resumption,
        )

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            raise RuntimeError("WandbLogger.log before resume(step) opened the run")
        if record["step"] >= self.first_step:
            self.run.log(flatten(record), step=record["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        self.run.summary.update(flatten(summary))
        self.run.finish()


# logger.name -> its class; a class's keyword-only constructor parameters are the other keys of the logger section
LOGGERS = Registry("logger (logger=...)", {"none": NullLogger, "wandb": WandbLogger})


def make_logger(settings: Mapping[str, Any], labels: RunLabels):
    """The logger of the `logger` section (plain values: name and the class's settings) for a run."""
    settings = dict(settings)
    return LOGGERS[settings.pop("name")](labels, **settings)
