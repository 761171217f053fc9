"""Every `python -m mpoe_exp` / `torchrun ... -m mpoe_exp` command in the README composes into valid runs.

Each command is expanded like Hydra's basic sweeper (comma-separated values) and every resulting run is composed
and validated exactly as the CLI does before any work starts. The commands that can run offline are also run by
tests/test_runner.py and tests/test_launchers_and_logging.py (quickstart, local data, joblib, submitit, torchrun).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from mpoe_exp.config import CONFIG_DIR, expand_sweep, validate_config
from mpoe_exp.runner import check_task_fits_model

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[list[str]]:
    commands, in_block = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```bash"
            continue
        if not in_block:
            continue
        line = line.split("  #")[0].strip()
        match = re.search(r"(?:^|\s)-m mpoe_exp(\s.*)?$", line)
        if match and ("python" in line or "torchrun" in line):
            args = shlex.split(match.group(1) or "")
            commands.append([a for a in args if a != "-m"])
    return commands


def expand(args: list[str]) -> list[list[str]]:
    """Hydra's basic sweep: key=a,b -> one run per value, with an experiment's own sweep parameters; runs that
    differ only in seed or learning rate are composed once (they are equally valid)."""
    runs = {}
    for overrides in expand_sweep(args):
        key = tuple(o for o in overrides if o.partition("=")[0] not in ("seed", "train.lr"))
        runs.setdefault(key, list(key))
    return list(runs.values())


COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_we_expect():
    assert len(COMMANDS) >= 10
    joined = [" ".join(c) for c in COMMANDS]
    assert any("experiment=quickstart" in c for c in joined)
    assert any("hydra/launcher=slurm" in c for c in joined)


def _marked(args: list[str]):
    """Table 1's full sweeps (hundreds of runs) are slow here: test_experiments.py composes each of their runs in the
    fast tier."""
    big = any(a.startswith("experiment=table1_") and not a.endswith("_smoke") for a in args)
    return pytest.param(args, marks=pytest.mark.slow) if big else args


@pytest.mark.parametrize("args", [_marked(a) for a in COMMANDS], ids=lambda a: " ".join(a)[:80])
def test_readme_command_composes_into_valid_runs(args):
    runs = expand(args)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for overrides in runs:
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
            validate_config(cfg)
            if not cfg.dry_run:
                check_task_fits_model(cfg)


def test_readme_commands_use_the_projects_environment():
    """A fresh clone has no `python` with this package: every command runs the one `make install` made."""
    in_block, bare = False, []
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```bash"
            continue
        command = line.split("  #")[0].strip()
        if in_block and re.match(r"(python3?|pip3?|torchrun)\s", command):
            bare.append(command)
    assert not bare, bare


def test_reproduction_shows_the_real_minilm_table_make_tables_wrote():
    """REPRODUCTION.md's table is the one `make tables` wrote for the finished real_minilm sweep (kept in
    docs/real_minilm/), every cell from 3 seeds: nothing missing, nothing partial."""
    root = Path(__file__).resolve().parent.parent
    written = [line for line in (root / "docs/real_minilm/real_minilm.md").read_text().splitlines() if line[:1] == "|"]
    shown = (root / "REPRODUCTION.md").read_text()
    assert len(written) == 2 + 7  # header, rule, seven methods
    for line in written:
        assert line in shown
    cells = "\n".join(written[2:])
    assert "missing" not in cells and "†" not in cells
    assert cells.count("(n=3)") == 7 * 2


def test_the_two_test_tiers_are_named_in_the_readme_and_ci_runs_every_test():
    """make test is the fast tier (no slow tests), make test-all every test; CI runs make test-all after installing
    as the README says, and the README shows both commands."""
    root = README.parent
    makefile = (root / "Makefile").read_text()
    fast = re.search(r"^test:.*\n\t(.*)$", makefile, re.M).group(1)
    everything = re.search(r"^test-all:.*\n\t(.*)$", makefile, re.M).group(1)
    assert '-m "not slow"' in fast and '-m "not sweep"' in everything
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines() if line.startswith("make")]
    assert ci == ["make install", "make test-all"]
    commands = [line.split("#")[0].strip() for line in README.read_text().splitlines()]
    assert {"make install", "make test", "make test-all"} <= set(commands)


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's "The same from Python" block, run as written on a random batch with an AdamW optimizer."""
    import torch

    text = README.read_text()
    start = text.index("```python", text.index("The same from Python")) + len("```python")
    code = text[start : text.index("```", start)]
    monkeypatch.chdir(tmp_path)
    setup = {
        "batch": {
            "input_ids": torch.randint(3, 60, (2, 5)),
            "attention_mask": torch.ones(2, 5, dtype=torch.long),
            "labels": torch.randint(3, 60, (2, 3)),
        }
    }
    namespace = dict(setup)
    code = code.replace("mask.step(optimizer)", "loss.backward(); mask.step(torch.optim.AdamW(model.parameters()))")
    exec(compile("import torch\n" + code, "README.md", "exec"), namespace)
    assert (tmp_path / "ckpt").is_dir() and namespace["saved"].method["name"] == "mpoe"
