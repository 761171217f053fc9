"""Evaluation metrics: GLUE classification/regression, perplexity, BLEU-n and Self-BLEU-n (paper section 4.1;
docs/method.md, 'Metrics' and 'Language modelling and generation').

Pure functions on predictions, references and token lists; no model or data code. Scores the paper reports are
x100 (percent): `glue_metrics`, `bleu` and `self_bleu` return them that way, the single-metric helpers
(`accuracy`, `pearson`, ...) return fractions as their libraries do.

BLEU follows Texygen (Zhu et al., 2018), the reference for the generation tables: every hypothesis is scored with
nltk's `sentence_bleu` against the WHOLE reference set, equal weights over 1..n, smoothing `method1`, and the
sentence scores are averaged. A pure-Python loop over nltk costs O(hypotheses x references) Counter builds, hours
for a full test set, so `bleu` and `self_bleu` precompute once per reference set the maximum count of every n-gram
in any single reference (all that BLEU's clipping needs) and the reference lengths, and then score each hypothesis
in O(its length). The arithmetic mirrors nltk 3.x step by step, so the results equal nltk's to rounding.

Beside it, `sacrebleu_corpus` gives sacreBLEU's corpus BLEU (BLEU-4, its 13a tokenizer on detokenized text,
exponential smoothing) with its signature, the number other papers can compare against: every hypothesis is scored
against the same pooled references as Texygen's (each reference sentence a reference of every hypothesis), the
n-gram statistics summed over the corpus.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn import metrics as sk_metrics

from mpoe_exp.glue_tasks import GLUE

Label = int | str
Ngram = tuple[str, ...]

# ----------------------------------------------------------------------------------------------------------------
# Classification and regression (GLUE)
# ----------------------------------------------------------------------------------------------------------------

# T5's `string_to_float` postprocessor maps an unparsable STS-B output to -1.0: outside the [0, 5] label range, so it
# can never be right by accident, and it depends on neither the references nor the other predictions.
STSB_UNPARSABLE_VALUE = -1.0
UNPARSABLE_TEXT_LABEL = "<unparsable>"

GLUE_TASK_METRICS: dict[str, tuple[str, ...]] = {name: t.metrics for name, t in GLUE.items()}  # glue_tasks.py
# The one number per task that enters the GLUE average (docs/method.md, 'Metrics').
GLUE_MAIN_METRIC: dict[str, str] = {name: t.main_metric for name, t in GLUE.items()}


def _check_pair(predictions: Sequence[object], references: Sequence[object]) -> None:
    """Raise a ValueError when the two sequences are empty or of different lengths."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references; they must pair up")
    if len(references) == 0:
        raise ValueError("cannot score an empty set of predictions")


def _replace_unparsable(predictions: Sequence[Label | None], references: Sequence[Label]) -> tuple[list[Label], int]:
    """Predictions with None replaced by a label that is no valid one, and how many were replaced."""
    known = [x for x in (*predictions, *references) if x is not None]
    numeric = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in known)
    # Same type as the real labels, or sklearn refuses the mix ("Mix of label input types").
    invalid: Label = int(min(known, default=0)) - 1 if numeric else UNPARSABLE_TEXT_LABEL
    replaced = [invalid if p is None else p for p in predictions]
    return replaced, sum(p is None for p in predictions)


def accuracy(predictions: Sequence[Label | None], references: Sequence[Label]) -> float:
    """Fraction of predictions equal to their reference; None (unparsable) is always wrong."""
    _check_pair(predictions, references)
    replaced, _ = _replace_unparsable(predictions, references)
    return float(sk_metrics.accuracy_score(references, replaced))


def matthews_correlation(predictions: Sequence[Label | None], references: Sequence[Label]) -> float:
    """Matthews correlation coefficient (sklearn; 0.0 when undefined); None becomes an extra, never-correct class."""
    _check_pair(predictions, references)
    replaced, _ = _replace_unparsable(predictions, references)
    with warnings.catch_warnings():
        # One label in both lists (constant predictions equal to constant references): sklearn returns 0.0 and warns
        # about the confusion-matrix shape, which is expected here and not worth a warning per evaluation.
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        return float(sk_metrics.matthews_corrcoef(references, replaced))


def f1(predictions: Sequence[Label | None], references: Sequence[Label], positive_label: Label = 1) -> float:
    """F1 of `positive_label` (sklearn; 0.0 when undefined); None is a prediction of no valid class."""
    _check_pair(predictions, references)
    replaced, _ = _replace_unparsable(predictions, references)
    # labels=[positive] with micro averaging is the binary F1 of that class, and stays valid when the extra
    # "unparsable" class makes the problem look multiclass to sklearn's average="binary" check.
    score = sk_metrics.f1_score(references, replaced, labels=[positive_label], average="micro", zero_division=0.0)
    return float(score)


def _is_constant(values: np.ndarray) -> bool:
    """True for fewer than two values or all values equal (a correlation is then undefined)."""
    return values.size < 2 or bool(np.all(values == values[0]))


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation (scipy); 0.0 when either side is constant."""
    _check_pair(predictions, references)
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    # scipy returns NaN (with a warning) for constant input; a model that predicts one value carries no linear
    # information about the references, so 0.0 is the honest score and keeps the GLUE average finite.
    if _is_constant(x) or _is_constant(y):
        return 0.0
    return float(stats.pearsonr(x, y).statistic)


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation (scipy); 0.0 when either side is constant."""
    _check_pair(predictions, references)
    x, y = np.asarray(predictions, dtype=np.float64), np.asarray(references, dtype=np.float64)
    # As in `pearson`: constant input has no ranking information, scipy would return NaN.
    if _is_constant(x) or _is_constant(y):
        return 0.0
    return float(stats.spearmanr(x, y).statistic)


def glue_metrics(
    task: str, predictions: Sequence[Label | float | None], references: Sequence[Label | float]
) -> dict[str, float]:
    """The task's GLUE metrics x100 (keys in GLUE_TASK_METRICS) plus "unparsable", the count of None predictions.

    Classification tasks take integer label ids; a None prediction counts as wrong (for MCC and F1 it is an extra
    class that matches no reference). STS-B takes float scores; a None prediction is scored as
    STSB_UNPARSABLE_VALUE (-1.0, T5's `string_to_float` default), outside the [0, 5] label range.
    """
    name = task.lower().replace("-", "")
    if name not in GLUE_TASK_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; expected one of {sorted(GLUE_TASK_METRICS)}")
    _check_pair(predictions, references)
    unparsable = sum(p is None for p in predictions)
    if name == "stsb":
        scores = [STSB_UNPARSABLE_VALUE if p is None else float(p) for p in predictions]
        values = {"pearson": pearson(scores, references), "spearman": spearman(scores, references)}
    else:
        functions = {"accuracy": accuracy, "mcc": matthews_correlation, "f1": f1}
        values = {metric: functions[metric](predictions, references) for metric in GLUE_TASK_METRICS[name]}
    return {**{metric: 100.0 * value for metric, value in values.items()}, "unparsable": unparsable}


# ----------------------------------------------------------------------------------------------------------------
# Language modelling
# ----------------------------------------------------------------------------------------------------------------


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(mean token negative log-likelihood, in nats); inf if that overflows a float."""
    if num_tokens <= 0:
        raise ValueError(f"perplexity needs at least one scored token, got num_tokens={num_tokens}")
    try:
        return math.exp(total_nll / num_tokens)
    except OverflowError:  # mean NLL > ~709 nats: an untrained or diverged model; report inf rather than crash
        return math.inf


# ----------------------------------------------------------------------------------------------------------------
# Generation: BLEU-n and Self-BLEU-n (Texygen definition)
# ----------------------------------------------------------------------------------------------------------------

# Words (with Treebank-style clitics split off: "don't" -> "do" "n't", "it's" -> "it" "'s") or single punctuation
# marks. Texygen uses nltk.word_tokenize, which needs the downloaded punkt model; this needs nothing and agrees with
# it on ordinary text. Scores from different tokenizers are not comparable: tokenize samples and references alike.
_TOKEN_PATTERN = re.compile(r"\w+(?=n't\b)|n't\b|'(?:s|re|ve|ll|d|m)\b|\w+|[^\w\s]", re.IGNORECASE)

# Smoothing method1 of nltk's SmoothingFunction: epsilon added to the numerator of a zero-count precision.
_METHOD1_EPSILON = 0.1


def tokenize(text: str, lowercase: bool = False) -> list[str]:
    """Split text into words, clitics and punctuation marks with a regex (no nltk data needed); case kept by default."""
    return _TOKEN_PATTERN.findall(text.lower() if lowercase else text)


@dataclass(frozen=True)
class BleuResult:
    """A BLEU-n or Self-BLEU-n score (x100) and how many hypotheses and references per hypothesis it used."""

    score: float
    n: int
    num_hypotheses: int
    num_references: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for results.json: score, n, hypotheses, references."""
        return {"score": self.score, "n": self.n, "hypotheses": self.num_hypotheses, "references": self.num_references}


def _ngram_counts(tokens: Sequence[str], order: int) -> Counter[Ngram]:
    """Counts of the n-grams of one order in a token list (empty when it is shorter than the order)."""
    return Counter(zip(*(tokens[i:] for i in range(order))))


def _check_order(n: int) -> None:
    """Raise a ValueError unless n is a positive n-gram order."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"BLEU order n must be a positive integer, got {n!r}")


def _cap(items: Sequence[Sequence[str]], limit: int | None, what: str) -> Sequence[Sequence[str]]:
    """The first `limit` items (all when None), refusing an empty result."""
    if limit is not None and limit < 1:
        raise ValueError(f"max_{what} must be a positive integer or None, got {limit}")
    capped = items if limit is None else items[:limit]
    if len(capped) == 0:
        raise ValueError(f"BLEU needs at least one {what[:-1]}, got none")
    return capped


def _closest_length(hypothesis_length: int, reference_lengths: Sequence[int]) -> int:
    """Reference length closest to the hypothesis length, ties to the shorter (nltk's closest_ref_length)."""
    return min(reference_lengths, key=lambda length: (abs(length - hypothesis_length), length))


def _sentence_bleu(
    hypothesis: Sequence[str],
    hypothesis_counts: Sequence[Counter[Ngram]],
    clip_counts: Sequence[dict[Ngram, int]],
    closest_reference_length: int,
) -> float:
    """nltk sentence_bleu with equal weights and method1 smoothing, from precomputed clipping counts.

    hypothesis_counts[k] and clip_counts[k] are the order-(k+1) n-gram counts of the hypothesis and, for each of its
    n-grams, the maximum count in any single reference (absent = 0).
    """
    n = len(hypothesis_counts)
    numerators, denominators = [], []
    for counts, clips in zip(hypothesis_counts, clip_counts):
        numerators.append(sum(min(count, clips.get(ngram, 0)) for ngram, count in counts.items()))
        denominators.append(max(1, sum(counts.values())))
    # nltk returns 0 outright when no unigram matches, before any smoothing.
    if numerators[0] == 0:
        return 0.0
    hypothesis_length = len(hypothesis)
    if hypothesis_length > closest_reference_length:
        brevity_penalty = 1.0
    else:  # hypothesis_length > 0 here: an empty hypothesis has no unigram match
        brevity_penalty = math.exp(1 - closest_reference_length / hypothesis_length)
    weight = 1.0 / n  # Texygen: tuple(1. / ngram for _ in range(ngram))
    # int / int is correctly rounded in Python, so this equals float() of nltk's Fraction precisions exactly.
    precisions = [
        (num / den) if num != 0 else (num + _METHOD1_EPSILON) / den for num, den in zip(numerators, denominators)
    ]
    return brevity_penalty * math.exp(math.fsum(weight * math.log(p) for p in precisions))


def bleu(
    hypotheses: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
    n: int,
    max_hypotheses: int | None = None,
    max_references: int | None = None,
) -> BleuResult:
    """Texygen BLEU-n x100: mean over hypotheses of nltk sentence_bleu against all references (method1 smoothing).

    Inputs are token lists. `max_hypotheses` / `max_references` keep the first K of each (deterministic); Texygen's
    "fast" BLEU keeps the first 500 references and scores every hypothesis.
    """
    _check_order(n)
    hypotheses = _cap(hypotheses, max_hypotheses, "hypotheses")
    references = _cap(references, max_references, "references")

    # Clipping needs only max over references of each n-gram's count, so one table per order replaces the
    # per-hypothesis loop over all references that nltk does.
    clip_counts: list[dict[Ngram, int]] = [{} for _ in range(n)]
    for reference in references:
        for order, clips in enumerate(clip_counts, start=1):
            for ngram, count in _ngram_counts(reference, order).items():
                if count > clips.get(ngram, 0):
                    clips[ngram] = count
    reference_lengths = sorted({len(reference) for reference in references})

    total = 0.0
    for hypothesis in hypotheses:
        counts = [_ngram_counts(hypothesis, order) for order in range(1, n + 1)]
        closest = _closest_length(len(hypothesis), reference_lengths)
        total += _sentence_bleu(hypothesis, counts, clip_counts, closest)
    return BleuResult(
        score=100.0 * total / len(hypotheses), n=n, num_hypotheses=len(hypotheses), num_references=len(references)
    )


def self_bleu(samples: Sequence[Sequence[str]], n: int, max_samples: int | None = None) -> BleuResult:
    """Texygen Self-BLEU-n x100: mean over samples of nltk sentence_bleu against all OTHER samples (method1).

    `max_samples` keeps the first K samples, which are then both hypotheses and references; Texygen's "fast"
    Self-BLEU (its default) keeps the first 500, each scored against the other 499. (Texygen's non-parallel
    `get_bleu` leaves each sample among its own references, which scores ~100; that is a bug we do not copy.)
    """
    _check_order(n)
    samples = _cap(samples, max_samples, "samples")
    if len(samples) < 2:
        raise ValueError(
            f"Self-BLEU needs at least two samples (each is scored against the others), got {len(samples)}"
        )

    sample_counts = [[_ngram_counts(sample, order) for order in range(1, n + 1)] for sample in samples]
    top, top_holders, runner_up = _largest_counts(sample_counts, n)
    length_multiplicity = Counter(len(sample) for sample in samples)
    all_lengths = sorted(length_multiplicity)

    total = 0.0
    for sample, counts_by_order in zip(samples, sample_counts):
        # Clipping counts over the other samples, for this sample's own n-grams only (all that is looked up).
        clips = [
            {
                ngram: (
                    runner_up[k].get(ngram, 0)
                    if count == top[k][ngram] and top_holders[k][ngram] == 1
                    else top[k][ngram]
                )
                for ngram, count in counts.items()
            }
            for k, counts in enumerate(counts_by_order)
        ]
        own_length = len(sample)
        other_lengths = (
            [length for length in all_lengths if length != own_length]
            if length_multiplicity[own_length] == 1
            else all_lengths
        )
        closest = _closest_length(own_length, other_lengths)
        total += _sentence_bleu(sample, counts_by_order, clips, closest)
    return BleuResult(
        score=100.0 * total / len(samples), n=n, num_hypotheses=len(samples), num_references=len(samples) - 1
    )


def _largest_counts(
    sample_counts: list[list[Counter]], n: int
) -> tuple[list[dict[Ngram, int]], list[dict[Ngram, int]], list[dict[Ngram, int]]]:
    """Per order and n-gram: the largest count in any sample, how many samples reach it, and the second largest
    count (over the remaining samples). Leaving sample i out changes the maximum only where i alone holds it."""
    top: list[dict[Ngram, int]] = [{} for _ in range(n)]
    top_holders: list[dict[Ngram, int]] = [{} for _ in range(n)]
    runner_up: list[dict[Ngram, int]] = [{} for _ in range(n)]
    for counts_by_order in sample_counts:
        for k, counts in enumerate(counts_by_order):
            best, holders, second = top[k], top_holders[k], runner_up[k]
            for ngram, count in counts.items():
                current = best.get(ngram, 0)
                if count > current:
                    if current > 0:
                        second[ngram] = current
                    best[ngram], holders[ngram] = count, 1
                elif count == current:
                    holders[ngram] += 1
                elif count > second.get(ngram, 0):
                    second[ngram] = count
    return top, top_holders, runner_up


@dataclass(frozen=True)
class SacreBleuResult:
    """sacreBLEU corpus BLEU (x100) and its signature (which says references, case, tokenizer, smoothing, version)."""

    score: float
    signature: str


def sacrebleu_corpus(hypotheses: Sequence[str], references: Sequence[str]) -> SacreBleuResult:
    """sacreBLEU's default corpus BLEU of `hypotheses` (strings), each scored against all of `references` (strings).

    Equal to `sacrebleu.corpus_bleu(hypotheses, [[r] * len(hypotheses) for r in references])`; the references' n-gram
    counts are extracted once rather than once per hypothesis (500 x 500 sentences in seconds, not minutes).
    """
    from sacrebleu.metrics import BLEU

    if not references:
        raise ValueError("sacreBLEU needs at least one reference, got none")
    scorer = BLEU()
    try:
        reference_info = scorer._extract_reference_info([scorer._preprocess_segment(r) for r in references])
        stats = [scorer._compute_segment_statistics(scorer._preprocess_segment(h), reference_info) for h in hypotheses]
        scorer.num_refs = len(references)
        result = scorer._aggregate_and_compute(stats)
    except AttributeError:  # a sacrebleu without these internals: the public API, slower
        result = scorer.corpus_score(list(hypotheses), [[r] * len(hypotheses) for r in references])
    return SacreBleuResult(score=float(result.score), signature=str(scorer.get_signature()))
