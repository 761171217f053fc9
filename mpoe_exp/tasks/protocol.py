"""What the trainer and the runner need of a task: the `Task` protocol every task class implements.

A task is built as `TaskClass(spec, tokenizer)` from the run's spec and the model's tokenizer, and registered
by one line in `tasks.TASK_TYPES` (`ENCODER_TASK_TYPES` for the class an encoder runs a task type with).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Task(Protocol):
    name: str  # the task's config name (cfg.task.name)
    main_metric: str  # the validation metric that selects the checkpoint and the hyperparameters
    greater_is_better: bool
    split_sizes: dict[str, Any]  # examples per split (a dict per sub-task for a mixture), written to results.json

    def train_features(self) -> list[dict]:
        """The training examples, encoded: one dict per example, holding at least "input_ids"."""
        ...

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """A batch of features as tensors: at least input_ids, attention_mask and labels."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float) -> torch.Tensor:
        """The training loss of `batch` (a scalar; the trainer adds the MoE layers' auxiliary losses)."""
        ...

    def evaluate(self, model: torch.nn.Module, split: str, batch_size: int, device: Any) -> dict[str, Any]:
        """The metrics of `split` ("validation" or "test"), `main_metric` among them. Features are encoded once
        per split and kept, so repeated evaluations only run the model."""
        ...
