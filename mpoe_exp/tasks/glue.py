"""GLUE tasks as the trainer sees them, for both model kinds; both read the task's splits the same way (the split
rule and subsets of `glue_data`), score with the same metrics and select on the same validation split:

- `GlueTask`: T5 text-to-text: "<task> field: text ..." -> label string; greedy decoding; unparsable predictions
  count as wrong (docs/method.md, 'Splits and formats of GLUE').
- `GlueClassificationTask`: an encoder (BERT): the task's input fields as one or two segments, a classifier on the
  pooled first token (cross-entropy; STS-B: one output, MSE).

Evaluation encodes each split once and runs it in batches of similar length (`length_sorted_batches`).
"""

from __future__ import annotations

import torch

from mpoe_exp import metrics
from mpoe_exp.moe import needs_full_sequence
from mpoe_exp.spec import RunSpec
from mpoe_exp.tasks import glue_data
from mpoe_exp.tasks.data_location import task_data_dir
from mpoe_exp.tasks.losses import token_loss
from mpoe_exp.tasks.protocol import Task


def pad(sequences: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def length_sorted_batches(features: list[dict], batch_size: int) -> list[list[int]]:
    """Batches of indices into `features`, shortest inputs first, so that evaluation pads little (a batch of
    similar lengths); each prediction goes back to its example's place, so results keep the split's order."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class _GlueSplits(Task):
    """What every GLUE task has, whatever the model reads: the task's splits by the split rule (and the subsets
    task.train_size / task.validation_size ask for), its main metric and its tokenizer."""

    def __init__(self, spec: RunSpec, tokenizer):
        task_cfg, data_dir = spec.task, task_data_dir(spec)
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

    def __init__(self, spec: RunSpec, tokenizer):
        super().__init__(spec, tokenizer)
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
                use_cache=not needs_full_sequence(model),  # some expert layers declare they need the whole prefix
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

    def __init__(self, spec: RunSpec, tokenizer):
        super().__init__(spec, tokenizer)
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
