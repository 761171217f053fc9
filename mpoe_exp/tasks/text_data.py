"""Text data for GPT-2: WikiText-2 for causal LM, EMNLP2017 WMT News and IMDB for generation (paper section 4.1;
docs/method.md, 'Language modelling and generation').

`load_text_splits(task, data_dir, seed)` gives {"train", "validation", "test"} -> list of texts, from files on disk,
a `save_to_disk` DatasetDict, or the Hugging Face hub. `tokenize_and_concatenate` and `lm_blocks` turn WikiText-2
lines into the fixed-size blocks a causal LM trains and is evaluated on.

WikiText-2 (raw, wikitext-2-raw-v1) keeps the line convention of the hub copy `Salesforce/wikitext`, whatever the
source: one entry per line of the raw file, a non-blank line WITH its trailing "\\n" (" = Title = \\n"), a blank
line as "" (the raw files write blank lines as " \\n"). Reading `wiki.train.raw` therefore gives the same list as
the hub. The LM text of a split is the concatenation "".join(lines): headings, paragraphs and their newlines in
order, blank lines contributing nothing — what the Hugging Face `run_clm` example trains and evaluates on.

EMNLP News and IMDB are one sentence per line: each line is stripped of surrounding whitespace (trailing newline
included) and blank lines are skipped. Without a validation file, a seeded 5% of the training lines (at most
1,000) becomes validation (`split_off_validation`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mpoe_exp.errors import UserError

TASKS = ("wikitext2", "emnlp_news", "imdb")
SPLITS = ("train", "validation", "test")

WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
IMDB_HUB = "stanfordnlp/imdb"

# Accepted file names per split, first match wins. WikiText: the files of wikitext-2-raw-v1.zip (also inside its
# `wikitext-2-raw/` folder) or plain text files. EMNLP News also takes the Texygen/RelGAN layout of `data/`.
WIKITEXT_FILES = {
    "train": ("wiki.train.raw", "wikitext-2-raw/wiki.train.raw", "train.txt"),
    "validation": ("wiki.valid.raw", "wikitext-2-raw/wiki.valid.raw", "valid.txt", "validation.txt"),
    "test": ("wiki.test.raw", "wikitext-2-raw/wiki.test.raw", "test.txt"),
}
SENTENCE_FILES = {
    "emnlp_news": {
        "train": ("train.txt", "emnlp_news.txt"),
        "validation": ("valid.txt", "validation.txt"),
        "test": ("test.txt", "testdata/test_emnlp.txt", "test_emnlp.txt"),
    },
    "imdb": {
        "train": ("train.txt",),
        "validation": ("valid.txt", "validation.txt"),
        "test": ("test.txt",),
    },
}

# Validation carved out of train when the data has none (data seed 42 by default;
# docs/method.md, 'Language modelling and generation').
VALIDATION_FRACTION = 0.05
MAX_VALIDATION_LINES = 1000

# IMDB reviews -> sentences: "<br />" tags become spaces, a sentence ends at . ! or ? followed by whitespace, and
# sentences of 5..50 whitespace-separated words (inclusive) are kept.
IMDB_MIN_WORDS = 5
IMDB_MAX_WORDS = 50
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

EMNLP_NEWS_HELP = (
    "EMNLP2017 WMT News has no canonical Hugging Face hub copy; the generation literature uses the Texygen/LeakGAN "
    "text files. Get them from the `data/` folder of the Texygen repository (github.com/geek-ai/Texygen) or of a "
    "repository that ships its data (e.g. RelGAN, github.com/weilinie/RelGAN: data/emnlp_news.txt for training, "
    "data/testdata/test_emnlp.txt for testing), then pass data_dir=/path/to/that/data folder. A folder with "
    "train.txt and test.txt (one sentence per line; valid.txt optional) works too."
)


# --- loading ---------------------------------------------------------------------------------------------------


def load_text_splits(task: str, data_dir: str | None = None, seed: int = 42) -> dict[str, list[str]]:
    """The train/validation/test texts of `task` ("wikitext2", "emnlp_news" or "imdb") from data_dir or the hub.

    `seed` only matters when the validation split is carved out of train (see `split_off_validation`).
    """
    if task not in TASKS:
        raise UserError(f"unknown text task {task!r}; expected one of {', '.join(TASKS)}")
    directory = _data_directory(data_dir) if data_dir is not None else None
    if task == "wikitext2":
        return _load_wikitext(directory)
    if directory is None and task == "emnlp_news":
        raise UserError(f"emnlp_news needs data_dir: no data folder was given.\n{EMNLP_NEWS_HELP}")
    return _load_sentences(task, directory, seed)


def _data_directory(data_dir: str) -> Path:
    directory = Path(data_dir).expanduser()
    if not directory.is_dir():
        raise UserError(f"data_dir {str(directory)!r} is not a folder; pass the folder that holds the task's data")
    return directory


def _load_wikitext(directory: Path | None) -> dict[str, list[str]]:
    if directory is None:
        texts = _texts_of_dataset_dict(_load_from_hub("wikitext2", *WIKITEXT_HUB), "wikitext2", "the hub copy")
    elif _is_saved_dataset(directory):
        texts = _texts_of_dataset_dict(_load_from_disk(directory), "wikitext2", str(directory))
    else:
        texts = {split: _read_lines(_find_file(directory, split, WIKITEXT_FILES, "wikitext2")) for split in SPLITS}
    splits = {split: [_wikitext_line(line) for line in lines] for split, lines in texts.items()}
    for split, lines in splits.items():
        if not any(lines):
            raise UserError(f"the wikitext2 {split} split from {directory or 'the hub'} has no text (only blank lines)")
    return splits


def _wikitext_line(line: str) -> str:
    """The hub's convention: a blank line is "", any other line ends with exactly the newline it had (or one)."""
    if not line.strip():
        return ""
    return line if line.endswith("\n") else line + "\n"


def _load_sentences(task: str, directory: Path | None, seed: int) -> dict[str, list[str]]:
    if directory is None:  # imdb: the hub's reviews, split into sentences
        reviews = _texts_of_dataset_dict(_load_from_hub(task, IMDB_HUB), task, "the hub copy", need_validation=False)
        texts = {split: imdb_sentences(lines) for split, lines in reviews.items()}
        source = f"the hub copy {IMDB_HUB}"
    elif _is_saved_dataset(directory):
        dataset_dict = _load_from_disk(directory)
        texts = _texts_of_dataset_dict(dataset_dict, task, str(directory), need_validation=False)
        if task == "imdb" and "label" in dataset_dict["train"].column_names:
            # A saved copy of stanfordnlp/imdb holds whole reviews: prepare them as the hub path does.
            texts = {split: imdb_sentences(lines) for split, lines in texts.items()}
        source = str(directory)
    else:
        files = SENTENCE_FILES[task]
        texts = {
            split: _read_lines(_find_file(directory, split, files, task))
            for split in SPLITS
            if split != "validation" or _first_existing(directory, files[split]) is not None
        }
        source = str(directory)

    splits = {split: _sentences(lines) for split, lines in texts.items()}
    for split, lines in splits.items():
        if not lines:
            raise UserError(f"the {task} {split} split from {source} has no text (only blank lines)")
    if "validation" not in splits:
        splits["train"], splits["validation"] = split_off_validation(splits["train"], seed)
    return {split: splits[split] for split in SPLITS}


def _sentences(lines: Iterable[str]) -> list[str]:
    """One sentence per line: surrounding whitespace (the newline included) stripped, blank lines skipped."""
    return [s for s in (line.strip() for line in lines) if s]


def imdb_sentences(reviews: Iterable[str]) -> list[str]:
    """IMDB reviews -> sentences of IMDB_MIN_WORDS..IMDB_MAX_WORDS words, in review order, whitespace normalized."""
    sentences = []
    for review in reviews:
        text = " ".join(_HTML_BREAK.sub(" ", review).split())
        for sentence in _SENTENCE_END.split(text):
            if IMDB_MIN_WORDS <= len(sentence.split()) <= IMDB_MAX_WORDS:
                sentences.append(sentence)
    return sentences


def split_off_validation(lines: Sequence[str], seed: int) -> tuple[list[str], list[str]]:
    """(train, validation): a seeded VALIDATION_FRACTION of the lines, at most MAX_VALIDATION_LINES, as validation.

    The validation indices are the first k of `numpy.random.default_rng(seed).permutation(len(lines))`, with
    k = min(MAX_VALIDATION_LINES, max(1, floor(VALIDATION_FRACTION * len(lines)))); both parts keep the original
    line order. Lines are taken by position, so every line lands in exactly one part (a line repeated in the file
    may land in both).
    """
    if len(lines) < 2:
        raise UserError(
            f"cannot carve a validation split out of {len(lines)} training line(s); "
            "provide more training lines or a valid.txt file"
        )
    num_validation = min(MAX_VALIDATION_LINES, max(1, int(VALIDATION_FRACTION * len(lines))))
    chosen = np.zeros(len(lines), dtype=bool)
    chosen[np.random.default_rng(seed).permutation(len(lines))[:num_validation]] = True
    train = [line for line, is_validation in zip(lines, chosen) if not is_validation]
    validation = [line for line, is_validation in zip(lines, chosen) if is_validation]
    return train, validation


# --- sources ---------------------------------------------------------------------------------------------------


def _first_existing(directory: Path, names: Sequence[str]) -> Path | None:
    return next((directory / name for name in names if (directory / name).is_file()), None)


def _find_file(directory: Path, split: str, files: dict[str, tuple[str, ...]], task: str) -> Path:
    path = _first_existing(directory, files[split])
    if path is None:
        expected = "; ".join(f"{s}: {' or '.join(names)}" for s, names in files.items())
        optional = " (validation optional)" if task != "wikitext2" else ""
        hint = f"\n{EMNLP_NEWS_HELP}" if task == "emnlp_news" else ""
        raise UserError(
            f"no {split} file for {task} in {directory}; expected text files named{optional}: {expected}, "
            f"or a save_to_disk DatasetDict folder with a 'text' column.{hint}"
        )
    return path


def _read_lines(path: Path) -> list[str]:
    """The file's lines with their newlines ("\\r\\n" read as "\\n")."""
    try:
        with path.open(encoding="utf-8") as handle:
            lines = handle.readlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err}); convert it, e.g. with iconv -t utf-8") from None
    if not lines:
        raise UserError(f"{path} is empty; it should hold the split's text, one line per line of text")
    return lines


def _is_saved_dataset(directory: Path) -> bool:
    """Whether `directory` is a `save_to_disk` folder (a DatasetDict or a single Dataset)."""
    return (directory / "dataset_dict.json").is_file() or (directory / "state.json").is_file()


def _load_from_disk(directory: Path):
    import datasets

    if not (directory / "dataset_dict.json").is_file():
        raise UserError(
            f"{directory} holds a single saved Dataset; expected a DatasetDict (save_to_disk of a dict with splits "
            "train, test and, optionally for generation tasks, validation), each with a 'text' column"
        )
    try:
        return datasets.load_from_disk(str(directory))
    except Exception as err:  # a corrupt or incompatible folder: say which
        raise UserError(f"could not read the saved DatasetDict in {directory}: {type(err).__name__}: {err}") from None


def _load_from_hub(task: str, path: str, name: str | None = None):
    import datasets

    args = (path, name) if name else (path,)
    try:
        return datasets.load_dataset(*args)
    except Exception as err:  # offline, hub down, renamed dataset: all leave the user the same way out
        quoted = ", ".join(repr(a) for a in args)
        files = (
            "wiki.train.raw, wiki.valid.raw, wiki.test.raw (or train.txt, valid.txt, test.txt)"
            if task == "wikitext2"
            else "train.txt, test.txt and optionally valid.txt, one sentence per line"
        )
        raise UserError(
            f"could not load {task} from the Hugging Face hub ({'/'.join(args)}): {type(err).__name__}: {err}\n"
            f"Offline? On a machine with network run\n"
            f"  python -c \"import datasets; datasets.load_dataset({quoted}).save_to_disk('{task}')\"\n"
            f"copy the folder over and pass data_dir=/path/to/{task}; or pass a data_dir with text files: {files}."
        ) from None


def _texts_of_dataset_dict(dataset_dict, task: str, source: str, need_validation: bool = True) -> dict[str, list[str]]:
    """split -> the 'text' column of a DatasetDict; validation is taken only when present or required."""
    wanted = [s for s in SPLITS if need_validation or s != "validation" or s in dataset_dict]
    missing = [s for s in wanted if s not in dataset_dict]
    if missing:
        raise UserError(
            f"the {task} DatasetDict from {source} lacks split(s) {', '.join(missing)}; it has "
            f"{', '.join(dataset_dict) or 'none'}. Expected train, test"
            f"{' and validation' if need_validation else ' (validation optional)'}, each with a 'text' column."
        )
    for split in wanted:
        columns = dataset_dict[split].column_names
        if "text" not in columns:
            raise UserError(
                f"the {task} {split} split from {source} has no 'text' column (columns: {', '.join(columns)}); "
                "rename the text column to 'text' before save_to_disk"
            )
    return {split: list(dataset_dict[split]["text"]) for split in wanted}


# --- language modeling -----------------------------------------------------------------------------------------


def tokenize_and_concatenate(texts: Sequence[str], tokenizer, lines_per_call: int = 1000) -> list[int]:
    """One token stream: every line tokenized on its own (no special tokens) and the token lists concatenated.

    This is exactly what the Hugging Face `run_clm` example does with WikiText (the GPT-2 PPL ~20 reference);
    lines are sent to the tokenizer `lines_per_call` at a time, and the result does not depend on that number.
    Because WikiText lines keep their newline, the stream equals tokenizing "".join(texts) in one call whenever no
    token spans a line end: always for a byte-level tokenizer, and for GPT-2's BPE on WikiText, where every
    non-blank line starts with a space and GPT-2's pre-tokenizer cuts before " word" and after " \\n".
    """
    if lines_per_call < 1:
        raise UserError(f"lines_per_call must be >= 1, got {lines_per_call}")
    token_ids: list[int] = []
    for start in range(0, len(texts), lines_per_call):
        chunk = [line for line in texts[start : start + lines_per_call] if line]
        if not chunk:
            continue
        # verbose=False: a long paragraph line exceeds model_max_length; the blocks are cut later, so no warning.
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            token_ids.extend(ids)
    return token_ids


def lm_blocks(token_ids: Sequence[int], block_size: int, *, max_positions: int | None = None) -> list[list[int]]:
    """Consecutive, non-overlapping blocks of exactly `block_size` tokens; the last, shorter block is kept.

    Keeping the tail means every token of an evaluation split is in some block (the first token of each block has
    no context and is not predicted, as in `run_clm`). `block_size` must fit the model's positions: at most 1024
    for GPT-2; pass `max_positions` to have that checked here.
    """
    if block_size < 1:
        raise UserError(f"block_size must be a positive number of tokens, got {block_size}")
    if max_positions is not None and block_size > max_positions:
        raise UserError(
            f"block_size {block_size} exceeds the model's {max_positions} positions; use block_size<={max_positions}"
        )
    return [list(token_ids[start : start + block_size]) for start in range(0, len(token_ids), block_size)]
