"""Unconditional generation (EMNLP News, IMDB) and WikiText-2 sample BLEU: the task unit by unit, then end to end
with tiny-gpt2 on the bundled demo news corpus, a small IMDB-like fixture and the demo WikiText."""

from __future__ import annotations

import json
import math
import re

import pytest
import sacrebleu
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from mpoe_exp import compose_config, metrics
from mpoe_exp.config import DEMO_DATA_DIR, run_spec
from mpoe_exp.errors import UserError
from mpoe_exp.models import build_model
from mpoe_exp.results import RESULTS_FILE
from mpoe_exp.runner import run
from mpoe_exp.spec import GenerationSpec
from mpoe_exp.tasks import generation
from mpoe_exp.tasks.generation import GenerationTask, generate_samples, sample_and_score, score_samples
from mpoe_exp.tasks.tasks import build_task

NEWS = DEMO_DATA_DIR / "news"
SMALL = [
    "model=tiny-gpt2",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.eval_batch_size=16",
]
NEWS_RUN = [*SMALL, "task=emnlp_news", f"data_dir={NEWS}", "task.num_samples=8", "task.max_length=24"]


def nltk_bleu(samples: list[str], references: list[str], n: int) -> float:
    """Texygen BLEU-n x100 straight from nltk: each sample against all references, method1, averaged."""
    refs = [metrics.tokenize(r) for r in references]
    smooth = SmoothingFunction().method1
    weights = (1.0 / n,) * n
    return 100 * sum(sentence_bleu(refs, metrics.tokenize(s), weights, smooth) for s in samples) / len(samples)


def nltk_self_bleu(samples: list[str], n: int) -> float:
    """Texygen Self-BLEU-n x100 straight from nltk: each sample against all the others."""
    return sum(nltk_bleu([s], samples[:i] + samples[i + 1 :], n) for i, s in enumerate(samples)) / len(samples)


def check_scores_of_saved_samples(test: dict, references: list[str], bleu_n, self_bleu_n) -> None:
    """The run's scores, recomputed from the samples its results.json keeps, with nltk and sacrebleu directly."""
    samples = test["samples"]
    assert len(samples) == test["num_samples"] == test["bleu_hypotheses"]
    for n in bleu_n:
        assert test[f"bleu{n}"] == pytest.approx(nltk_bleu(samples, references, n), rel=1e-9, abs=1e-12)
    for n in self_bleu_n:
        assert test[f"self_bleu{n}"] == pytest.approx(nltk_self_bleu(samples, n), rel=1e-9, abs=1e-12)
    scorer = sacrebleu.BLEU()
    expected = scorer.corpus_score(samples, [[r] * len(samples) for r in references])
    assert test["sacrebleu"] == pytest.approx(expected.score, rel=1e-9, abs=1e-12)
    assert test["sacrebleu_signature"] == str(scorer.get_signature())


def sampling_cfg(**overrides):
    """A generation task's spec with these sampling settings."""
    sampling = {
        "num_samples": 6,
        "top_k": 50,
        "bleu_n": [2, 3],
        "self_bleu_n": [2],
        "max_references": 500,
        "sample_batch_size": 4,
    }
    task = {"type": "generation", "name": "imdb", "families": ["gpt2"], "data_seed": 0, "text_task": "imdb"}
    return GenerationSpec.from_mapping({**task, "max_length": 32, **sampling, **overrides})


@pytest.fixture(scope="module")
def tiny_model():
    cfg = compose_config(["model=tiny-gpt2", "method=mpoe"])
    torch.manual_seed(0)
    model, tokenizer = build_model(run_spec(cfg))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def news_run(tmp_path_factory):
    """results.json of a demo-news run, cached per (method, extra overrides, runs_dir name)."""
    cache = {}

    def get(method: str, *extra: str, where: str = "a") -> dict:
        key = (method, extra, where)
        if key not in cache:
            runs = tmp_path_factory.mktemp(f"runs-{where}")
            directory = run(compose_config([*NEWS_RUN, f"method={method}", *extra, f"runs_dir={runs}"]))
            cache[key] = json.loads((directory / RESULTS_FILE).read_text())
        return cache[key]

    return get


# --- the task, unit by unit ------------------------------------------------------------------------------------


def test_sentences_become_start_tokens_end_sequences_cut_at_max_length():
    cfg = compose_config(["model=tiny-gpt2", "task=emnlp_news", f"data_dir={NEWS}", "task.max_length=40"])
    _, tokenizer = build_model(run_spec(cfg))
    task = build_task(run_spec(cfg), tokenizer)
    assert isinstance(task, GenerationTask)
    assert task.split_sizes == {"train": 190, "validation": 10, "test": 50}
    eot = tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(eot) == "<|endoftext|>" and task.start_id == eot
    short = task.encode(["the cat ."])[0]
    assert short == [eot, *tokenizer("the cat .").input_ids, eot]
    long = task.encode(["x" * 100])[0]
    assert len(long) == 40 and long[0] == eot and long[-1] != eot  # cut: no end token
    assert task.truncated["test"] == sum(len(s) + 2 > 40 for s in task.texts["test"])

    batch = task.collate([{"input_ids": short}, {"input_ids": long}])
    assert batch["input_ids"].shape == (2, 40)
    # GPT-2 pads with its end token: labels are masked by the attention mask, so the real end token stays a label.
    assert batch["labels"][0, len(short) - 1] == eot
    assert (batch["labels"][0, len(short) :] == -100).all()
    assert (batch["attention_mask"][0, len(short) :] == 0).all() and batch["attention_mask"][1].all()


def test_validation_perplexity_is_mean_nll_over_predicted_tokens(tiny_model):
    cfg = compose_config(["model=tiny-gpt2", "task=emnlp_news", f"data_dir={NEWS}", "task.max_length=24"])
    model, tokenizer = tiny_model
    task = build_task(run_spec(cfg), tokenizer)
    with torch.no_grad():
        result = task.evaluate(model, "validation", 4, "cpu")
        assert set(result) == {"perplexity", "nll", "tokens"}  # no sampling outside the test split
        assert result["tokens"] == sum(len(s) - 1 for s in task.sequences["validation"])
        total = 0.0
        for seq in task.sequences["validation"]:  # one sentence at a time: padding must not matter
            ids = torch.tensor([seq])
            total += float(torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum"))
    assert result["nll"] == pytest.approx(total / result["tokens"], rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / result["tokens"]), rel=1e-5)


def test_perplexity_evaluation_builds_no_autograd_graph_even_with_gradients_enabled(tiny_model):
    """A task's evaluate is self-contained: called outside torch.no_grad it must not keep activations for backward."""
    import warnings

    cfg = compose_config(["model=tiny-gpt2", "task=emnlp_news", f"data_dir={NEWS}", "task.max_length=24"])
    model, tokenizer = tiny_model
    task = build_task(run_spec(cfg), tokenizer)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # float() of a tensor that requires grad warns
        result = task.evaluate(model, "validation", 4, "cpu")
    assert result["tokens"] > 0


def test_sample_scores_are_metrics_bleu_of_the_decoded_samples(tiny_model):
    model, tokenizer = tiny_model
    cfg = sampling_cfg()
    samples = generate_samples(model, tokenizer, 6, 20, 50, seed=3, device="cpu", batch_size=4)
    references = [*samples[:2], "the cat sees the dog .", "a b c d"]  # two samples among the references: BLEU > 0
    torch.manual_seed(123)  # whatever the global RNG holds, the samples come from the seed
    before = torch.get_rng_state()
    result = sample_and_score(model, tokenizer, references, cfg, seed=3, device="cpu", max_new_tokens=20)
    assert torch.equal(torch.get_rng_state(), before)  # sampling leaves training randomness alone
    assert result["samples"] == samples

    hypotheses = [metrics.tokenize(s) for s in samples]
    reference_tokens = [metrics.tokenize(r) for r in references]
    for n in (2, 3):
        assert result[f"bleu{n}"] == metrics.bleu(hypotheses, reference_tokens, n, max_references=500).score
    assert result["self_bleu2"] == metrics.self_bleu(hypotheses, 2, max_samples=6).score
    assert result["bleu2"] > 0 and result["sacrebleu"] > 0
    check_scores_of_saved_samples(result, references, (2, 3), (2,))
    assert (result["bleu_hypotheses"], result["bleu_references"], result["self_bleu_samples"]) == (6, 4, 6)
    assert (result["num_samples"], result["sample_seed"], result["sample_top_k"]) == (6, 3, 50)
    other_seed = generate_samples(model, tokenizer, 6, 20, 50, seed=4, device="cpu", batch_size=4)
    assert other_seed != samples


def test_samples_fit_the_model_positions_and_stop_at_the_end_token(monkeypatch):
    cfg = compose_config(["model=tiny-gpt2", "model.architecture.n_positions=16"])
    model, tokenizer = build_model(run_spec(cfg))
    model.eval()
    calls = []
    generate = model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(model, "generate", spy)
    texts = generate_samples(model, tokenizer, 3, 100, 50, seed=0, device="cpu", batch_size=2)
    assert len(texts) == 3 and len(calls) == 2
    kwargs, out = calls[0]
    assert kwargs["max_new_tokens"] == 15 and out.shape[1] <= 16
    assert kwargs["pad_token_id"] == tokenizer.eos_token_id and kwargs["top_k"] == 50 and kwargs["do_sample"]
    assert all(len(t) <= 15 for t in texts)
    assert "<|endoftext|>" not in "".join(texts)


def test_empty_samples_stay_as_empty_hypotheses():
    cfg = sampling_cfg(num_samples=3, bleu_n=[2])
    samples = ["", "the cat sees the dog .", ""]
    references = ["the cat sees the dog .", "the dog sees the cat ."]
    result = score_samples(samples, references, cfg)
    hypotheses = [[], metrics.tokenize(samples[1]), []]
    expected = metrics.bleu(hypotheses, [metrics.tokenize(r) for r in references], 2).score
    assert result["bleu2"] == expected == pytest.approx(100 / 3)
    assert result["bleu_hypotheses"] == 3 and result["empty_samples"] == 2
    assert result["self_bleu2"] == metrics.self_bleu(hypotheses, 2).score


@pytest.mark.parametrize(
    "override,message",
    [
        ("task.num_samples=1", "needs at least 2"),  # Self-BLEU needs two samples: checked with the task
        ("task.num_samples=0", "task.num_samples must be an integer >= 1"),  # the others by the schema
        ("task.bleu_n=[0]", "task.bleu_n must be null or a list, each item an integer >= 1"),
        ("task.top_k=-1", "task.top_k must be an integer >= 0"),
        ("task.max_length=1", "task.max_length must be an integer >= 2"),
    ],
)
def test_bad_sampling_settings_are_refused_before_training(override, message):
    overrides = ["model=tiny-gpt2", "task=emnlp_news", f"data_dir={NEWS}", override]
    with pytest.raises(UserError, match=re.escape(message)):
        cfg = compose_config(overrides)
        _, tokenizer = build_model(run_spec(cfg))
        build_task(run_spec(cfg), tokenizer)


def test_wikitext2_samples_only_when_bleu_is_asked_for_and_sample_settings_are_checked_by_the_spec():
    base = ["model=tiny-gpt2", "task=wikitext2", f"data_dir={DEMO_DATA_DIR / 'wikitext2'}", "task.block_size=64"]
    cfg = compose_config(base)
    _, tokenizer = build_model(run_spec(cfg))
    with pytest.raises(UserError, match="task.sample_length"):  # refused by the schema, before any work
        compose_config([*base, "task.sample_length=0"])
    cfg.task.sample_length = 0  # past the schema (a config changed in Python): its spec refuses it
    with pytest.raises(UserError, match="task.sample_length=0 is not allowed"):
        run_spec(cfg)
    cfg.task.sample_length = 8
    assert build_task(run_spec(cfg), tokenizer).sample_references
    cfg.task.bleu_n = []
    task = build_task(run_spec(cfg), tokenizer)
    assert task.sample_references is None


def test_wikitext_references_skip_headings_and_blank_lines():
    lines = ["", " = Title = \n", "", " First paragraph . \n", " = = Sub = = \n", " Second = one . \n", ""]
    assert generation.wikitext_references(lines) == ["First paragraph .", "Second = one ."]


# --- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["mpoe", "dense"])
def test_news_run_scores_samples_on_test_and_selects_on_validation_perplexity(news_run, method):
    results = news_run(method)
    assert results["status"] == "finished"
    assert results["main_metric"] == "perplexity" and results["greater_is_better"] is False
    assert results["split_sizes"] == {"train": 190, "validation": 10, "test": 50}
    history = results["history"]
    assert [h["step"] for h in history] == [3, 6]
    best = min(history, key=lambda h: h["validation"]["perplexity"])
    assert results["best_step"] == best["step"] and results["validation"] == best["validation"]
    assert all(set(h["validation"]) == {"perplexity", "nll", "tokens"} for h in history)

    test = results["test"]
    assert test["perplexity"] > 1.0
    assert "bleu4" not in test  # the paper's EMNLP News / IMDB columns: BLEU-2 and Self-BLEU-2
    assert (test["bleu_hypotheses"], test["bleu_references"], test["self_bleu_samples"]) == (8, 50, 8)
    assert test["num_samples"] == 8 and test["sample_max_new_tokens"] == 23 and test["sample_seed"] == 1
    references = [line.strip() for line in (NEWS / "test.txt").read_text().splitlines() if line.strip()]
    assert len(references) == 50
    check_scores_of_saved_samples(test, references, (2,), (2,))


def test_samples_are_reproducible_and_do_not_touch_training(news_run):
    first = news_run("dense")
    again = news_run("dense", where="b")
    assert again["test"] == first["test"]  # same seed: the same samples and scores
    more = news_run("dense", "task.num_samples=12", where="c")
    assert [h["loss"] for h in more["history"]] == [h["loss"] for h in first["history"]]
    assert [h["validation"] for h in more["history"]] == [h["validation"] for h in first["history"]]
    assert more["test"]["perplexity"] == first["test"]["perplexity"]
    assert more["test"]["bleu_hypotheses"] == 12 and more["test"]["self_bleu_samples"] == 12
    other_seed = news_run("dense", "seed=2", where="d")
    assert other_seed["test"]["samples"] != first["test"]["samples"]


def test_imdb_run_on_sentence_files(tmp_path):
    data = tmp_path / "imdb"
    data.mkdir()
    openings = ["this movie", "the acting", "the plot", "every scene", "the ending"]
    verdicts = ["was great fun .", "felt far too long .", "made me laugh .", "is worth a second look ."]
    sentences = [f"{o} {v}" for o in openings for v in verdicts]
    (data / "train.txt").write_text("\n".join(sentences * 3) + "\n")
    (data / "test.txt").write_text("\n\n".join(sentences[::2]) + "\n")  # blank lines are skipped
    overrides = [*SMALL, "method=mpoe", "task=imdb", f"data_dir={data}", "task.num_samples=6", "task.max_length=24"]
    results = json.loads(
        (run(compose_config([*overrides, f"runs_dir={tmp_path / 'runs'}"])) / RESULTS_FILE).read_text()
    )
    assert results["split_sizes"] == {"train": 57, "validation": 3, "test": 10}
    test = results["test"]
    assert (test["bleu_hypotheses"], test["bleu_references"], test["self_bleu_samples"]) == (6, 10, 6)
    check_scores_of_saved_samples(test, sentences[::2], (2,), (2,))


def test_wikitext2_run_reports_bleu2_and_bleu4_of_samples_on_test(tmp_path):
    overrides = [
        *SMALL,
        "method=mpoe",
        "task=wikitext2",
        f"data_dir={DEMO_DATA_DIR / 'wikitext2'}",
        "task.block_size=64",
        "task.num_samples=6",
        "task.sample_length=16",
        f"runs_dir={tmp_path}",
    ]
    results = json.loads((run(compose_config(overrides)) / RESULTS_FILE).read_text())
    test = results["test"]
    assert "self_bleu2" not in test  # the paper reports none for WikiText-2
    lines = (DEMO_DATA_DIR / "wikitext2" / "test.txt").read_text().splitlines()
    paragraphs = [line.strip() for line in lines if line.strip() and not line.strip().startswith("=")]
    assert test["bleu_references"] == len(paragraphs) == 40
    check_scores_of_saved_samples(test, paragraphs, (2, 4), ())
    assert test["bleu_hypotheses"] == 6 and test["sample_max_new_tokens"] == 16
    assert all(set(h["validation"]) == {"perplexity", "nll", "tokens"} for h in results["history"])
