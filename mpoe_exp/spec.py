"""The typed run spec: what a run's modules receive instead of the composed config.

Each section is a frozen dataclass whose field annotations are its schema: `Annotated[int, integer(ge=1)]` says
the type and the rule a value follows (mpoe_exp/rules.py), a field with a default may be left out of the config,
and a key that is no field is refused. `from_mapping` checks a section's plain values against that table, with the
one-line messages of every other refusal, and builds the spec; the schema (mpoe_exp/schema.py) checks the
composed config's sections with the same tables, so a rule is written once, here.

Why dataclasses and not pydantic: the refusals must stay one line naming the full key, the value and what is
allowed, in the words of rules.py, which every bad-input test pins; the keys a method, router, task or logger takes
depend on a sibling's value, which the schema resolves before a spec is built. A dataclass with annotated rules
gives the types and the one table per section without a second error vocabulary to translate from.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from mpoe_exp.glue_tasks import GLUE_TASKS
from mpoe_exp.rules import (
    Rule,
    Section,
    Table,
    annotation_rule,
    anything,
    boolean,
    check_table,
    choice,
    integer,
    list_of,
    mapping,
    number,
    string,
)

EVALS_PER_EPOCH, MIN_EVALS, CHECKPOINT_EVERY = 4, 5, 200  # defaults of train.evals_per_epoch, min_evals, ...


class Spec:
    """A section of the run spec: a frozen dataclass whose annotations carry its rules."""

    section: ClassVar[str]  # its key in the config: train, model, ...

    @classmethod
    def table(cls) -> Table:
        """{key: rule} of the section, from the fields' annotations; a field with a default may be absent."""
        hints = typing.get_type_hints(cls, include_extras=True)
        table = {}
        for f in dataclasses.fields(cls):
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            table[f.name] = dataclasses.replace(annotation_rule(hints[f.name]), optional=has_default)
        return table

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]):
        """The spec of plain config values (resolved, no interpolation left), refused in one line if they break
        a rule, lack a key or hold an unknown one."""
        values = dict(values)
        check_table(f"{cls.section}.", values, cls.table(), {cls.section: values})
        return cls(**values)

    @classmethod
    def check_field(cls, name: str, value: Any) -> None:
        """Refuse one value of the section by its field's rule (for code that takes it outside a spec)."""
        check_table(f"{cls.section}.", {name: value}, {name: cls.table()[name]}, {cls.section: {name: value}})

    def to_mapping(self) -> dict[str, Any]:
        """Plain values that `from_mapping` reads back into this spec: optional keys left at None are left out."""
        optional = {k for k, rule in self.table().items() if rule.optional}
        values = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: v for k, v in values.items() if not (v is None and k in optional)}


@dataclass(frozen=True, kw_only=True)
class TrainSpec(Spec):
    """How a run trains: optimizer, schedule, batches, precision, evaluation and checkpoint cadence."""

    section: ClassVar[str] = "train"

    lr: Annotated[float, number(gt=0)]
    epochs: Annotated[int, integer(ge=1)]
    max_steps: Annotated[int | None, integer(ge=1, null=True)]  # null: `epochs`
    batch_size: Annotated[int, integer(ge=1)]
    grad_accum_steps: Annotated[int, integer(ge=1)]
    group_by_length: Annotated[bool, boolean()] = False  # batches of similar lengths (Trainer.epoch_order)
    warmup_steps: Annotated[int | None, integer(ge=0, null=True)]  # null: warmup_ratio * total steps
    warmup_ratio: Annotated[float, number(ge=0, lt=1)]
    weight_decay: Annotated[float, number(ge=0)]
    adam_eps: Annotated[float, number(gt=0)]
    grad_clip: Annotated[float | None, number(ge=0, null=True)]  # 0 or null: no clipping
    label_smoothing: Annotated[float, number(ge=0, lt=1)]
    precision: Annotated[str, choice("fp32", "bf16", "fp16")] = "fp32"
    tf32: Annotated[bool, boolean()]
    eval_every: Annotated[int | None, integer(ge=1, null=True)] = None  # null: from evals_per_epoch
    evals_per_epoch: Annotated[int, integer(ge=1)] = EVALS_PER_EPOCH
    min_evals: Annotated[int, integer(ge=1)] = MIN_EVALS
    checkpoint_every: Annotated[int, integer(ge=1)] = CHECKPOINT_EVERY  # optimizer steps between resume checkpoints
    eval_batch_size: Annotated[int, integer(ge=1)]
    log_every: Annotated[int, integer(ge=1)]


def families():
    """The registered model families (mpoe_exp/backbones/; imported when first needed: it loads torch)."""
    from mpoe_exp.backbones import FAMILIES

    return FAMILIES


def registered_family() -> Rule:
    """model.family: one of the families registered when the config is checked."""
    return choice(*families())


@dataclass(frozen=True, kw_only=True)
class ModelSpec(Spec):
    """The backbone: its family, where its weights and tokenizer come from, and its architecture (the fields of the
    family's transformers config class, for random weights and the dry run)."""

    section: ClassVar[str] = "model"

    name: Annotated[str, string()]
    family: Annotated[str, registered_family]
    hub_id: Annotated[str | None, string(null=True)]
    path: Annotated[str | None, string(null=True)]
    package: Annotated[str | None, string(null=True)] = None  # a pip package shipping the weights
    label_smoothing: Annotated[float | None, number(ge=0, lt=1)] = None  # the family's default; before the task's
    pretrained: Annotated[bool, boolean()]
    tokenizer: Annotated[str, choice("pretrained", "byte")]
    architecture: Annotated[dict[str, Any], Section(architecture_section)]  # keys: the family's config class


# model.architecture: the fields of the family's transformers config class (`architecture_keys`). Ranges of the
# fields known by name, in any family; the other fields are checked against the type of the class's default value.
SIZES = (
    *("vocab_size", "d_model", "d_kv", "head_dim", "d_ff", "num_layers", "num_heads"),  # T5
    *("relative_attention_num_buckets", "relative_attention_max_distance"),
    *("n_positions", "n_embd", "n_layer", "n_head"),  # GPT-2
    *("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings"),
    "type_vocab_size",
)
DROPOUTS = (
    *("dropout_rate", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"),
    *("hidden_dropout_prob", "attention_probs_dropout_prob"),
)
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id")
TOKEN_ID = integer(ge=0)
ARCHITECTURE_RANGES: Table = {
    **{key: integer(ge=1) for key in SIZES},
    "num_decoder_layers": integer(ge=1, null=True),  # null: num_layers
    "n_inner": integer(ge=1, null=True),  # null: 4 * n_embd
    **{key: number(ge=0, lt=1) for key in DROPOUTS},
    "classifier_dropout": number(ge=0, lt=1, null=True),
    "layer_norm_epsilon": number(gt=0),
    "layer_norm_eps": number(gt=0),
    "initializer_range": number(gt=0),  # the std of the initial weights
    "initializer_factor": number(gt=0),
    "chunk_size_feed_forward": integer(ge=0),
    **{key: TOKEN_ID.or_null() for key in TOKEN_IDS},
    "eos_token_id": Rule(  # T5 and GPT-2 also take a list of end tokens
        "null, an integer >= 0 or a list of them",
        lambda v: v is None or TOKEN_ID.accepts(v) or list_of(TOKEN_ID, nonempty=True).accepts(v),
    ),
    "tie_word_embeddings": boolean(),
}
# Fields that every config class takes (transformers' PretrainedConfig), though a class's defaults may lack them:
# T5Config has no decoder_start_token_id, which T5 needs to shift its targets right.
COMMON_FIELDS = (*TOKEN_IDS, "tie_word_embeddings")
# Fields of a config class that are no part of an architecture: the task head's (models.head_config sets them), the
# form of the outputs and the dtype (the run sets them), and transformers' bookkeeping.
NOT_ARCHITECTURE = frozenset(
    {"num_labels", "id2label", "label2id", "problem_type", "return_dict", "output_hidden_states", "output_attentions"}
    | {"dtype", "torch_dtype", "model_type", "transformers_version", "architectures"}
)


@functools.cache
def _activation_rules() -> tuple[Rule, Rule]:
    """(an activation name of transformers' ACT2FN, T5's feed_forward_proj: such a name or gated-<name>)."""
    from transformers.activations import ACT2FN

    names = sorted(ACT2FN)
    activation = Rule(f"one of {', '.join(names)}", lambda v: isinstance(v, str) and v in names)
    gated = Rule(
        f"an activation or gated-<activation> ({', '.join(names)})",
        lambda v: isinstance(v, str) and v.removeprefix("gated-") in names,
    )
    return activation, gated


def _default_rule(value: Any) -> Rule:
    """A rule from a field's default value: its type (a float field also takes an integer); anything for null."""
    if isinstance(value, bool):
        return boolean()
    simple = {int: integer(), float: number(), str: string(), list: list_of(anything()), dict: mapping("a mapping")}
    return next((rule for kind, rule in simple.items() if isinstance(value, kind)), anything())


def architecture_keys(family: str) -> dict[str, Rule]:
    """model.architecture.* keys of a family: the fields of its transformers config class, their aliases (its
    attribute_map) and COMMON_FIELDS, less NOT_ARCHITECTURE; ranged by ARCHITECTURE_RANGES (activations: by the
    names transformers knows), else typed by the default value. Any may be left out: the class's default."""
    return _architecture_keys(families()[family].config_class())


@functools.cache
def _architecture_keys(config_class: type) -> dict[str, Rule]:
    activation, feed_forward_proj = _activation_rules()
    named = {**ARCHITECTURE_RANGES, "hidden_act": activation, "activation_function": activation}
    named.update(dense_act_fn=activation, feed_forward_proj=feed_forward_proj)
    defaults = config_class().to_dict()
    fields = [k for k in defaults if not k.startswith("_") and k not in NOT_ARCHITECTURE]
    keys = {key: named.get(key) or _default_rule(defaults[key]) for key in fields}
    aliases = config_class.attribute_map
    keys.update({alias: named.get(alias) or keys[field] for alias, field in aliases.items() if field in keys})
    keys.update({key: named[key] for key in COMMON_FIELDS if key not in keys})
    return {key: dataclasses.replace(keys[key], optional=True) for key in sorted(keys)}


def architecture_section(architecture: dict, cfg: dict) -> tuple[Table, str]:
    family = cfg["model"].get("family")
    if family not in families():  # refused as model.family, or unresolved
        return {key: anything() for key in architecture}, f"model.family={family}"
    config_class = families()[family].config_class_name
    return architecture_keys(family), f"model.family={family}: the fields of transformers.{config_class}"


@dataclass(frozen=True, kw_only=True)
class AblationSpec(Spec):
    """The ablation a run is (Table 3/4): its name, and whether it only applies to MPO methods."""

    section: ClassVar[str] = "ablation"

    name: Annotated[str, string()]
    mpo_only: Annotated[bool, boolean()]


NO_ABLATION = AblationSpec(name="none", mpo_only=False)


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """What the modules below the runner receive of a run (config.run_spec builds it from the composed config,
    once the whole config has been checked): the seed, the typed sections, and the method as plain resolved values
    (its keys depend on its layer kind, its router's on the router type; the schema has checked them)."""

    seed: int
    model: ModelSpec
    method: dict[str, Any]
    train: TrainSpec | None = None  # None: a dry run, which trains nothing
    task: TaskSpec | None = None  # None: no task chosen (a bare dry run)
    data_dir: str | None = None  # the root of local data (tasks/data_location.py); None: the hub
    ablation: AblationSpec = NO_ABLATION

    @property
    def method_label(self) -> str:
        """method[-ablation], as run directories and the paper's parameter table name it."""
        name = self.ablation.name
        return self.method["name"] if name == "none" else f"{self.method['name']}-{name}"


# --- task: one spec per task.type ------------------------------------------------------------------------------


def registered_families() -> Rule:
    """task.families: the registered model families the task was written for (it also runs on their kind)."""
    return list_of(registered_family(), nonempty=True)


def task_types() -> Rule:
    return choice(*TASK_SPECS)


@dataclass(frozen=True, kw_only=True)
class TaskSpec(Spec):
    """What every task has; a task type's spec adds its own keys (TASK_SPECS)."""

    section: ClassVar[str] = "task"

    type: Annotated[str, task_types]
    name: Annotated[str, string()]
    families: Annotated[list[str], registered_families]
    data_seed: Annotated[int, integer(ge=0)]
    data_dir: Annotated[str | None, string(null=True)] = None  # this task's own data folder (tasks/data_location.py)
    label_smoothing: Annotated[float | None, number(ge=0, lt=1)] = None  # the default of train.label_smoothing


@dataclass(frozen=True, kw_only=True)
class GlueTextSpec(TaskSpec):
    """GLUE as text: where the hub has it and how long the inputs and (T5's) targets may be."""

    hub_path: Annotated[str, string()]
    max_source_length: Annotated[int, integer(ge=1)]
    max_target_length: Annotated[int, integer(ge=1)]


@dataclass(frozen=True, kw_only=True)
class GlueSpec(GlueTextSpec):
    """One GLUE task (task.type glue); train_size, validation_size: seeded subsets after the split rule, for budget
    runs (tasks/glue_data.py load_glue_splits); null: all."""

    glue_task: Annotated[str, choice(*GLUE_TASKS)]
    train_size: Annotated[int | None, integer(ge=1, null=True)] = None
    validation_size: Annotated[int | None, integer(ge=1, null=True)] = None


GLUE_NAME = Rule(  # as tasks/glue_data.py reads a task name: "SST-2" and "sst-2" are sst2
    f"a GLUE task ({', '.join(GLUE_TASKS)}; any case, hyphens ignored)",
    lambda v: isinstance(v, str) and v.lower().replace("-", "") in GLUE_TASKS,
)


@dataclass(frozen=True, kw_only=True)
class MultiTaskSpec(GlueTextSpec):
    """The GLUE tasks as one temperature-sampled mixture (task.type glue_multitask; tasks/multitask.py)."""

    tasks: Annotated[list[str], list_of(GLUE_NAME, nonempty=True)]  # duplicates: refused by tasks/multitask.py
    temperature: Annotated[float, number(gt=0)]
    mixture_size: Annotated[int | None, integer(ge=1, null=True)] = None


@dataclass(frozen=True, kw_only=True)
class SamplingSpec(TaskSpec):
    """Unconditional samples scored with BLEU on the test split (tasks/generation.py)."""

    num_samples: Annotated[int, integer(ge=1)]
    top_k: Annotated[int, integer(ge=0)]  # 0: no top-k filtering
    bleu_n: Annotated[list[int] | None, list_of(integer(ge=1)).or_null()]  # null or []: no samples scored
    self_bleu_n: Annotated[list[int] | None, list_of(integer(ge=1)).or_null()]
    max_references: Annotated[int | None, integer(ge=1, null=True)]
    sample_batch_size: Annotated[int | None, integer(ge=1, null=True)]


@dataclass(frozen=True, kw_only=True)
class LanguageModelingSpec(SamplingSpec):
    """Causal LM on WikiText-2 (task.type lm), with samples from the start token."""

    text_task: Annotated[str, choice("wikitext2")]
    block_size: Annotated[int, integer(ge=1)]
    sample_length: Annotated[int, integer(ge=1)]  # new tokens per sample


@dataclass(frozen=True, kw_only=True)
class GenerationSpec(SamplingSpec):
    """One sentence per sequence, then samples (task.type generation: EMNLP2017 News, IMDB)."""

    text_task: Annotated[str, choice("emnlp_news", "imdb")]
    max_length: Annotated[int, integer(ge=2)]
    references: Annotated[str, choice("first", "sample")] = "first"


TASK_SPECS: dict[str, type[TaskSpec]] = {
    "glue": GlueSpec,
    "glue_multitask": MultiTaskSpec,
    "lm": LanguageModelingSpec,
    "generation": GenerationSpec,
}


def task_spec(values: Mapping[str, Any]) -> TaskSpec:
    """The spec of a task section, by its type."""
    kind = values.get("type")
    return TASK_SPECS.get(kind, TaskSpec).from_mapping(values)
