"""Sweeps that survive a failing run: each failed run leaves `error.txt` in its Hydra job folder, and a callback
prints the list at the end of the sweep and exits non-zero.

Why not let the exception escape: Hydra's launchers stop a whole sweep at a `SystemExit`, and print a traceback for
any other exception. A sweep of 360 runs should not die of one diverging run, and a user error (a bad combination
in the grid) deserves its message, not a traceback. The error files work with every launcher (local, joblib
workers, SLURM jobs), because they are on the file system that all of them share.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

ERROR_FILE = "error.txt"


def record_error(output_dir: str | Path, overrides: list[str], message: str) -> None:
    """Leave the run's error in its Hydra job folder, for the end-of-sweep summary."""
    path = Path(output_dir) / ERROR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(overrides) + "\n" + message + "\n")


def _error_files(config: DictConfig) -> list[Path]:
    sweep_dir = Path(config.hydra.sweep.dir)
    return sorted(sweep_dir.glob(f"*/{ERROR_FILE}"), key=lambda p: (len(p.parent.name), p.parent.name))


class SweepSummary(Callback):
    """At the start of a multirun, clear old error files; at its end, list the runs that failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        for path in _error_files(config):
            path.unlink(missing_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        failed = _error_files(config)
        if not failed:
            return
        print(f"\n{len(failed)} run(s) of the sweep failed (the others finished):", file=sys.stderr)
        for path in failed:
            overrides, _, message = path.read_text().partition("\n")
            print(f"  [{overrides}] {message.strip()}", file=sys.stderr)
        sys.exit(1)
