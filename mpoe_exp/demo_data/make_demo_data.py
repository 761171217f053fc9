"""Regenerate the bundled demo data (deterministic): python -m mpoe_exp.demo_data.make_demo_data

A CoLA-like acceptability task in the GLUE download-script layout (glue/CoLA/train.tsv, dev.tsv: no header;
source, label, original label, sentence), a WikiText-like text corpus (wikitext2/{train,valid,test}.txt) and a
news-like one-sentence-per-line corpus for the generation tasks (news/{train,test}.txt, 200 and 50 lines, no
valid.txt: validation is carved out of train as for the Texygen EMNLP News files). For the smoke experiments
(conf/experiment/*_smoke.yaml) also the seven other GLUE tasks in the GLUE download-script layout (glue/SST-2, MRPC,
QQP, STS-B, MNLI, QNLI, RTE, with their headers; SST-2, QQP and QNLI have 1,100 training rows because the split rule
moves 1,000 of them to validation) and a review-like corpus for IMDB (imdb/{train,test}.txt).
Acceptable sentences follow a small grammar; unacceptable ones break subject-verb agreement or word order. It is
synthetic: enough to run the whole pipeline offline in a minute, not to measure anything.
"""

from __future__ import annotations

import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOUNS = ["cat", "dog", "teacher", "student", "farmer", "child", "doctor", "bird", "painter", "river"]
VERBS = ["sees", "likes", "follows", "helps", "paints", "finds", "calls", "watches"]
ADJECTIVES = ["old", "young", "quiet", "happy", "tall", "small", "clever", "brave"]


def sentence(rng: random.Random, acceptable: bool) -> str:
    subject, obj = rng.choice(NOUNS), rng.choice(NOUNS)
    adjective, verb = rng.choice(ADJECTIVES), rng.choice(VERBS)
    words = ["the", adjective, subject, verb, "the", obj]
    if not acceptable:
        if rng.random() < 0.5:
            words[3] = verb[:-1]  # "the dog see the cat": agreement broken
        else:
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
            if words == ["the", adjective, subject, verb, "the", obj]:
                words[3] = verb[:-1]
    return " ".join(words).capitalize() + "."


def main() -> None:
    rng = random.Random(42)
    cola = HERE / "glue" / "CoLA"
    cola.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", 400), ("dev", 120)):
        rows = []
        for _ in range(size):
            label = int(rng.random() < 0.6)
            rows.append(f"demo\t{label}\t{'' if label else '*'}\t{sentence(rng, bool(label))}")
        (cola / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    wiki = HERE / "wikitext2"
    wiki.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", 300), ("valid", 40), ("test", 40)):
        lines = []
        for k in range(size):
            if k % 20 == 0:
                lines += ["", f" = {rng.choice(NOUNS).capitalize()} {k // 20} = ", ""]
            lines.append(" " + " ".join(sentence(rng, True) for _ in range(rng.randint(2, 4))))
        (wiki / f"{split}.txt").write_text("\n".join(lines) + "\n")
    write_news(HERE / "news")
    write_glue_tasks(HERE / "glue")
    write_reviews(HERE / "imdb")


ADVERBS = ["today", "again", "at last", "every morning", "in the rain", "near the river"]


def news_sentence(rng: random.Random) -> str:
    """A lowercased, space-tokenized sentence in the style of the Texygen EMNLP News files."""
    words = sentence(rng, True).rstrip(".").lower().split()
    if rng.random() < 0.4:
        words += rng.choice(ADVERBS).split()
    if rng.random() < 0.3:
        words += ["and", "the", rng.choice(NOUNS), rng.choice(VERBS), "the", rng.choice(NOUNS)]
    return " ".join(words) + " ."


def write_news(folder: Path) -> None:
    """news/train.txt and news/test.txt from their own generator, so the files above never change."""
    rng = random.Random(2017)
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", 200), ("test", 50)):
        (folder / f"{split}.txt").write_text("\n".join(news_sentence(rng) for _ in range(size)) + "\n")


# --- the other GLUE tasks and IMDB (own generators, so the files above never change) ----------------------------

POSITIVE = ["good", "great", "wonderful", "lovely", "fine", "brilliant"]
NEGATIVE = ["bad", "awful", "boring", "dull", "poor", "terrible"]
NLI_NAMES = ("entailment", "neutral", "contradiction")
MNLI_TRAIN_HEADER = [
    "index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse",
    "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label",
]  # fmt: skip
MNLI_DEV_HEADER = [*MNLI_TRAIN_HEADER[:-1], "label2", "label3", "label4", "label5", "gold_label"]
STSB_HEADER = [
    "index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score",
]  # fmt: skip
# Rows per split: (train, dev). SST-2, QQP and QNLI need more than 1,000 training rows (the split rule's holdout).
GLUE_SIZES = {"SST-2": (1100, 60), "MRPC": (200, 60), "QQP": (1100, 60), "STS-B": (200, 60), "MNLI": (300, 60),
              "QNLI": (1100, 60), "RTE": (200, 60)}  # fmt: skip


def _tsv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join("\t".join(row) + "\n" for row in [header, *rows]))


def _pair(rng: random.Random) -> tuple[str, str, int]:
    """Two sentences and how much of the second repeats the first: 2 = same, 1 = same subject, 0 = unrelated."""
    first = sentence(rng, True)
    overlap = rng.randrange(3)
    if overlap == 2:
        second = first
    elif overlap == 1:
        second = " ".join(first.split()[:3] + [rng.choice(VERBS), "the", rng.choice(NOUNS)]) + "."
    else:
        second = sentence(rng, True)
    return first, second, overlap


def write_glue_tasks(root: Path) -> None:
    """SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE in the GLUE download-script layout, labels learnable from the text."""
    rng = random.Random(1234)
    for task, (train_size, dev_size) in GLUE_SIZES.items():
        for split, size in (("train", train_size), ("dev", dev_size)):
            rows = []
            for i in range(size):
                first, second, overlap = _pair(rng)
                if task == "SST-2":
                    label = int(rng.random() < 0.55)
                    words = POSITIVE if label else NEGATIVE
                    rows.append([f"{first[:-1].lower()} and it was {rng.choice(words)} .", str(label)])
                elif task == "MRPC":
                    rows.append([str(int(overlap == 2)), str(2 * i), str(2 * i + 1), first, second])
                elif task == "QQP":
                    q1, q2 = f"who {first[4:-1]}?", f"who {second[4:-1]}?"
                    rows.append([str(i), str(2 * i), str(2 * i + 1), q1, q2, str(int(overlap == 2))])
                elif task == "STS-B":
                    score = min(5.0, max(0.0, 2.0 * overlap + rng.uniform(0.0, 1.0)))
                    rows.append([str(i), "main-news", "demo", "2012", str(i), "none", "none", first, second,
                                 f"{score:.3f}"])  # fmt: skip
                elif task == "MNLI":
                    gold = NLI_NAMES[2 - overlap]
                    votes = [gold] * (len(MNLI_TRAIN_HEADER if split == "train" else MNLI_DEV_HEADER) - 10)
                    rows.append([str(i), str(i), f"{i}e", "demo", "(A)", "(B)", "(ROOT A)", "(ROOT B)", first, second,
                                 *votes])  # fmt: skip
                elif task == "QNLI":
                    question = f"what does {first.split()[2]} do?"
                    rows.append([str(i), question, second, "entailment" if overlap else "not_entailment"])
                else:  # RTE
                    rows.append([str(i), first, second, "entailment" if overlap == 2 else "not_entailment"])
            if task == "MNLI":
                names = ("train.tsv",) if split == "train" else ("dev_matched.tsv", "dev_mismatched.tsv")
                header = MNLI_TRAIN_HEADER if split == "train" else MNLI_DEV_HEADER
                half = len(rows) // 2
                parts = (rows,) if split == "train" else (rows[:half], rows[half:])
                for name, part in zip(names, parts):
                    _tsv(root / task / name, header, part)
                continue
            header = {
                "SST-2": ["sentence", "label"],
                "MRPC": ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                "QQP": ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                "STS-B": STSB_HEADER,
                "QNLI": ["index", "question", "sentence", "label"],
                "RTE": ["index", "sentence1", "sentence2", "label"],
            }[task]
            _tsv(root / task / f"{split}.tsv", header, rows)


def write_reviews(folder: Path) -> None:
    """imdb/train.txt and imdb/test.txt: one review-like sentence per line (5-50 words, as the IMDB task keeps)."""
    rng = random.Random(1999)
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", 200), ("test", 50)):
        lines = []
        for _ in range(size):
            opinion = rng.choice(POSITIVE + NEGATIVE)
            lines.append(f"the film about the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} was {opinion} .")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
