"""GLUE for T5 in text-to-text form: loading, the paper's splits, and the input/target strings (paper section 4.1;
docs/method.md, 'Splits and formats of GLUE').

Examples are plain dicts, `{"fields": {name: text, ...}, "label": int | float, "idx": int}`, with the field names
and integer labels of the hub's `nyu-mll/glue` (GLUE_FIELDS; mnli: entailment 0, neutral 1, contradiction 2; qnli
and rte: entailment 0, not_entailment 1; mrpc 1 = equivalent; qqp 1 = duplicate; cola 1 = acceptable; sst2
1 = positive; stsb a float score in [0, 5]). `idx` is the example's row number in the official split it came from
(as the hub's `idx` column), so an example keeps its `idx` when the split rule moves it.

Sources, first match wins (`load_glue_splits`):
  1. `data_dir` in the layout of the GLUE download script: `<data_dir>/<TaskDir>/train.tsv` and `dev.tsv`
     (MNLI: `dev_matched.tsv`, `dev_mismatched.tsv`), TaskDir one of CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE.
     Read with `csv` and QUOTE_NONE (the files hold unbalanced quotes). CoLA has no header (source, label,
     original label, sentence); the others are read through their header. A row with the wrong number of columns
     is an error naming file and line, except in QQP, whose train.tsv has a few broken lines in some copies: those
     are skipped with a warning that counts them (the hub's builder drops them too).
  2. `data_dir` holding a `save_to_disk` DatasetDict, at `<data_dir>/<task>` or `<data_dir>` itself, with the hub's
     split names (train, validation; MNLI: validation_matched, validation_mismatched) and column names.
  3. No `data_dir`: `datasets.load_dataset(hub_path, task)`; any failure (offline, no cache) becomes a UserError
     that says how to put the data on disk.

Split rule (test labels of GLUE are private; deterministic for a seed, data seed 42 by default). One permutation
from `numpy.random.default_rng(seed).permutation(n)`, drawn over the rows of the official split it splits:
  - CoLA, RTE, MRPC, STS-B: the official validation set, in permutation order, is halved: the first n // 2 are
    validation, the remaining n - n // 2 are test (CoLA 1043 -> 521/522). No example is dropped (the reference
    code loses one of an odd-sized set; we do not copy that). Train is the official train set.
  - SST-2, QQP, QNLI: the first 1,000 training rows of the permutation are validation (permutation order), the
    other training rows stay train (in file order); the official validation set is test.
  - MNLI: validation_mismatched is validation, validation_matched is test; train is the official train set.

Text-to-text format (T5 style; docs/method.md, 'Splits and formats of GLUE'): `format_source` gives
"<task> <field>: <text> ...", e.g. "rte sentence1: ... sentence2: ...". Targets are the label ids as digit strings
("0", "1", "2"), the reference code's choice. STS-B targets follow T5: the score rounded to the nearest 0.2 with one
decimal ("3.8", "5.0").
Ties (2.5 -> 12.5 fifths) go to the even number of fifths, the rule of T5's `tf.round`; we round the decimal value
the score prints as, so a score like 2.3 is decided by that rule and not by binary floating-point noise.
`parse_prediction` reads a generated string back into a label, or None when it is no valid label (counted wrong by
`metrics.glue_metrics`).
"""

from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import TypedDict

import datasets
import numpy as np

from mpoe_exp.errors import UserError
from mpoe_exp.glue_tasks import GLUE, GLUE_TASKS, TRAIN_HOLDOUT_SIZE

logger = logging.getLogger(__name__)

# Views of the one table of GLUE facts (mpoe_exp/glue_tasks.py).
GLUE_FIELDS: dict[str, tuple[str, ...]] = {name: t.fields for name, t in GLUE.items()}
GLUE_NUM_LABELS: dict[str, int] = {name: t.num_labels for name, t in GLUE.items() if t.num_labels is not None}
STSB_MAX_SCORE = 5.0

HALVED_VALIDATION_TASKS = tuple(name for name, t in GLUE.items() if t.split == "halve_validation")
TRAIN_HOLDOUT_TASKS = tuple(name for name, t in GLUE.items() if t.split == "hold_out_train")

# The hub's label ids for the string labels of the TSV files.
_NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}
_ENTAILMENT_LABELS = {"entailment": 0, "not_entailment": 1}

_HOW_TO_GET_DATA = (
    "To work offline, put the data on disk and set data_dir=/path: either the layout of the GLUE download script "
    "(<data_dir>/CoLA/train.tsv and dev.tsv, <data_dir>/MNLI/dev_matched.tsv and dev_mismatched.tsv, ...), or a "
    "save_to_disk folder per task, made on a machine with network by "
    "datasets.load_dataset('nyu-mll/glue', '<task>').save_to_disk('<data_dir>/<task>')."
)


class GlueExample(TypedDict):
    """One example: input texts by hub field name, the hub's label (int id, or float score for STS-B), row id."""

    fields: dict[str, str]
    label: int | float
    idx: int


Splits = dict[str, list[GlueExample]]


# ----------------------------------------------------------------------------------------------------------------
# Task names and labels
# ----------------------------------------------------------------------------------------------------------------


def _task_name(task: str) -> str:
    """The canonical task name ("SST-2" and "sst-2" become "sst2"), or a UserError listing the GLUE tasks."""
    name = str(task).lower().replace("-", "")
    if name not in GLUE_TASKS:
        raise UserError(f"unknown GLUE task {task!r}; expected one of {', '.join(GLUE_TASKS)}")
    return name


def _is_integer(value: object) -> bool:
    """True for Python and numpy integers, not for bools."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _valid_score(value: float) -> bool:
    """True for a finite STS-B score in [0, 5]."""
    return math.isfinite(value) and 0.0 <= value <= STSB_MAX_SCORE


def _check_label(task: str, label: object, where: str) -> int | float:
    """The label as int (classification) or float (STS-B); a UserError naming `where` when it is not a valid one."""
    if task == "stsb":
        if isinstance(label, (int, float, np.integer, np.floating)) and not isinstance(label, bool):
            if _valid_score(float(label)):
                return float(label)
        raise UserError(f"{where}: label {label!r} is no STS-B score; expected a number in [0, {STSB_MAX_SCORE:g}]")
    num_labels = GLUE_NUM_LABELS[task]
    if _is_integer(label) and 0 <= int(label) < num_labels:
        return int(label)
    raise UserError(
        f"{where}: label {label!r} is no {task} label; expected an integer id 0..{num_labels - 1} as in nyu-mll/glue"
    )


# ----------------------------------------------------------------------------------------------------------------
# Source 1: TSV files in the layout of the GLUE download script
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TsvLayout:
    """Where a task's TSV files are and which columns hold what."""

    directory: str  # folder under data_dir
    files: dict[str, str]  # hub split name -> file name
    columns: dict[str, str | int]  # hub field name -> header column name (or position in a header-less file)
    label_column: str | int
    labels: dict[str, int] | None = None  # string label -> hub id; None: the column holds the number itself
    num_columns: int | None = None  # header-less files only; with a header, the header's width
    skip_malformed: bool = False  # skip (and count) rows of the wrong width instead of refusing the file


_TRAIN_DEV = {"train": "train.tsv", "validation": "dev.tsv"}
_TSV_LAYOUTS: dict[str, _TsvLayout] = {
    "cola": _TsvLayout("CoLA", _TRAIN_DEV, {"sentence": 3}, label_column=1, num_columns=4),
    "sst2": _TsvLayout("SST-2", _TRAIN_DEV, {"sentence": "sentence"}, "label"),
    "mrpc": _TsvLayout("MRPC", _TRAIN_DEV, {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),
    "qqp": _TsvLayout(
        "QQP", _TRAIN_DEV, {"question1": "question1", "question2": "question2"}, "is_duplicate", skip_malformed=True
    ),
    "stsb": _TsvLayout("STS-B", _TRAIN_DEV, {"sentence1": "sentence1", "sentence2": "sentence2"}, "score"),
    "mnli": _TsvLayout(
        "MNLI",
        {"train": "train.tsv", "validation_matched": "dev_matched.tsv", "validation_mismatched": "dev_mismatched.tsv"},
        {"premise": "sentence1", "hypothesis": "sentence2"},
        "gold_label",
        labels=_NLI_LABELS,
    ),
    "qnli": _TsvLayout(
        "QNLI", _TRAIN_DEV, {"question": "question", "sentence": "sentence"}, "label", _ENTAILMENT_LABELS
    ),
    "rte": _TsvLayout(
        "RTE", _TRAIN_DEV, {"sentence1": "sentence1", "sentence2": "sentence2"}, "label", _ENTAILMENT_LABELS
    ),
}


def _parse_tsv_label(task: str, layout: _TsvLayout, text: str, where: str) -> int | float:
    """The hub label of a TSV label cell (a digit, a score, or a label name); a UserError naming `where` if invalid."""
    if layout.labels is not None:
        if text not in layout.labels:
            raise UserError(f"{where}: label {text!r} is no {task} label; expected one of {', '.join(layout.labels)}")
        return layout.labels[text]
    try:
        value: int | float = float(text) if task == "stsb" else int(text)
    except ValueError:
        kind = f"a score in [0, {STSB_MAX_SCORE:g}]" if task == "stsb" else "an integer label id"
        raise UserError(f"{where}: label {text!r} is not {kind}") from None
    return _check_label(task, value, where)


def _read_tsv(task: str, layout: _TsvLayout, path: Path) -> list[GlueExample]:
    """Examples of one GLUE TSV file; `idx` counts data rows (skipped malformed ones included, as the hub does)."""
    if not path.is_file():
        raise UserError(
            f"GLUE {task}: missing file {path}; the GLUE download-script layout has "
            f"{', '.join(layout.files.values())} in {path.parent}. " + _HOW_TO_GET_DATA
        )
    examples: list[GlueExample] = []
    skipped = 0
    with path.open(encoding="utf-8-sig", newline="") as handle:  # -sig: MRPC's files may start with a BOM
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        if layout.num_columns is not None:  # header-less (CoLA): columns are positions
            width = layout.num_columns
            positions = {name: int(column) for name, column in layout.columns.items()}
            label_position = int(layout.label_column)
        else:
            header = next(reader, None)
            needed = [*layout.columns.values(), layout.label_column]
            missing = [column for column in needed if header is None or column not in header]
            if header is None or missing:
                raise UserError(
                    f"{path}: the header line lacks the column(s) {', '.join(map(str, missing))}; expected the header "
                    f"of the GLUE download script's {layout.directory}/{path.name}, with columns {', '.join(needed)}"
                )
            width = len(header)
            positions = {name: header.index(str(column)) for name, column in layout.columns.items()}
            label_position = header.index(str(layout.label_column))
        row_number = 0
        for row in reader:
            if not row:  # blank line (csv.DictReader, which the hub's builder used, skips them too)
                continue
            idx, row_number = row_number, row_number + 1
            where = f"{path}, line {reader.line_num}"  # QUOTE_NONE: one row per line
            if len(row) != width:
                if layout.skip_malformed:
                    skipped += 1
                    continue
                raise UserError(
                    f"{where}: expected {width} tab-separated columns, found {len(row)}; the file is damaged or not "
                    f"in the GLUE download-script layout (fetch it again)"
                )
            fields = {name: row[position] for name, position in positions.items()}
            label = _parse_tsv_label(task, layout, row[label_position], where)
            examples.append({"fields": fields, "label": label, "idx": idx})
    if skipped:
        logger.warning("%s: skipped %d malformed line(s) with a column count other than %d", path, skipped, width)
    return examples


def _load_tsv(task: str, directory: Path) -> Splits:
    """The official splits of one task from its GLUE download-script folder."""
    layout = _TSV_LAYOUTS[task]
    return {split: _read_tsv(task, layout, directory / name) for split, name in layout.files.items()}


# ----------------------------------------------------------------------------------------------------------------
# Sources 2 and 3: Hugging Face datasets (save_to_disk folder or the hub)
# ----------------------------------------------------------------------------------------------------------------


def _examples_from_dataset(task: str, dataset: datasets.Dataset, where: str) -> list[GlueExample]:
    """Examples of one split of a hub-format GLUE dataset (hub column names)."""
    needed = [*GLUE_FIELDS[task], "label"]
    missing = [column for column in needed if column not in dataset.column_names]
    if missing:
        raise UserError(
            f"{where} lacks the column(s) {', '.join(missing)}; expected the nyu-mll/glue columns of {task}: "
            f"{', '.join(needed)} (and idx); found {', '.join(dataset.column_names)}"
        )
    has_idx = "idx" in dataset.column_names
    columns = dataset.select_columns(needed + (["idx"] if has_idx else [])).to_dict()
    labels = columns["label"]
    # The hub stores STS-B scores as float32 (3.8 reads back as 3.7999999523...). The shortest decimal that
    # round-trips in float32 is the score of the TSV files, so both sources give the same floats.
    feature = dataset.features.get("label")
    if task == "stsb" and getattr(feature, "dtype", None) == "float32":
        labels = [float(str(np.float32(label))) for label in labels]
    examples: list[GlueExample] = []
    for position, label in enumerate(labels):
        fields = {name: columns[name][position] for name in GLUE_FIELDS[task]}
        checked = _check_label(task, label, f"{where}, row {position}")
        idx = int(columns["idx"][position]) if has_idx else position
        examples.append({"fields": fields, "label": checked, "idx": idx})
    return examples


def _official_from_dataset_dict(task: str, dataset_dict: object, where: str) -> Splits:
    """The official splits (hub split names) of a DatasetDict."""
    split_names = list(_TSV_LAYOUTS[task].files)
    if not isinstance(dataset_dict, datasets.DatasetDict):
        raise UserError(
            f"{where} holds a {type(dataset_dict).__name__}, not a DatasetDict; save all splits together: "
            f"datasets.load_dataset('nyu-mll/glue', '{task}').save_to_disk(path)"
        )
    missing = [split for split in split_names if split not in dataset_dict]
    if missing:
        raise UserError(
            f"{where} lacks the split(s) {', '.join(missing)}; GLUE {task} needs {', '.join(split_names)} "
            f"(the nyu-mll/glue split names); found {', '.join(dataset_dict)}"
        )
    return {
        split: _examples_from_dataset(task, dataset_dict[split], f"{where}, split {split}") for split in split_names
    }


def _load_saved(task: str, directory: Path) -> Splits:
    """The official splits of one task from a `save_to_disk` folder."""
    try:
        dataset_dict = datasets.load_from_disk(str(directory))
    except Exception as error:  # a damaged or foreign folder: say which, not a library traceback
        raise UserError(
            f"could not read the save_to_disk folder {directory} for GLUE {task}: {type(error).__name__}: {error}"
        ) from error
    return _official_from_dataset_dict(task, dataset_dict, f"save_to_disk folder {directory}")


def _load_hub(task: str, hub_path: str) -> Splits:
    """The official splits of one task from the Hugging Face hub (or its local cache)."""
    try:
        dataset_dict = datasets.load_dataset(hub_path, task)
    except Exception as error:  # offline, no cache, unknown path: all mean "get the data another way"
        raise UserError(
            f"could not load GLUE {task} from the Hugging Face hub ({hub_path!r}, config {task!r}): "
            f"{type(error).__name__}: {error}. " + _HOW_TO_GET_DATA
        ) from error
    return _official_from_dataset_dict(task, dataset_dict, f"hub dataset {hub_path!r} ({task})")


def source_folder(task: str, data_dir: str | Path) -> Path:
    """The folder a task's official splits are read from under `data_dir` (module docstring): the TSV folder of the
    GLUE download-script layout, or a save_to_disk DatasetDict at <data_dir>/<task> or <data_dir>. Its files are
    what a run reads (and what its identity fingerprints)."""
    task = _task_name(task)
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"data_dir {str(data_dir)!r} is not a directory. " + _HOW_TO_GET_DATA)
    layout = _TSV_LAYOUTS[task]
    tsv_directory = root / layout.directory
    if any((tsv_directory / name).is_file() for name in layout.files.values()):
        return tsv_directory
    for candidate in (root / task, root):
        if (candidate / "dataset_dict.json").is_file():
            return candidate
        if (candidate / "state.json").is_file():  # save_to_disk of a single split
            raise UserError(
                f"{candidate} is a save_to_disk folder of a single Dataset; GLUE {task} needs the DatasetDict with "
                f"all splits ({', '.join(layout.files)}): datasets.load_dataset('nyu-mll/glue', '{task}')"
                f".save_to_disk('{root / task}')"
            )
    expected = ", ".join(str(tsv_directory / name) for name in layout.files.values())
    raise UserError(
        f"no GLUE {task} data under data_dir {str(root)!r}: expected the TSV files {expected} (GLUE download-script "
        f"layout), or a save_to_disk DatasetDict at {root / task} or {root}. " + _HOW_TO_GET_DATA
    )


def _load_official(task: str, data_dir: str | Path | None, hub_path: str) -> Splits:
    """The official splits of one task from the first source that has them (module docstring)."""
    if data_dir is None:
        return _load_hub(task, hub_path)
    folder = source_folder(task, data_dir)
    if any((folder / name).is_file() for name in _TSV_LAYOUTS[task].files.values()):
        return _load_tsv(task, folder)
    return _load_saved(task, folder)


# ----------------------------------------------------------------------------------------------------------------
# The paper's splits
# ----------------------------------------------------------------------------------------------------------------


def _paper_splits(task: str, official: Splits, seed: int) -> Splits:
    """Train/validation/test from the official splits by the split rule of the module docstring."""
    order_of = np.random.default_rng(seed).permutation
    if task in HALVED_VALIDATION_TASKS:
        official_validation = official["validation"]
        order = order_of(len(official_validation))
        half = len(official_validation) // 2
        splits = {
            "train": list(official["train"]),
            "validation": [official_validation[i] for i in order[:half]],
            "test": [official_validation[i] for i in order[half:]],
        }
    elif task in TRAIN_HOLDOUT_TASKS:
        official_train = official["train"]
        if len(official_train) <= TRAIN_HOLDOUT_SIZE:
            raise UserError(
                f"GLUE {task}: the training set has {len(official_train)} examples; the split rule moves "
                f"{TRAIN_HOLDOUT_SIZE} of them to validation, so it needs more (is the train file truncated?)"
            )
        order = order_of(len(official_train))
        splits = {
            "train": [official_train[i] for i in np.sort(order[TRAIN_HOLDOUT_SIZE:])],
            "validation": [official_train[i] for i in order[:TRAIN_HOLDOUT_SIZE]],
            "test": list(official["validation"]),
        }
    else:  # mnli
        splits = {
            "train": list(official["train"]),
            "validation": list(official["validation_mismatched"]),
            "test": list(official["validation_matched"]),
        }
    empty = [split for split, examples in splits.items() if not examples]
    if empty:
        sizes = ", ".join(f"{split} {len(examples)}" for split, examples in official.items())
        raise UserError(f"GLUE {task}: the {'/'.join(empty)} split would be empty (official sizes: {sizes})")
    return splits


def load_glue_splits(
    task: str,
    data_dir: str | Path | None = None,
    hub_path: str = "nyu-mll/glue",
    seed: int = 42,
    sizes: dict[str, int | None] | None = None,
) -> Splits:
    """{"train", "validation", "test"} example lists of a GLUE task, by the paper's split rule (module docstring).

    `sizes` ({"train": n, "validation": m}; None or a missing key: the whole split) keeps a subset of a split
    after the split rule: the first n of a permutation drawn from `seed` (a second draw, independent of the split
    rule's), in the split's order. For budget runs (task.train_size, task.validation_size); test is never cut.
    """
    name = _task_name(task)
    splits = _paper_splits(name, _load_official(name, data_dir, hub_path), seed)
    for split, size in (sizes or {}).items():
        if size is None or size >= len(splits[split]):
            continue
        keep = np.sort(np.random.default_rng([seed, len(splits[split])]).permutation(len(splits[split]))[:size])
        splits[split] = [splits[split][i] for i in keep]
    return splits


def subset_sizes(task) -> dict[str, int | None]:
    """The subsets a GLUE task spec asks for: task.train_size and task.validation_size (null: all)."""
    return {"train": task.train_size, "validation": task.validation_size}


def glue_task_sizes(splits: Splits) -> dict[str, int]:
    """Number of examples per split."""
    return {split: len(examples) for split, examples in splits.items()}


# ----------------------------------------------------------------------------------------------------------------
# Text-to-text format
# ----------------------------------------------------------------------------------------------------------------

_SCORE_PATTERN = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")  # plain decimal; no sign, exponent, nan or inf


def format_source(task: str, fields: dict[str, str]) -> str:
    """T5 input string: "<task> <field>: <text> ...", e.g. "mnli premise: ... hypothesis: ..."."""
    name = _task_name(task)
    missing = [field for field in GLUE_FIELDS[name] if field not in fields]
    if missing:
        raise ValueError(f"{name} inputs need the fields {', '.join(GLUE_FIELDS[name])}; got {', '.join(fields)}")
    return " ".join([name, *(f"{field}: {fields[field]}" for field in GLUE_FIELDS[name])])


def format_target(task: str, label: int | float) -> str:
    """T5 target string: the label id as a digit ("0"/"1"/"2"); STS-B the score rounded to 0.2, one decimal."""
    name = _task_name(task)
    if name == "stsb":
        score = float(label)
        if not _valid_score(score):
            raise ValueError(f"STS-B score {label!r} is outside [0, {STSB_MAX_SCORE:g}]")
        # Decimal of the printed value: 2.3 is 2.3 here, not 2.2999999999999998, so ties follow the rounding rule.
        fifths = (Decimal(repr(score)) * 5).to_integral_value(rounding=ROUND_HALF_EVEN)
        return f"{fifths / 5:.1f}"
    if not (_is_integer(label) and 0 <= int(label) < GLUE_NUM_LABELS[name]):
        raise ValueError(f"{label!r} is no {name} label; expected an integer id 0..{GLUE_NUM_LABELS[name] - 1}")
    return str(int(label))


def parse_prediction(task: str, text: str) -> int | float | None:
    """The label a generated string names (int id; STS-B a float in [0, 5]), or None when it names none."""
    name = _task_name(task)
    text = text.strip()
    if name == "stsb":
        if _SCORE_PATTERN.fullmatch(text) is None:
            return None
        score = float(text)
        return score if _valid_score(score) else None
    valid = {str(label): label for label in range(GLUE_NUM_LABELS[name])}
    return valid.get(text)
