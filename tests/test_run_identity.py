"""Run identity (mpoe_exp/results.py): everything that changes a run's numbers is in its directory and its hash, and a
finished run is skipped, or a checkpoint resumed, only when it was made by the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mpoe_exp import results, tables
from mpoe_exp.config import compose_config, run_spec
from mpoe_exp.errors import UserError
from mpoe_exp.runner import run

BASE = ["model=tiny-t5", "method=mpoe", "task=cola", "data_dir=${mpoe_demo_data:glue}"]


@pytest.mark.parametrize(
    "override",
    [
        "method.gradient_mask_prob=0.3",
        "method.num_experts=4",
        "method.mpo.num_tensors=3",
        "train.warmup_steps=7",
        "train.label_smoothing=0.0",
        "train.weight_decay=0.01",
        "method.router.jitter=0.01",
        "model.tokenizer=pretrained",
    ],
)
def test_runs_that_differ_in_one_setting_get_different_directories(override, monkeypatch):
    monkeypatch.setattr("mpoe_exp.fingerprints.model_files_fingerprint", lambda cfg: None)  # no tokenizer on disk
    base = compose_config(BASE)
    other = compose_config([*BASE, override])
    assert results.config_hash(base) != results.config_hash(other)
    assert results.run_dir(base) != results.run_dir(other)
    # the readable tag stays, the short hash is added
    assert results.run_dir(other).parent.name.startswith("lr=0.0001,bs=32,ep=3,cfg=")


@pytest.mark.parametrize("override", ["seed=2", "runs_dir=elsewhere", "force=true", "logger=wandb", "device=cpu"])
def test_outputs_seed_and_logging_are_not_part_of_the_identity(override):
    assert results.config_hash(compose_config(BASE)) == results.config_hash(compose_config([*BASE, override]))


MEMORY_ONLY = ["method.recompute=false", "method.recompute=true", "method.mpo.cache_in_eval=false"]


@pytest.mark.parametrize("override", MEMORY_ONLY)
def test_memory_and_time_trades_are_not_part_of_the_identity(override):
    """Recomputing in backward and caching in evaluation trade memory for time; the run's numbers stay the same
    (test_every_key_left_out_of_the_identity_leaves_the_numbers_unchanged), so a run made with either is the same."""
    assert results.config_hash(compose_config(BASE)) == results.config_hash(compose_config([*BASE, override]))


# --- every key of every config, in the identity or left out with a reason --------------------------------------

CONF = Path(__file__).resolve().parent.parent / "conf"
# The keys a run's identity leaves out (results.NOT_IN_IDENTITY gives the reason of each). Written out here, so that
# leaving a key out is a decision this file records, not a side effect of an edit to results.py.
LEFT_OUT = {
    "seed",
    "runs_dir",
    "experiment_name",
    "table_model",
    "force",
    "dry_run",
    "device",
    "cpu_threads",
    "cpu_malloc",
    "logger",
    "hydra",
    "train.log_every",
    "train.checkpoint_every",
    "method.recompute",
    "method.mpo.cache_in_eval",
    "data_dir",
    "task.data_dir",
    "task.hub_path",
    "model.path",
    "model.package",
    "model.hub_id",
}
# Left out only where it cannot change the numbers (results.EVAL_BATCH_SIZE): without an evaluation capacity limit.
CONDITIONAL = {"train.eval_batch_size"}
GPT2_TASKS = {"task=wikitext2", "task=imdb", "task=emnlp_news"}


def _leaves(tree, prefix=""):
    if isinstance(tree, dict) and tree:
        return {leaf for k, v in tree.items() for leaf in _leaves(v, f"{prefix}.{k}" if prefix else str(k))}
    return {prefix}


def _covering(key: str, table) -> str | None:
    """The entry of `table` that covers `key` (itself or a prefix of it)."""
    parts = key.split(".")
    return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in table), None)


def _config_file_keys() -> set[str]:
    """Every leaf key the config files set: config.yaml's, and each group's under its package."""
    from omegaconf import OmegaConf

    keys = set()
    for path in CONF.rglob("*.yaml"):
        group = path.relative_to(CONF).parts[0]
        if group in ("paper", "hydra"):  # the paper's tables and numbers; launcher settings (under hydra)
            continue
        tree = OmegaConf.to_container(OmegaConf.load(path))
        tree.pop("defaults", None)
        if group == "config.yaml" or "@package _global_" in path.read_text():
            keys |= _leaves(tree)
        else:
            keys |= {f"{group}.{k}" for k in _leaves(tree) if k}
    return {k for k in keys if k}


def test_every_config_key_is_in_the_identity_or_left_out_with_a_reason():
    from omegaconf import OmegaConf

    from mpoe_exp.config import available

    assert set(results.NOT_IN_IDENTITY) == LEFT_OUT
    assert all(len(reason) > 10 for reason in results.NOT_IN_IDENTITY.values())
    assert results.EVAL_BATCH_SIZE in CONDITIONAL
    # compose every choice of every group once, and check each key where it is composed
    seen: set[str] = set()
    commands = [[f"{g}={c}"] for g in ("model", "method", "task", "logger", "ablation") for c in available(g)]
    commands += [[f"experiment={e}"] for e in available("experiment")]
    for command in commands:
        if command[0].startswith("ablation=") and command[0] != "ablation=none":
            command = ["method=mpoe", *command]
        if command[0].startswith("task="):
            command = [*command, "model=" + ("gpt2" if command[0] in GPT2_TASKS else "t5-base")]
        cfg = compose_config(command)
        if cfg.get("task") is None or "name" not in cfg.task:  # a sweep over tasks: compose one of its runs
            cfg = compose_config([*command, "task=" + ("wikitext2" if cfg.model.family == "gpt2" else "cola")])
        keys = _leaves(OmegaConf.to_container(cfg, resolve=False)) - {""}
        kept = _leaves(results.configured_identity(cfg))
        for key in keys:
            if _covering(key, LEFT_OUT) or key in CONDITIONAL:
                assert key not in kept, (command, key)
            else:
                assert key in kept, (command, key)
        seen |= keys
    # hydra's own settings never reach a run's config (left out either way)
    missed = {k for k in _config_file_keys() if not _covering(k, seen) and not k.startswith("hydra.")}
    assert not missed, f"keys of the config files no composed config had: {sorted(missed)}"


# --- the three collisions: evaluation batch size, how a data path is spelled, an unused model.path ----------------

CAPACITY_EVAL = [*BASE, "method=switch", "method.router.capacity_factor_eval=1.0"]


def test_the_evaluation_batch_size_is_part_of_the_identity_when_evaluation_drops_tokens():
    """With a capacity limit in evaluation, the tokens that share a forward call decide which are dropped."""
    limited = results.config_hash(compose_config(CAPACITY_EVAL))
    assert limited != results.config_hash(compose_config([*CAPACITY_EVAL, "train.eval_batch_size=1"]))
    unlimited = [*BASE, "method=switch"]
    assert results.config_hash(compose_config(unlimited)) == results.config_hash(
        compose_config([*unlimited, "train.eval_batch_size=1"])
    )


def test_evaluation_batch_sizes_that_drop_different_tokens_are_two_runs(tmp_path):
    lm = ["model=tiny-gpt2", "task=wikitext2", "data_dir=${mpoe_demo_data:wikitext2}", "method=switch"]
    quick = [*lm, "method.router.capacity_factor_eval=1.0", "train.max_steps=2", "train.batch_size=8"]
    quick += ["train.eval_every=2", f"runs_dir={tmp_path}"]
    one = json.loads((run(compose_config([*quick, "train.eval_batch_size=1"])) / results.RESULTS_FILE).read_text())
    many = json.loads((run(compose_config([*quick, "train.eval_batch_size=64"])) / results.RESULTS_FILE).read_text())
    assert one["config_hash"] != many["config_hash"]
    assert one["validation"] != many["validation"]  # a different run, not a copy of the first's results


def test_a_data_folder_is_identified_by_its_files_not_by_how_its_path_is_spelled(monkeypatch):
    repo = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(repo)
    spellings = ["mpoe_exp/demo_data/glue", str(repo / "mpoe_exp/demo_data/glue"), "mpoe_exp/demo_data/glue/"]
    spellings.append("./mpoe_exp/demo_data/../demo_data/glue")
    base = [o for o in BASE if not o.startswith("data_dir=")]
    hashes = {results.config_hash(compose_config([*base, f"data_dir={s}"])) for s in spellings}
    hashes.add(results.config_hash(compose_config([*base, f"task.data_dir={spellings[1]}"])))
    assert len(hashes) == 1


def test_one_relative_data_path_from_two_working_directories_is_two_runs(tmp_path, monkeypatch):
    import shutil

    demo = Path(__file__).resolve().parent.parent / "mpoe_exp/demo_data/glue/CoLA"
    for place, drop in (("a", 0), ("b", 5)):
        folder = tmp_path / place / "glue" / "CoLA"
        shutil.copytree(demo, folder)
        lines = (folder / "train.tsv").read_text().splitlines(keepends=True)
        (folder / "train.tsv").write_text("".join(lines[drop:]))
    base = [o for o in BASE if not o.startswith("data_dir=")] + ["data_dir=glue", f"runs_dir={tmp_path / 'runs'}"]
    monkeypatch.chdir(tmp_path / "a")
    first = compose_config(base)
    digest_a, dir_a = results.config_hash(first), results.run_dir(first)
    monkeypatch.chdir(tmp_path / "b")
    second = compose_config(base)
    assert results.config_hash(second) != digest_a and results.run_dir(second) != dir_a
    # the data fingerprint covers the task's own folder only: another task's files beside it change nothing
    (tmp_path / "b" / "glue" / "RTE").mkdir()
    (tmp_path / "b" / "glue" / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n")
    assert results.config_hash(compose_config(base)) == results.config_hash(second)


def test_model_path_is_refused_where_nothing_reads_it():
    with pytest.raises(UserError, match="model.path=.* is not used"):
        compose_config([*BASE, "model.path=/somewhere/else"])


def test_model_files_are_identified_by_their_content(tmp_path, monkeypatch):
    """A pre-trained folder given by two spellings is one run; the same path holding other weights is another."""
    import torch
    from transformers import T5ForConditionalGeneration

    from mpoe_exp.models import model_config

    cfg = compose_config(BASE)
    torch.manual_seed(0)
    T5ForConditionalGeneration(model_config(run_spec(cfg).model)).save_pretrained(tmp_path / "t5")
    monkeypatch.chdir(tmp_path)
    pretrained = [*BASE, "model.pretrained=true"]
    spellings = ["t5", "./t5/", str(tmp_path / "t5")]
    hashes = {results.config_hash(compose_config([*pretrained, f"model.path={s}"])) for s in spellings}
    assert len(hashes) == 1
    torch.manual_seed(1)
    T5ForConditionalGeneration(model_config(run_spec(cfg).model)).save_pretrained(tmp_path / "t5")
    assert results.config_hash(compose_config([*pretrained, "model.path=t5"])) not in hashes
    with pytest.raises(UserError, match="is not a folder"):
        results.config_hash(compose_config([*pretrained, "model.path=nowhere"]))


# --- each key left out: the numbers do not change --------------------------------------------------------------

QUICK_RUN = [*BASE, "train.max_steps=4", "train.eval_every=2", "train.batch_size=8", "method.gradient_mask_prob=0.5"]


def _numbers(command: list[str]) -> tuple:
    result = json.loads((run(compose_config(command)) / results.RESULTS_FILE).read_text())
    return result["history"], result["validation"], result["test"], result["central_updates"]


def _left_out_variants(tmp_path: Path) -> dict[str, list[str]]:
    """For each key left out of the identity, overrides that change it (and nothing else) on QUICK_RUN; [] where
    another test covers it (named beside it)."""
    repo = Path(__file__).resolve().parent.parent
    return {
        "seed": [],  # its own directory level: a new seed is a new repeat (test_outputs_seed_and_logging_...)
        "runs_dir": [f"runs_dir={tmp_path / 'elsewhere'}"],
        "experiment_name": ["experiment_name=another"],
        "table_model": ["table_model=t5-base"],
        "force": ["force=true"],
        "dry_run": [],  # trains nothing, writes no numbers
        "device": ["device=cpu"],
        "cpu_threads": ["cpu_threads=2"],
        "cpu_malloc": ["cpu_malloc=keep"],
        "logger": [],  # W&B only receives the records (test_launchers_and_logging.py)
        "hydra": [],  # launcher settings: a sweep's runs are these same runs (test_experiments.py)
        "train.log_every": ["train.log_every=1"],
        "train.checkpoint_every": ["train.checkpoint_every=1"],
        "train.eval_batch_size": ["train.eval_batch_size=3"],
        "method.recompute": ["method.recompute=false"],
        "method.mpo.cache_in_eval": ["method.mpo.cache_in_eval=false"],
        "data_dir": [f"data_dir={repo / 'mpoe_exp/demo_data/glue/'}"],
        "task.data_dir": [f"task.data_dir={repo / 'mpoe_exp/demo_data/glue'}"],
        "task.hub_path": ["task.hub_path=someone/glue"],
        "model.path": [],  # test_model_files_are_identified_by_their_content: same files, same run
        "model.package": ["+model.package=no_such_package"],
        "model.hub_id": ["model.hub_id=someone/t5"],
    }


def _leaf_values(tree) -> list:
    if isinstance(tree, dict):
        return [v for k in sorted(tree) for v in _leaf_values(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [v for item in tree for v in _leaf_values(item)]
    return [tree]


ROUNDING = {"cpu_threads", "device"}  # the same run up to rounding (their reasons in results.NOT_IN_IDENTITY say so)


@pytest.mark.slow
def test_every_key_left_out_of_the_identity_leaves_the_numbers_unchanged(tmp_path):
    variants = _left_out_variants(tmp_path)
    assert set(variants) == LEFT_OUT | CONDITIONAL
    reference = _numbers([*QUICK_RUN, f"runs_dir={tmp_path / 'reference'}"])
    for i, (key, overrides) in enumerate(sorted(variants.items())):
        if not overrides:
            continue
        numbers = _numbers([*QUICK_RUN, f"runs_dir={tmp_path / str(i)}", *overrides])
        if key in ROUNDING:  # another number of threads sums in another order
            assert _leaf_values(numbers) == pytest.approx(_leaf_values(reference), rel=1e-5), key
        else:
            assert numbers == reference, key


def test_identity_holds_fingerprints_not_paths():
    ident = results.identity(compose_config(BASE))
    assert "data_dir" not in ident and set(ident["data_fingerprint"]) == {"files"}
    assert ident["model_files_fingerprint"] is None  # random weights, byte-level tokenizer
    assert "seed" not in ident and "runs_dir" not in ident and "log_every" not in ident["train"]


QUICK = [*BASE, "train.max_steps=2", "train.eval_every=1", "train.batch_size=8"]


def test_finished_run_of_another_config_is_never_reported_as_this_one(tmp_path, capsys):
    cfg = compose_config([*QUICK, f"runs_dir={tmp_path}"])
    directory = run(cfg)
    saved = json.loads((directory / results.RESULTS_FILE).read_text())
    assert saved["config_hash"] == results.config_hash(cfg)
    run(cfg)
    assert "already finished" in capsys.readouterr().out
    # the same folder holding another config's results (an older version's file, or a short-hash collision)
    saved["config_hash"] = "0" * 64
    (directory / results.RESULTS_FILE).write_text(json.dumps(saved))
    with pytest.raises(UserError, match="holds the results of another config"):
        run(cfg)
    run(compose_config([*QUICK, f"runs_dir={tmp_path}", "force=true"]))
    assert json.loads((directory / results.RESULTS_FILE).read_text())["config_hash"] == results.config_hash(cfg)


def _record(runs: Path, seed: int, mask_prob: float, validation: float, test: float) -> None:
    cfg = compose_config([*BASE, f"seed={seed}", f"method.gradient_mask_prob={mask_prob}", "experiment_name=paper"])
    from omegaconf import OmegaConf

    directory = runs / f"p={mask_prob}" / f"seed={seed}"
    directory.mkdir(parents=True)
    record = {
        "status": "finished",
        "experiment": "paper",
        "model": "t5-base",
        "table_model": "t5-base",
        "method": "mpoe",
        "method_label": "mpoe",
        "ablation": "none",
        "task": "cola",
        "seed": seed,
        "hparams": results.hparams(cfg),
        "config_hash": results.config_hash(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "main_metric": "mcc",
        "greater_is_better": True,
        "validation": {"mcc": validation},
        "test": {"mcc": test},
        "parameters": {"total": 294_000_000},
    }
    (directory / results.RESULTS_FILE).write_text(json.dumps(record))


def test_tables_choose_between_settings_that_differ_beyond_the_learning_rate(tmp_path):
    """Two gradient-mask probabilities at the same learning rate are two settings, chosen on validation and shown."""
    for seed in (1, 2, 3):
        _record(tmp_path, seed, 0.5, validation=40.0, test=70.0)
        _record(tmp_path, seed, 0.3, validation=60.0, test=50.0 + seed)
    records, problems = tables.load_results(tmp_path)
    assert not problems
    selection = tables.select(records)[("paper", "t5-base", "mpoe", "cola")]
    assert selection.settings == 2
    assert selection.hparams["method.gradient_mask_prob"] == 0.3
    assert selection.stat("mcc").mean == pytest.approx(52.0)
    table = tables.build_tables(tables.select(records), "paper")[0]
    assert "method.gradient_mask_prob" in tables.render_markdown(table)


def test_make_tables_lists_runs_that_fit_no_row(tmp_path, capsys):
    for seed in (1, 2):
        _record(tmp_path, seed, 0.5, validation=40.0, test=70.0)
    record_path = next(tmp_path.rglob(results.RESULTS_FILE))
    stray = json.loads(record_path.read_text())
    stray.update(model="tiny-t5", table_model="tiny-t5")
    (record_path.parent.parent / "stray").mkdir()
    (record_path.parent.parent / "stray" / results.RESULTS_FILE).write_text(json.dumps(stray))
    assert tables.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny-t5/mpoe/cola: 1 run(s) fit no table row: no table has a row for model tiny-t5" in out
    assert "table_model=" in out


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, monkeypatch):
    import torch
    from test_runner import killed_in_the_final_test_evaluation

    cfg = compose_config([*QUICK, f"runs_dir={tmp_path}", "train.checkpoint_every=1"])
    directory = killed_in_the_final_test_evaluation(cfg, monkeypatch)  # the next start resumes
    last = directory / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["config_hash"] == results.config_hash(cfg)
    checkpoint["config_hash"] = "f" * 64
    torch.save(checkpoint, last)
    with pytest.raises(UserError, match="saved by another config.*force=true"):
        run(cfg)
    run(compose_config([*QUICK, f"runs_dir={tmp_path}", "train.checkpoint_every=1", "force=true"]))
    assert json.loads((directory / results.RESULTS_FILE).read_text())["status"] == "finished"
