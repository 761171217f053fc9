"""Every run of every experiment keeps its identity: the hash of its configured identity (the settings that make
a run, results.py's `configured_identity`) is pinned in config_pins.json. A refactor must leave every pin as it
is; a deliberate identity change rewrites the pins in its own commit, with

    python tests/test_config_pins.py

and the diff of config_pins.json shows which runs it renames. The data and model-file fingerprints, the other
half of a run's identity, are read from files and tested in test_run_identity.py."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PINS = Path(__file__).resolve().parent / "config_pins.json"


def experiments() -> list[str]:
    from mpoe_exp.config import available

    return sorted(available("experiment"))


def run_key(overrides: list[str]) -> str:
    return " ".join(overrides)


def pinned_hash(overrides: list[str]) -> str:
    from mpoe_exp import compose_config
    from mpoe_exp.results import configured_identity

    text = json.dumps(configured_identity(compose_config(overrides)), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def experiment_runs(experiment: str) -> list[list[str]]:
    from mpoe_exp.config import expand_sweep

    return expand_sweep([f"experiment={experiment}"])


def pins() -> dict[str, dict[str, str]]:
    return json.loads(PINS.read_text())


def test_every_experiment_has_its_pins():
    assert sorted(pins()) == experiments()


def test_the_first_run_of_each_experiment_keeps_its_identity():
    """The fast tier's check: one run per experiment (the slow tier checks every run)."""
    pinned = pins()
    for experiment in experiments():
        first = experiment_runs(experiment)[0]
        assert pinned[experiment][run_key(first)] == pinned_hash(first), experiment


@pytest.mark.slow
@pytest.mark.parametrize("experiment", experiments())
def test_every_run_keeps_its_identity(experiment):
    runs = experiment_runs(experiment)
    assert sorted(pins()[experiment]) == sorted(run_key(r) for r in runs)  # the sweep itself is unchanged
    changed = [run_key(r) for r in runs if pins()[experiment][run_key(r)] != pinned_hash(r)]
    assert changed == []


def test_a_changed_setting_changes_the_pinned_hash():
    """The pin sees what it guards: one setting of a run's method changes its hash."""
    first = experiment_runs("quickstart")[0]
    assert pinned_hash(first) != pinned_hash([*first, "method.gradient_mask_prob=0.25"])


def write_pins() -> None:
    table = {e: {run_key(r): pinned_hash(r) for r in experiment_runs(e)} for e in experiments()}
    PINS.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {sum(map(len, table.values()))} pins of {len(table)} experiments to {PINS.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    write_pins()
