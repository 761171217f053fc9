"""Where a task's data is on disk: its own folder, or its folder under one data root.

Precedence, first match wins:
  1. `task.data_dir`: this task's data folder.
  2. `<data_dir>/<task folder>` when it exists, `data_dir` being a root with one folder per task (TASK_FOLDERS):
     `glue/` (every GLUE task and the multi-task mixture: the GLUE download-script layout `glue/CoLA/train.tsv`,
     ..., or a save_to_disk folder per task `glue/rte`), `wikitext2/`, `emnlp_news/`, `imdb/`.
  3. `data_dir` itself, the folder of this one task (`data_dir=/data/glue` for GLUE; a single-task folder).
Nothing falls back to another task's data: if `data_dir` is a root holding other tasks' folders but not this
task's, or if `data_dir` itself is another task's folder (named as one, or holding files only that task has),
the run is refused with a message saying where the data was expected. No `data_dir` and no `task.data_dir`: the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mpoe_exp.errors import UserError

if TYPE_CHECKING:
    from mpoe_exp.spec import RunSpec, TaskSpec

GLUE_FOLDER = "glue"
TEXT_FOLDERS = ("wikitext2", "emnlp_news", "imdb")  # text_task -> its folder under a data root: the same name
TASK_FOLDERS = (GLUE_FOLDER, *TEXT_FOLDERS)

# Files or folders only one task's data has: a data_dir holding them is that task's, whatever else it holds.
SIGNATURES = {
    GLUE_FOLDER: ("CoLA", "SST-2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE"),
    "wikitext2": ("wiki.train.raw", "wikitext-2-raw"),
    "emnlp_news": ("emnlp_news.txt", "test_emnlp.txt", "testdata"),
}


def task_folder(task: TaskSpec) -> str:
    """The folder name of a task under a data root: "glue" for GLUE tasks, else its text task's name."""
    return getattr(task, "text_task", None) or GLUE_FOLDER


def task_data_dir(spec: RunSpec) -> str | None:
    """The data folder of the run's task by the precedence of the module docstring; None: load from the hub."""
    own = spec.task.data_dir
    if own is not None:
        if not Path(own).expanduser().is_dir():
            raise UserError(
                f"task.data_dir {str(own)!r} is not a folder; pass the folder that holds the {spec.task.name} data"
            )
        return str(own)
    if spec.data_dir is None:
        return None
    root = Path(spec.data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"data_dir {str(root)!r} is not a folder; pass the folder that holds the data")
    folder, name = task_folder(spec.task), spec.task.name
    if (root / folder).is_dir():
        return str(root / folder)
    layout = f"data_dir=<root> with one folder per task ({', '.join(f'<root>/{f}' for f in TASK_FOLDERS)})"
    others = [f for f in TASK_FOLDERS if (root / f).is_dir()]
    if others:
        raise UserError(
            f"no data for task={name}: data_dir {str(root)!r} holds the folders of other tasks ({', '.join(others)}) "
            f"but not {folder}/; add {root / folder} or set task.data_dir=<folder with the {name} data>"
        )
    owner = _owner(root)
    if owner is not None and owner != folder:
        raise UserError(
            f"data_dir {str(root)!r} holds the {owner} data, not the {name} data; use {layout}, "
            f"or task.data_dir=<folder with the {name} data>"
        )
    return str(root)


def _owner(directory: Path) -> str | None:
    """The task folder `directory` belongs to by its name or by files only that task's data has; None: unknown."""
    if directory.name in TASK_FOLDERS:
        return directory.name
    return next((task for task, names in SIGNATURES.items() if any((directory / n).exists() for n in names)), None)
