"""Experiment loggers: none (default) or Weights & Biases (`logger=wandb`).

W&B runs are grouped by experiment/model/method/task with one run per seed; the run id is made fresh when a run
starts and kept in its directory (`wandb_run_id`), so a resumed run continues the same W&B run and a run started
again with force=true (which deletes the file) gets a new one. `logger.wandb.mode=offline` writes under the run
directory and needs no network (`wandb sync` uploads it later).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mpoe_exp.config import method_label
from mpoe_exp.errors import UserError

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


class NullLogger:
    def log(self, record: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"validation": {"mcc": 1}} -> {"validation/mcc": 1}; non-numeric leaves are dropped."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


class WandbLogger:
    def __init__(self, cfg: DictConfig, directory: Path, parameters: dict[str, int]):
        try:
            import wandb
        except ImportError:
            raise UserError("logger=wandb needs the wandb package: pip install wandb") from None
        try:
            self.run = self._init(wandb, cfg, directory)
        except wandb.errors.Error as err:  # no API key, no network, a bad entity or project
            raise UserError(
                f"logger=wandb could not start a W&B run: {str(err).strip()} Log in once with `wandb login` (or set "
                f"WANDB_API_KEY), or log locally with logger.mode=offline (upload later with `wandb sync`), or use "
                f"logger=none"
            ) from None
        self.run.summary.update({f"parameters/{k}": v for k, v in parameters.items()})

    @staticmethod
    def _init(wandb, cfg: DictConfig, directory: Path):
        settings = cfg.logger
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            mode=settings.mode,
            group=f"{cfg.experiment_name}/{cfg.model.name}/{method_label(cfg)}/{cfg.task.name}",
            name=f"seed={cfg.seed}",
            id=wandb_run_id(directory),
            resume="allow",
            dir=str(directory),
            config=OmegaConf.to_container(cfg, resolve=True),
            tags=list(settings.tags or []),
        )

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(flatten(record), step=record["step"])

    def finish(self, summary: dict[str, Any]) -> None:
        self.run.summary.update(flatten(summary))
        self.run.finish()


def make_logger(cfg: DictConfig, directory: Path, parameters: dict[str, int]):
    kind = cfg.logger.name
    if kind == "none":
        return NullLogger()
    if kind == "wandb":
        return WandbLogger(cfg, directory, parameters)
    raise UserError(f"unknown logger {kind!r}: use logger=none or logger=wandb")
