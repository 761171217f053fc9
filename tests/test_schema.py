"""Every setting is checked before any work starts (mpoe_exp/schema.py): a wrong type, an out-of-range value or an
unknown key (one a router, a layer or a task would ignore) is one `error:` line naming the key, exit 2, no
traceback; nothing valid is refused (the experiment and README tests compose every run)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from mpoe_exp import compose_config, schema, spec
from mpoe_exp.config import available, run_spec
from mpoe_exp.errors import UserError
from mpoe_exp.moe import GroupTop1Router
from mpoe_exp.moe.layer import ROUTERS
from mpoe_exp.tasks.tasks import TASK_TYPES

T5 = ["model=tiny-t5", "task=cola"]
GPT2 = ["model=tiny-gpt2", "task=wikitext2"]

# (overrides, the key the message must name, a phrase of what is allowed)
BAD = [
    (["train.lr=-1"], "train.lr", "> 0"),
    (["train.lr=0"], "train.lr", "> 0"),
    (["train.lr=fast"], "train.lr", "a number"),
    (["train.lr=nan"], "train.lr", "a number"),
    (["train.batch_size=0"], "train.batch_size", ">= 1"),
    (["train.batch_size=2.5"], "train.batch_size", "an integer"),
    (["train.grad_accum_steps=0"], "train.grad_accum_steps", ">= 1"),
    (["train.epochs=0"], "train.epochs", ">= 1"),
    (["train.max_steps=0"], "train.max_steps", "null or an integer >= 1"),
    (["train.warmup_steps=-1"], "train.warmup_steps", ">= 0"),
    (["train.warmup_ratio=1.0"], "train.warmup_ratio", "< 1"),
    (["train.label_smoothing=1"], "train.label_smoothing", "< 1"),
    (["train.grad_clip=-1"], "train.grad_clip", ">= 0"),
    (["train.weight_decay=-0.1"], "train.weight_decay", ">= 0"),
    (["train.adam_eps=0"], "train.adam_eps", "> 0"),
    (["train.precision=bogus"], "train.precision", "fp32, bf16, fp16"),
    (["train.eval_every=0"], "train.eval_every", "null or an integer >= 1"),
    (["train.evals_per_epoch=0"], "train.evals_per_epoch", ">= 1"),
    (["train.min_evals=0"], "train.min_evals", ">= 1"),
    (["train.checkpoint_every=0"], "train.checkpoint_every", ">= 1"),
    (["train.tf32=maybe"], "train.tf32", "true or false"),
    (["+train.learning_rate=1e-4"], "train.learning_rate", "lr, epochs"),
    (["seed=one"], "seed", "an integer"),
    (["force=yes"], "force", "true or false"),
    (["device=gpu"], "device", "auto, cpu, cuda or cuda:N"),
    (["cpu_threads=0"], "cpu_threads", "auto or an integer >= 1"),
    (["cpu_malloc=jemalloc"], "cpu_malloc", "one of system, keep"),
    (["data_dir=7"], "data_dir", "a non-empty string"),
    (["+datadir=x"], "datadir", "data_dir"),
    # method: keys a router or layer would ignore, or that its constructor would choke on
    (["method=switch", "method.router.type=noisy_top_k"], "method.router.bias", "top_k"),
    (["method=moe", "+method.router.capacity_factor_train=2.0"], "method.router.capacity_factor_train", "top_k"),
    (["method=mpoe", "method.router.type=top_9"], "method.router.type", "switch or noisy_top_k"),
    (["method=cartesian", "method.router.type=switch"], "method.router.type", "group_top1"),
    (["method=cartesian", "+method.router.groups=4"], "method.router.groups", "init_std"),
    (["method=meo", "+method.bottleneck_reduction=8"], "method.bottleneck_reduction", "level"),
    (["method=meo", "method.level=word"], "method.level", "sequence, token"),
    (["method=meo", "method.experts=mpo"], "method.experts", "dense"),
    (["method=moe", "+method.recompute=true", "+method.layer=cartesian"], "method.recompute", "shared_experts"),
    (["method=switch", "+method.gradient_mask_prob=0.5"], "method.gradient_mask_prob", "num_experts"),
    (["method=dense", "+method.num_experts=4"], "method.num_experts", "name, experts"),
    (["method=switch", "method.router.jitter=-0.1"], "method.router.jitter", ">= 0"),
    (["method=switch", "method.router.capacity_factor_eval=0"], "method.router.capacity_factor_eval", "> 0"),
    (["method=switch", "method.router.straight_through=1"], "method.router.straight_through", "true or false"),
    (["method=moe", "method.router.top_k=0"], "method.router.top_k", ">= 1"),
    (["method=moe", "method.router.top_k=9"], "method.router.top_k", "1..8"),
    (["method=adapters", "method.router.top_k=9"], "method.router.top_k", "1..8 (method.num_experts)"),
    (["method=meo", "method.num_experts=1"], "method.router.top_k=2", "1..1 (method.num_experts)"),
    (["method=cartesian", "method.num_experts=7"], "method.num_experts=7", "split it evenly"),
    (["method=mpoe", "method.num_experts=0"], "method.num_experts", ">= 1"),
    (["method=mpoe", "method.gradient_mask_prob=1.5"], "method.gradient_mask_prob", "<= 1"),
    (["method=mpoe", "method.mpo.num_tensors=4"], "method.mpo.num_tensors", "m must be odd and >= 3"),
    (["method=mpoe", "method.mpo.num_tensors=5.0"], "method.mpo.num_tensors", "an integer >= 1"),
    (["method=switch", "ablation=m3"], "ablation=m3", "only applies to MPO methods"),
    (["method=mpoe", "method.mpo.max_bond=0"], "method.mpo.max_bond", ">= 1"),
    (["method=mpoe", "+method.mpo.rank=8"], "method.mpo.rank", "num_tensors"),
    # task and the other sections
    (["task.max_source_length=0"], "task.max_source_length", ">= 1"),
    (["task.glue_task=colaa"], "task.glue_task", "cola, sst2"),
    (["+task.bleu_n=[2]"], "task.bleu_n", "glue_task"),
    (["task=wikitext2", "model=tiny-gpt2", "task.bleu_n=[0]"], "task.bleu_n", "each item an integer >= 1"),
    (["task=wikitext2", "model=tiny-gpt2", "task.bleu_n=2"], "task.bleu_n", "list"),
    (["task=wikitext2", "model=tiny-gpt2", "+task.max_length=64"], "task.max_length", "block_size"),
    (["task=imdb", "model=tiny-gpt2", "task.max_length=1"], "task.max_length", ">= 2"),
    (["task=imdb", "model=tiny-gpt2", "task.num_samples=0"], "task.num_samples", ">= 1"),
    (["task=imdb", "model=tiny-gpt2", "task.references=last"], "task.references", "first, sample"),
    (["task=glue_multitask", "task.tasks=[cola,boolq]"], "task.tasks", "cola"),
    (["task=glue_multitask", "task.temperature=0"], "task.temperature", "> 0"),
    (["model.family=llama"], "model.family", "t5, gpt2, bert"),
    (["+model.revision=main"], "model.revision", "architecture"),
    # model.architecture: the fields of the family's transformers config class, typed by its defaults, ranged by name
    (["experiment=quickstart", "+model.architecture.nonsense=1"], "model.architecture.nonsense", "d_model"),
    (["experiment=quickstart", "model.architecture.d_model=abc"], "model.architecture.d_model", "an integer >= 1"),
    (["experiment=quickstart", "model.architecture.dropout_rate=-0.5"], "model.architecture.dropout_rate", "< 1"),
    (["model.architecture.num_heads=0"], "model.architecture.num_heads", "an integer >= 1"),
    (["model.architecture.num_decoder_layers=0"], "model.architecture.num_decoder_layers", "null or an integer >= 1"),
    (["model.architecture.layer_norm_epsilon=0"], "model.architecture.layer_norm_epsilon", "a number > 0"),
    (["model.architecture.feed_forward_proj=gated-bogus"], "model.architecture.feed_forward_proj", "gated-"),
    (["model.architecture.tie_word_embeddings=1"], "model.architecture.tie_word_embeddings", "true or false"),
    (["model.architecture.pad_token_id=-1"], "model.architecture.pad_token_id", "an integer >= 0"),
    (["model.architecture.eos_token_id=259"], "model.architecture.eos_token_id", "< 259 (model.architecture.vocab"),
    (["+model.architecture.initializer_factor=big"], "model.architecture.initializer_factor", "a number"),
    (["+model.architecture.n_embd=64"], "model.architecture.n_embd", "d_model"),  # a GPT-2 field on a T5
    ([*GPT2, "model.architecture.attn_pdrop=1.0"], "model.architecture.attn_pdrop", "< 1"),
    ([*GPT2, "model.architecture.n_inner=0"], "model.architecture.n_inner", ">= 1"),
    ([*GPT2, "model.architecture.n_head=3"], "model.architecture.n_head", "divide"),
    ([*GPT2, "model.architecture.activation_function=gelu_newer"], "model.architecture.activation_function", "silu"),
    (["model.architecture.vocab_size=100"], "model.architecture.vocab_size", "model.tokenizer=byte has 259 tokens"),
    (["model=tiny-bert", "model.architecture.hidden_size=2.5"], "model.architecture.hidden_size", "an integer >= 1"),
    (["model=tiny-bert", "model.architecture.layer_norm_eps=-1"], "model.architecture.layer_norm_eps", "> 0"),
    (["model=tiny-bert", "+model.architecture.problem_type=regression"], "model.architecture.problem_type", "vocab"),
    (["ablation=no_mask", "method=mpoe", "+ablation.p=0.1"], "ablation.p", "mpo_only"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode", "online, offline, disabled"),
    (["+logger.project=x"], "logger.project", "name"),
    # typed without "+": Hydra itself refuses these; our message names what is allowed instead, on one line
    (["train.learning_rate=1e-4"], "train.learning_rate", "lr, epochs"),
    (["method=switch", "method.router.capacity=2"], "method.router.capacity", "capacity_factor_train"),
    (["method=dense", "method.router.capacity=2"], "method.router.capacity", "method takes name, experts"),
    (["method=bogus"], "method=bogus", "dense, meo"),
    (["task=colaa"], "task=colaa", "cola, emnlp_news"),
]


@pytest.mark.parametrize("overrides,key,allowed", BAD, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_settings_are_refused_naming_the_key_and_what_is_allowed(overrides, key, allowed):
    with pytest.raises(UserError) as refused:
        compose_config([*T5, *overrides])
    message = str(refused.value)
    assert "\n" not in message
    assert key in message and allowed in message, message


# Through the CLI: exit 2, one `error:` line naming the key, no traceback. 17 of the cases above, covering every
# section, each `python -m mpoe_exp ...` in its own process (~5 s of CPU each, mostly importing torch), 4 at a time.
CLI = [
    ["train.lr=-1"],
    ["train.batch_size=0"],
    ["train.precision=bogus"],
    ["train.warmup_ratio=1.0"],
    ["+train.learning_rate=1e-4"],
    ["method=switch", "method.router.type=noisy_top_k"],
    ["method=meo", "+method.bottleneck_reduction=8"],
    ["method=mpoe", "method.mpo.num_tensors=4"],
    ["task.glue_task=colaa"],
    ["device=gpu"],
    ["seed=one"],
    ["logger=wandb", "logger.mode=sometimes"],
    ["train.learning_rate=1e-4"],
    ["method=bogus"],
    ["experiment=quickstart", "+model.architecture.nonsense=1"],
    ["experiment=quickstart", "model.architecture.d_model=abc"],
    ["experiment=quickstart", "model.architecture.dropout_rate=-0.5"],
]


@pytest.mark.slow
def test_the_cli_refuses_bad_settings_with_one_line_and_exit_2(tmp_path):
    def cli(overrides: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
        runs = tmp_path / f"runs{CLI.index(overrides)}"
        command = [sys.executable, "-m", "mpoe_exp", *T5, *overrides, f"runs_dir={runs}"]
        return overrides, subprocess.run(command, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=4) as pool:
        done = list(pool.map(cli, CLI))
    for overrides, result in done:
        key = next(k for o, k, _ in BAD if o == overrides)
        output = result.stdout + result.stderr
        assert result.returncode == 2, (overrides, output)
        assert "Traceback" not in output, (overrides, output)
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and key in errors[0], (overrides, output)
    assert not list(tmp_path.iterdir())  # refused before any work: no run directory


def test_valid_settings_at_their_edges_are_accepted():
    compose_config(
        [
            *T5,
            "train.lr=1",
            "train.max_steps=1",
            "train.warmup_steps=0",
            "train.warmup_ratio=0.0",
            "train.grad_clip=null",
            "train.label_smoothing=0",
            "train.eval_every=null",
            "train.evals_per_epoch=1",
            "train.min_evals=1",
            "train.checkpoint_every=1",
            "cpu_threads=auto",
            "device=cuda:1",
            "method=moe",
            "method.router.top_k=8",
        ]
    )
    compose_config([*T5, "cpu_threads=2", "method=meo_token", "method.bottleneck_reduction=4"])
    compose_config([*GPT2, "method=mpoe", "method.mpo.max_bond=4", "method.gradient_mask_prob=1", "task.bleu_n=[]"])
    compose_config(["model=tiny-gpt2", "task=imdb", "task.references=first", "task.data_dir=/somewhere", "seed=0"])
    compose_config(["model=tiny-gpt2", "dry_run=true"])  # no task: a dry run needs none


def test_router_keys_come_from_the_constructor_so_a_new_router_needs_no_schema_edit():
    class TemperatureRouter(ROUTERS["switch"]):
        def __init__(self, d_model: int, num_experts: int, *, temperature: float = 1.0, hard: bool = False):
            super().__init__(d_model, num_experts)

    keys = schema.router_keys(TemperatureRouter)
    assert set(keys) == {"type", "temperature", "hard"}
    assert keys["temperature"].accepts(0.5) and not keys["temperature"].accepts("hot")
    assert keys["hard"].accepts(True) and not keys["hard"].accepts(1)
    assert keys["temperature"].optional
    switch = schema.router_keys(ROUTERS["switch"])
    assert not switch["capacity_factor_train"].accepts(-1.0) and switch["capacity_factor_train"].accepts(None)
    assert "groups" not in schema.router_keys(GroupTop1Router, fixed=("groups",))


def test_the_schema_covers_every_task_type_and_layer():
    from mpoe_exp.moe import LAYER_KINDS
    from mpoe_exp.tasks.glue_data import GLUE_TASKS

    assert set(spec.TASK_SPECS) == set(TASK_TYPES)
    for name, kind in LAYER_KINDS.items():  # the schema reads the layer kinds from their registry
        keys, _ = schema._method_section({"experts": kind.experts[0], "layer": name}, {})
        assert keys["layer"].accepts(name) and all(keys["experts"].accepts(e) for e in kind.experts)
    assert spec.GLUE_TASKS == GLUE_TASKS


@pytest.mark.parametrize("model", available("model"))
def test_every_model_config_passes_and_its_architecture_builds_the_config_class(model):
    from mpoe_exp.models import head_config, model_config

    cfg = compose_config([f"model={model}", "dry_run=true"])
    spec = run_spec(cfg)
    config = model_config(spec.model, head_config(spec))  # what a random-weight build or a dry run passes on
    for key, value in cfg.model.architecture.items():
        assert getattr(config, key) == value, (model, key)


def test_architecture_keys_come_from_the_family_config_class():
    t5, gpt2 = spec.architecture_keys("t5"), spec.architecture_keys("gpt2")
    assert {"d_model", "d_ff", "num_heads", "initializer_factor", "use_cache"} <= set(t5)
    assert {"hidden_size", "decoder_start_token_id", "tie_word_embeddings"} <= set(t5)  # an alias; common fields
    assert "n_embd" in gpt2 and "n_embd" not in t5 and "d_model" not in gpt2
    assert not {"id2label", "num_labels", "problem_type", "return_dict", "transformers_version"} & set(t5)
    # typed by the class's default value where no range is known for the name
    assert t5["initializer_factor"].accepts(0.5) and not t5["initializer_factor"].accepts("big")
    assert t5["use_cache"].accepts(False) and not t5["use_cache"].accepts(0)
    assert t5["hidden_size"].accepts(64) and not t5["hidden_size"].accepts(0)  # an alias follows its field
    assert all(rule.optional for rule in t5.values())  # the class's default stands in for a missing key


def test_an_integer_for_a_float_field_is_built_as_a_float():
    from mpoe_exp.models import model_config

    cfg = compose_config([*T5, "model.architecture.layer_norm_epsilon=1", "model.architecture.dropout_rate=0"])
    config = model_config(run_spec(cfg).model)
    assert config.layer_norm_epsilon == 1.0 and isinstance(config.layer_norm_epsilon, float)
