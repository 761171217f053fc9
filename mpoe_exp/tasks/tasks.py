"""Tasks as the trainer sees them: training features, a collate function, a loss and an evaluation.

- `GlueTask`, `GlueClassificationTask` (glue.py): a GLUE task on T5 (text-to-text) and on an encoder (a classifier).
- `MultiTaskGlue` (multitask.py): the GLUE tasks as one T5 mixture.
- `LanguageModelingTask`: GPT-2 causal LM (WikiText-2): the split's text tokenized and cut into blocks;
  perplexity = exp(mean token NLL) over the evaluation split; with `task.bleu_n` set, the test split also reports
  BLEU-n of unconditional samples against the test paragraphs (`generation.sample_and_score`).
- `GenerationTask` (generation.py): EMNLP News / IMDB, one sentence per sequence; validation perplexity; test
  perplexity plus BLEU-n and Self-BLEU-n of unconditional top-k samples.

A task type is a class implementing the `Task` protocol (protocol.py), built as `TaskClass(spec, tokenizer)` from
the run's spec (mpoe_exp/spec.py: its task is the type's spec, TASK_SPECS), plus one line in `TASK_TYPES`
(`ENCODER_TASK_TYPES` for the class an encoder model runs a task type with).
"""

from __future__ import annotations

import torch

from mpoe_exp.errors import UserError
from mpoe_exp.registry import Registry
from mpoe_exp.spec import RunSpec
from mpoe_exp.tasks import text_data
from mpoe_exp.tasks.data_location import task_data_dir
from mpoe_exp.tasks.generation import (
    GenerationTask,
    causal_lm_collate,
    causal_lm_loss,
    causal_lm_nll,
    check_sampling_config,
    model_positions,
    perplexity_metrics,
    sample_and_score,
    wikitext_references,
)
from mpoe_exp.tasks.glue import GlueClassificationTask, GlueTask, length_sorted_batches, pad
from mpoe_exp.tasks.multitask import MultiTaskGlue
from mpoe_exp.tasks.protocol import Task

__all__ = [
    "ENCODER_TASK_TYPES",
    "TASK_TYPES",
    "GenerationTask",
    "GlueClassificationTask",
    "GlueTask",
    "LanguageModelingTask",
    "MultiTaskGlue",
    "Task",
    "build_task",
    "length_sorted_batches",
    "pad",
]


class LanguageModelingTask(Task):
    """Causal LM fine-tuning; evaluation is perplexity over the split's blocks."""

    def __init__(self, spec: RunSpec, tokenizer):
        task_cfg, data_dir = spec.task, task_data_dir(spec)
        max_positions = model_positions(spec)
        self.name = task_cfg.name
        self.cfg = task_cfg
        self.tokenizer = tokenizer
        self.main_metric = "perplexity"
        self.greater_is_better = False
        self.block_size = min(task_cfg.block_size, max_positions)
        texts = text_data.load_text_splits(task_cfg.text_task, data_dir=data_dir, seed=task_cfg.data_seed)
        self.blocks = {
            split: text_data.lm_blocks(text_data.tokenize_and_concatenate(lines, tokenizer), self.block_size)
            for split, lines in texts.items()
        }
        self.split_sizes = {k: len(v) for k, v in self.blocks.items()}
        # Samples scored on test when the task config asks for BLEU (WikiText-2: BLEU-2/4; docs/method.md,
        # 'Language modelling and generation').
        self.seed = spec.seed
        self.sample_references = wikitext_references(texts["test"]) if task_cfg.bleu_n else None
        if self.sample_references is not None:
            check_sampling_config(task_cfg)

    def train_features(self) -> list[dict]:
        return [{"input_ids": b} for b in self.blocks["train"]]

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return causal_lm_collate([f["input_ids"] for f in features], self.tokenizer.pad_token_id)

    def loss(self, model, batch: dict, label_smoothing: float) -> torch.Tensor:
        return causal_lm_loss(model, batch, label_smoothing)

    def evaluate(self, model, split: str, batch_size: int, device) -> dict:
        """Perplexity over the split's blocks; on "test" with task.bleu_n set, also BLEU-n of unconditional samples
        (task.num_samples of at most task.sample_length tokens, top-k task.top_k, seeded by the run seed)."""
        features = [{"input_ids": b} for b in self.blocks[split]]
        result = perplexity_metrics(*causal_lm_nll(model, features, self.collate, batch_size, device))
        if split == "test" and self.sample_references is not None:
            result.update(
                sample_and_score(
                    model, self.tokenizer, self.sample_references, self.cfg, self.seed, device, self.cfg.sample_length
                )
            )
        return result


TASK_TYPES = Registry(
    "task type (task.type)",
    {"glue": GlueTask, "lm": LanguageModelingTask, "glue_multitask": MultiTaskGlue, "generation": GenerationTask},
)
# what an encoder (a family of kind encoder: BERT) runs a task type as
ENCODER_TASK_TYPES = Registry("task type on an encoder", {"glue": GlueClassificationTask})


def build_task(spec: RunSpec, tokenizer) -> Task:
    """The task object of the run's task with data from its folder (`data_location.task_data_dir`) or the hub."""
    from mpoe_exp.backbones import FAMILIES

    kind = spec.task.type
    if FAMILIES[spec.model.family].kind == "encoder":
        if kind not in ENCODER_TASK_TYPES:
            raise UserError(f"task type {kind!r} does not run on an encoder; encoders run {sorted(ENCODER_TASK_TYPES)}")
        return ENCODER_TASK_TYPES[kind](spec, tokenizer)
    return TASK_TYPES[kind](spec, tokenizer)
