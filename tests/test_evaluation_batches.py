"""Evaluation of GLUE tasks: batches of similar length (little padding), predictions back in the split's order,
features encoded once per split; for the T5 text-to-text task and the encoder's classification task alike."""

from __future__ import annotations

import pytest

from mpoe_exp import build_model, compose_config, metrics
from mpoe_exp.config import DEMO_DATA_DIR, run_spec
from mpoe_exp.tasks.tasks import length_sorted_batches

MODELS = ["tiny-t5", "tiny-bert"]


def test_length_sorted_batches_cover_every_example_once_shortest_first():
    lengths = [5, 1, 4, 4, 2, 9, 3]
    batches = length_sorted_batches([{"input_ids": [0] * n} for n in lengths], 3)
    assert [len(b) for b in batches] == [3, 3, 1]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)


@pytest.fixture(params=MODELS)
def glue(request, monkeypatch):
    cfg = compose_config([f"model={request.param}", "task=rte", f"data_dir={DEMO_DATA_DIR / 'glue'}"])
    model, tokenizer = build_model(run_spec(cfg))
    from mpoe_exp.tasks.tasks import build_task

    task = build_task(run_spec(cfg), tokenizer)
    seen = []  # the predictions glue_metrics is given, per evaluation
    score = metrics.glue_metrics
    monkeypatch.setattr(
        metrics, "glue_metrics", lambda name, p, r: seen.append((list(p), list(r))) or score(name, p, r)
    )
    return task, model.eval(), seen


def test_predictions_keep_the_splits_order_whatever_the_batching(glue):
    task, model, seen = glue
    task.evaluate(model, "validation", 1, "cpu")
    task.evaluate(model, "validation", 7, "cpu")
    (one_by_one, references), (batched, batched_references) = seen
    assert batched == one_by_one
    assert references == batched_references == [e["label"] for e in task.splits["validation"]]


def test_evaluation_pads_no_more_than_length_sorted_batches_do(glue, monkeypatch):
    task, model, _ = glue
    widths = []
    collate = task.collate
    monkeypatch.setattr(
        task, "collate", lambda fs: widths.append((len(fs), max(len(f["input_ids"]) for f in fs))) or collate(fs)
    )
    task.evaluate(model, "validation", 4, "cpu")
    padded = sum(n * width for n, width in widths)
    lengths = sorted(len(f["input_ids"]) for f in task._encode_split("validation"))
    assert padded == sum(max(lengths[s : s + 4]) * len(lengths[s : s + 4]) for s in range(0, len(lengths), 4))
    in_order = [len(f["input_ids"]) for f in task._encode_split("validation")]
    assert padded < sum(max(in_order[s : s + 4]) * len(in_order[s : s + 4]) for s in range(0, len(in_order), 4))


def test_evaluation_features_are_encoded_once_per_split(glue, monkeypatch):
    task, model, _ = glue
    calls = []
    tokenizer_type = type(task.tokenizer)
    original = tokenizer_type.__call__
    monkeypatch.setattr(tokenizer_type, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    task.evaluate(model, "validation", 8, "cpu")
    first = len(calls)
    task.evaluate(model, "validation", 8, "cpu")
    assert len(calls) == first  # the second evaluation tokenizes nothing
