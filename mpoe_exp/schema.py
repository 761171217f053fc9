"""The tables the composed config is checked with before any work starts (config.check_config): the top level,
and the sections whose keys depend on a sibling's value.

Each config section is a table `key -> Rule` (mpoe_exp/rules.py); a value outside its rule, a missing key or a key
the section does not know (one a router, a layer or a task would silently ignore) is refused with one line: the full
key, the value, what is allowed. The train, model, task and ablation tables are their specs' (mpoe_exp/spec.py: the
annotations of TrainSpec, ModelSpec, the task type's spec). What a method may set comes from its layer kind
(`mpoe_exp.moe.LAYER_KINDS`: expert kinds, router types, its own keys), router keys and logger keys from each class's
constructor (keyword-only parameters, types from their annotations), so a new layer kind, router or logger needs no
edit here; `VALUE_RANGES` adds the ranges of known parameter names. Relations between keys are checked after this,
each once, by the code that needs them: attention heads dividing the hidden size by config.check_architecture;
top_k <= num_experts, Cartesian's even expert count and the MPO factorization fitting the model by the router and
layer constructors, which config.validate_config runs on the meta device (models.refuse_unbuildable).
"""

from __future__ import annotations

import inspect
import re
import typing
from dataclasses import replace
from typing import Any

from mpoe_exp.errors import UserError
from mpoe_exp.moe import LAYER_KINDS, ROUTERS
from mpoe_exp.rules import (
    Rule,
    Section,
    Table,
    annotation_rule,
    anything,
    boolean,
    choice,
    integer,
    is_int,
    mapping,
    number,
    string,
)
from mpoe_exp.spec import TASK_SPECS, AblationSpec, ModelSpec, TaskSpec, TrainSpec

# --- the tables ------------------------------------------------------------------------------------------------

TRAIN: Table = TrainSpec.table()  # the spec's annotations (mpoe_exp/spec.py)

ABLATION: Table = AblationSpec.table()

MPO: Table = {
    "num_tensors": integer(ge=1),  # odd and >= 3: the MPO layer says why (models.refuse_unbuildable)
    "max_bond": integer(ge=1, null=True, optional=True),
    "share_central": boolean(optional=True),
    "factorizations": mapping("a mapping {ROWSxCOLS: [[row factors], [col factors]]}", null=True, optional=True),
    "cache_in_eval": boolean(optional=True),
}

# Ranges of router constructor parameters, by name (any router with such a parameter); other parameters are checked
# against their type annotation only.
VALUE_RANGES: Table = {
    "init_std": number(ge=0),
    "jitter": number(ge=0, lt=1),
    "capacity_factor_train": number(gt=0, null=True),
    "capacity_factor_eval": number(gt=0, null=True),
    "balance_loss_coef": number(ge=0),
    "z_loss_coef": number(ge=0),
    "importance_loss_coef": number(ge=0),
    "load_loss_coef": number(ge=0),
    "noise_eps": number(ge=0),
    "top_k": integer(ge=1),
    "groups": integer(ge=1),
}
# Ranges of layer kinds' own method keys (`LayerKind.keys`), by name; other keys are checked against their type.
LAYER_KEY_RANGES: Table = {
    "rank": integer(ge=1),
    "shared_experts": integer(ge=0),
    "bottleneck_reduction": integer(ge=1),
}


# --- sections whose keys depend on their content ----------------------------------------------------------------


def layer_keys(types_by_name: dict[str, Any]) -> dict[str, Rule]:
    """Rules of a layer kind's own method keys (`LayerKind.keys`: name -> type), ranges from LAYER_KEY_RANGES;
    every one may be left out."""
    keys = {}
    for name, annotation in types_by_name.items():
        rule = annotation_rule(annotation)
        if name in LAYER_KEY_RANGES:
            nullable = type(None) in typing.get_args(annotation)
            rule = LAYER_KEY_RANGES[name].or_null() if nullable else LAYER_KEY_RANGES[name]
        keys[name] = replace(rule, optional=True)
    return keys


def router_keys(router_cls: type, fixed: tuple[str, ...] = ()) -> dict[str, Rule]:
    """method.router.* keys of a router class: its type and its keyword-only constructor parameters (less
    `fixed`)."""
    return {"type": string(), **constructor_keys(router_cls, fixed)}


def constructor_keys(cls: type, fixed: tuple[str, ...] = ()) -> dict[str, Rule]:
    """The config keys of a class built from them (a router, a logger): its keyword-only constructor parameters
    (less `fixed`), typed by VALUE_RANGES or else by their annotations; a parameter with a default may be left
    out."""
    hints = typing.get_type_hints(cls.__init__)
    keys: dict[str, Rule] = {}
    for parameter in inspect.signature(cls.__init__).parameters.values():
        if parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.name in fixed:
            continue
        rule = VALUE_RANGES.get(parameter.name) or annotation_rule(hints.get(parameter.name))
        keys[parameter.name] = replace(rule, optional=parameter.default is not inspect.Parameter.empty)
    return keys


def _router_section(router: dict, method: dict) -> tuple[Table, str]:
    layer_name = method.get("layer", "moe")
    layer = LAYER_KINDS[layer_name]
    kind = router.get("type")
    if kind not in layer.routers:
        raise UserError(
            f"method.router.type={kind}: method.layer={layer_name} takes router type {' or '.join(layer.routers)}"
        )
    return router_keys(ROUTERS[kind], layer.fixed_router_keys), f"router type {kind}, method.layer={layer_name}"


def _method_section(method: dict, cfg: dict) -> tuple[Table, str]:
    experts = method.get("experts")
    keys: dict = {"name": string(), "experts": choice("none", "dense", "mpo")}
    if experts not in ("dense", "mpo"):
        return keys, f"method.experts={experts}"
    layer_name = method.get("layer", "moe")
    keys["layer"] = choice(*LAYER_KINDS, optional=True)
    if layer_name not in LAYER_KINDS:
        return keys, f"method.experts={experts}"
    layer = LAYER_KINDS[layer_name]
    keys["experts"] = choice(*layer.experts)
    keys.update(num_experts=integer(ge=1), router=Section(lambda r, _: _router_section(r, method)))
    keys.update(layer_keys(layer.keys(method)))
    if experts == "mpo":
        keys.update(mpo=Section(MPO), gradient_mask_prob=number(ge=0, le=1, optional=True))
    return keys, f"method.layer={layer_name} with {experts} experts"


def _task_section(task: dict, cfg: dict) -> tuple[Table, str]:
    kind = task.get("type")
    if kind is None:  # settings for the task a sweep chooses later (smoke_gpt2.yaml): checked once it is chosen
        return {key: anything() for key in task}, "no task chosen"
    return TASK_SPECS.get(kind, TaskSpec).table(), f"task.type={kind}"


def _logger_section(logger: dict, cfg: dict) -> tuple[Table, str]:
    """The logger's name and its class's keyword-only constructor parameters (loggers.LOGGERS)."""
    from mpoe_exp.loggers import LOGGERS

    name = logger.get("name")
    keys = constructor_keys(LOGGERS[name]) if name in LOGGERS else {}
    return {"name": choice(*LOGGERS), **keys}, f"logger={name}"


DEVICE = Rule("auto, cpu, cuda or cuda:N", lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v))
CPU_THREADS = Rule(
    "auto or an integer >= 1", lambda v: v == "auto" or (is_int(v) and v >= 1), optional=True
)  # torch threads on CPU

CONFIG: Table = {
    "seed": integer(ge=0),
    "dry_run": boolean(),
    "experiment_name": string(),
    "table_model": string(null=True),
    "runs_dir": string(),
    "data_dir": string(null=True),
    "force": boolean(),
    "device": DEVICE,
    "cpu_threads": CPU_THREADS,
    "cpu_malloc": choice("system", "keep", optional=True),
    "train": Section(TRAIN),
    "model": Section(lambda model, cfg: (ModelSpec.table(), "")),
    "method": Section(_method_section),
    "ablation": Section(ABLATION),
    "task": Section(_task_section, null=True, optional=True),  # a dry run needs none (runner checks)
    "logger": Section(_logger_section),
    "hydra": anything(optional=True),  # present when composed with return_hydra_config; Hydra checks it
}
