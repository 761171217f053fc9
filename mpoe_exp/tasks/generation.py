"""Unconditional text generation with GPT-2: EMNLP2017 WMT News and IMDB, one sentence per line (paper section 4.1;
docs/method.md, 'Language modelling and generation').

Training is causal LM on the training sentences, each sentence one sequence:

    <start> sentence tokens <end>        (GPT-2: <start> = <end> = "<|endoftext|>")

cut to `task.max_length` tokens (and the model's n_positions). A sentence longer than that loses its end token, so
the model is never taught that a sentence stops mid-way. The start token is the tokenizer's bos token (GPT-2's is
its eos, "<|endoftext|>"), so unconditional sampling starts from exactly the context every training sentence
starts from. Model selection: perplexity on the validation sentences (the same sentence encoding, NLL summed over
every predicted token, end token included, divided by their count); the test split is never seen before the end.

On the test split the task also samples `task.num_samples` sentences (`sample_and_score`): each starts from the start
token alone, top-k sampling (`task.top_k`, 50 in the reference practice), temperature 1, until the end token or
`task.max_length - 1` new tokens (a sample is then as long as the longest training sequence). Samples are scored
with Texygen BLEU-n against the test sentences and Self-BLEU-n against each other (`mpoe_exp.metrics`; text split
into words by `metrics.tokenize` on both sides), and with sacreBLEU's corpus BLEU against the same references
(`sacrebleu`, with its signature in `sacrebleu_signature`). Counts used are recorded next to the scores, and every
sample is kept in the test metrics (`samples`). The defaults follow Texygen's "fast" variants: 500 samples, 500
test sentences as references (`task.references`: the first ones, or for IMDB, whose sentences come in review
order, a sample drawn with the data seed; `reference_sentences`), Self-BLEU over the 500 samples.

Sampling is reproducible and invisible to training: the global torch RNG (CPU and every CUDA device) is saved,
seeded with the run seed (`cfg.seed`), used by `model.generate`, and restored afterwards. Samples are drawn
`task.sample_batch_size` at a time; they depend on that number (and on the device), not on the evaluation batch
size. A sample that decodes to nothing (the end token drawn first) stays in as an empty token list: it scores 0 in
BLEU and is counted in "empty_samples", so a model that often stops at once is penalized rather than hidden.

WikiText-2 (`LanguageModelingTask`, type lm) reports the same sample scores on its test split when its task config
sets `bleu_n`; its references are the test paragraphs (`wikitext_references`) and its sample length is
`task.sample_length`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mpoe_exp import metrics
from mpoe_exp.errors import UserError
from mpoe_exp.moe import needs_full_sequence
from mpoe_exp.spec import RunSpec, SamplingSpec
from mpoe_exp.tasks import text_data
from mpoe_exp.tasks.data_location import task_data_dir
from mpoe_exp.tasks.losses import token_loss
from mpoe_exp.tasks.protocol import Task

DEFAULT_SAMPLE_BATCH_SIZE = 500


# --- shared with LanguageModelingTask --------------------------------------------------------------------------


def causal_lm_collate(sequences: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (the input ids, -100 on padding)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.tensor([list(s) + [pad_token_id] * (width - len(s)) for s in sequences], dtype=torch.long)
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], dtype=torch.long)
    # By the mask, not by the pad id: GPT-2 pads with its end token, which is a real label at a sentence's end.
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def causal_lm_loss(model, batch: dict, label_smoothing: float) -> torch.Tensor:
    """Training loss of a causal LM: token t predicts token t+1 (labels -100 are ignored)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_loss(logits[:, :-1], batch["labels"][:, 1:], label_smoothing)


@torch.no_grad()
def causal_lm_nll(
    model, features: Sequence[dict], collate: Callable[[list[dict]], dict], batch_size: int, device
) -> tuple[float, int]:
    """(summed NLL in nats, number of predicted tokens) of a causal LM over `features`: token t predicts t+1."""
    total_nll, num_tokens = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = collate(list(features[start : start + batch_size]))
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total_nll += float(nll)
        num_tokens += int((labels != -100).sum())
    return total_nll, num_tokens


def perplexity_metrics(total_nll: float, num_tokens: int) -> dict[str, float]:
    return {
        "perplexity": metrics.perplexity(total_nll, num_tokens),
        "nll": total_nll / num_tokens if num_tokens else math.nan,
        "tokens": num_tokens,
    }


def wikitext_references(lines: Sequence[str]) -> list[str]:
    """BLEU references of WikiText: the non-blank lines that are not headings (" = Title = ", " = = Sub = = "),
    stripped, in order (one paragraph per reference)."""
    return [line.strip() for line in lines if line.strip() and not line.startswith(" = ")]


def reference_sentences(test: Sequence[str], max_references: int | None, how: str, seed: int) -> list[str]:
    """The BLEU references among the test sentences: all when there are at most `max_references`; else the first
    `max_references` (how="first", Texygen) or a sample of that many drawn with `seed` (how="sample": indices
    `numpy.random.default_rng(seed).choice(len(test), max_references, replace=False)`), kept in test-file order."""
    if max_references is None or len(test) <= max_references:
        return list(test)
    if how == "first":
        return list(test[:max_references])
    chosen = np.sort(np.random.default_rng(seed).choice(len(test), size=max_references, replace=False))
    return [test[i] for i in chosen]


# --- sampling and scoring --------------------------------------------------------------------------------------


def start_token_id(tokenizer) -> int:
    """The token unconditional samples (and training sequences) start from: bos, else eos."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise UserError("generation needs a tokenizer with a bos or eos token to start samples from")
    return token


def check_sampling_config(task: SamplingSpec) -> None:
    """Refuse sampling settings that cannot work together, before any training (each one alone: its spec)."""
    if task.self_bleu_n and task.num_samples < 2:
        raise UserError(
            f"task.num_samples={task.num_samples}: Self-BLEU scores each sample against the others and needs at least 2"
        )


def max_sample_tokens(model, requested: int) -> int:
    """`requested` new tokens, capped so start token + samples fit the model's n_positions."""
    n_positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    limit = requested if n_positions is None else min(requested, n_positions - 1)
    if limit < 1:
        raise UserError(f"cannot sample: {requested} new tokens asked for, model n_positions {n_positions}")
    return limit


def _rng_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


@torch.no_grad()
def generate_samples(
    model,
    tokenizer,
    num_samples: int,
    max_new_tokens: int,
    top_k: int,
    seed: int,
    device,
    batch_size: int = DEFAULT_SAMPLE_BATCH_SIZE,
) -> list[str]:
    """`num_samples` unconditional top-k samples, decoded; the global RNG state is unchanged afterwards.

    Each sample starts from the start token alone and ends at the first end token (not included) or after
    `max_new_tokens` (capped by the model's n_positions). Decoding skips special tokens and strips whitespace.
    """
    start, end = start_token_id(tokenizer), tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    max_new_tokens = max_sample_tokens(model, max_new_tokens)
    was_training = model.training
    model.eval()
    texts: list[str] = []
    with torch.random.fork_rng(devices=_rng_devices()):
        torch.manual_seed(seed)
        for offset in range(0, num_samples, batch_size):
            size = min(batch_size, num_samples - offset)
            input_ids = torch.full((size, 1), start, dtype=torch.long, device=device)
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                top_k=top_k,
                top_p=1.0,
                temperature=1.0,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                min_new_tokens=0,
                pad_token_id=pad,
                eos_token_id=end,
                use_cache=not needs_full_sequence(model),  # some expert layers declare they need the whole prefix
            )
            for row in generated[:, 1:].tolist():
                if end is not None and end in row:
                    row = row[: row.index(end)]
                texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return texts


def score_samples(samples: Sequence[str], references: Sequence[str], task_cfg: SamplingSpec) -> dict:
    """BLEU-n (task.bleu_n) against `references` and Self-BLEU-n (task.self_bleu_n), x100, with the counts used;
    with BLEU also sacreBLEU's corpus BLEU on the same references, and its signature (`metrics.sacrebleu_corpus`)."""
    hypotheses = [metrics.tokenize(s) for s in samples]
    result: dict = {}
    if task_cfg.bleu_n:
        max_references = task_cfg.max_references
        # bleu() keeps the first max_references: tokenize only those (IMDB's test split has ~10^5 sentences).
        reference_tokens = [metrics.tokenize(r) for r in references[:max_references]]
        for n in task_cfg.bleu_n:
            score = metrics.bleu(hypotheses, reference_tokens, n, max_references=max_references)
            result[f"bleu{n}"] = score.score
            result["bleu_hypotheses"], result["bleu_references"] = score.num_hypotheses, score.num_references
        sacre = metrics.sacrebleu_corpus(samples, references[:max_references])
        result["sacrebleu"], result["sacrebleu_signature"] = sacre.score, sacre.signature
    for n in task_cfg.self_bleu_n or []:
        score = metrics.self_bleu(hypotheses, n, max_samples=task_cfg.num_samples)
        result[f"self_bleu{n}"] = score.score
        result["self_bleu_samples"] = score.num_hypotheses
    result["empty_samples"] = sum(not h for h in hypotheses)
    result["sample_mean_words"] = sum(len(h) for h in hypotheses) / len(hypotheses) if hypotheses else 0.0
    return result


def sample_and_score(
    model, tokenizer, references: Sequence[str], task_cfg: SamplingSpec, seed: int, device, max_new_tokens: int
) -> dict:
    """Sample task.num_samples sentences (seeded by `seed`) and score them: `score_samples` plus the sampling
    settings and every sample under "samples" (so the scores can be recomputed from results.json)."""
    samples = generate_samples(
        model,
        tokenizer,
        num_samples=task_cfg.num_samples,
        max_new_tokens=max_new_tokens,
        top_k=task_cfg.top_k,
        seed=seed,
        device=device,
        batch_size=task_cfg.sample_batch_size or DEFAULT_SAMPLE_BATCH_SIZE,
    )
    return {
        **score_samples(samples, references, task_cfg),
        "num_samples": len(samples),
        "sample_seed": seed,
        "sample_top_k": task_cfg.top_k,
        "sample_max_new_tokens": max_sample_tokens(model, max_new_tokens),
        "samples": samples,
    }


def model_positions(spec: RunSpec) -> int:
    """The longest sequence the run's model reads: its learned positions (GPT-2's n_positions), else 1024."""
    from mpoe_exp.backbones import shapes_of

    return shapes_of(spec.model.family, spec.model.architecture).max_positions or 1024


# --- the task --------------------------------------------------------------------------------------------------


class GenerationTask(Task):
    """Causal LM fine-tuning on one sentence per sequence; validation perplexity; test perplexity + sample scores."""

    def __init__(self, spec: RunSpec, tokenizer):
        task_cfg = spec.task
        max_positions = model_positions(spec)
        self.name = task_cfg.name
        self.cfg = task_cfg
        self.seed = spec.seed
        self.tokenizer = tokenizer
        self.main_metric = "perplexity"
        self.greater_is_better = False
        self.max_length = min(task_cfg.max_length, max_positions)
        if self.max_length < 2:
            raise UserError(f"task.max_length must be >= 2 (start token + one token), got {task_cfg.max_length}")
        check_sampling_config(task_cfg)
        self.start_id = start_token_id(tokenizer)
        self.end_id = tokenizer.eos_token_id
        if self.end_id is None:
            raise UserError("generation needs a tokenizer with an eos token to end sentences with")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        data_dir = task_data_dir(spec)
        self.texts = text_data.load_text_splits(task_cfg.text_task, data_dir=data_dir, seed=task_cfg.data_seed)
        self.references = reference_sentences(
            self.texts["test"], task_cfg.max_references, task_cfg.references, task_cfg.data_seed
        )
        self.sequences = {split: self.encode(lines) for split, lines in self.texts.items()}
        # Sentences cut at max_length (they lost their end token), per split.
        self.truncated = {
            split: sum(len(s) == self.max_length and s[-1] != self.end_id for s in seqs)
            for split, seqs in self.sequences.items()
        }
        self.split_sizes = {k: len(v) for k, v in self.sequences.items()}

    def encode(self, sentences: Sequence[str]) -> list[list[int]]:
        """<start> + tokens + <end>, cut to max_length (no special tokens added by the tokenizer itself)."""
        ids = self.tokenizer(list(sentences), add_special_tokens=False, verbose=False).input_ids
        return [([self.start_id] + tokens + [self.end_id])[: self.max_length] for tokens in ids]

    def train_features(self) -> list[dict]:
        return [{"input_ids": s} for s in self.sequences["train"]]

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return causal_lm_collate([f["input_ids"] for f in features], self.pad_id)

    def loss(self, model, batch: dict, label_smoothing: float) -> torch.Tensor:
        return causal_lm_loss(model, batch, label_smoothing)

    def evaluate(self, model, split: str, batch_size: int, device) -> dict:
        """Perplexity of `split`; on "test" also the sample scores of `sample_and_score` (see the module doc)."""
        features = [{"input_ids": s} for s in self.sequences[split]]
        result: dict = perplexity_metrics(*causal_lm_nll(model, features, self.collate, batch_size, device))
        if split == "test":
            result["truncated"] = self.truncated[split]
            result.update(
                sample_and_score(
                    model, self.tokenizer, self.references, self.cfg, self.seed, device, self.max_length - 1
                )
            )
        return result
