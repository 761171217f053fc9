"""The GLUE tasks' facts, in one table: input fields, labels, metrics, the paper's split rule. Everything else (the
data loaders, metrics, config schema, classification heads) reads them from here. Facts only: no imports, so the
config layer and `make tables` can read it too.

Split rules (the paper's, section 4.1; tasks/glue_data.py applies them with a seeded permutation):
- "halve_validation": the official validation set is halved into validation and test (small tasks);
- "hold_out_train": `TRAIN_HOLDOUT_SIZE` training examples become validation, the official validation set is test;
- "mnli": validation from matched, test the mismatched set (tasks/glue_data.py).
"""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_HOLDOUT_SIZE = 1000


@dataclass(frozen=True)
class GlueTask:
    name: str
    fields: tuple[str, ...]  # input fields in the order of the T5 input; names as in nyu-mll/glue
    num_labels: int | None  # classes; None: regression (STS-B, scores in [0, 5])
    metrics: tuple[str, ...]  # what evaluation reports (x100)
    main_metric: str  # the one number that selects checkpoints and enters the GLUE average
    split: str  # the paper's split rule (module docstring)


GLUE: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", ("sentence",), 2, ("mcc",), "mcc", "halve_validation"),
        GlueTask("sst2", ("sentence",), 2, ("accuracy",), "accuracy", "hold_out_train"),
        GlueTask("mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"), "accuracy", "halve_validation"),
        GlueTask("qqp", ("question1", "question2"), 2, ("accuracy", "f1"), "accuracy", "hold_out_train"),
        GlueTask("stsb", ("sentence1", "sentence2"), None, ("pearson", "spearman"), "pearson", "halve_validation"),
        GlueTask("mnli", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy", "mnli"),
        GlueTask("qnli", ("question", "sentence"), 2, ("accuracy",), "accuracy", "hold_out_train"),
        GlueTask("rte", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy", "halve_validation"),
    )
}
GLUE_TASKS = tuple(GLUE)
