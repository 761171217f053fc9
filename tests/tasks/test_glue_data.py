"""GLUE loading, split rule and text format on small fixtures written here (TSV layout and save_to_disk); no network."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import pytest

from mpoe_exp.errors import UserError
from mpoe_exp.tasks import glue_data
from mpoe_exp.tasks.glue_data import (
    GLUE_FIELDS,
    GLUE_TASKS,
    format_source,
    format_target,
    glue_task_sizes,
    load_glue_splits,
    parse_prediction,
)

HOLDOUT_TRAIN_SIZE = 1010  # SST-2, QQP, QNLI: 1,000 go to validation, 10 stay train
MNLI_TRAIN_HEADER = [
    "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse",
    "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label",
]  # fmt: skip
MNLI_DEV_HEADER = [*MNLI_TRAIN_HEADER[:-1], "label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = [
    "index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score",
]  # fmt: skip
STSB_SCORES = [3.8, 0.0, 5.0, 2.5, 4.667, 1.2, 0.75, 3.2, 2.0]
NLI_NAMES = ["entailment", "neutral", "contradiction"]
ENTAILMENT_NAMES = ["entailment", "not_entailment"]

# Expected official data per task and hub split: (fields, label) in file order.
Official = dict[str, dict[str, list[tuple[dict[str, str], int | float]]]]


def write_tsv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


def pair(task: str, split: str, i: int) -> dict[str, str]:
    first, second = GLUE_FIELDS[task] if len(GLUE_FIELDS[task]) == 2 else (GLUE_FIELDS[task][0], None)
    fields = {first: f'{task} {split} {i} first "quoted'}  # unbalanced quote: only QUOTE_NONE reads it whole
    if second is not None:
        fields[second] = f"{task} {split} {i} second, it's"
    return fields


def write_glue_tsv(root: Path) -> Official:
    """All 8 tasks in the GLUE download-script layout under root; returns what each file holds."""
    official: Official = {}

    def rows_for(task: str, split: str, count: int, num_labels: int) -> list[tuple[dict[str, str], int]]:
        return [(pair(task, split, i), (i * 7 + len(split)) % num_labels) for i in range(count)]

    # CoLA: no header; source, label, original label (* or empty), sentence.
    official["cola"] = {"train": rows_for("cola", "train", 4, 2), "validation": rows_for("cola", "dev", 7, 2)}
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = [["gj04", str(label), "" if label else "*", f["sentence"]] for f, label in official["cola"][split]]
        write_tsv(root / "CoLA" / name, rows)

    official["sst2"] = {
        "train": rows_for("sst2", "train", HOLDOUT_TRAIN_SIZE, 2),
        "validation": rows_for("sst2", "dev", 5, 2),
    }
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = [[f["sentence"], str(label)] for f, label in official["sst2"][split]]
        write_tsv(root / "SST-2" / name, [["sentence", "label"], *rows])

    official["mrpc"] = {"train": rows_for("mrpc", "train", 3, 2), "validation": rows_for("mrpc", "dev", 6, 2)}
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
        rows = [[str(label), "101", "102", f["sentence1"], f["sentence2"]] for f, label in official["mrpc"][split]]
        write_tsv(root / "MRPC" / name, [header, *rows])
    # The MRPC files of the download script may start with a byte-order mark.
    path = root / "MRPC" / "train.tsv"
    path.write_text("\ufeff" + path.read_text(encoding="utf-8"), encoding="utf-8")

    official["qqp"] = {
        "train": rows_for("qqp", "train", HOLDOUT_TRAIN_SIZE, 2),
        "validation": rows_for("qqp", "dev", 5, 2),
    }
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = [[str(i), "1", "2", f["question1"], f["question2"], str(label)]
                for i, (f, label) in enumerate(official["qqp"][split])]  # fmt: skip
        if split == "train":  # a broken line like those in some copies of QQP's train.tsv
            rows.insert(500, ["", "Was Muhammad a real historical figure?", "0"])
        write_tsv(root / "QQP" / name, [header, *rows])

    official["stsb"] = {
        "train": [(pair("stsb", "train", i), score) for i, score in enumerate([1.5, 4.0, 2.6])],
        "validation": [(pair("stsb", "dev", i), score) for i, score in enumerate(STSB_SCORES)],
    }
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = [[str(i), "main-news", "MSRvid", "2012test", "0001", "none", "none", f["sentence1"], f["sentence2"],
                 f"{score:.3f}"] for i, (f, score) in enumerate(official["stsb"][split])]  # fmt: skip
        write_tsv(root / "STS-B" / name, [STSB_HEADER, *rows])

    official["mnli"] = {
        "train": rows_for("mnli", "train", 4, 3),
        "validation_matched": rows_for("mnli", "matched", 3, 3),
        "validation_mismatched": rows_for("mnli", "mismatched", 4, 3),
    }
    for split, name, header in (
        ("train", "train.tsv", MNLI_TRAIN_HEADER),
        ("validation_matched", "dev_matched.tsv", MNLI_DEV_HEADER),
        ("validation_mismatched", "dev_mismatched.tsv", MNLI_DEV_HEADER),
    ):
        rows = []
        for i, (f, label) in enumerate(official["mnli"][split]):
            votes = [NLI_NAMES[label]] * (len(header) - 10)  # label1[..label5] and gold_label
            rows.append([str(i), "31193", "31193n", "government", "( ( A b ) )", "( B )", "(ROOT (S))", "(ROOT (NP))",
                         f["premise"], f["hypothesis"], *votes])  # fmt: skip
        write_tsv(root / "MNLI" / name, [header, *rows])

    for task, directory, header, train_size, names in (
        ("qnli", "QNLI", ["index", "question", "sentence", "label"], HOLDOUT_TRAIN_SIZE, ENTAILMENT_NAMES),
        ("rte", "RTE", ["index", "sentence1", "sentence2", "label"], 4, ENTAILMENT_NAMES),
    ):
        official[task] = {"train": rows_for(task, "train", train_size, 2), "validation": rows_for(task, "dev", 5, 2)}
        first, second = GLUE_FIELDS[task]
        for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
            rows = [[str(i), f[first], f[second], names[label]] for i, (f, label) in enumerate(official[task][split])]
            write_tsv(root / directory / name, [header, *rows])
    return official


def write_save_to_disk(path: Path, task: str, official: Official, float32_scores: bool = False) -> None:
    """The official splits of one task as a hub-format DatasetDict saved at path."""
    features = datasets.Features(
        {name: datasets.Value("string") for name in GLUE_FIELDS[task]}
        | {"label": datasets.Value("float32" if float32_scores else "float64"), "idx": datasets.Value("int32")}
    )
    splits = {}
    for split, rows in official[task].items():
        columns = {name: [fields[name] for fields, _ in rows] for name in GLUE_FIELDS[task]}
        columns["label"] = [label for _, label in rows]
        columns["idx"] = list(range(len(rows)))
        # Classification labels as the from_dict default (int64); STS-B scores typed as asked.
        splits[split] = datasets.Dataset.from_dict(columns, features=features if task == "stsb" else None)
    datasets.DatasetDict(splits).save_to_disk(str(path))


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Official]:
    root = tmp_path_factory.mktemp("glue")
    return root, write_glue_tsv(root)


def official_from_splits(task: str, splits: dict) -> dict[str, list[tuple[dict[str, str], int | float]]]:
    """Undo the split rule by idx: the official splits as (fields, label) in file order."""
    if task in glue_data.HALVED_VALIDATION_TASKS:
        groups = {"train": splits["train"], "validation": splits["validation"] + splits["test"]}
    elif task in glue_data.TRAIN_HOLDOUT_TASKS:
        groups = {"train": splits["train"] + splits["validation"], "validation": splits["test"]}
    else:
        groups = {
            "train": splits["train"],
            "validation_matched": splits["test"],
            "validation_mismatched": splits["validation"],
        }
    return {
        split: [(e["fields"], e["label"]) for e in sorted(examples, key=lambda e: e["idx"])]
        for split, examples in groups.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# TSV source and the split rule
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_tsv_fields_and_labels_round_trip(glue_dir, task):
    root, official = glue_dir
    splits = load_glue_splits(task, data_dir=root)
    assert set(splits) == {"train", "validation", "test"}
    # Every official example lands in exactly one split, with its fields and hub label (string labels mapped).
    assert official_from_splits(task, splits) == official[task]
    for examples in splits.values():
        for example in examples:
            assert set(example) == {"fields", "label", "idx"}
            assert set(example["fields"]) == set(GLUE_FIELDS[task])
            assert isinstance(example["label"], float if task == "stsb" else int)
    idx = sorted(e["idx"] for split in ("validation", "test") for e in splits[split])
    if task in glue_data.HALVED_VALIDATION_TASKS:  # no example lost or duplicated
        assert idx == list(range(len(official[task]["validation"])))


@pytest.mark.parametrize("task", ["cola", "rte", "mrpc", "stsb"])
def test_halved_tasks_split_official_validation(glue_dir, task):
    root, official = glue_dir
    n = len(official[task]["validation"])
    sizes = glue_task_sizes(load_glue_splits(task, data_dir=root))
    assert sizes == {"train": len(official[task]["train"]), "validation": n // 2, "test": n - n // 2}


@pytest.mark.parametrize("task", ["sst2", "qqp", "qnli"])
def test_holdout_tasks_move_1000_training_examples_to_validation(glue_dir, task):
    root, official = glue_dir
    splits = load_glue_splits(task, data_dir=root)
    assert glue_task_sizes(splits) == {"train": HOLDOUT_TRAIN_SIZE - 1000, "validation": 1000, "test": 5}
    assert [(e["fields"], e["label"]) for e in splits["test"]] == official[task]["validation"]
    train_idx = [e["idx"] for e in splits["train"]]
    assert train_idx == sorted(train_idx)  # what stays train keeps file order
    assert not set(train_idx) & {e["idx"] for e in splits["validation"]}


def test_mnli_mismatched_is_validation_and_matched_is_test(glue_dir):
    root, official = glue_dir
    splits = load_glue_splits("mnli", data_dir=root)
    assert [(e["fields"], e["label"]) for e in splits["validation"]] == official["mnli"]["validation_mismatched"]
    assert [(e["fields"], e["label"]) for e in splits["test"]] == official["mnli"]["validation_matched"]
    assert splits["test"][0]["fields"]["premise"].startswith("mnli matched 0")
    assert {e["label"] for e in splits["train"]} == {0, 1, 2}


def test_tsv_details_cola_quotes_labels_and_qqp_broken_line(glue_dir, caplog):
    root, _ = glue_dir
    cola = load_glue_splits("cola", data_dir=root)
    first = next(e for e in cola["train"] if e["idx"] == 0)
    assert first == {"fields": {"sentence": 'cola train 0 first "quoted'}, "label": 1, "idx": 0}
    rte = load_glue_splits("rte", data_dir=root)
    assert "not_entailment" in (root / "RTE" / "train.tsv").read_text()
    assert {e["idx"]: e["label"] for e in rte["train"]} == {0: 1, 1: 0, 2: 1, 3: 0}  # entailment 0, not_entailment 1
    stsb = load_glue_splits("stsb", data_dir=root)
    assert sorted(e["label"] for e in stsb["validation"] + stsb["test"]) == sorted(STSB_SCORES)

    with caplog.at_level(logging.WARNING, logger="mpoe_exp.tasks.glue_data"):
        qqp = load_glue_splits("qqp", data_dir=root)
    assert "skipped 1 malformed line" in caplog.text and "train.tsv" in caplog.text
    train_idx = sorted(e["idx"] for e in qqp["train"] + qqp["validation"])
    assert len(train_idx) == HOLDOUT_TRAIN_SIZE and 500 not in train_idx  # idx counts rows, as the hub does


def test_same_seed_same_splits_other_seed_other_splits(glue_dir):
    root, _ = glue_dir
    for task in ("rte", "qnli"):
        first = load_glue_splits(task, data_dir=root)
        assert load_glue_splits(task, data_dir=root, seed=42) == first
        other = load_glue_splits(task, data_dir=root, seed=7)
        assert [e["idx"] for e in other["validation"]] != [e["idx"] for e in first["validation"]]
        assert official_from_splits(task, other) == official_from_splits(task, first)


# ----------------------------------------------------------------------------------------------------------------
# save_to_disk and hub sources give the same splits
# ----------------------------------------------------------------------------------------------------------------


def test_save_to_disk_matches_tsv(glue_dir, tmp_path):
    root, official = glue_dir
    disk = tmp_path / "disk"
    for task in ("rte", "mnli", "qnli"):
        write_save_to_disk(disk / task, task, official)
    write_save_to_disk(disk / "stsb", "stsb", official, float32_scores=True)  # as the hub stores scores
    for task in ("rte", "mnli", "qnli", "stsb"):
        assert load_glue_splits(task, data_dir=disk) == load_glue_splits(task, data_dir=root), task
    # data_dir may also be the save_to_disk folder itself.
    assert load_glue_splits("mnli", data_dir=disk / "mnli") == load_glue_splits("mnli", data_dir=root)


def test_save_to_disk_with_wrong_splits_or_columns_raises(glue_dir, tmp_path):
    _, official = glue_dir
    write_save_to_disk(tmp_path / "rte", "rte", official)
    with pytest.raises(UserError, match="validation_matched"):
        load_glue_splits("mnli", data_dir=tmp_path / "rte")  # RTE's splits where MNLI's are expected
    single = tmp_path / "single"
    datasets.Dataset.from_dict({"sentence": ["a"], "label": [1], "idx": [0]}).save_to_disk(str(single / "cola"))
    with pytest.raises(UserError, match="single Dataset"):
        load_glue_splits("cola", data_dir=single)
    renamed = tmp_path / "renamed"
    rows = {"text": ["a", "b"], "label": [0, 1]}
    datasets.DatasetDict({s: datasets.Dataset.from_dict(rows) for s in ("train", "validation")}).save_to_disk(
        str(renamed / "sst2")
    )
    with pytest.raises(UserError, match="lacks the column.*sentence"):
        load_glue_splits("sst2", data_dir=renamed)


def test_hub_source_uses_load_dataset(glue_dir, monkeypatch, tmp_path):
    root, official = glue_dir
    write_save_to_disk(tmp_path / "rte", "rte", official)
    saved = datasets.load_from_disk(str(tmp_path / "rte"))
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name: calls.append((path, name)) or saved)
    assert load_glue_splits("RTE", hub_path="some/glue") == load_glue_splits("rte", data_dir=root)
    assert calls == [("some/glue", "rte")]


# ----------------------------------------------------------------------------------------------------------------
# Errors for people
# ----------------------------------------------------------------------------------------------------------------


def test_offline_hub_failure_says_how_to_get_the_data(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError) as error:
        load_glue_splits("cola")
    message = str(error.value)
    assert "ConnectionError" in message and "data_dir=" in message
    assert "CoLA/train.tsv" in message and "save_to_disk" in message


def test_missing_data_and_bad_task_raise_user_errors(glue_dir, tmp_path):
    root, _ = glue_dir
    with pytest.raises(UserError, match="not a directory"):
        load_glue_splits("cola", data_dir=tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"no GLUE rte data.*RTE/train\.tsv.*save_to_disk"):
        load_glue_splits("rte", data_dir=tmp_path)
    (tmp_path / "MNLI").mkdir()
    (tmp_path / "MNLI" / "train.tsv").write_text((root / "MNLI" / "train.tsv").read_text())
    with pytest.raises(UserError, match=r"missing file .*MNLI/dev_matched\.tsv"):
        load_glue_splits("mnli", data_dir=tmp_path)
    with pytest.raises(UserError, match="unknown GLUE task 'squad'.*cola, sst2"):
        load_glue_splits("squad", data_dir=root)


def test_malformed_rows_and_labels_name_file_and_line(tmp_path):
    header = ["index", "sentence1", "sentence2", "label"]
    write_tsv(tmp_path / "RTE" / "train.tsv", [header, ["0", "a", "b", "entailment"], ["1", "a", "not_entailment"]])
    write_tsv(tmp_path / "RTE" / "dev.tsv", [header, ["0", "a", "b", "entailment"]])
    with pytest.raises(UserError, match=r"RTE/train\.tsv, line 3: expected 4 tab-separated columns, found 3"):
        load_glue_splits("rte", data_dir=tmp_path)
    write_tsv(tmp_path / "RTE" / "train.tsv", [header, ["0", "a", "b", "maybe"]])
    with pytest.raises(UserError, match=r"line 2: label 'maybe' is no rte label; expected one of entailment"):
        load_glue_splits("rte", data_dir=tmp_path)
    write_tsv(tmp_path / "RTE" / "train.tsv", [["id", "premise", "hypothesis", "label"], ["0", "a", "b", "entailment"]])
    with pytest.raises(UserError, match="header line lacks the column.*sentence1"):
        load_glue_splits("rte", data_dir=tmp_path)
    write_tsv(tmp_path / "CoLA" / "train.tsv", [["gj04", "2", "", "A sentence."]])
    write_tsv(tmp_path / "CoLA" / "dev.tsv", [["gj04", "1", "", "A sentence."]])
    with pytest.raises(UserError, match=r"CoLA/train\.tsv, line 1: label 2 is no cola label"):
        load_glue_splits("cola", data_dir=tmp_path)


def test_holdout_task_with_too_few_training_examples_raises(tmp_path):
    write_tsv(tmp_path / "SST-2" / "train.tsv", [["sentence", "label"], ["good", "1"]])
    write_tsv(tmp_path / "SST-2" / "dev.tsv", [["sentence", "label"], ["bad", "0"]])
    with pytest.raises(UserError, match="training set has 1 examples.*1000"):
        load_glue_splits("sst2", data_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Text-to-text format
# ----------------------------------------------------------------------------------------------------------------

SOURCES = {
    "cola": ({"sentence": "A b."}, "cola sentence: A b."),
    "sst2": ({"sentence": "fine ."}, "sst2 sentence: fine ."),
    "mrpc": ({"sentence1": "A.", "sentence2": "B."}, "mrpc sentence1: A. sentence2: B."),
    "qqp": ({"question1": "Why?", "question2": "How?"}, "qqp question1: Why? question2: How?"),
    "stsb": ({"sentence1": "A.", "sentence2": "B."}, "stsb sentence1: A. sentence2: B."),
    "mnli": ({"premise": "P.", "hypothesis": "H."}, "mnli premise: P. hypothesis: H."),
    "qnli": ({"question": "Who?", "sentence": "Me."}, "qnli question: Who? sentence: Me."),
    "rte": ({"sentence1": "A.", "sentence2": "B."}, "rte sentence1: A. sentence2: B."),
}


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_format_source(task):
    fields, expected = SOURCES[task]
    assert format_source(task, fields) == expected
    with pytest.raises(ValueError, match="fields"):
        format_source(task, {"other": "x"})


@pytest.mark.parametrize("task", [t for t in GLUE_TASKS if t != "stsb"])
def test_classification_targets_and_predictions(task):
    num_labels = 3 if task == "mnli" else 2
    for label in range(num_labels):
        assert format_target(task, label) == str(label)
        assert parse_prediction(task, format_target(task, label)) == label
        assert parse_prediction(task, f" {label}\n") == label
    for unparsable in ["", "yes", "7", "abc", "-1", "01", "1.0", "entailment", "3"]:
        assert parse_prediction(task, unparsable) is None, unparsable
    assert parse_prediction(task, "2") == (2 if task == "mnli" else None)
    for bad in [num_labels, -1, True, 0.0, "1"]:
        with pytest.raises(ValueError):
            format_target(task, bad)


@pytest.mark.parametrize(
    ("score", "target"),
    [(3.8, "3.8"), (5.0, "5.0"), (0.0, "0.0"), (0, "0.0"), (4.667, "4.6"), (3.75, "3.8"), (0.7, "0.8"),
     (2.5, "2.4"), (2.3, "2.4"), (2.1, "2.0"), (1.5, "1.6"), (4.9, "4.8"), (4.95, "5.0")],
)  # fmt: skip
def test_stsb_target_rounds_to_fifths_ties_to_even(score, target):
    assert format_target("stsb", score) == target
    assert parse_prediction("stsb", target) == float(target)


def test_stsb_predictions_and_bad_scores():
    assert parse_prediction("STS-B", " 3.8 ") == 3.8
    assert parse_prediction("stsb", "0") == 0.0
    assert parse_prediction("stsb", "5") == 5.0
    assert parse_prediction("stsb", ".5") == 0.5
    for unparsable in ["", "yes", "7", "abc", "5.2", "-1", "-0.0", "nan", "inf", "1e0", "3.8 points", "3,8"]:
        assert parse_prediction("stsb", unparsable) is None, unparsable
    for bad in [-0.1, 5.01, float("nan")]:
        with pytest.raises(ValueError, match="outside"):
            format_target("stsb", bad)


def test_format_functions_reject_unknown_tasks():
    for function, argument in ((format_source, {}), (format_target, 0), (parse_prediction, "0")):
        with pytest.raises(UserError, match="unknown GLUE task"):
            function("squad", argument)
