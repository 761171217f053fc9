"""Run directories, the results.json schema, atomic writes and the "already done?" check.

Layout (derived from the config, never from the clock):

    <runs_dir>/<experiment>/<model>[-as-<table_model>]/<method>[-<ablation>]/<task>/<hparams>/seed=<seed>/
        results.json          written once, atomically, when the run finishes (or fails: status "failed")
        checkpoints/last.pt   model + optimizer + scheduler + gradient mask + RNG state, for resuming (deleted
                              once results.json says finished)
        checkpoints/best.pt   model weights at the best validation score
        train.log

The <hparams> level (e.g. `lr=0.0001,bs=32,ep=3,cfg=1a2b3c4d`) is the readable part of the run's identity plus
the first 8 hex digits of `config_hash(cfg)`: a hash of everything that can change the result and nothing that
cannot (`identity`). That is the resolved config less the keys `NOT_IN_IDENTITY` lists, each with its reason (the
seed has its own level; where outputs go, `force`, logging, launching, memory-for-time trades; data and model paths),
plus fingerprints of the data and model files the run reads (mpoe_exp/fingerprints.py), so that a path spelled two
ways is one run and new files at an old path are a new run. Two runs that differ in any setting, however deep
(`method.gradient_mask_prob`, `train.warmup_steps`, the weights in `model.path`, ...), never share a directory, a
checkpoint or a "finished" verdict.

results.json: its schema is `RunRecord` (mpoe_exp/run_record.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mpoe_exp.conf_files import with_matched
from mpoe_exp.config import method_label
from mpoe_exp.errors import UserError
from mpoe_exp.run_record import HPARAMS, RESULTS_FILE, RunRecord
from mpoe_exp.spec import RunSpec

# Config keys left out of a run's identity, each with the reason (a dotted path; a prefix covers its subtree).
# tests/test_run_identity.py lists every key of every config file against this table and shows, for each key left
# out, that changing it leaves the numbers unchanged.
NOT_IN_IDENTITY: dict[str, str] = {
    "seed": "its own directory level (seed=<s>): the seeds of one setting are its repeats",
    "runs_dir": "where the results go",
    "experiment_name": "where the results go",
    "table_model": "which table row the results fill",
    "force": "whether a finished run is run again",
    "dry_run": "a dry run trains nothing",
    "device": "the hardware: another device gives the same run up to rounding",
    "cpu_threads": "the hardware's use: the same run up to rounding",
    "cpu_malloc": "the allocator's policy: memory against time, same numbers",
    "logger": "where the metrics are also sent",
    "hydra": "the launcher and its sweep folders",
    "train.log_every": "how often the progress bar shows the loss",
    "train.checkpoint_every": "how often a resume checkpoint is written (a resumed run gives the same numbers)",
    "method.recompute": "memory against time: backward recomputes what it would otherwise keep, same numbers",
    "method.mpo.cache_in_eval": "memory against time: evaluation contracts the experts once, same numbers",
    "data_dir": "a path: the run's identity holds the fingerprint of the data files read instead",
    "task.data_dir": "a path: the run's identity holds the fingerprint of the data files read instead",
    "task.hub_path": "in the data fingerprint ({'hub': ...}) when the data comes from the hub, unused otherwise",
    "model.path": "a path: the run's identity holds the fingerprint of the model files read instead",
    "model.package": "in the model files' fingerprint: the installed package's folder is read",
    "model.hub_id": "in the model files' fingerprint ({'hub': ...}) when the model comes from the hub",
}
# Left out unless a router limits the experts' capacity in evaluation: then which tokens share a forward call
# decides which are dropped, and the evaluation batch size changes the numbers.
EVAL_BATCH_SIZE = "train.eval_batch_size"
HASH_DIGITS = 8


def _capacity_limited_in_evaluation(tree: Any) -> bool:
    """Whether any capacity_factor_eval in the (method) tree is set."""
    if isinstance(tree, dict):
        return tree.get("capacity_factor_eval") is not None or any(
            _capacity_limited_in_evaluation(v) for v in tree.values()
        )
    return False


def configured_identity(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config less the keys `NOT_IN_IDENTITY` leaves out: the part of a run's identity that is read from
    the config alone (no data or model file is opened; the tables compare settings with it). A method sized to
    another's parameter count (`method.match_params`, moe/adapters.py) takes its size from that method's config
    file, so that file's settings are part of the identity too (`method.matched`)."""
    tree = OmegaConf.to_container(cfg, resolve=True)
    if tree.get("method"):
        tree["method"] = with_matched(tree["method"])
    left_out = set(NOT_IN_IDENTITY)
    if not _capacity_limited_in_evaluation(tree.get("method")):
        left_out.add(EVAL_BATCH_SIZE)

    def prune(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            keys = {k: f"{path}.{k}" if path else str(k) for k in node}
            return {k: prune(v, keys[k]) for k, v in node.items() if keys[k] not in left_out}
        if isinstance(node, list):
            return [prune(v, path) for v in node]
        return node

    return prune(tree, "")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """Everything that can change a run's numbers: `configured_identity` plus fingerprints of the data and model
    files the run reads (mpoe_exp/fingerprints.py), so that how a path is spelled, or where the files lie, does not
    matter and new files at an old path are a new run."""
    from mpoe_exp.config import run_spec
    from mpoe_exp.fingerprints import data_fingerprint, model_files_fingerprint

    spec = run_spec(cfg, train=False)
    return {
        **configured_identity(cfg),
        "data_fingerprint": data_fingerprint(spec),
        "model_files_fingerprint": model_files_fingerprint(spec.model),
    }


def config_hash(cfg: DictConfig) -> str:
    """sha256 (hex) of `identity(cfg)`: equal for two configs exactly when they train the same run."""
    text = json.dumps(identity(cfg), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """The hyperparameters that distinguish runs of one model/method/task (what a sweep varies): `HPARAMS`."""
    values = {label: [OmegaConf.select(cfg, key) for key in keys] for label, keys in HPARAMS.items()}
    return {label: v[0] if len(v) == 1 else math.prod(v) for label, v in values.items()}


def hparams_tag(cfg: DictConfig) -> str:
    """`lr=...,bs=...,ep=...,cfg=<hash>`: the readable hyperparameters, then the short hash of the whole setting."""
    readable = [f"{k}={v}" for k, v in hparams(cfg).items() if v is not None]
    return ",".join([*readable, f"cfg={config_hash(cfg)[:HASH_DIGITS]}"])


def table_model(cfg: DictConfig) -> str:
    """The paper's model this run stands in for in the tables (`table_model`, default the model itself)."""
    return cfg.get("table_model") or cfg.model.name


def model_dir_name(cfg: DictConfig) -> str:
    """The run directory's model level: the model, or `<model>-as-<table_model>` for a stand-in."""
    stands_for = table_model(cfg)
    return cfg.model.name if stands_for == cfg.model.name else f"{cfg.model.name}-as-{stands_for}"


def run_dir(cfg: DictConfig) -> Path:
    return (
        Path(cfg.runs_dir)
        / cfg.experiment_name
        / model_dir_name(cfg)
        / method_label(cfg)
        / cfg.task.name
        / hparams_tag(cfg)
        / f"seed={cfg.seed}"
    )


def sweep_runs(experiment: str, same_cost: tuple[str, ...] = ()) -> Iterator[tuple[RunSpec, list[Path]]]:
    """The runs of an experiment's sweep (`expand_sweep`) grouped by their setting less the keys `same_cost` (seed,
    train.lr: keys that change nothing the caller reads of the spec): each group's spec, composed once for its
    first run (composing is the slow part), and the run directories of all its runs, in sweep order."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mpoe_exp.config import compose_config, expand_sweep, run_spec

    groups: dict[tuple[str, ...], tuple[DictConfig, list[Path]]] = {}
    for overrides in expand_sweep([f"experiment={experiment}"]):
        varying = [o for o in overrides if o.split("=")[0] in same_cost]
        key = tuple(o for o in overrides if o not in varying)
        if key not in groups:
            groups[key] = (compose_config(list(key)), [])
        cfg = groups[key][0].copy()
        for override in OverridesParser.create().parse_overrides(varying):
            OmegaConf.update(cfg, override.key_or_group, override.value())
        groups[key][1].append(run_dir(cfg))
    for cfg, directories in groups.values():
        yield run_spec(cfg), directories


@contextlib.contextmanager
def atomic_replace(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; when the block ends without error the file written there replaces
    `path` in one rename, so `path` is never half-written. A write that fails for lack of space (an OSError, or
    torch's zip writer's "unexpected pos") is a UserError naming the file and the space left; `path` is unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) or (isinstance(err, RuntimeError) and "inline_container" in str(err)):
            free = shutil.disk_usage(path.parent).free / 1e9
            raise UserError(
                f"could not write {path} ({err}); {free:.2f} GB free on its disk. What was written before is "
                "kept: free some space and run the same command again to resume"
            ) from err
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through `atomic_replace`, fsynced before the rename."""
    with atomic_replace(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_results(directory: Path, record: RunRecord) -> Path:
    path = directory / RESULTS_FILE
    atomic_write_text(path, record.dumps())
    return path


def read_results(directory: Path) -> RunRecord | None:
    """The run's record, or None if there is none or the file is unreadable or not a run's record."""
    path = directory / RESULTS_FILE
    try:
        return RunRecord.from_json(json.loads(path.read_text()), path)
    except (OSError, ValueError):  # json's errors and run_record.BadRecord are ValueErrors
        return None


def is_finished(directory: Path, config_digest: str | None = None) -> bool:
    """Whether the run in `directory` finished; with `config_digest`, only if it was that config's run."""
    record = read_results(directory)
    if record is None or not record.finished:
        return False
    return config_digest is None or record.config_hash == config_digest


def code_version() -> str:
    """`git describe` of the checkout this package runs from, or the package version."""
    from mpoe_exp import __version__

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "datasets", "hydra-core", "omegaconf", "nltk", "sacrebleu", "scikit-learn"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions
