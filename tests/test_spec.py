"""The typed run spec (mpoe_exp/spec.py): a section's annotations are its schema, its spec is built from plain
values and refuses a bad one in the same one line as the composed config's check."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from mpoe_exp import compose_config, schema
from mpoe_exp.config import train_spec
from mpoe_exp.errors import UserError
from mpoe_exp.spec import CHECKPOINT_EVERY, TrainSpec


def plain_train(*overrides: str) -> dict:
    return OmegaConf.to_container(compose_config(["model=tiny-t5", *overrides]).train, resolve=True)


def test_the_schema_checks_train_with_the_specs_own_table():
    assert list(schema.TRAIN) == [f.name for f in dataclasses.fields(TrainSpec)]
    assert {k: r.allowed for k, r in schema.TRAIN.items()} == {k: r.allowed for k, r in TrainSpec.table().items()}


def test_a_train_spec_is_typed_frozen_and_resolved():
    spec = train_spec(compose_config(["model=tiny-t5", "task=cola", "train.lr=3e-4"]))
    assert isinstance(spec, TrainSpec) and spec.lr == 3e-4
    assert spec.label_smoothing == 0.1  # the interpolation (the task's default) resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.lr = 1.0


def test_left_out_optional_keys_take_the_specs_defaults():
    values = {k: v for k, v in plain_train().items() if k not in ("checkpoint_every", "group_by_length")}
    spec = TrainSpec.from_mapping(values)
    assert spec.checkpoint_every == CHECKPOINT_EVERY and spec.group_by_length is False


@pytest.mark.parametrize(
    "change,message",
    [
        ({"lr": 0}, "train.lr=0 is not allowed: train.lr must be a number > 0"),
        ({"precision": "fp8"}, "train.precision=fp8 is not allowed: train.precision must be one of fp32, bf16, fp16"),
        ({"learning_rate": 1e-4}, "unknown key train.learning_rate: train takes lr, epochs, max_steps"),
        ({"lr": None}, "train.lr=null is not allowed"),
    ],
)
def test_a_bad_value_is_refused_in_one_line(change, message):
    with pytest.raises(UserError) as refused:
        TrainSpec.from_mapping({**plain_train(), **change})
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_a_missing_key_is_refused():
    values = plain_train()
    del values["batch_size"]
    with pytest.raises(UserError, match="missing key train.batch_size: train needs it"):
        TrainSpec.from_mapping(values)
