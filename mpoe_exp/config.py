"""Config composition (the Python twin of the CLI) and early validation with messages for people."""

from __future__ import annotations

import functools
import os
import re
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mpoe_exp.conf_files import CONFIG_DIR
from mpoe_exp.errors import UserError
from mpoe_exp.spec import AblationSpec, ModelSpec, RunSpec, TrainSpec, task_spec

CONFIG_NAME = "config"
DEMO_DATA_DIR = Path(__file__).resolve().parent / "demo_data"

# The demo data folder of each task (smoke experiments sweep tasks, so data_dir must follow the task).
DEMO_DATA_OF_TASK = {"wikitext2": "wikitext2", "emnlp_news": "news", "imdb": "imdb"}  # every GLUE task: "glue"


def demo_data_for(task_name: str) -> str:
    """The bundled demo data folder for a task: ${mpoe_demo_data_for:${task.name}} in a config."""
    return str(DEMO_DATA_DIR / DEMO_DATA_OF_TASK.get(task_name, "glue"))


# ${mpoe_demo_data:glue} -> the bundled demo data folder, wherever the package is installed
OmegaConf.register_new_resolver("mpoe_demo_data", lambda sub="": str(DEMO_DATA_DIR / sub), replace=True)
OmegaConf.register_new_resolver("mpoe_demo_data_for", demo_data_for, replace=True)


def sweep_tag() -> str:
    """What makes a sweep's folder unique beside its start time: this process's id and a random tag."""
    return f"{os.getpid()}-{secrets.token_hex(3)}"


# ${mpoe_sweep_tag:} in hydra.sweep.dir; cached, so every use within one composed config gives the same folder
OmegaConf.register_new_resolver("mpoe_sweep_tag", sweep_tag, use_cache=True, replace=True)


def available(group: str) -> list[str]:
    """The choices of a config group (file names under conf/<group>/)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/ with Hydra overrides exactly as `python -m mpoe_exp <overrides>` does, then validate."""
    from hydra.errors import HydraException

    overrides = list(overrides or [])
    try:
        cfg = _compose(overrides)
    except HydraException as err:
        raise UserError(hydra_error_line(err, overrides)) from None
    validate_config(cfg)
    return cfg


def _compose(overrides: list[str], **kwargs) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=overrides, **kwargs)


def hydra_error_line(err: Exception, overrides: list[str]) -> str:
    """One line for a Hydra composition error: the unknown choice or key, and what is allowed instead."""
    text = str(err)
    missing_choice = re.search(r"Could not find '([\w/]+)/([^']*)'", text)
    if missing_choice:
        group, name = missing_choice.groups()
        return f"unknown {group}={name}: {group} is one of {', '.join(available(group))}"
    missing_key = re.search(r"Could not override '([^']+)'", text)
    if missing_key:
        key = missing_key.group(1)
        others = [o for o in overrides if o.partition("=")[0].lstrip("+~") != key]
        try:
            composed = _compose(others)
        except Exception:  # the other overrides are broken too: name the key alone
            return f"unknown key {key}: it is not a setting of this config"
        parent = key
        while parent:  # the nearest section that exists, and what it takes
            parent = parent.rpartition(".")[0]
            node = OmegaConf.select(composed, parent) if parent else composed
            if isinstance(node, DictConfig):
                return f"unknown key {key}: {parent or 'the config'} takes {', '.join(str(k) for k in node)}"
        return f"unknown key {key}: it is not a setting of this config"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)
    return f"bad config overrides {' '.join(overrides)}: {first}"


def check_composes(arguments: list[str], multirun: bool) -> None:
    """Compose the command's runs as Hydra will (for a sweep, enough runs to use every swept value once): an unknown
    choice or key is a UserError of one line here, rather than Hydra's multi-line report later."""
    from hydra.errors import HydraException

    runs = expand_sweep(arguments) if multirun else [list(arguments)]
    unused = {o for run in runs for o in run}
    for run in runs:
        if unused.isdisjoint(run):
            continue
        unused.difference_update(run)
        try:
            _compose(run)
        except HydraException as err:
            raise UserError(hydra_error_line(err, run)) from None


def expand_sweep(arguments: list[str]) -> list[list[str]]:
    """The runs of `python -m mpoe_exp -m <arguments>`, as Hydra's basic sweeper makes them: the sweep parameters
    of the config (an experiment's hydra.sweeper.params), then the command line's (which win), one run per
    combination of their comma-separated values. Each run is a list of overrides."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        fixed = [a for a, o in zip(arguments, parser.parse_overrides(arguments)) if not o.is_sweep_override()]
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=fixed, return_hydra_config=True)
        params = cfg.hydra.sweeper.get("params") or {}
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(arguments))
        return BasicSweeper.split_arguments(overrides, None)[0]
    except HydraException as err:
        raise UserError(hydra_error_line(err, list(arguments))) from None


def validate_config(cfg: DictConfig) -> None:
    """Refuse bad settings and bad combinations before any work starts: every key against its typed schema
    (mpoe_exp/schema.py), the model architecture against its transformers class, then the method against the model:
    its expert layer built on the meta device for each FFN, so the constructors that need a relation refuse it."""
    from mpoe_exp.models import refuse_unbuildable

    method = cfg.method
    if cfg.ablation.get("mpo_only") and method.get("experts") != "mpo":  # first: it adds method.mpo keys
        raise UserError(
            f"ablation={cfg.ablation.name} only applies to MPO methods (mpoe, mpoe++), not method={method.name}"
        )
    check_config(cfg)
    check_model_path_is_read(cfg.model)
    check_architecture(cfg.model)
    try:
        refuse_unbuildable(ModelSpec.from_mapping(plain(cfg.model)), plain(method))
    except UserError as err:
        raise UserError(f"model={cfg.model.name} method={method.name}: {err}") from None


def check_model_path_is_read(model_cfg: DictConfig) -> None:
    """Refuse `model.path` on a model that reads no model files: it would be ignored."""
    from mpoe_exp.fingerprints import reads_model_files

    if model_cfg.get("path") and not reads_model_files(ModelSpec.from_mapping(plain(model_cfg))):
        raise UserError(
            f"model.path={model_cfg.path} is not used: model={model_cfg.name} has random weights "
            f"(model.pretrained=false) and the byte-level tokenizer (model.tokenizer=byte); drop model.path, or set "
            f"model.pretrained=true to load the weights from it"
        )


def check_architecture(model_cfg: DictConfig) -> None:
    """Refuse model.architecture fields that its model class would fail on together: attention heads that do not
    divide the hidden size, a token id outside the vocabulary, a vocabulary smaller than the byte-level tokenizer's."""
    from mpoe_exp.backbones import FAMILIES
    from mpoe_exp.models import model_config
    from mpoe_exp.spec import TOKEN_IDS

    try:
        # the class's defaults filled in, aliases resolved
        config = model_config(ModelSpec.from_mapping(plain(model_cfg)))
    except Exception as err:  # a check of transformers' own that the schema does not make
        reason = " ".join(str(err).split())
        raise UserError(f"model.architecture of model={model_cfg.name} is refused by transformers: {reason}") from None
    family = FAMILIES[model_cfg.family]
    if family.heads and getattr(config, family.heads[1]) % getattr(config, family.heads[0]):
        heads, width = family.heads
        raise UserError(
            f"model.architecture.{heads}={getattr(config, heads)} is not allowed: it must divide "
            f"model.architecture.{width}={getattr(config, width)} (each head takes an equal share)"
        )
    vocab = config.vocab_size
    for key in TOKEN_IDS:
        value = getattr(config, key, None)
        if any(i >= vocab for i in (value if isinstance(value, list) else [value]) if i is not None):
            raise UserError(
                f"model.architecture.{key}={value} is not allowed: a token id must be < {vocab} "
                f"(model.architecture.vocab_size)"
            )
    if model_cfg.tokenizer == "byte" and vocab < byte_vocabulary(family):
        raise UserError(
            f"model.architecture.vocab_size={vocab} is not allowed: model.tokenizer=byte has "
            f"{byte_vocabulary(family)} tokens"
        )


@functools.cache
def byte_vocabulary(family) -> int:
    """The number of tokens of a family's byte-level tokenizer."""
    return len(family.byte_tokenizer())


def run_spec(cfg: DictConfig, *, train: bool = True) -> RunSpec:
    """The typed spec of a composed, checked config (mpoe_exp/spec.py). train=False: without the train section (a
    dry run, whose task may be unresolved)."""
    chosen = isinstance(cfg.get("task"), DictConfig) and "type" in cfg.task  # a dry run may have none
    task = task_spec(plain(cfg.task)) if chosen else None
    return RunSpec(
        seed=cfg.seed,
        model=ModelSpec.from_mapping(plain(cfg.model)),
        method=plain(cfg.method),
        train=train_spec(cfg) if train else None,
        task=task,
        data_dir=cfg.data_dir if task is not None else None,
        ablation=AblationSpec.from_mapping(plain(cfg.ablation)),
    )


def plain(node: DictConfig) -> dict:
    """A config section as plain resolved values."""
    return OmegaConf.to_container(node, resolve=True)


def train_spec(cfg: DictConfig) -> TrainSpec:
    """The run's `train` section as its typed spec (mpoe_exp/spec.py)."""
    return TrainSpec.from_mapping(OmegaConf.to_container(cfg.train, resolve=True))


def method_label(cfg: DictConfig) -> str:
    """method[-ablation], as run directories and the paper's parameter table name it (RunSpec.method_label)."""
    return run_spec(cfg, train=False).method_label


def check_config(cfg: DictConfig) -> None:
    """Refuse, with one line naming the key and what it allows, any value, missing key or unknown key of `cfg`
    (the tables: mpoe_exp/schema.py, from the specs of mpoe_exp/spec.py)."""
    from mpoe_exp.rules import check_table
    from mpoe_exp.schema import CONFIG

    resolved = {key: _plain(cfg, key) for key in cfg if key != "hydra"}
    check_table("", resolved, CONFIG, resolved)


def _plain(node: DictConfig | ListConfig, key: Any) -> Any:
    """node[key] resolved into plain Python (dicts, lists, scalars), Unresolved where an interpolation fails."""
    from omegaconf.errors import InterpolationResolutionError

    from mpoe_exp.rules import Unresolved

    try:
        value = node[key]
    except InterpolationResolutionError:
        return Unresolved()
    if isinstance(value, DictConfig):
        return {k: _plain(value, k) for k in value}
    if isinstance(value, ListConfig):
        return [_plain(value, i) for i in range(len(value))]
    return value
