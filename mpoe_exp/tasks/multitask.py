"""Multi-task GLUE (the paper's Table 2): one T5 model trained on a sampled mixture of the GLUE tasks.

Each sub-task is a `GlueTask` built from a per-task config composed from `cfg.task` (same data_dir, hub_path,
data_seed and length limits), so loading, the split rule, the text-to-text format and the evaluation are exactly
those of the single-task runs. T5's input carries the task prefix ("cola sentence: ...", "rte sentence1: ..."),
so one model serves all tasks and batches mix tasks freely.

Task mixture (docs/method.md, 'Multi-task GLUE'): a training example comes from task t with probability
p_t = n_t^(1/T) / sum_s n_s^(1/T), n_t the size of t's training split, T = `task.temperature` (10 as in Hyperformer;
T = 1 is proportional to size, T -> inf uniform). `train_features()` returns a list of `mixture_size` examples:
  1. the task of each slot is drawn independently with probability p_t (numpy Generator);
  2. the slots of task t take t's training examples in a shuffled cyclic order: a fresh permutation of the task's
     examples per pass, passes concatenated, so within a task every example is used floor(k/n) or ceil(k/n) times
     (k slots of the task, n examples): even use, no example left out while another repeats twice more.
Both draws come from `numpy.random.SeedSequence([task.data_seed, seed])`, so the mixture is deterministic for a
given (data_seed, seed) and changes with the run seed like everything else that is random in a run.
`mixture_size: null` means the sum of the task sizes. The trainer shuffles this list again every epoch and
walks through it, so one epoch is `mixture_size` examples and later epochs repeat the same mixture in a new order;
to draw a single mixture for a whole run of train.max_steps steps, set mixture_size to
max_steps * batch_size * grad_accum_steps (the paper's 65,536 steps x 32 = 2,097,152), which lets each large task
contribute up to p_t times that many distinct examples instead of p_t times the sum of the sizes.

Evaluation runs every task on the split and returns a flat dict: "<task>/<metric>" for each task's GLUE metrics
(x100, plus "<task>/unparsable") and "glue_average", the mean over tasks of each task's GLUE_MAIN_METRIC
(CoLA mcc, STS-B pearson, accuracy otherwise) — the selection metric (greater is better).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping

import numpy as np
import torch

from mpoe_exp import metrics
from mpoe_exp.errors import UserError
from mpoe_exp.spec import GlueSpec, MultiTaskSpec, RunSpec
from mpoe_exp.tasks import glue_data
from mpoe_exp.tasks.data_location import task_data_dir
from mpoe_exp.tasks.glue import GlueTask
from mpoe_exp.tasks.protocol import Task

logger = logging.getLogger(__name__)

AVERAGE_METRIC = "glue_average"


def mixture_probabilities(sizes: Mapping[str, int], temperature: float) -> dict[str, float]:
    """p_t proportional to sizes[t]^(1/temperature), in the order of `sizes`; temperature may be inf (uniform)."""
    if not sizes:
        raise ValueError("a task mixture needs at least one task")
    if not temperature > 0:  # also refuses NaN
        raise ValueError(f"the mixture temperature must be > 0, got {temperature}")
    empty = [name for name, n in sizes.items() if n < 1]
    if empty:
        raise ValueError(f"the training split of {', '.join(empty)} is empty; it cannot be part of a mixture")
    # In log space, shifted by the maximum: exact for T = 1 and no overflow for small T.
    logs = np.log(np.array(list(sizes.values()), dtype=np.float64)) / temperature
    weights = np.exp(logs - logs.max())
    probabilities = weights / weights.sum()
    return {name: float(p) for name, p in zip(sizes, probabilities)}


def sample_mixture(
    sizes: Mapping[str, int], temperature: float, mixture_size: int, seed: int | list[int]
) -> list[tuple[str, int]]:
    """`mixture_size` (task, example index) pairs: tasks drawn per slot with `mixture_probabilities`, each task's
    examples taken in a shuffled cyclic order (a fresh permutation per pass). Deterministic for a given seed."""
    if mixture_size < 1:
        raise ValueError(f"mixture_size must be a positive integer, got {mixture_size}")
    names = list(sizes)
    probabilities = np.array(list(mixture_probabilities(sizes, temperature).values()))
    task_seed, *order_seeds = np.random.SeedSequence(seed).spawn(1 + len(names))
    slots = np.random.default_rng(task_seed).choice(len(names), size=mixture_size, p=probabilities)
    indices = np.empty(mixture_size, dtype=np.int64)
    for t, (name, order_seed) in enumerate(zip(names, order_seeds)):
        mine = np.flatnonzero(slots == t)
        if mine.size == 0:
            continue
        n, rng = sizes[name], np.random.default_rng(order_seed)
        passes = math.ceil(mine.size / n)
        indices[mine] = np.concatenate([rng.permutation(n) for _ in range(passes)])[: mine.size]
    return [(names[t], int(i)) for t, i in zip(slots.tolist(), indices.tolist())]


def _task_list(task: MultiTaskSpec) -> list[str]:
    """The canonical GLUE names of `task.tasks` (known and at least one: the spec's rule), refusing duplicates."""
    names = [glue_data._task_name(t) for t in task.tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"task.tasks lists {', '.join(duplicates)} more than once")
    return names


class MultiTaskGlue(Task):
    """Several GLUE tasks for one encoder-decoder model: a temperature-sampled training mixture, evaluation on all."""

    def __init__(self, spec: RunSpec, tokenizer):
        task_cfg = spec.task
        self.name = task_cfg.name
        self.cfg = task_cfg
        self.tokenizer = tokenizer
        self.main_metric = AVERAGE_METRIC
        self.greater_is_better = True
        self.temperature = float(task_cfg.temperature)
        self.seed = [int(task_cfg.data_seed), int(spec.seed)]
        self.tasks: dict[str, GlueTask] = {}
        data_dir = task_data_dir(spec)  # the GLUE folder every sub-task reads
        for glue_task in _task_list(task_cfg):
            sub_task = GlueSpec(
                type="glue",
                name=glue_task,
                families=list(task_cfg.families),
                data_seed=task_cfg.data_seed,
                data_dir=data_dir,
                hub_path=task_cfg.hub_path,
                max_source_length=task_cfg.max_source_length,
                max_target_length=task_cfg.max_target_length,
                glue_task=glue_task,
            )
            self.tasks[glue_task] = GlueTask(dataclasses.replace(spec, task=sub_task, data_dir=None), tokenizer)
        self.split_sizes = {name: dict(task.split_sizes) for name, task in self.tasks.items()}
        self.train_sizes = {name: task.split_sizes["train"] for name, task in self.tasks.items()}
        try:
            self.probabilities = mixture_probabilities(self.train_sizes, self.temperature)
        except ValueError as err:
            raise UserError(f"task={self.name}: {err}") from None
        size = task_cfg.mixture_size
        self.mixture_size = sum(self.train_sizes.values()) if size is None else int(size)
        self._first = next(iter(self.tasks.values()))

    def mixture(self) -> list[tuple[str, int]]:
        """The training mixture as (task, index into that task's training split) pairs (see the module doc)."""
        return sample_mixture(self.train_sizes, self.temperature, self.mixture_size, self.seed)

    def train_features(self) -> list[dict]:
        """The encoded training mixture; an example drawn several times is encoded once and shared."""
        cache: dict[tuple[str, int], dict] = {}
        counts = dict.fromkeys(self.tasks, 0)
        features = []
        for key in self.mixture():
            name, index = key
            if key not in cache:
                cache[key] = self.tasks[name].encode(self.tasks[name].splits["train"][index])
            features.append(cache[key])
            counts[name] += 1
        logger.info(
            "%s: mixture of %d examples (T=%g): %s",
            self.name,
            len(features),
            self.temperature,
            ", ".join(f"{n} {counts[n]} (p={p:.3f})" for n, p in self.probabilities.items()),
        )
        return features

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return self._first.collate(features)  # every sub-task shares the tokenizer and the padding rule

    def loss(self, model, batch: dict, label_smoothing: float) -> torch.Tensor:
        return self._first.loss(model, batch, label_smoothing)

    def evaluate(self, model, split: str, batch_size: int, device) -> dict[str, float]:
        """Every task's GLUE metrics on `split` as "<task>/<metric>", plus "glue_average" of the main metrics."""
        results: dict[str, float] = {}
        main_values = []
        for name, task in self.tasks.items():
            task_metrics = task.evaluate(model, split, batch_size, device)
            results.update({f"{name}/{metric}": value for metric, value in task_metrics.items()})
            main_values.append(task_metrics[metrics.GLUE_MAIN_METRIC[name]])
        results[AVERAGE_METRIC] = float(np.mean(main_values))
        return results
