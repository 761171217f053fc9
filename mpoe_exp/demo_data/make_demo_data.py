"""Regenerate the bundled demo data (deterministic): python -m mpoe_exp.demo_data.make_demo_data

A CoLA-like acceptability task in the GLUE download-script layout (glue/CoLA/train.tsv, dev.tsv: no header;
source, label, original label, sentence), a WikiText-like text corpus (wikitext2/{train,valid,test}.txt) and a
news-like one-sentence-per-line corpus for the generation tasks (news/{train,test}.txt, 200 and 50 lines, no
valid.txt: validation is carved out of train as for the Texygen EMNLP News files).
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


if __name__ == "__main__":
    main()
