"""`RunRecord` is results.json's schema: every committed study record reads into it and writes back as it was, keys
it does not know survive, and each status writes only its own keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpoe_exp import compose_config
from mpoe_exp.results import hparams
from mpoe_exp.run_record import HPARAM_KEYS, HPARAMS, RESULTS_FILE, BadRecord, RunRecord

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = sorted((ROOT / "docs").rglob(RESULTS_FILE))


def test_there_are_committed_records():
    assert len(COMMITTED) >= 8


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_a_committed_record_reads_and_writes_back_unchanged(path):
    data = json.loads(path.read_text())
    record = RunRecord.from_json(data, path)
    assert record.extra == {}  # the schema names every key the runner wrote
    assert record.to_json() == data


def minimal(**changes) -> dict:
    record = RunRecord("finished", "e", "m", "mpoe", "sst2", 1, {"lr": 1e-4}, main_metric="accuracy",
                       validation={"accuracy": 80.0}, test={"accuracy": 81.0})  # fmt: skip
    return {**record.to_json(), **changes}


def test_unknown_keys_are_kept_and_written_back():
    data = minimal(from_a_newer_version={"x": 1})
    record = RunRecord.from_json(data)
    assert record.extra == {"from_a_newer_version": {"x": 1}} and record.to_json() == data


def test_each_status_writes_its_own_keys():
    finished = RunRecord.from_json(minimal()).to_json()
    assert "error" not in finished and {"validation", "test", "history", "best_step"} <= set(finished)
    failed = RunRecord("failed", "e", "m", "mpoe", "sst2", 1, {}, error="diverged").to_json()
    assert failed["error"] == "diverged" and not {"validation", "test", "history", "best_step"} & set(failed)
    assert list(finished)[0] == "schema_version" == list(failed)[0]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ([1, 2], "not a JSON object"),
        ({"status": "finished"}, "missing required keys: experiment"),
        (minimal(status="running"), "unknown status 'running'"),
        (minimal(hparams=[1]), "hparams is not an object"),
        (minimal(test=[1]), "validation/test are not objects"),
        (minimal(validation={"accuracy": "high"}), "no numeric main metric 'accuracy'"),
    ],
)
def test_what_is_not_a_run_record_says_why(data, reason):
    with pytest.raises(BadRecord, match=reason):
        RunRecord.from_json(data)


def test_the_readable_hyperparameters_come_from_one_table():
    cfg = compose_config(["train.batch_size=8", "train.grad_accum_steps=4", "train.lr=3e-4", "train.epochs=2"])
    assert hparams(cfg) == {"lr": 3e-4, "bs": 32, "ep": 2, "steps": None}
    assert set(hparams(cfg)) == set(HPARAMS)
    assert HPARAM_KEYS == {"train.lr", "train.batch_size", "train.grad_accum_steps", "train.epochs", "train.max_steps"}
