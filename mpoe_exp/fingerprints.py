"""What a run reads from disk, identified by content: the data and model files in a run's identity.

A path says where files are, not what they are: `glue`, `./glue/` and its absolute path are one data set, and one
relative path names different data from two working directories. So a run's identity (mpoe_exp/results.py) holds
no data or model path; it holds a fingerprint of the files the run reads:

- data: the task's folder as the loader finds it (mpoe_exp/tasks/data_location.py), narrowed for GLUE to the
  folder of the task itself (`SST-2/` in the GLUE download-script layout, or its save_to_disk folder), so other
  tasks' files beside it do not count; `{"hub": <dataset>}` when the data comes from the Hugging Face hub.
- model files: the folder that pre-trained weights or the pre-trained tokenizer load from (`model.path`, or the
  folder of the installed `model.package`); `{"hub": <hub id>}` when they come from the hub; None when the run
  reads neither (random weights and the byte-level tokenizer).

A fingerprint is the sha256 of every file's relative path and content (hidden files left out), computed once per
process for a folder whose files' sizes and modification times have not changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpoe_exp.errors import UserError

if TYPE_CHECKING:
    from mpoe_exp.spec import ModelSpec, RunSpec

_CHUNK = 1 << 20
_cache: dict[tuple, str] = {}


def _files(folder: Path) -> list[Path]:
    """Every regular file under `folder` (or `folder` itself if it is a file), hidden ones left out, sorted."""
    if folder.is_file():
        return [folder]
    found = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
        found += [Path(root, n) for n in names if not n.startswith(".")]
    return sorted(found)


def folder_digest(folder: Path) -> str:
    """sha256 (hex) of the relative paths and contents of the files under `folder`."""
    folder = Path(folder).expanduser().resolve()
    files = _files(folder)
    signature = (str(folder), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if signature not in _cache:
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.relative_to(folder) if path != folder else path.name}\0".encode())
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK):
                    digest.update(chunk)
            digest.update(b"\0")
        _cache[signature] = digest.hexdigest()
    return _cache[signature]


def data_fingerprint(spec: RunSpec) -> dict[str, Any]:
    """{"files": digest} of the data the run's task reads, or {"hub": name} for data from the hub."""
    from mpoe_exp.tasks import glue_data
    from mpoe_exp.tasks.data_location import task_data_dir

    task = spec.task
    folder = task_data_dir(spec)
    if folder is None:
        return {"hub": getattr(task, "hub_path", None) or getattr(task, "text_task", None) or task.name}
    if task.type == "glue":
        return {"files": folder_digest(glue_data.source_folder(task.glue_task, folder))}
    if task.type == "glue_multitask":
        return {"files": {str(name): folder_digest(glue_data.source_folder(name, folder)) for name in task.tasks}}
    return {"files": folder_digest(Path(folder))}


def reads_model_files(model_cfg: ModelSpec) -> bool:
    """Whether a run reads model files: pre-trained weights, or a pre-trained tokenizer."""
    return bool(model_cfg.pretrained) or model_cfg.tokenizer == "pretrained"


def model_files_fingerprint(model: ModelSpec) -> dict[str, Any] | None:
    """{"files": digest} of the folder pre-trained weights or tokenizer load from, {"hub": id}, or None when the run
    reads no model files (random weights, byte-level tokenizer)."""
    from mpoe_exp.models import packaged_model_dir

    if not reads_model_files(model):
        return None
    if model.path:
        folder = Path(str(model.path)).expanduser()
        if not folder.is_dir():
            raise UserError(f"model.path={model.path} is not a folder; pass a save_pretrained folder")
        return {"files": folder_digest(folder)}
    packaged = packaged_model_dir(model.package)
    if packaged is not None:
        return {"files": folder_digest(packaged)}
    return {"hub": model.hub_id}
