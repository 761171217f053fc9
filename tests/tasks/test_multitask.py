"""Multi-task GLUE: the temperature-sampled mixture, its determinism and evenness, and a tiny end-to-end run."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mpoe_exp import compose_config
from mpoe_exp.config import run_spec
from mpoe_exp.errors import UserError
from mpoe_exp.metrics import GLUE_MAIN_METRIC
from mpoe_exp.models import byte_tokenizer
from mpoe_exp.results import RESULTS_FILE
from mpoe_exp.runner import run
from mpoe_exp.tasks.multitask import MultiTaskGlue, mixture_probabilities, sample_mixture
from mpoe_exp.tasks.tasks import GlueTask, build_task

TRAIN_SIZES = {"cola": 30, "rte": 12, "stsb": 50}
DEV_SIZE = 8  # halved: 4 validation, 4 test per task
TASKS = "task.tasks=[cola,rte,stsb]"
# Training sizes of docs/method.md, 'Splits and formats of GLUE'.
PAPER_SIZES = {
    "cola": 8551, "sst2": 66349, "mrpc": 3668, "qqp": 362846,
    "stsb": 5749, "mnli": 392702, "qnli": 103743, "rte": 2490,
}  # fmt: skip


def write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


def write_glue(root: Path) -> Path:
    """CoLA (no header), RTE and STS-B in the GLUE download-script layout, TRAIN_SIZES / DEV_SIZE rows."""
    rng = random.Random(0)
    for split, file in (("train", "train.tsv"), ("dev", "dev.tsv")):
        n = TRAIN_SIZES["cola"] if split == "train" else DEV_SIZE
        write_tsv(root / "CoLA" / file, [["gj04", str(i % 2), "", f"cola {split} sentence {i}"] for i in range(n)])
        n = TRAIN_SIZES["rte"] if split == "train" else DEV_SIZE
        labels = ("entailment", "not_entailment")
        rows = [[str(i), f"rte {split} {i} premise", f"hypothesis {i}", labels[i % 2]] for i in range(n)]
        write_tsv(root / "RTE" / file, [["index", "sentence1", "sentence2", "label"], *rows])
        n = TRAIN_SIZES["stsb"] if split == "train" else DEV_SIZE
        header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
        rows = [
            [str(i), "main", "x", "2012", str(i), "none", "none", f"stsb {split} {i}", f"other {i % 7}"]
            + [str(round(rng.uniform(0, 5), 2))]
            for i in range(n)
        ]
        write_tsv(root / "STS-B" / file, [[*header, "score"], *rows])
    return root


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer("t5")


@pytest.fixture
def one_thread():
    """One intra-op thread for the tiny model: on a shared 2-core VM two threads spin against each other and the
    end-to-end run varies from ~3 s to ~40 s; with one it takes ~3 s every time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_task(glue_dir: Path, tokenizer, *overrides: str) -> MultiTaskGlue:
    cfg = compose_config(["model=tiny-t5", "task=glue_multitask", f"data_dir={glue_dir}", TASKS, *overrides])
    task = build_task(run_spec(cfg), tokenizer)
    assert isinstance(task, MultiTaskGlue)
    return task


def expected_probabilities(sizes: dict[str, int], temperature: float) -> dict[str, float]:
    weights = {name: n ** (1 / temperature) for name, n in sizes.items()}
    return {name: w / sum(weights.values()) for name, w in weights.items()}


def test_default_config_lists_all_eight_tasks_at_temperature_10():
    cfg = compose_config(["model=tiny-t5", "task=glue_multitask"])
    assert sorted(cfg.task.tasks) == sorted(PAPER_SIZES)
    assert cfg.task.temperature == 10 and cfg.task.mixture_size is None
    assert list(cfg.task.families) == ["t5"]


def test_task_sizes_and_probabilities_follow_size_to_the_one_over_t(glue_dir, tokenizer):
    task = make_task(glue_dir, tokenizer)
    assert task.split_sizes == {name: {"train": n, "validation": 4, "test": 4} for name, n in TRAIN_SIZES.items()}
    assert task.main_metric == "glue_average" and task.greater_is_better
    assert task.mixture_size == sum(TRAIN_SIZES.values())  # mixture_size: null
    assert task.probabilities == pytest.approx(expected_probabilities(TRAIN_SIZES, 10), rel=1e-12)
    one = make_task(glue_dir, tokenizer, "task.temperature=1").probabilities
    assert one == pytest.approx({name: n / sum(TRAIN_SIZES.values()) for name, n in TRAIN_SIZES.items()}, rel=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1, 2, 10, 100])
def test_probabilities_on_the_paper_sizes(temperature):
    got = mixture_probabilities(PAPER_SIZES, temperature)
    assert list(got) == list(PAPER_SIZES)
    assert got == pytest.approx(expected_probabilities(PAPER_SIZES, temperature), rel=1e-10)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-12)


def test_temperature_moves_the_mixture_from_proportional_to_uniform():
    proportional = mixture_probabilities(PAPER_SIZES, 1)
    assert proportional["mnli"] / proportional["rte"] == pytest.approx(392702 / 2490)
    paper = mixture_probabilities(PAPER_SIZES, 10)
    assert paper["mnli"] / paper["rte"] == pytest.approx((392702 / 2490) ** 0.1)  # ~1.66
    for temperature in (1e6, float("inf")):
        assert mixture_probabilities(PAPER_SIZES, temperature) == pytest.approx(
            dict.fromkeys(PAPER_SIZES, 1 / 8), abs=1e-5
        )
    spreads = [max(p.values()) - min(p.values()) for p in (mixture_probabilities(PAPER_SIZES, t) for t in (1, 2, 10))]
    assert spreads == sorted(spreads, reverse=True)


@pytest.mark.parametrize("temperature", [1, 10])
def test_sampled_mixture_matches_the_probabilities(temperature):
    n = 200_000
    mixture = sample_mixture(PAPER_SIZES, temperature, n, seed=[42, 1])
    counts = Counter(name for name, _ in mixture)
    for name, p in mixture_probabilities(PAPER_SIZES, temperature).items():
        assert counts[name] / n == pytest.approx(p, abs=0.005)  # binomial sd <= 0.0012


def test_train_features_follow_the_mixture(glue_dir, tokenizer):
    task = make_task(glue_dir, tokenizer, "task.mixture_size=20000")
    features = task.train_features()
    assert len(features) == 20000
    prefixes = {name: tokenizer(name).input_ids[:-1] for name in TRAIN_SIZES}  # drop </s>
    counts = Counter(
        next(name for name, prefix in prefixes.items() if f["input_ids"][: len(prefix)] == prefix) for f in features
    )
    for name, p in task.probabilities.items():
        assert counts[name] / 20000 == pytest.approx(p, abs=0.02)
    for (name, index), feature in list(zip(task.mixture(), features))[:50]:
        assert feature == task.tasks[name].encode(task.tasks[name].splits["train"][index])


def test_each_tasks_examples_are_used_evenly(glue_dir, tokenizer):
    task = make_task(glue_dir, tokenizer, "task.mixture_size=1000")
    mixture = task.mixture()
    for name, size in TRAIN_SIZES.items():
        uses = Counter(index for task_name, index in mixture if task_name == name)
        assert set(uses) == set(range(size))  # every example drawn (each task has > size slots here)
        assert max(uses.values()) - min(uses.values()) <= 1
    # Fewer slots than examples: no example repeats.
    small = make_task(glue_dir, tokenizer, "task.mixture_size=20").mixture()
    assert len(set(small)) == len(small)


def test_mixture_is_deterministic_per_seed(glue_dir, tokenizer):
    first = make_task(glue_dir, tokenizer).mixture()
    assert make_task(glue_dir, tokenizer).mixture() == first
    assert make_task(glue_dir, tokenizer).train_features() == make_task(glue_dir, tokenizer).train_features()
    assert make_task(glue_dir, tokenizer, "seed=2").mixture() != first
    assert make_task(glue_dir, tokenizer, "task.data_seed=7").mixture() != first
    assert sample_mixture({"a": 5, "b": 9}, 10, 50, seed=3) == sample_mixture({"a": 5, "b": 9}, 10, 50, seed=3)


@pytest.mark.parametrize(
    "override,message",
    [
        # refused by the schema (mpoe_exp/schema.py) when the config is composed
        ("task.tasks=[cola,nope]", r"task.tasks=\[cola,nope\] is not allowed: .* each item a GLUE task"),
        ("task.tasks=[]", "task.tasks must be a non-empty list"),
        ("task.temperature=0", "task.temperature must be a number > 0"),
        ("task.mixture_size=0", "task.mixture_size must be null or an integer >= 1"),
        # refused by the task
        ("task.tasks=[cola,CoLA]", "cola more than once"),
    ],
)
def test_bad_task_settings_are_refused(glue_dir, tokenizer, override, message):
    with pytest.raises(UserError, match=message):
        make_task(glue_dir, tokenizer, override)


def test_evaluate_flattens_per_task_metrics_and_averages_the_main_ones(glue_dir, tokenizer, monkeypatch):
    task = make_task(glue_dir, tokenizer)
    fake = {
        "cola": {"mcc": 30.0, "unparsable": 1},
        "rte": {"accuracy": 60.0, "unparsable": 0},
        "stsb": {"pearson": 90.0, "spearman": 10.0, "unparsable": 2},
    }
    for name, sub in task.tasks.items():
        monkeypatch.setattr(sub, "evaluate", lambda model, split, batch_size, device, name=name: fake[name])
    got = task.evaluate(None, "validation", 4, "cpu")
    expected = {f"{name}/{metric}": value for name, values in fake.items() for metric, value in values.items()}
    assert got == {**expected, "glue_average": 60.0}  # mean of mcc, accuracy, pearson; not spearman


def test_multitask_run_end_to_end_selects_on_the_glue_average(glue_dir, tmp_path, monkeypatch, one_thread):
    # The real evaluation runs; the first validation evaluation of RTE gets +30 accuracy, so the best step on the
    # validation glue_average is step 2, not the last one.
    original = GlueTask.evaluate
    validation_calls = Counter()

    def evaluate(self, model, split, batch_size, device):
        values = original(self, model, split, batch_size, device)
        if split == "validation":
            validation_calls[self.glue_task] += 1
            if self.glue_task == "rte" and validation_calls["rte"] == 1:
                values = {**values, "accuracy": values["accuracy"] + 30.0}
        return values

    monkeypatch.setattr(GlueTask, "evaluate", evaluate)
    cfg = compose_config(
        [
            "model=tiny-t5",
            "method=mpoe",
            "task=glue_multitask",
            TASKS,
            f"data_dir={glue_dir}",
            f"runs_dir={tmp_path}",
            "train.max_steps=4",
            "train.eval_every=2",
            "train.batch_size=8",
        ]
    )
    results = json.loads((run(cfg) / RESULTS_FILE).read_text())
    assert results["status"] == "finished" and results["main_metric"] == "glue_average"
    assert results["split_sizes"]["rte"] == {"train": 12, "validation": 4, "test": 4}
    for split in ("validation", "test"):
        values = results[split]
        assert {"cola/mcc", "rte/accuracy", "stsb/pearson", "stsb/spearman", "cola/unparsable"} <= set(values)
        mean = np.mean([values[f"{name}/{GLUE_MAIN_METRIC[name]}"] for name in TRAIN_SIZES])
        assert values["glue_average"] == pytest.approx(mean)
    history = results["history"]
    assert [h["step"] for h in history] == [2, 4]
    assert history[0]["validation"]["glue_average"] > history[1]["validation"]["glue_average"]
    assert results["best_step"] == 2
    assert results["validation"] == history[0]["validation"]
    assert validation_calls == {"cola": 2, "rte": 2, "stsb": 2}
