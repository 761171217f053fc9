"""The experiment runner end to end on tiny models and local data: results files, skip, resume, failures."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpoe_exp import compose_config
from mpoe_exp.config import DEMO_DATA_DIR
from mpoe_exp.errors import UserError
from mpoe_exp.results import RESULTS_FILE, run_dir
from mpoe_exp.runner import run

ROOT = Path(__file__).resolve().parent.parent
LM_RUN = [
    "model=tiny-gpt2",
    "method=mpoe",
    "task=wikitext2",
    f"data_dir={DEMO_DATA_DIR / 'wikitext2'}",
    "task.block_size=64",
    "train.batch_size=8",
    "train.max_steps=24",
    "train.eval_every=4",
    "train.lr=1e-3",
    "train.eval_batch_size=16",
]


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mpoe_exp", *args], capture_output=True, text=True, cwd=ROOT, timeout=600, **kwargs
    )


@pytest.mark.slow
def test_quickstart_command_end_to_end_learns(tmp_path):
    """Its time is a benchmark, not a test: benchmarks/wall_time.py (BENCHMARKS.md, "Wall-clock time")."""
    result = cli("experiment=quickstart", f"runs_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    files = list(tmp_path.rglob(RESULTS_FILE))
    assert len(files) == 1
    results = json.loads(files[0].read_text())
    assert files[0].parent.relative_to(tmp_path).parts[:4] == ("quickstart", "tiny-t5", "mpoe", "cola")
    assert results["status"] == "finished"
    for key in ("validation", "test", "best_step", "parameters", "wall_time_s", "tokens_per_second", "config"):
        assert key in results
    assert "mcc" in results["test"] and "mcc" in results["validation"]
    assert results["split_sizes"] == {"train": 400, "validation": 60, "test": 60}
    assert (files[0].parent / "checkpoints" / "best.pt").is_file()
    assert results["validation"]["mcc"] >= 50.0  # MCC x100: a newcomer's first run shows learning
    assert results["validation"]["unparsable"] == 0


def test_language_modeling_run_reports_perplexity_and_selects_on_validation(tmp_path):
    cfg = compose_config([*LM_RUN, f"runs_dir={tmp_path}"])
    directory = run(cfg)
    results = json.loads((directory / RESULTS_FILE).read_text())
    history = results["history"]
    assert [h["step"] for h in history] == [4, 8, 12, 16, 20, 24]
    best = min(history, key=lambda h: h["validation"]["perplexity"])
    assert results["best_step"] == best["step"]
    assert results["validation"] == best["validation"]
    assert results["test"]["perplexity"] > 1.0
    assert history[-1]["validation"]["perplexity"] < history[0]["validation"]["perplexity"]
    assert 0 < results["central_updates"] < 24  # gradient mask p_b = 0.5 skipped some steps


def write_stsb(data_dir: Path) -> None:
    folder = data_dir / "STS-B"
    folder.mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    rng = random.Random(0)
    for split, n in (("train", 40), ("dev", 20)):
        rows = [header]
        for i in range(n):
            score = round(rng.uniform(0, 5), 2)
            rows.append(f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\ta sentence {i}\tanother one {i % 7}\t{score}")
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def test_glue_regression_task_end_to_end(tmp_path):
    write_stsb(tmp_path / "glue")
    cfg = compose_config(
        [
            "model=tiny-t5",
            "method=switch",
            "task=stsb",
            f"data_dir={tmp_path / 'glue'}",
            f"runs_dir={tmp_path / 'runs'}",
            "train.max_steps=6",
            "train.eval_every=3",
            "train.batch_size=8",
        ]
    )
    results = json.loads((run(cfg) / RESULTS_FILE).read_text())
    assert set(results["test"]) >= {"pearson", "spearman", "unparsable"}
    assert results["split_sizes"] == {"train": 40, "validation": 10, "test": 10}


def test_finished_run_is_skipped_and_force_reruns(tmp_path, capsys):
    cfg = compose_config([*LM_RUN, f"runs_dir={tmp_path}", "train.max_steps=4"])
    directory = run(cfg)
    mtime = (directory / RESULTS_FILE).stat().st_mtime_ns
    run(cfg)
    assert "already finished" in capsys.readouterr().out
    assert (directory / RESULTS_FILE).stat().st_mtime_ns == mtime
    run(compose_config([*LM_RUN, f"runs_dir={tmp_path}", "train.max_steps=4", "force=true"]))
    assert (directory / RESULTS_FILE).stat().st_mtime_ns != mtime


def logged_records(path: Path) -> list[dict]:
    """train.log's records; a line still being written is left out."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


@pytest.mark.slow
def test_run_killed_at_a_random_point_resumes_to_the_same_result(tmp_path):
    """kill -9 after an evaluation past the last resume checkpoint, then the same command: the results and every
    train.log record (each evaluation once) equal an uninterrupted run's; no temporary file is left."""
    every = 6  # resume checkpoints at 6, 12, ...; evaluations at every even step
    args = [*LM_RUN, "train.max_steps=40", "train.eval_every=2", f"train.checkpoint_every={every}"]
    reference = cli(*args, f"runs_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads(next((tmp_path / "reference").rglob(RESULTS_FILE)).read_text())
    expected_log = logged_records(next((tmp_path / "reference").rglob("train.log")))

    import torch

    runs = tmp_path / "killed"
    directory = run_dir(compose_config([*args, f"runs_dir={runs}"]))
    log, rng, checkpoint = directory / "train.log", random.Random(), {"step": 0}
    for _attempt in range(5):  # each attempt resumes the one before
        proc = subprocess.Popen(
            [sys.executable, "-m", "mpoe_exp", *args, f"runs_dir={runs}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:  # wait for an evaluation past a checkpoint
            steps = [record["step"] for record in logged_records(log)]
            if steps and steps[-1] > every and steps[-1] % every:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (directory / RESULTS_FILE).exists():
            (directory / RESULTS_FILE).unlink()  # finished before the kill: the next attempt starts again
            continue
        checkpoint = torch.load(directory / "checkpoints" / "last.pt", weights_only=True)["state"]  # no code in it
        if 0 < checkpoint["step"] < logged_records(log)[-1]["step"]:
            break
    killed_at = [record["step"] for record in logged_records(log)]
    assert checkpoint["step"] < killed_at[-1] < 40, "could not kill the run after an evaluation past its checkpoint"
    leftovers = [  # as kills during torch.save, the results.json and train.log writes leave them
        directory / "checkpoints" / ".last.pt.k1ll3d.tmp",
        directory / ".results.json.k1ll3d.tmp",
        directory / ".train.log.k1ll3d.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"half a file")
    resumed = cli(*args, f"runs_dir={runs}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {directory / 'checkpoints' / 'last.pt'} at step {checkpoint['step']}" in (
        resumed.stdout + resumed.stderr
    )
    got = json.loads((directory / RESULTS_FILE).read_text())
    assert got["test"] == expected["test"]
    assert got["validation"] == expected["validation"]
    assert got["history"] == expected["history"]  # steps, losses, metrics, tokens
    assert got["central_updates"] == expected["central_updates"]
    assert logged_records(log) == expected_log  # each evaluation once, with the same values
    assert [path for path in leftovers if path.exists()] == []


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch

    from mpoe_exp.tasks.tasks import LanguageModelingTask
    from mpoe_exp.training import TrainingDiverged

    original = LanguageModelingTask.loss
    calls = {"n": 0}

    def loss_that_explodes(self, model, batch, label_smoothing):
        calls["n"] += 1
        loss = original(self, model, batch, label_smoothing)
        return loss * torch.nan if calls["n"] == 7 else loss

    monkeypatch.setattr(LanguageModelingTask, "loss", loss_that_explodes)
    cfg = compose_config([*LM_RUN, f"runs_dir={tmp_path}", "train.eval_every=2", "train.checkpoint_every=2"])
    with pytest.raises(TrainingDiverged, match="the loss became nan at step 7"):
        run(cfg)
    directory = run_dir(cfg)
    checkpoint = torch.load(directory / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["state"]["step"] == 6
    results = json.loads((directory / RESULTS_FILE).read_text())
    assert results["status"] == "failed" and "nan" in results["error"]


BAD_RUNS = [
    (["model=tiny-gpt2", "task=cola"], "task=cola runs on t5 or bert models"),
    (["model=tiny-t5", "task=wikitext2"], "task=wikitext2 runs on gpt2 models"),
    (["model=tiny-t5"], "no task chosen"),
    (["model=tiny-t5", "task=nonexistent"], "error: unknown task=nonexistent: task is one of cola, emnlp_news"),
    (["model=tiny-t5", "task=cola", "data_dir=/nonexistent/glue"], "/nonexistent/glue"),
]


# Each command is a fresh process (seconds of CPU importing torch): one in the fast tier, the rest slow; the messages
# of all of them are checked in this process below (the data folder's: test_a_bad_data_folder_is_refused_...).
@pytest.mark.parametrize(
    "args,message", [BAD_RUNS[0], *(pytest.param(*case, marks=pytest.mark.slow) for case in BAD_RUNS[1:])]
)
def test_bad_runs_are_refused_before_any_work(tmp_path, args, message):
    result = cli(*args, f"runs_dir={tmp_path}")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob(RESULTS_FILE))


@pytest.mark.parametrize("args,message", BAD_RUNS[:4])
def test_bad_runs_are_refused_in_one_line_by_the_checks_the_command_makes(args, message):
    from mpoe_exp.runner import check_task_fits_model

    with pytest.raises(UserError) as refused:
        check_task_fits_model(compose_config(args))
    assert message in f"error: {refused.value}" and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "model,task,where",
    [("minilm", "rte", "data_dir"), ("minilm", "rte", "task.data_dir"), ("tiny-gpt2", "imdb", "task.data_dir")],
)
def test_a_bad_data_folder_is_refused_before_the_model_is_built(tmp_path, monkeypatch, model, task, where):
    from mpoe_exp import runner

    def no_model(cfg):
        raise AssertionError("the model was built before the data folder was checked")

    monkeypatch.setattr(runner, "build_model", no_model)
    missing = tmp_path / "nonexistent"
    cfg = compose_config([f"model={model}", f"task={task}", f"{where}={missing}", f"runs_dir={tmp_path / 'runs'}"])
    with pytest.raises(UserError, match="is not a folder") as refused:
        runner.run(cfg)
    assert "\n" not in str(refused.value) and str(missing) in str(refused.value)
    assert not (tmp_path / "runs").exists()  # nothing made, nothing deleted


def test_a_batch_larger_than_the_training_split_is_refused_before_training(tmp_path, monkeypatch):
    from mpoe_exp.training import Trainer

    monkeypatch.setattr(Trainer, "fit", lambda self: pytest.fail("training started"))
    cfg = compose_config(["experiment=quickstart", "train.batch_size=100000", f"runs_dir={tmp_path}"])
    with pytest.raises(UserError) as refused:
        run(cfg)
    message = str(refused.value)
    assert "\n" not in message and "train.batch_size=100000" in message and "400 training examples" in message


@pytest.mark.slow
def test_multirun_sweep_writes_one_results_file_per_run(tmp_path):
    result = cli(
        "-m",
        "model=tiny-t5",
        "method=switch,mpoe",
        "task=cola",
        "seed=1,2,3",
        f"data_dir={DEMO_DATA_DIR / 'glue'}",
        f"runs_dir={tmp_path}",
        "train.max_steps=2",
        "train.eval_every=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(tmp_path.rglob(RESULTS_FILE))
    assert len(files) == 6
    labels = {(f.parts[-5], f.parts[-2]) for f in files}
    assert labels == {(m, f"seed={s}") for m in ("switch", "mpoe") for s in (1, 2, 3)}


def test_results_file_is_never_half_written(tmp_path, monkeypatch):
    import os

    from mpoe_exp import results
    from mpoe_exp.run_record import RunRecord

    def record(mcc: float) -> RunRecord:
        return RunRecord("finished", "e", "m", "x", "cola", 1, {}, main_metric="mcc", validation={"mcc": 1.0},
                         test={"mcc": mcc})  # fmt: skip

    directory = tmp_path / "run"
    results.write_results(directory, record(1.0))
    before = (directory / RESULTS_FILE).read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed between writing the temporary file and renaming it

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        results.write_results(directory, record(2.0))
    assert (directory / RESULTS_FILE).read_text() == before
    assert [p.name for p in directory.iterdir()] == [RESULTS_FILE]  # no temporary file left behind


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tiny_run_on_cuda_with_mixed_precision(tmp_path, precision):
    cfg = compose_config([*LM_RUN, f"runs_dir={tmp_path}", "device=cuda", f"train.precision={precision}"])
    results = json.loads((run(cfg) / RESULTS_FILE).read_text())
    assert results["status"] == "finished"
    assert results["test"]["perplexity"] < 1e4


def test_glue_run_from_a_save_to_disk_folder(tmp_path):
    """The third local format: a `save_to_disk` DatasetDict per task, as made from the hub copy."""
    from datasets import Dataset, DatasetDict

    def rows(n, offset):
        return {
            "sentence1": [f"premise number {i}" for i in range(offset, offset + n)],
            "sentence2": [f"hypothesis {i % 5}" for i in range(offset, offset + n)],
            "label": [i % 2 for i in range(n)],
            "idx": list(range(n)),
        }

    DatasetDict({"train": Dataset.from_dict(rows(24, 0)), "validation": Dataset.from_dict(rows(10, 100))}).save_to_disk(
        str(tmp_path / "glue" / "rte")
    )
    cfg = compose_config(
        [
            "model=tiny-t5",
            "method=mpoe",
            "task=rte",
            f"data_dir={tmp_path / 'glue'}",
            f"runs_dir={tmp_path / 'runs'}",
            "train.max_steps=2",
            "train.eval_every=2",
            "train.batch_size=8",
        ]
    )
    results = json.loads((run(cfg) / RESULTS_FILE).read_text())
    assert results["split_sizes"] == {"train": 24, "validation": 5, "test": 5}
    assert "accuracy" in results["test"]


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    no_dropout = [
        "model.architecture.resid_pdrop=0",
        "model.architecture.embd_pdrop=0",
        "model.architecture.attn_pdrop=0",
    ]
    base = [a for a in LM_RUN if not a.startswith(("train.batch_size", "train.max_steps"))] + no_dropout
    full = compose_config([*base, "train.batch_size=8", "train.max_steps=8", f"runs_dir={tmp_path / 'full'}"])
    accumulated = compose_config(
        [*base, "train.batch_size=4", "train.grad_accum_steps=2", "train.max_steps=8", f"runs_dir={tmp_path / 'acc'}"]
    )
    one = json.loads((run(full) / RESULTS_FILE).read_text())
    two = json.loads((run(accumulated) / RESULTS_FILE).read_text())
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["step"] == b["step"]
        assert (
            abs(a["validation"]["perplexity"] - b["validation"]["perplexity"]) <= 1e-4 * a["validation"]["perplexity"]
        )


def killed_in_the_final_test_evaluation(cfg, monkeypatch) -> Path:
    """Run `cfg` as if the process died during its final test evaluation: trained, resume checkpoint written at
    the last step, no results.json. Returns the run directory."""
    from mpoe_exp.training import Trainer

    original = Trainer.evaluate

    class Killed(BaseException):
        pass

    def evaluate(self, split):
        if split == "test":
            raise Killed
        return original(self, split)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "evaluate", evaluate)
        with pytest.raises(Killed):
            run(cfg)
    directory = run_dir(cfg)
    assert not (directory / RESULTS_FILE).exists()
    return directory


def test_a_finished_run_drops_its_resume_checkpoint_and_keeps_the_best_weights(tmp_path, monkeypatch):
    """last.pt (weights, optimizer moments, RNG) exists only to resume: once results.json says finished it is never
    read again, and a sweep of finished runs would otherwise keep one per run (84 real_minilm runs: 28 GB)."""
    import torch

    cfg = compose_config([*LM_RUN, f"runs_dir={tmp_path}", "train.max_steps=4", "train.checkpoint_every=2"])
    directory = killed_in_the_final_test_evaluation(cfg, monkeypatch)
    assert torch.load(directory / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 4
    run(cfg)  # resumes at the last step: only the test evaluation is left
    assert json.loads((directory / RESULTS_FILE).read_text())["status"] == "finished"
    assert (directory / "checkpoints" / "best.pt").is_file()
    assert not (directory / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(
    "failure",
    [
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 34496 vs 34390"),  # torch, disk full
        OSError(28, "No space left on device"),
    ],
)
def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_message_and_keeps_the_last_good_one(
    tmp_path, monkeypatch, failure
):
    import torch

    from mpoe_exp import training
    from mpoe_exp.errors import UserError

    cfg = compose_config([*LM_RUN, f"runs_dir={tmp_path}", "train.max_steps=6", "train.checkpoint_every=2"])
    original, saved = torch.save, []

    def save(obj, path, *args, **kwargs):
        if "last.pt" in str(path) and len(saved) == 2:  # the third resume checkpoint: the disk is full
            Path(path).write_bytes(b"half")
            raise failure
        saved.append(path) if "last.pt" in str(path) else None
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(training.torch, "save", save)
    with pytest.raises(UserError, match=r"could not write .*last\.pt.*free on its disk.*resume"):
        run(cfg)
    checkpoints = run_dir(cfg) / "checkpoints"
    assert torch.load(checkpoints / "last.pt", weights_only=True)["state"]["step"] == 4
    assert not list(checkpoints.glob(".*.tmp"))
    assert not (run_dir(cfg) / RESULTS_FILE).exists()
