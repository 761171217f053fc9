"""A model family added from outside the package: a Llama-style decoder (transformers' Llama classes, a gated SiLU
FFN, rotary positions, grouped-query attention, random tiny weights) registered from this file alone, with one
`Backbone` subclass and one registry line, and no edit to mpoe_exp. It validates, builds, upcycles into every method
(each equal to the dense model at initialization), trains, evaluates, generates and scores samples, saves and
loads, and is refused for tasks of another kind."""

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mpoe_exp import compose_config
from mpoe_exp.backbones import FAMILIES, Backbone, FFNSite, ModelShapes
from mpoe_exp.backbones.byte_level import byte_level_tokenizer
from mpoe_exp.config import DEMO_DATA_DIR, run_spec, validate_config
from mpoe_exp.errors import UserError
from mpoe_exp.models import build_model, ffn_sites, load_model, parameter_report, save_model, upcycle
from mpoe_exp.moe import FeedForwardSpec
from mpoe_exp.results import RESULTS_FILE
from mpoe_exp.runner import check_task_fits_model, run

METHOD_FILES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "method").glob("*.yaml"))


class Llama(Backbone):
    """A decoder: down(silu(gate(x)) * up(x)) in every layer, no biases, no dropout."""

    kind = "decoder"
    model_type = "llama"
    config_class_name = "LlamaConfig"
    model_class_name = "LlamaForCausalLM"
    token_mask_stacks = ("model",)
    heads = ("num_attention_heads", "hidden_size")

    def byte_tokenizer(self):
        return byte_level_tokenizer(
            before=("<unk>", "<s>", "</s>"), unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
        )

    def ffn_sites(self, model: nn.Module) -> Iterator[FFNSite]:
        from transformers.models.llama.modeling_llama import LlamaMLP

        config = model.config
        for layer in list(model.modules()):
            mlp = getattr(layer, "mlp", None)
            if not isinstance(mlp, LlamaMLP):
                continue
            spec = FeedForwardSpec(
                d_model=config.hidden_size, d_ff=config.intermediate_size, activation=config.hidden_act, gated=True
            )
            weights = {"wi_0": mlp.gate_proj.weight, "wi_1": mlp.up_proj.weight, "wo": mlp.down_proj.weight}
            yield FFNSite(layer, "mlp", spec, weights, {}, causal=True)

    def shapes(self, config) -> ModelShapes:
        return ModelShapes(
            d_model=config.hidden_size,
            d_ff=config.intermediate_size,
            gated=True,
            layers=config.num_hidden_layers,
            decoder_layers=0,
            vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings,
        )


TINY_LLAMA = {
    "name": "tiny-llama",
    "family": "llama",
    "hub_id": None,
    "path": None,
    "pretrained": False,
    "tokenizer": "byte",
    "architecture": {
        "vocab_size": 259,  # <unk>, <s>, </s> + 256 bytes
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "tie_word_embeddings": True,
    },
}


@pytest.fixture(autouse=True)
def llama_family():
    """The one registry line, undone after each test."""
    FAMILIES["llama"] = Llama()
    yield
    del FAMILIES["llama"]


def llama_config(*overrides: str, model: dict | None = None):
    """A run config with the tiny Llama as its model: composed on tiny-gpt2 (same kind), the model section replaced,
    then validated as a composed config is."""
    cfg = compose_config(["model=tiny-gpt2", *overrides])
    cfg.model = OmegaConf.create(model or TINY_LLAMA)
    validate_config(cfg)
    return cfg


def logits_at_real_tokens(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[inputs["attention_mask"].bool()]


@pytest.fixture(scope="module")
def dense():
    FAMILIES["llama"] = Llama()
    try:
        torch.manual_seed(0)
        cfg = llama_config("method=dense")
        model, tokenizer = build_model(run_spec(cfg))
        inputs = dict(tokenizer(["the cat sat on the mat.", "short"], return_tensors="pt", padding=True))
        return model.eval(), inputs, logits_at_real_tokens(model.eval(), inputs)
    finally:
        del FAMILIES["llama"]


@pytest.mark.parametrize("method", METHOD_FILES)
def test_every_method_equals_the_dense_llama_at_initialization(dense, method):
    model, inputs, expected = dense
    upcycled = upcycle(copy.deepcopy(model), llama_config(f"method={method}").method).eval()
    assert method == "dense" or not list(ffn_sites(upcycled)), "every dense FFN must be replaced"
    rel = (logits_at_real_tokens(upcycled, inputs) - expected).norm() / expected.norm()
    assert rel <= 1e-5, f"relative error {rel:.2e}"


def test_the_family_is_unknown_until_registered():
    del FAMILIES["llama"]
    try:
        cfg = compose_config(["model=tiny-gpt2"])
        cfg.model = OmegaConf.create(TINY_LLAMA)
        with pytest.raises(UserError, match=r"model.family=llama is not allowed: .*one of t5, gpt2, bert"):
            validate_config(cfg)
    finally:
        FAMILIES["llama"] = Llama()


def test_its_architecture_is_checked_against_its_config_class():
    bad_key = {**TINY_LLAMA, "architecture": {**TINY_LLAMA["architecture"], "n_embd": 64}}
    with pytest.raises(UserError, match=r"unknown key model.architecture.n_embd: .*transformers.LlamaConfig"):
        llama_config(model=bad_key)
    bad_heads = {**TINY_LLAMA, "architecture": {**TINY_LLAMA["architecture"], "num_attention_heads": 5}}
    with pytest.raises(UserError, match="refused by transformers: .*not a multiple of the number of attention heads"):
        llama_config(model=bad_heads)
    small_vocab = {**TINY_LLAMA, "architecture": {**TINY_LLAMA["architecture"], "vocab_size": 200}}
    with pytest.raises(UserError, match="model.tokenizer=byte has 259 tokens"):
        llama_config(model=small_vocab)


def test_it_runs_the_tasks_of_its_kind_only():
    check_task_fits_model(llama_config("task=wikitext2"))  # written for GPT-2: another decoder
    with pytest.raises(UserError, match=r"task=cola runs on t5 or bert models, not model=tiny-llama \(llama, kind dec"):
        check_task_fits_model(llama_config("task=cola"))


@pytest.mark.parametrize("method", ["mpoe", "switch"])
def test_tiny_llama_trains_evaluates_and_generates(tmp_path, method):
    data = tmp_path / "imdb"
    data.mkdir()
    sentences = [f"the film number {i} was {'good' if i % 2 else 'bad'} and the cast was fine ." for i in range(60)]
    for split, lines in (("train", sentences[:40]), ("valid", sentences[40:50]), ("test", sentences[50:])):
        (data / f"{split}.txt").write_text("\n".join(lines) + "\n")
    cfg = llama_config(
        f"method={method}",
        "task=imdb",
        f"data_dir={data}",
        f"runs_dir={tmp_path / 'runs'}",
        "task.num_samples=4",
        "task.max_length=96",
        "train.max_steps=8",
        "train.eval_every=4",
        "train.batch_size=8",
        "train.lr=3e-3",
    )
    results = json.loads((run(cfg) / RESULTS_FILE).read_text())
    assert results["status"] == "finished"
    assert results["validation"]["perplexity"] < 259  # below a uniform guess over the vocabulary: it learned
    assert {"bleu2", "self_bleu2"} <= set(results["test"]) and results["test"]["truncated"] == 0
    assert len(results["test"]["samples"]) == 4 and results["test"]["empty_samples"] == 0  # it generated
    assert results["parameters"]["moe_layers"] == 2
    assert results["config"]["model"]["family"] == "llama"


def test_tiny_llama_lm_run_on_the_demo_data(tmp_path):
    cfg = llama_config(
        "method=mpoe",
        "task=wikitext2",
        f"data_dir={DEMO_DATA_DIR / 'wikitext2'}",
        f"runs_dir={tmp_path}",
        "task.block_size=64",
        "task.num_samples=2",
        "task.sample_length=8",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.batch_size=4",
        "train.eval_batch_size=8",
    )
    results = json.loads((run(cfg) / RESULTS_FILE).read_text())
    assert results["status"] == "finished" and "perplexity" in results["test"]


def test_save_and_load_roundtrip(tmp_path):
    torch.manual_seed(1)
    cfg = llama_config("method=mpoe")
    model, tokenizer = build_model(run_spec(cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    inputs = dict(tokenizer(["a b c", "d"], return_tensors="pt", padding=True))
    expected = logits_at_real_tokens(model.eval(), inputs)
    save_model(model, run_spec(cfg), tmp_path / "ckpt", tokenizer)
    loaded, loaded_tokenizer, _ = load_model(tmp_path / "ckpt")
    assert parameter_report(loaded) == parameter_report(model)
    assert torch.equal(logits_at_real_tokens(loaded.eval(), inputs), expected)
