"""Tasks as the trainer sees them: training features, a collate function, a loss and an evaluation.

- `GlueTask`: T5 text-to-text: "<task> field: text ..." -> label string; greedy decoding; unparsable predictions
  count as wrong (docs/method.md, 'Splits and formats of GLUE').
- `GlueClassificationTask`: the same GLUE tasks, splits and metrics on an encoder (BERT): the task's input fields
  as one or two segments, a classifier on the pooled first token (cross-entropy; STS-B: one output, MSE).
- `LanguageModelingTask`: GPT-2 causal LM (WikiText-2): the split's text tokenized and cut into blocks;
  perplexity = exp(mean token NLL) over the evaluation split; with `task.bleu_n` set, the test split also reports
  BLEU-n of unconditional samples against the test paragraphs (`generation.sample_and_score`).
- `GenerationTask` (generation.py): EMNLP News / IMDB, one sentence per sequence; validation perplexity; test
  perplexity plus BLEU-n and Self-BLEU-n of unconditional top-k samples.

A task type is a class constructed as `Task(cfg, tokenizer)` (the whole run config) with the attributes `name`,
`main_metric`, `greater_is_better`, `split_sizes` and the methods `train_features()`, `collate(features)` (a dict
of tensors with at least input_ids, attention_mask, labels), `loss(model, batch, label_smoothing)` and
`evaluate(model, split, batch_size, device)` (a dict of metrics holding `main_metric`), plus one line in
`TASK_TYPES` (`ENCODER_TASK_TYPES` for the class an encoder model runs a task type with).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from mpoe_exp import metrics
from mpoe_exp.errors import UserError
from mpoe_exp.moe import needs_full_sequence
from mpoe_exp.tasks import glue_data, text_data
from mpoe_exp.tasks.data_location import task_data_dir
from mpoe_exp.tasks.generation import (
    GenerationTask,
    causal_lm_collate,
    causal_lm_loss,
    causal_lm_nll,
    check_sampling_config,
    perplexity_metrics,
    sample_and_score,
    wikitext_references,
)
from mpoe_exp.tasks.multitask import MultiTaskGlue


def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def length_sorted_batches(features: list[dict], batch_size: int) -> list[list[int]]:
    """Batches of indices into `features`, shortest inputs first, so that evaluation pads little (a batch of
    similar lengths); each prediction goes back to its example's place, so results keep the split's order."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class _GlueSplits:
    """What every GLUE task has, whatever the model reads: the task's splits by the split rule (and the subsets
    task.train_size / task.validation_size ask for), its main metric and its tokenizer."""

    def __init__(self, cfg: DictConfig, tokenizer):
        task_cfg, data_dir = cfg.task, task_data_dir(cfg)
        self.name = task_cfg.name
        self.glue_task = task_cfg.glue_task
        self.cfg = task_cfg
        self.tokenizer = tokenizer
        self.main_metric = metrics.GLUE_MAIN_METRIC[self.glue_task]
        self.greater_is_better = True
        self.splits = glue_data.load_glue_splits(
            self.glue_task, data_dir, task_cfg.hub_path, task_cfg.data_seed, glue_data.subset_sizes(task_cfg)
        )
        self.split_sizes = {k: len(v) for k, v in self.splits.items()}


class GlueTask(_GlueSplits):
    """One GLUE task for an encoder-decoder model. Evaluation features are encoded once per split and kept."""

    def __init__(self, cfg: DictConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self._encoded: dict[str, list[dict]] = {}

    def encode(self, example: dict) -> dict:
        source = self.tokenizer(
            glue_data.format_source(self.glue_task, example["fields"]),
            max_length=self.cfg.max_source_length,
            truncation=True,
        ).input_ids
        target = self.tokenizer(
            glue_data.format_target(self.glue_task, example["label"]),
            max_length=self.cfg.max_target_length,
            truncation=True,
        ).input_ids
        return {"input_ids": source, "labels": target}

    def _encode_split(self, split: str) -> list[dict]:
        if split not in self._encoded:
            self._encoded[split] = [self.encode(e) for e in self.splits[split]]
        return self._encoded[split]

    def train_features(self) -> list[dict]:
        return [self.encode(e) for e in self.splits["train"]]

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad([f["input_ids"] for f in features], self.tokenizer.pad_token_id)
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids != self.tokenizer.pad_token_id).long(),
            "labels": pad([f["labels"] for f in features], -100),
        }

    def loss(self, model, batch: dict, label_smoothing: float) -> torch.Tensor:
        from mpoe_exp.training import token_loss

        logits = model(**batch).logits  # T5 shifts labels into decoder inputs itself
        return token_loss(logits, batch["labels"], label_smoothing)

    def evaluate(self, model, split: str, batch_size: int, device) -> dict[str, float]:
        """Greedy-decode every example of `split` and score it with the task's GLUE metrics (x100)."""
        features = self._encode_split(split)
        predictions: list = [None] * len(features)
        for indices in length_sorted_batches(features, batch_size):
            batch = self.collate([features[i] for i in indices])
            generated = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                max_new_tokens=self.cfg.max_target_length,
                do_sample=False,
                num_beams=1,
                use_cache=not needs_full_sequence(model),  # causal MEO routes on the whole prefix
            )
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            for i, text in zip(indices, texts):
                predictions[i] = glue_data.parse_prediction(self.glue_task, text)
        references = [e["label"] for e in self.splits[split]]
        return metrics.glue_metrics(self.glue_task, predictions, references)


class GlueClassificationTask(_GlueSplits):
    """One GLUE task for an encoder with a classification head (BertForSequenceClassification).

    Inputs are the task's fields as BERT reads a sentence (pair): "[CLS] a [SEP] b [SEP]", truncated to
    task.max_source_length tokens. Labels are the hub's ids (STS-B: the score, a regression target). Evaluation
    features are encoded once per split and kept.
    """

    def __init__(self, cfg: DictConfig, tokenizer):
        super().__init__(cfg, tokenizer)
        self.regression = self.glue_task == "stsb"
        self._encoded: dict[str, list[dict]] = {}

    def _encode_split(self, split: str) -> list[dict]:
        if split not in self._encoded:
            examples = self.splits[split]
            texts = [[e["fields"][f] for f in glue_data.GLUE_FIELDS[self.glue_task]] for e in examples]
            encoded = self.tokenizer(
                *zip(*texts), max_length=self.cfg.max_source_length, truncation=True, return_token_type_ids=True
            )
            self._encoded[split] = [
                {"input_ids": ids, "token_type_ids": types, "label": e["label"]}
                for ids, types, e in zip(encoded["input_ids"], encoded["token_type_ids"], examples)
            ]
        return self._encoded[split]

    def train_features(self) -> list[dict]:
        return self._encode_split("train")

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids = pad([f["input_ids"] for f in features], self.tokenizer.pad_token_id)
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        label_type = torch.float if self.regression else torch.long
        return {
            "input_ids": input_ids,
            "token_type_ids": pad([f["token_type_ids"] for f in features], 0),
            "attention_mask": (torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]).long(),
            "labels": torch.tensor([f["label"] for f in features], dtype=label_type),
        }

    def logits(self, model, batch: dict) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # the loss is ours, not the model's
        return model(**inputs).logits.float()

    def loss(self, model, batch: dict, label_smoothing: float) -> torch.Tensor:
        logits = self.logits(model, batch)
        if self.regression:
            return torch.nn.functional.mse_loss(logits.squeeze(-1), batch["labels"])
        return torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing)

    @torch.no_grad()
    def evaluate(self, model, split: str, batch_size: int, device) -> dict[str, float]:
        """Predict every example of `split` (argmax; STS-B the output clipped to [0, 5]) and score it (x100)."""
        features = self._encode_split(split)
        predictions: list = [None] * len(features)
        for indices in length_sorted_batches(features, batch_size):
            batch = {k: v.to(device) for k, v in self.collate([features[i] for i in indices]).items()}
            logits = self.logits(model, batch)
            if self.regression:
                batch_predictions = logits.squeeze(-1).clamp(0.0, glue_data.STSB_MAX_SCORE).tolist()
            else:
                batch_predictions = logits.argmax(-1).tolist()
            for i, prediction in zip(indices, batch_predictions):
                predictions[i] = prediction
        references = [e["label"] for e in self.splits[split]]
        return metrics.glue_metrics(self.glue_task, predictions, references)


class LanguageModelingTask:
    """Causal LM fine-tuning; evaluation is perplexity over the split's blocks."""

    def __init__(self, cfg: DictConfig, tokenizer):
        task_cfg, data_dir = cfg.task, task_data_dir(cfg)
        max_positions = cfg.model.architecture.get("n_positions", 1024)
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
        self.seed = cfg.seed
        self.sample_references = wikitext_references(texts["test"]) if task_cfg.get("bleu_n") else None
        if self.sample_references is not None:
            check_sampling_config(task_cfg, length_key="sample_length")

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


TASK_TYPES = {
    "glue": GlueTask,
    "lm": LanguageModelingTask,
    "glue_multitask": MultiTaskGlue,
    "generation": GenerationTask,
}
ENCODER_TASK_TYPES = {"glue": GlueClassificationTask}  # what an encoder (model.family bert) runs a task type as


def build_task(cfg: DictConfig, tokenizer):
    """The task object of `cfg.task` with data from its folder (`data_location.task_data_dir`) or the hub."""
    kind = cfg.task.type
    if kind not in TASK_TYPES:
        raise UserError(f"task type {kind!r} is not available; known: {sorted(TASK_TYPES)}")
    if cfg.model.family == "bert":
        if kind not in ENCODER_TASK_TYPES:
            raise UserError(f"task type {kind!r} does not run on an encoder; encoders run {sorted(ENCODER_TASK_TYPES)}")
        return ENCODER_TASK_TYPES[kind](cfg, tokenizer)
    return TASK_TYPES[kind](cfg, tokenizer)
