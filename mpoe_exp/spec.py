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
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from mpoe_exp.rules import Table, annotation_rule, boolean, check_table, choice, integer, number

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
        check_table(f"{cls.section}.", values, cls.table(), values)
        return cls(**values)


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
