"""Each task finds its own data (mpoe_exp/tasks/data_location.py): task.data_dir, else <data_dir>/<task folder>, else
data_dir itself; never another task's folder. The README's Table 1 NLG command loads every task's own data from a
root laid out as the README says."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from mpoe_exp import compose_config
from mpoe_exp.config import DEMO_DATA_DIR, expand_sweep, run_spec
from mpoe_exp.errors import UserError
from mpoe_exp.models import byte_tokenizer
from mpoe_exp.tasks import text_data
from mpoe_exp.tasks.data_location import task_data_dir
from mpoe_exp.tasks.generation import GenerationTask
from mpoe_exp.tasks.tasks import build_task

README = Path(__file__).resolve().parents[2] / "README.md"
DEMO_OF = {task: DEMO_DATA_DIR / folder for task, folder in [("wikitext2",) * 2, ("emnlp_news", "news"), ("imdb",) * 2]}


@pytest.fixture
def data_root(tmp_path) -> Path:
    """A data root laid out as the README says (one folder per task), made of the bundled demo data."""
    root = tmp_path / "data"
    for folder, demo in DEMO_OF.items():
        shutil.copytree(demo, root / folder)
    shutil.copytree(DEMO_DATA_DIR / "glue", root / "glue")
    return root


def readme_command(experiment: str) -> list[str]:
    """The arguments of the README's `python -m mpoe_exp -m experiment=<experiment> ...` command."""
    for line in README.read_text().splitlines():
        line = line.split("  #")[0]
        if re.search(rf"-m mpoe_exp -m experiment={experiment}(\s|$)", line):
            return [a for a in shlex.split(line.split("-m mpoe_exp", 1)[1]) if a != "-m"]
    raise AssertionError(f"no README command for experiment={experiment}")


def test_the_readme_table1_nlg_command_gives_every_task_its_own_data(data_root):
    args = readme_command("table1_gpt2")
    assert "data_dir=/data" in args  # the root of the README's layout
    args = [f"data_dir={data_root}" if a == "data_dir=/data" else a for a in args]
    runs = expand_sweep(args)
    assert len(runs) == 90
    distinct = {tuple(o for o in run if o.partition("=")[0] not in ("seed", "train.lr")) for run in runs}
    tokenizer = byte_tokenizer("gpt2")  # offline stand-in for GPT-2's: the data, not the tokens, are under test
    loaded = {}
    for overrides in sorted(distinct):
        cfg = compose_config(list(overrides))
        name = cfg.task.name
        assert task_data_dir(run_spec(cfg)) == str(data_root / name)
        demo = text_data.load_text_splits(name, data_dir=str(DEMO_OF[name]), seed=cfg.task.data_seed)
        if name not in loaded:  # the same task in every method: built once
            task = build_task(run_spec(cfg), tokenizer)
            texts = task.texts if isinstance(task, GenerationTask) else None
            loaded[name] = text_data.load_text_splits(
                name, data_dir=task_data_dir(run_spec(cfg)), seed=cfg.task.data_seed
            )
            assert texts is None or texts == demo
        assert loaded[name] == demo
    assert set(loaded) == {"wikitext2", "emnlp_news", "imdb"}
    tests = [set(texts["test"]) for texts in loaded.values()]
    assert all(not (a & b) for i, a in enumerate(tests) for b in tests[i + 1 :])  # no task got another's sentences


def test_task_data_dir_beats_the_root_and_the_root_folder_beats_the_root_itself(data_root, tmp_path):
    own = tmp_path / "my_imdb"
    shutil.copytree(DEMO_DATA_DIR / "imdb", own)
    cfg = compose_config(["model=tiny-gpt2", "task=imdb", f"data_dir={data_root}", f"task.data_dir={own}"])
    assert task_data_dir(run_spec(cfg)) == str(own)
    cfg = compose_config(["model=tiny-gpt2", "task=imdb", f"data_dir={data_root}"])
    assert task_data_dir(run_spec(cfg)) == str(data_root / "imdb")
    # A single-task folder as data_dir still works: the GLUE download-script layout and a text task's folder.
    glue = compose_config(["model=tiny-t5", "task=rte", f"data_dir={DEMO_DATA_DIR / 'glue'}"])
    assert task_data_dir(run_spec(glue)) == str(DEMO_DATA_DIR / "glue")
    assert build_task(run_spec(glue), byte_tokenizer("t5")).split_sizes["train"] > 0
    news = compose_config(["model=tiny-gpt2", "task=emnlp_news", f"data_dir={DEMO_DATA_DIR / 'news'}"])
    assert task_data_dir(run_spec(news)) == str(DEMO_DATA_DIR / "news")
    assert compose_config(["model=tiny-gpt2", "task=imdb"]).data_dir is None  # no data_dir: the hub
    assert task_data_dir(run_spec(compose_config(["model=tiny-gpt2", "task=imdb"]))) is None


def test_glue_and_the_multitask_mixture_find_glue_under_the_root(data_root):
    cfg = compose_config(["model=tiny-t5", "task=glue_multitask", "task.tasks=[rte,stsb]", f"data_dir={data_root}"])
    task = build_task(run_spec(cfg), byte_tokenizer("t5"))
    direct = compose_config(["model=tiny-t5", "task=rte", f"data_dir={DEMO_DATA_DIR / 'glue'}"])
    assert task.split_sizes["rte"] == build_task(run_spec(direct), byte_tokenizer("t5")).split_sizes


@pytest.mark.parametrize(
    "make,task,message",
    [
        # the old README command: one task's folder for every task of the sweep
        (lambda root: root / "emnlp_news", "imdb", "holds the emnlp_news data, not the imdb data"),
        (lambda root: root / "wikitext2", "emnlp_news", "holds the wikitext2 data"),
        (lambda root: root / "glue", "wikitext2", "holds the glue data"),
        # a root with other tasks' folders but not this one's
        (lambda root: shutil.rmtree(root / "imdb") or root, "imdb", "holds the folders of other tasks"),
        # a folder of another name that holds the Texygen EMNLP News files
        (lambda root: _texygen_copy(root), "imdb", "holds the emnlp_news data"),
    ],
)
def test_a_folder_of_another_task_is_refused(data_root, make, task, message):
    cfg = compose_config(["model=tiny-gpt2", f"task={task}", f"data_dir={make(data_root)}"])
    with pytest.raises(UserError, match=message):
        task_data_dir(run_spec(cfg))
    with pytest.raises(UserError, match=message):
        build_task(run_spec(cfg), byte_tokenizer("gpt2"))


def _texygen_copy(root: Path) -> Path:
    folder = root.parent / "downloads"
    folder.mkdir()
    shutil.copy(root / "emnlp_news" / "train.txt", folder / "emnlp_news.txt")
    shutil.copy(root / "emnlp_news" / "train.txt", folder / "train.txt")
    shutil.copy(root / "emnlp_news" / "test.txt", folder / "test.txt")
    return folder


def test_imdb_references_are_a_seeded_sample_of_the_test_set(tmp_path):
    data = tmp_path / "imdb"
    data.mkdir()
    train = [f"train sentence number {i} is here ." for i in range(40)]
    test = [f"review {i // 10} sentence {i % 10} is here ." for i in range(200)]  # review order
    (data / "train.txt").write_text("\n".join(train) + "\n")
    (data / "test.txt").write_text("\n".join(test) + "\n")
    base = ["model=tiny-gpt2", "task=imdb", f"data_dir={data}", "task.max_references=50"]
    tokenizer = byte_tokenizer("gpt2")
    references = build_task(run_spec(compose_config(base)), tokenizer).references
    assert len(references) == len(set(references)) == 50 and set(references) <= set(test)
    assert references != test[:50]  # not the first reviews
    # The data seed's sample, in test-file order
    chosen = np.sort(np.random.default_rng(42).choice(200, size=50, replace=False))
    assert references == [test[i] for i in chosen]
    assert build_task(run_spec(compose_config(base)), tokenizer).references == references  # reproducible
    other = build_task(run_spec(compose_config([*base, "task.data_seed=7"])), tokenizer).references
    assert other != references and len(other) == 50
    # all of them when the test set is smaller than max_references; EMNLP News keeps Texygen's first K
    assert build_task(run_spec(compose_config([*base, "task.max_references=500"])), tokenizer).references == test
    news = ["model=tiny-gpt2", "task=emnlp_news", f"task.data_dir={data}", "task.max_references=50"]
    assert build_task(run_spec(compose_config(news)), tokenizer).references == test[:50]
