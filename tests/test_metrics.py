"""Metrics against their reference libraries: sklearn, scipy, torch cross-entropy and a direct nltk BLEU loop."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from scipy import stats
from sklearn import metrics as sk_metrics

from mpoe_exp.metrics import (
    GLUE_MAIN_METRIC,
    GLUE_TASK_METRICS,
    STSB_UNPARSABLE_VALUE,
    BleuResult,
    accuracy,
    bleu,
    f1,
    glue_metrics,
    matthews_correlation,
    pearson,
    perplexity,
    sacrebleu_corpus,
    self_bleu,
    spearman,
    tokenize,
)

GLUE_TASKS = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]


def random_labels(num: int, num_classes: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(0, num_classes, size=num)]


# ---------------------------------------------------------------------------------------------------------------
# Classification and regression
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 3])
def test_classification_metrics_match_sklearn(num_classes: int):
    references = random_labels(200, num_classes, seed=1)
    predictions = random_labels(200, num_classes, seed=2)
    assert accuracy(predictions, references) == pytest.approx(sk_metrics.accuracy_score(references, predictions))
    assert matthews_correlation(predictions, references) == pytest.approx(
        sk_metrics.matthews_corrcoef(references, predictions)
    )
    if num_classes == 2:
        assert f1(predictions, references) == pytest.approx(sk_metrics.f1_score(references, predictions))
        assert f1(predictions, references, positive_label=0) == pytest.approx(
            sk_metrics.f1_score(references, predictions, pos_label=0)
        )


def test_correlations_match_scipy():
    rng = np.random.default_rng(3)
    references = rng.uniform(0, 5, size=300)
    predictions = references + rng.normal(0, 1.5, size=300)
    assert pearson(list(predictions), list(references)) == pytest.approx(stats.pearsonr(predictions, references)[0])
    assert spearman(list(predictions), list(references)) == pytest.approx(stats.spearmanr(predictions, references)[0])


def test_unparsable_predictions_count_as_wrong():
    references = [0, 1, 1, 0, 1, 0]
    predictions = [0, 1, None, None, 1, 0]
    assert accuracy(predictions, references) == pytest.approx(4 / 6)
    # All-None never matches, even where a sentinel could collide with a label.
    assert accuracy([None] * 6, references) == 0.0
    # F1 of class 1: TP=2, FP=0, FN=1 (the None on a positive); the None on a negative is no false positive.
    assert f1(predictions, references) == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))
    # MCC treats None as a third class that matches nothing.
    assert matthews_correlation(predictions, references) == pytest.approx(
        sk_metrics.matthews_corrcoef(references, [0, 1, -1, -1, 1, 0])
    )
    # String labels work too (sentinel of the same type).
    assert accuracy(["a", None, "b"], ["a", "a", "b"]) == pytest.approx(2 / 3)


def test_degenerate_inputs_do_not_crash():
    references = [0, 1, 0, 1, 1]
    assert matthews_correlation([1] * 5, references) == 0.0
    assert matthews_correlation([1] * 5, [1] * 5) == 0.0  # sklearn's convention for a single class
    assert f1([0] * 5, [0] * 5) == 0.0  # no positives anywhere
    assert pearson([2.0] * 5, [0.0, 1.0, 2.0, 3.0, 4.0]) == 0.0
    assert spearman([0.0, 1.0, 2.0, 3.0, 4.0], [2.0] * 5) == 0.0
    assert pearson([1.0], [2.0]) == 0.0
    with pytest.raises(ValueError, match="pair up"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_glue_metrics_keys_and_scaling():
    for task in GLUE_TASKS:
        references = [1.0, 2.5, 4.0, 0.2] if task == "stsb" else [0, 1, 1, 0]
        predictions = [1.2, 2.0, None, 0.0] if task == "stsb" else [0, 1, None, 1]
        result = glue_metrics(task, predictions, references)
        assert set(result) == set(GLUE_TASK_METRICS[task]) | {"unparsable"}
        assert result["unparsable"] == 1
        assert GLUE_MAIN_METRIC[task] in result
    assert set(glue_metrics("cola", [0], [0])) == {"mcc", "unparsable"}
    assert set(glue_metrics("stsb", [1.0, 2.0], [1.0, 3.0])) == {"pearson", "spearman", "unparsable"}
    assert set(glue_metrics("mrpc", [0], [0])) == set(glue_metrics("qqp", [0], [0])) == {"accuracy", "f1", "unparsable"}
    for task in ("sst2", "rte", "qnli", "mnli"):
        assert set(glue_metrics(task, [0], [0])) == {"accuracy", "unparsable"}
    assert GLUE_MAIN_METRIC == {
        "cola": "mcc",
        "stsb": "pearson",
        **{task: "accuracy" for task in ("sst2", "mrpc", "qqp", "mnli", "qnli", "rte")},
    }

    result = glue_metrics("mrpc", [0, 1, None, 1], [0, 1, 1, 0])
    assert result["accuracy"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * f1([0, 1, None, 1], [0, 1, 1, 0]))
    assert glue_metrics("SST-2", [1], [1])["accuracy"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_metrics("wnli", [0], [0])


def test_stsb_unparsable_is_scored_as_documented_value():
    references = [0.4, 1.8, 3.2, 4.6, 2.2]
    predictions = [0.5, None, 3.0, 4.4, 2.0]
    filled = [STSB_UNPARSABLE_VALUE if p is None else p for p in predictions]
    result = glue_metrics("stsb", predictions, references)
    assert result["pearson"] == pytest.approx(100 * stats.pearsonr(filled, references)[0])
    assert result["spearman"] == pytest.approx(100 * stats.spearmanr(filled, references)[0])
    assert result["unparsable"] == 1
    assert result["pearson"] < glue_metrics("stsb", [0.5, 1.6, 3.0, 4.4, 2.0], references)["pearson"]


# ---------------------------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------------------------


def test_perplexity_matches_torch_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 50, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,), generator=generator)
    total_nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
    expected = torch.exp(torch.nn.functional.cross_entropy(logits, targets)).item()
    assert perplexity(total_nll, 37) == pytest.approx(expected, rel=1e-12)
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(1e6, 1) == math.inf
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_tokens"):
            perplexity(1.0, bad)


# ---------------------------------------------------------------------------------------------------------------
# BLEU and Self-BLEU
# ---------------------------------------------------------------------------------------------------------------

VOCABULARY = [f"w{i}" for i in range(30)]


def random_corpus(num: int, seed: int, max_length: int = 12) -> list[list[str]]:
    """Sentences over a small vocabulary: lengths 0..max_length (length 1 and 0 included) with repeated n-grams."""
    rng = random.Random(seed)
    corpus = []
    for i in range(num):
        length = [0, 1, 2, 3][i] if i < 4 else rng.randint(1, max_length)
        # A skewed word distribution makes repeated unigrams/bigrams (and clipping) common.
        sentence = [rng.choice(VOCABULARY[: rng.choice([4, 10, 30])]) for _ in range(length)]
        if i % 5 == 0 and length >= 4:
            sentence[2:4] = sentence[0:2]  # an explicit repeated bigram
        corpus.append(sentence)
    return corpus


def nltk_bleu(hypotheses: list[list[str]], references: list[list[str]], n: int) -> float:
    """The Texygen loop itself: sentence_bleu of every hypothesis against all references, averaged, x100."""
    weight = tuple(1.0 / n for _ in range(n))
    smoothing = SmoothingFunction().method1
    scores = [sentence_bleu(references, h, weight, smoothing_function=smoothing) for h in hypotheses]
    return 100.0 * sum(scores) / len(scores)


def nltk_self_bleu(samples: list[list[str]], n: int) -> float:
    weight = tuple(1.0 / n for _ in range(n))
    smoothing = SmoothingFunction().method1
    scores = [
        sentence_bleu(samples[:i] + samples[i + 1 :], s, weight, smoothing_function=smoothing)
        for i, s in enumerate(samples)
    ]
    return 100.0 * sum(scores) / len(scores)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_bleu_equals_nltk_sentence_bleu_loop(n: int, seed: int):
    hypotheses = random_corpus(40, seed=100 + seed)
    references = random_corpus(60, seed=200 + seed)
    result = bleu(hypotheses, references, n)
    assert isinstance(result, BleuResult)
    assert result.score == pytest.approx(nltk_bleu(hypotheses, references, n), abs=1e-9)
    assert (result.n, result.num_hypotheses, result.num_references) == (n, 40, 60)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_self_bleu_equals_nltk_loop_over_other_samples(n: int, seed: int):
    samples = random_corpus(45, seed=300 + seed, max_length=8)
    samples += [list(samples[5]), list(samples[7])]  # exact duplicates: a sample's max count shared with another
    result = self_bleu(samples, n)
    assert result.score == pytest.approx(nltk_self_bleu(samples, n), abs=1e-9)
    assert (result.num_hypotheses, result.num_references) == (len(samples), len(samples) - 1)


def test_self_bleu_excludes_self_when_it_alone_holds_the_max():
    # "a a a" alone holds the max count 3 of "a" and the only length 3; excluding it must fall back to 2 and 2.
    samples = [["a", "a", "a"], ["a", "a"], ["b", "a"], ["b"]]
    assert self_bleu(samples, 2).score == pytest.approx(nltk_self_bleu(samples, 2), abs=1e-12)
    assert self_bleu(samples, 1).score == pytest.approx(nltk_self_bleu(samples, 1), abs=1e-12)


def test_bleu_caps_take_the_first_k():
    hypotheses = random_corpus(40, seed=7)
    references = random_corpus(60, seed=8)
    result = bleu(hypotheses, references, 2, max_hypotheses=15, max_references=25)
    assert (result.num_hypotheses, result.num_references) == (15, 25)
    assert result.score == pytest.approx(nltk_bleu(hypotheses[:15], references[:25], 2), abs=1e-9)
    assert result.as_dict() == {"score": result.score, "n": 2, "hypotheses": 15, "references": 25}
    # Caps larger than the data keep everything.
    assert bleu(hypotheses, references, 2, max_hypotheses=1000).num_hypotheses == 40

    capped = self_bleu(hypotheses, 2, max_samples=20)
    assert (capped.num_hypotheses, capped.num_references) == (20, 19)
    assert capped.score == pytest.approx(nltk_self_bleu(hypotheses[:20], 2), abs=1e-9)


def test_bleu_edge_cases():
    references = [["a", "b", "c"], ["a", "b"]]
    assert bleu([["a", "b", "c"]], references, 3).score == pytest.approx(100.0)
    assert bleu([[]], references, 2).score == 0.0  # empty hypothesis: nltk returns 0
    assert bleu([["z", "z"]], references, 2).score == 0.0  # no unigram match: 0 before smoothing
    assert bleu([["a"]], references, 4).score == pytest.approx(nltk_bleu([["a"]], references, 4), abs=1e-12)
    with pytest.raises(ValueError, match="reference"):
        bleu([["a"]], [], 2)
    with pytest.raises(ValueError, match="hypothes"):
        bleu([], references, 2)
    with pytest.raises(ValueError, match="order"):
        bleu([["a"]], references, 0)
    with pytest.raises(ValueError, match="max_references"):
        bleu([["a"]], references, 2, max_references=0)
    with pytest.raises(ValueError, match="two samples"):
        self_bleu([["a"]], 2)


def test_tokenize_needs_no_nltk_data():
    assert tokenize("Don't stop, it's 5 o'clock!") == [
        "Do",
        "n't",
        "stop",
        ",",
        "it",
        "'s",
        "5",
        "o",
        "'",
        "clock",
        "!",
    ]
    assert tokenize("The CAT sat.", lowercase=True) == ["the", "cat", "sat", "."]
    assert tokenize("  ") == []


def test_bleu_on_a_full_size_reference_set():
    """Its time is a benchmark, not a test: benchmarks/wall_time.py (BENCHMARKS.md, "Wall-clock time")."""
    rng = random.Random(11)
    vocabulary = [f"w{i}" for i in range(2000)]

    def sentence() -> list[str]:
        return [rng.choice(vocabulary[: rng.choice([50, 500, 2000])]) for _ in range(rng.randint(15, 25))]

    hypotheses = [sentence() for _ in range(300)]
    references = [sentence() for _ in range(2000)]
    result = bleu(hypotheses, references, 4)
    assert (result.num_hypotheses, result.num_references) == (300, 2000)
    # Spot check against nltk on a few hypotheses with the full reference set (the whole loop would take minutes).
    assert bleu(hypotheses[:3], references, 4).score == pytest.approx(
        nltk_bleu(hypotheses[:3], references, 4), abs=1e-9
    )


def test_sacrebleu_corpus_is_sacrebleus_own_corpus_bleu_against_the_pooled_references():
    import sacrebleu

    rng = random.Random(5)
    words = "the a cat dog sees runs home , . quickly and it is".split()
    references = [" ".join(rng.choices(words, k=rng.randint(3, 14))) for _ in range(30)]
    hypotheses = [" ".join(rng.choices(words, k=rng.randint(0, 12))) for _ in range(12)] + [references[0], ""]
    result = sacrebleu_corpus(hypotheses, references)
    scorer = sacrebleu.BLEU()
    expected = scorer.corpus_score(hypotheses, [[r] * len(hypotheses) for r in references])
    assert result.score == pytest.approx(expected.score, abs=1e-9) and 0 < result.score < 100
    assert result.signature == str(scorer.get_signature())
    assert result.signature.startswith("nrefs:30|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert sacrebleu_corpus(references[:3], references[:3]).score == pytest.approx(100.0)
    with pytest.raises(ValueError, match="at least one reference"):
        sacrebleu_corpus(hypotheses, [])
