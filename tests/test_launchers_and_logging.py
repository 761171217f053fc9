"""Sweeps through Hydra's launchers (joblib in parallel, submitit as used for SLURM) and the W&B logger."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mpoe_exp import compose_config
from mpoe_exp.config import DEMO_DATA_DIR
from mpoe_exp.results import RESULTS_FILE
from mpoe_exp.runner import run

ROOT = Path(__file__).resolve().parent.parent
TINY_SWEEP = [
    "model=tiny-t5",
    "method=switch,mpoe",
    "task=cola",
    "seed=1,2",
    f"data_dir={DEMO_DATA_DIR / 'glue'}",
    "train.max_steps=2",
    "train.eval_every=2",
]


def sweep(tmp_path: Path, *args: str, runs: list[str] = TINY_SWEEP) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mpoe_exp", "-m", *args, *runs, f"runs_dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


@pytest.mark.slow
def test_joblib_launcher_runs_the_sweep_in_parallel(tmp_path):
    runs = [arg.replace("seed=1,2", "seed=1,2,3") for arg in TINY_SWEEP]  # the runner's six-run sweep
    result = sweep(tmp_path, "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=2", runs=runs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    assert len(list(tmp_path.rglob(RESULTS_FILE))) == 6


@pytest.mark.slow
def test_submitit_launcher_runs_the_sweep_as_jobs(tmp_path):
    """The SLURM path (hydra/launcher=slurm) uses submitit; its local executor runs the same code here."""
    runs = [arg.replace("method=switch,mpoe", "method=mpoe") for arg in TINY_SWEEP]  # 2 jobs keep it quick
    result = sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=0", runs=runs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.rglob(RESULTS_FILE))) == 2
    assert list(tmp_path.rglob(".submitit"))


def test_slurm_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    from mpoe_exp.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "model=t5-base", "task=cola"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.summary, self.finished = kwargs, [], {}, False
        rewound_to = kwargs.get("resume_from", "?_step=-1").split("?_step=")[1]
        self.starting_step = int(rewound_to) + 1  # as W&B: the first step after the rewind, 0 for a new run

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


def test_wandb_logger_groups_runs_and_logs_metrics(tmp_path, monkeypatch):
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeWandbRun(**kw)) or runs[-1])
    cfg = compose_config(
        [
            "experiment=quickstart",
            "logger=wandb",
            f"runs_dir={tmp_path}",
            "train.max_steps=4",
            "train.eval_every=2",
            "seed=3",
        ]
    )
    directory = run(cfg)
    (fake,) = runs
    assert fake.init_kwargs["group"] == "quickstart/tiny-t5/mpoe/cola"
    assert fake.init_kwargs["name"] == "seed=3"
    assert fake.init_kwargs["config"]["method"]["name"] == "mpoe"
    assert [step for step, _ in fake.logged] == [2, 4]
    assert "validation/mcc" in fake.logged[0][1] and "loss" in fake.logged[0][1]
    results = json.loads((directory / RESULTS_FILE).read_text())
    assert fake.summary["parameters/total"] == results["parameters"]["total"]
    assert fake.summary["test/mcc"] == results["test"]["mcc"]
    assert fake.finished


def test_force_starts_a_new_wandb_run_and_a_fresh_train_log(tmp_path, monkeypatch):
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeWandbRun(**kw)) or runs[-1])
    args = ["experiment=quickstart", "logger=wandb", f"runs_dir={tmp_path}", "train.max_steps=4", "train.eval_every=2"]
    directory = run(compose_config(args))
    (directory / RESULTS_FILE).unlink()  # a run that did not finish: resuming continues its W&B run
    run(compose_config(args))
    run(compose_config([*args, "force=true"]))
    first, resumed, forced = (fake.init_kwargs for fake in runs)
    assert resumed["resume_from"] == f"{first['id']}?_step=0"  # it had no resume checkpoint: rewound to the start
    assert forced["id"] != first["id"] and "resume_from" not in forced
    log = [json.loads(line) for line in (directory / "train.log").read_text().splitlines()]
    assert [record["step"] for record in log] == [2, 4]  # only the forced run's evaluations


# the logger section of conf/logger/wandb.yaml, less its name: WandbLogger's keyword-only parameters
WANDB_SETTINGS = {"project": "mpoe-exp", "entity": None, "mode": "online", "tags": []}


def test_the_wandb_settings_are_the_logger_sections_keys():
    from mpoe_exp.loggers import LOGGERS
    from mpoe_exp.schema import constructor_keys

    section = OmegaConf.to_container(compose_config(["logger=wandb"]).logger)
    assert section == {"name": "wandb", **WANDB_SETTINGS}
    assert set(constructor_keys(LOGGERS["wandb"])) == set(WANDB_SETTINGS)


def test_a_resumed_run_rewinds_its_wandb_run_to_the_resume_checkpoint(tmp_path, monkeypatch):
    import wandb

    from mpoe_exp.loggers import RunLabels, WandbLogger

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kw: runs.append(FakeWandbRun(**kw)) or runs[-1])
    labels = RunLabels(tmp_path, parameters={"total": 10})
    first = WandbLogger(labels, **WANDB_SETTINGS)
    first.resume(0)
    for step in (2, 4, 6):
        first.log({"step": step, "loss": 1.0})
    # killed after the evaluation of step 6; its resume checkpoint is step 4's
    resumed = WandbLogger(labels, **WANDB_SETTINGS)
    resumed.resume(4)
    for step in (6, 8):
        resumed.log({"step": step, "loss": 0.5})
    assert runs[0].init_kwargs["resume"] == "allow"
    assert runs[1].init_kwargs["resume_from"] == f"{runs[0].init_kwargs['id']}?_step=4"
    assert "resume" not in runs[1].init_kwargs and "id" not in runs[1].init_kwargs  # W&B takes one of the three
    assert [step for step, _ in runs[1].logged] == [6, 8]
    assert runs[1].summary["parameters/total"] == 10


def test_a_refused_rewind_resumes_the_wandb_run_and_sends_only_new_steps(tmp_path, monkeypatch, capsys):
    import wandb

    from mpoe_exp.loggers import WANDB_RUN_ID_FILE, RunLabels, WandbLogger

    runs = []

    def init(**kw):
        if "resume_from" in kw:
            raise wandb.errors.CommError("cannot rewind a run that is not in a terminal state")
        runs.append(FakeWandbRun(**kw))
        runs[-1].starting_step = 7  # the killed process logged up to step 6
        return runs[-1]

    monkeypatch.setattr(wandb, "init", init)
    (tmp_path / WANDB_RUN_ID_FILE).write_text("earlierrun\n")
    logger = WandbLogger(RunLabels(tmp_path), **WANDB_SETTINGS)
    logger.resume(4)
    for step in (6, 8):
        logger.log({"step": step, "loss": 0.5})
    (run,) = runs
    assert run.init_kwargs["id"] == "earlierrun" and run.init_kwargs["resume"] == "allow"
    assert [step for step, _ in run.logged] == [8]  # step 6 is in the W&B run already
    assert "did not rewind run earlierrun to step 4" in capsys.readouterr().out


def test_each_composed_sweep_names_its_own_folder():
    """hydra.sweep.dir: start time, process id and a random tag, fixed once composed (in-process twin of the test
    below, which starts two sweeps at once)."""
    from mpoe_exp.config import _compose

    first, second = (_compose(["model=tiny-t5"], return_hydra_config=True) for _ in range(2))
    folder = first.hydra.sweep.dir
    assert folder == first.hydra.sweep.dir  # one sweep, one folder
    assert folder != second.hydra.sweep.dir  # same process, same second: the tag differs
    assert f"_{os.getpid()}-" in folder and Path(folder).parent.name == ".multirun"


@pytest.mark.slow
def test_two_concurrent_sweeps_get_their_own_sweep_folders(tmp_path):
    """Each sweep lists only its own failed run, though both start at once with the same runs_dir."""
    command = [sys.executable, "-m", "mpoe_exp", "-m", "model=tiny-t5", "method=dense", "ablation=no_mask"]
    sweeps = [
        subprocess.Popen(
            [*command, f"seed={seed}", "dry_run=true", f"runs_dir={tmp_path}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for seed in (1, 2)
    ]
    outputs = [sweep.communicate(timeout=300) for sweep in sweeps]
    for seed, sweep, (_, stderr) in zip((1, 2), sweeps, outputs):
        assert sweep.returncode == 1, stderr[-3000:]
        assert "1 run(s) of the sweep failed" in stderr and f"seed={seed}" in stderr
    errors = list((tmp_path / ".multirun").rglob("error.txt"))
    assert len(errors) == 2
    assert len({path.relative_to(tmp_path / ".multirun").parts[0] for path in errors}) == 2  # two sweep folders


@pytest.mark.slow
def test_wandb_offline_mode_needs_no_network_and_rewinds_offline(tmp_path):
    args = ["experiment=quickstart", "logger=wandb", "logger.mode=offline", f"runs_dir={tmp_path}"]
    command = [sys.executable, "-m", "mpoe_exp", *args, "train.max_steps=2", "train.eval_every=2"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.rglob("offline-run-*/run-*.wandb"))) == 1
    next(tmp_path.rglob(RESULTS_FILE)).unlink()  # unfinished: the next start continues its W&B run, rewound to 0
    again = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "did not rewind" not in again.stdout  # offline, W&B records the rewind for `wandb sync`
    assert len(list(tmp_path.rglob("offline-run-*/run-*.wandb"))) == 2


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path):
    """Multi-GPU path (DDP) run on CPU with Gloo: same global batch, no dropout -> the same training."""
    from test_runner import LM_RUN

    args = [
        *(a for a in LM_RUN if not a.startswith(("train.max_steps", "train.eval_every"))),
        "train.max_steps=6",
        "train.eval_every=3",
        "method.gradient_mask_prob=0.5",
        "model.architecture.resid_pdrop=0",
        "model.architecture.embd_pdrop=0",
        "model.architecture.attn_pdrop=0",
    ]
    single = subprocess.run(
        [sys.executable, "-m", "mpoe_exp", *args, f"runs_dir={tmp_path / 'one'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    double = subprocess.run(
        [str(torchrun), "--nproc_per_node=2", "-m", "mpoe_exp", *args, f"runs_dir={tmp_path / 'two'}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert double.returncode == 0, double.stderr[-3000:]
    (one,) = [json.loads(p.read_text()) for p in (tmp_path / "one").rglob(RESULTS_FILE)]
    (two,) = [json.loads(p.read_text()) for p in (tmp_path / "two").rglob(RESULTS_FILE)]
    assert two["world_size"] == 2 and one["world_size"] == 1
    for a, b in zip(one["history"], two["history"], strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"])
        assert (
            abs(a["validation"]["perplexity"] - b["validation"]["perplexity"]) <= 1e-3 * a["validation"]["perplexity"]
        )
    assert one["central_updates"] == two["central_updates"]
    assert [h["tokens"] for h in one["history"]] == [h["tokens"] for h in two["history"]]  # all ranks counted


@pytest.mark.slow
def test_wandb_without_an_api_key_is_a_message_not_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["HOME"] = str(tmp_path / "home")  # no ~/.netrc, no stored key
    result = subprocess.run(
        [sys.executable, "-m", "mpoe_exp", "experiment=quickstart", "logger=wandb", f"runs_dir={tmp_path}",
         "train.max_steps=2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "error: logger=wandb could not start a W&B run" in result.stderr and "wandb login" in result.stderr
