"""Model families, one file each (t5.py, gpt2.py, bert.py; the interface is base.py's `Backbone`), and the
registry that names them for `model.family`. A new family is one file and one line:

    FAMILIES["llama"] = Llama()

after which `model.family: llama` configs validate (their `architecture` takes the fields of the family's
transformers config class), build, upcycle into every method, save and load, and run every task of their kind
(`Backbone.kind`). tests/test_new_family.py registers a Llama-style decoder this way from the test file alone.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from torch import nn

from mpoe_exp.backbones.base import KINDS, Backbone, FFNSite, ModelShapes
from mpoe_exp.backbones.bert import Bert
from mpoe_exp.backbones.gpt2 import GPT2
from mpoe_exp.backbones.t5 import T5
from mpoe_exp.errors import UserError
from mpoe_exp.registry import Registry

__all__ = [
    "FAMILIES",
    "KINDS",
    "Backbone",
    "FFNSite",
    "ModelShapes",
    "architecture_defaults",
    "family_of",
    "shapes_of",
    "transformers_config",
]

FAMILIES: Registry = Registry("model family (model.family)", {"t5": T5(), "gpt2": GPT2(), "bert": Bert()})


def family_of(model: nn.Module) -> Backbone:
    """The family of a built transformers model, by its config's model_type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for backbone in FAMILIES.values():
        if backbone.model_type == model_type:
            return backbone
    raise UserError(f"no registered model family builds {type(model).__name__} (model_type {model_type!r})")


@functools.cache
def _defaults(config_class: type) -> dict[str, Any]:
    return config_class().to_dict()


def architecture_defaults(family: str) -> dict[str, Any]:
    """The fields of a family's transformers config class with their default values (T5Config().to_dict(), ...)."""
    return _defaults(FAMILIES[family].config_class())


def transformers_config(family: str, architecture: Mapping[str, Any], head: Mapping[str, Any] | None = None):
    """The family's transformers config from `model.architecture` (plain values) and the task head's fields."""
    defaults = architecture_defaults(family)
    kwargs = {  # `layer_norm_epsilon=1` is 1.0: transformers 5 refuses an int in a float field
        key: float(value) if isinstance(defaults.get(key), float) and type(value) is int else value
        for key, value in architecture.items()
    }
    return FAMILIES[family].config_class()(**kwargs, **(head or {}))


def shapes_of(family: str, architecture: Mapping[str, Any]) -> ModelShapes:
    """The sizes of a family's model built from `model.architecture` (plain values)."""
    return FAMILIES[family].shapes(transformers_config(family, architecture))
