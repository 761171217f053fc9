"""Text data for GPT-2: every source of every task, the validation carve-out, errors, LM tokenization and blocks.

Fixtures are written to tmp_path; the hub is replaced by monkeypatched `datasets.load_dataset` (never the network).
"""

from collections import Counter

import datasets
import pytest

from mpoe_exp.errors import UserError
from mpoe_exp.models import byte_tokenizer
from mpoe_exp.tasks import text_data
from mpoe_exp.tasks.text_data import (
    imdb_sentences,
    lm_blocks,
    load_text_splits,
    split_off_validation,
    tokenize_and_concatenate,
)

# Raw WikiText as in wikitext-2-raw-v1.zip: blank lines are " \n", headings " = Title = \n".
RAW = {
    "train": (
        " \n = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 is a tactical role @-@ playing game . \n"
        " \n = = Gameplay = = \n \n The game 's battle system , the BliTZ system , is carried over . \n"
        " Troops are divided into five classes — Scouts , Shocktroopers and others . \n"
    ),
    "validation": " \n = Homarus gammarus = \n \n Homarus gammarus is a species of clawed lobster . \n",
    "test": " \n = Robert Boulter = \n \n Robert Boulter is an English film actor . \n \n",
}
# The same text in the hub's convention: one entry per line, blank lines "", others with their newline.
HUB_LINES = {
    split: ["" if not line.strip() else line for line in text.splitlines(keepends=True)] for split, text in RAW.items()
}
RAW_FILE_NAMES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def write_raw_wikitext(directory, names=RAW_FILE_NAMES):
    for split, name in names.items():
        write(directory / name, RAW[split])
    return directory


def sentence_lines(prefix, count):
    return [f"{prefix} sentence number {i} ends here ." for i in range(count)]


def write_sentences(directory, train, test, validation=None, validation_name="valid.txt"):
    # Trailing whitespace, CRLF-free newlines and blank lines, as real files have them.
    write(directory / "train.txt", "\n".join(line + "  " for line in train) + "\n\n")
    write(directory / "test.txt", "\n\n".join(test) + "\n")
    if validation is not None:
        write(directory / validation_name, "\n".join(validation))
    return directory


def fake_hub(monkeypatch, dataset_dict, calls=None):
    def load_dataset(*args, **kwargs):
        if calls is not None:
            calls.append(args)
        return dataset_dict

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def failing_hub(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def dataset_dict(columns_by_split):
    return datasets.DatasetDict({s: datasets.Dataset.from_dict(c) for s, c in columns_by_split.items()})


# --- WikiText-2 --------------------------------------------------------------------------------------------------


def test_wikitext_raw_files_follow_the_hub_line_convention(tmp_path):
    splits = load_text_splits("wikitext2", str(write_raw_wikitext(tmp_path)))
    assert list(splits) == ["train", "validation", "test"]
    assert splits == HUB_LINES
    train = splits["train"]
    assert train[:4] == [
        "",
        " = Valkyria Chronicles III = \n",
        "",
        " Senjō no Valkyria 3 is a tactical role @-@ playing game . \n",
    ]
    # The LM text: headings and paragraphs in order with their newlines, blank lines contributing nothing.
    assert "".join(train).startswith(" = Valkyria Chronicles III = \n Senjō no Valkyria 3")


@pytest.mark.parametrize(
    "names",
    [
        {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"},
        {"train": "train.txt", "validation": "validation.txt", "test": "test.txt"},
        {s: f"wikitext-2-raw/{n}" for s, n in RAW_FILE_NAMES.items()},  # the zip's folder, unpacked into data_dir
    ],
)
def test_wikitext_plain_text_files_and_the_zip_folder(tmp_path, names):
    assert load_text_splits("wikitext2", str(write_raw_wikitext(tmp_path, names))) == HUB_LINES


def test_wikitext_last_line_without_newline_gets_one(tmp_path):
    write_raw_wikitext(tmp_path)
    write(tmp_path / "wiki.test.raw", " = A = \n \n Last line")
    assert load_text_splits("wikitext2", str(tmp_path))["test"] == [" = A = \n", "", " Last line\n"]


def test_wikitext_save_to_disk_and_hub_match_the_files(tmp_path, monkeypatch):
    hub_copy = dataset_dict({s: {"text": lines} for s, lines in HUB_LINES.items()})
    hub_copy.save_to_disk(str(tmp_path / "saved"))
    assert load_text_splits("wikitext2", str(tmp_path / "saved")) == HUB_LINES

    calls = []
    fake_hub(monkeypatch, hub_copy, calls)
    assert load_text_splits("wikitext2") == HUB_LINES
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1")]


def test_wikitext_saved_lines_without_newlines_are_normalized(tmp_path):
    stripped = {s: {"text": [line.rstrip("\n") for line in lines]} for s, lines in HUB_LINES.items()}
    dataset_dict(stripped).save_to_disk(str(tmp_path))
    assert load_text_splits("wikitext2", str(tmp_path)) == HUB_LINES


def test_wikitext_missing_file_names_expected_files_and_folder(tmp_path):
    write_raw_wikitext(tmp_path)
    (tmp_path / "wiki.test.raw").unlink()
    with pytest.raises(UserError, match="no test file for wikitext2") as err:
        load_text_splits("wikitext2", str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "wiki.test.raw" in message and "test.txt" in message
    assert "save_to_disk" in message


def test_wikitext_empty_or_blank_files_are_errors(tmp_path):
    write_raw_wikitext(tmp_path)
    write(tmp_path / "wiki.valid.raw", "")
    with pytest.raises(UserError, match=r"wiki\.valid\.raw is empty"):
        load_text_splits("wikitext2", str(tmp_path))
    write(tmp_path / "wiki.valid.raw", " \n \n\n")
    with pytest.raises(UserError, match="validation split .* has no text"):
        load_text_splits("wikitext2", str(tmp_path))


def test_wikitext_saved_dataset_errors(tmp_path):
    no_validation = {s: {"text": HUB_LINES[s]} for s in ("train", "test")}
    dataset_dict(no_validation).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(UserError, match="lacks split.*validation"):
        load_text_splits("wikitext2", str(tmp_path / "splits"))

    wrong_column = {s: {"sentence": lines} for s, lines in HUB_LINES.items()}
    dataset_dict(wrong_column).save_to_disk(str(tmp_path / "column"))
    with pytest.raises(UserError, match="no 'text' column.*sentence"):
        load_text_splits("wikitext2", str(tmp_path / "column"))

    datasets.Dataset.from_dict({"text": HUB_LINES["train"]}).save_to_disk(str(tmp_path / "single"))
    with pytest.raises(UserError, match="single saved Dataset; expected a DatasetDict"):
        load_text_splits("wikitext2", str(tmp_path / "single"))


@pytest.mark.parametrize("task", ["wikitext2", "imdb"])
def test_hub_failure_is_a_user_error_saying_how_to_give_data_dir(monkeypatch, task):
    failing_hub(monkeypatch)
    with pytest.raises(UserError, match="could not load .* from the Hugging Face hub") as err:
        load_text_splits(task)
    message = str(err.value)
    assert "ConnectionError" in message and "data_dir=" in message and "save_to_disk" in message


def test_unknown_task_and_missing_folder(tmp_path):
    with pytest.raises(UserError, match="unknown text task 'wikitext103'.*wikitext2, emnlp_news, imdb"):
        load_text_splits("wikitext103", str(tmp_path))
    with pytest.raises(UserError, match="is not a folder"):
        load_text_splits("imdb", str(tmp_path / "nowhere"))


# --- one sentence per line: EMNLP2017 News, IMDB -------------------------------------------------------------------


def test_sentence_files_with_validation(tmp_path):
    train, validation, test = sentence_lines("train", 30), sentence_lines("valid", 4), sentence_lines("test", 6)
    for name in ("valid.txt", "validation.txt"):
        directory = write_sentences(tmp_path / name, train, test, validation, validation_name=name)
        for task in ("emnlp_news", "imdb"):
            splits = load_text_splits(task, str(directory))
            assert splits == {"train": train, "validation": validation, "test": test}  # stripped, blanks skipped


def test_sentence_files_without_validation_carve_it_out_of_train(tmp_path):
    train, test = sentence_lines("train", 100), sentence_lines("test", 6)
    directory = write_sentences(tmp_path, train, test)
    splits = load_text_splits("emnlp_news", str(directory), seed=42)
    assert len(splits["validation"]) == 5 and len(splits["train"]) == 95  # 5% of 100
    assert splits["test"] == test
    # Nothing lost, nothing duplicated, original order kept in both parts.
    assert Counter(splits["train"]) + Counter(splits["validation"]) == Counter(train)
    assert splits["train"] == [line for line in train if line not in set(splits["validation"])]
    assert splits["validation"] == sorted(splits["validation"], key=train.index)
    # Deterministic for a seed, different for another.
    assert load_text_splits("emnlp_news", str(directory), seed=42) == splits
    assert load_text_splits("emnlp_news", str(directory), seed=7)["validation"] != splits["validation"]


def test_split_off_validation_size_cap_and_duplicates():
    lines = [f"line {i % 30000}" for i in range(40000)]  # 10,000 lines appear twice
    train, validation = split_off_validation(lines, seed=42)
    assert len(validation) == 1000 and len(train) == 39000  # 5% would be 2,000: capped
    assert Counter(train) + Counter(validation) == Counter(lines)
    assert split_off_validation(lines, seed=42) == (train, validation)
    assert [len(part) for part in split_off_validation(["a", "b"], seed=0)] == [1, 1]  # at least one line
    with pytest.raises(UserError, match="cannot carve a validation split out of 1 training line"):
        split_off_validation(["only one"], seed=0)


def test_emnlp_news_without_data_dir_explains_where_to_get_it():
    with pytest.raises(UserError, match="emnlp_news needs data_dir") as err:
        load_text_splits("emnlp_news")
    message = str(err.value)
    assert "Texygen" in message and "emnlp_news.txt" in message and "test_emnlp.txt" in message
    assert "data_dir=" in message and "train.txt" in message


def test_emnlp_news_texygen_layout(tmp_path):
    train, test = sentence_lines("train", 40), sentence_lines("test", 5)
    write(tmp_path / "emnlp_news.txt", "\n".join(train) + "\n")
    write(tmp_path / "testdata" / "test_emnlp.txt", "\n".join(test) + "\n")
    write(tmp_path / "image_coco.txt", "a coco caption that must not be read\n")
    splits = load_text_splits("emnlp_news", str(tmp_path))
    assert splits["test"] == test and len(splits["validation"]) == 2
    assert sorted(splits["train"] + splits["validation"]) == sorted(train)


def test_sentence_files_missing_or_empty(tmp_path):
    write(tmp_path / "train.txt", "one sentence here .\nanother one .\n")
    with pytest.raises(UserError, match="no test file for emnlp_news") as err:
        load_text_splits("emnlp_news", str(tmp_path))
    assert "test.txt" in str(err.value) and "Texygen" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(UserError, match=r"no test file for imdb.*validation optional.*test\.txt"):
        load_text_splits("imdb", str(tmp_path))
    write(tmp_path / "test.txt", "")
    with pytest.raises(UserError, match=r"test\.txt is empty"):
        load_text_splits("imdb", str(tmp_path))
    write(tmp_path / "test.txt", "\n  \n")
    with pytest.raises(UserError, match="imdb test split .* has no text"):
        load_text_splits("imdb", str(tmp_path))


def test_sentence_save_to_disk_with_and_without_validation(tmp_path):
    train, validation, test = sentence_lines("train", 60), sentence_lines("valid", 3), sentence_lines("test", 4)
    full = {"train": {"text": train}, "validation": {"text": validation}, "test": {"text": test + ["  "]}}
    dataset_dict(full).save_to_disk(str(tmp_path / "full"))
    assert load_text_splits("emnlp_news", str(tmp_path / "full")) == {
        "train": train,
        "validation": validation,
        "test": test,
    }
    dataset_dict({"train": {"text": train}, "test": {"text": test}}).save_to_disk(str(tmp_path / "no_validation"))
    splits = load_text_splits("emnlp_news", str(tmp_path / "no_validation"))
    assert len(splits["validation"]) == 3 and Counter(splits["train"] + splits["validation"]) == Counter(train)


IMDB_REVIEWS = [
    "I loved this film. It was great!<br /><br />The acting was superb and the plot kept me guessing until the end. "
    "Wow.",
    "Terrible. " + "word " * 60 + "end. Would you really watch   this again?",
]


def test_imdb_sentences():
    assert imdb_sentences(IMDB_REVIEWS) == [
        "The acting was superb and the plot kept me guessing until the end.",
        "Would you really watch this again?",
    ]
    # "I loved this film." (4 words), "Wow." and the 62-word sentence are out of the 5..50 range.
    assert imdb_sentences(["One two three four five.", "One two three four."]) == ["One two three four five."]


def test_imdb_from_hub_and_from_a_saved_hub_copy(tmp_path, monkeypatch):
    hub_copy = dataset_dict(
        {
            "train": {"text": IMDB_REVIEWS * 20, "label": [0, 1] * 20},
            "test": {"text": IMDB_REVIEWS[:1], "label": [1]},
            "unsupervised": {"text": ["Not used at all, not even once."], "label": [-1]},
        }
    )
    calls = []
    fake_hub(monkeypatch, hub_copy, calls)
    splits = load_text_splits("imdb")
    assert calls == [("stanfordnlp/imdb",)]
    assert splits["test"] == ["The acting was superb and the plot kept me guessing until the end."]
    assert len(splits["train"]) == 38 and len(splits["validation"]) == 2  # 40 sentences, 5% carved out
    assert set(splits["train"] + splits["validation"]) == set(imdb_sentences(IMDB_REVIEWS))

    hub_copy.save_to_disk(str(tmp_path))
    assert load_text_splits("imdb", str(tmp_path)) == splits  # whole reviews recognized by the label column


# --- language modeling ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length, block_size", [(10, 4), (12, 4), (3, 4), (1024, 1024), (0, 8)])
def test_lm_blocks_sizes_and_round_trip(length, block_size):
    stream = list(range(100, 100 + length))
    blocks = lm_blocks(stream, block_size)
    assert [len(b) for b in blocks[:-1]] == [block_size] * (len(blocks) - 1)
    assert len(blocks) == -(-length // block_size)
    if blocks:
        assert 1 <= len(blocks[-1]) <= block_size and len(blocks[-1]) == length - block_size * (len(blocks) - 1)
    assert [t for b in blocks for t in b] == stream


def test_lm_blocks_rejects_bad_sizes():
    with pytest.raises(UserError, match="positive"):
        lm_blocks([1, 2, 3], 0)
    with pytest.raises(UserError, match="block_size 2048 exceeds the model's 1024 positions"):
        lm_blocks([1, 2, 3], 2048, max_positions=1024)
    assert lm_blocks([1, 2, 3], 1024, max_positions=1024) == [[1, 2, 3]]


@pytest.mark.parametrize("lines_per_call", [1, 3, 1000])
def test_tokenize_and_concatenate_equals_the_whole_text_byte_level(lines_per_call):
    tokenizer = byte_tokenizer("gpt2")
    lines = HUB_LINES["train"] + HUB_LINES["test"]
    stream = tokenize_and_concatenate(lines, tokenizer, lines_per_call=lines_per_call)
    whole = tokenizer("".join(lines), add_special_tokens=False)["input_ids"]
    assert stream == whole
    assert len(stream) == len("".join(lines).encode("utf-8"))  # one token per byte ("ō", "—" are multi-byte)
    assert tokenizer.eos_token_id not in stream
    assert tokenizer.decode(stream) == "".join(lines)


def test_tokenize_and_concatenate_with_gpt2_style_bpe_on_wikitext_lines():
    # A small BPE with GPT-2's byte-level regex pre-tokenizer, trained in memory: the per-line stream equals the
    # whole-text tokenization on WikiText lines (every non-blank line starts with a space).
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    lines = [line for split in ("train", "validation", "test") for line in HUB_LINES[split]]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["".join(lines)] * 3, vocab_size=400, min_frequency=1, show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    stream = tokenize_and_concatenate(lines, tokenizer, lines_per_call=2)
    assert len(stream) < len("".join(lines).encode("utf-8"))  # merges happened
    assert stream == tokenizer("".join(lines), add_special_tokens=False)["input_ids"]


def test_tokenize_and_concatenate_skips_blank_lines_and_adds_no_special_tokens():
    tokenizer = byte_tokenizer("t5")  # appends </s> unless told not to
    assert tokenize_and_concatenate(["", "", "ab\n", ""], tokenizer) == tokenizer("ab\n").input_ids[:-1]
    assert tokenize_and_concatenate(["", ""], tokenizer) == []
    with pytest.raises(UserError, match="lines_per_call"):
        tokenize_and_concatenate(["a"], tokenizer, lines_per_call=0)


def test_constants_match_the_spec():
    assert text_data.VALIDATION_FRACTION == 0.05 and text_data.MAX_VALIDATION_LINES == 1000
    assert (text_data.IMDB_MIN_WORDS, text_data.IMDB_MAX_WORDS) == (5, 50)
