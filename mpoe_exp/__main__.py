"""python -m mpoe_exp model=... method=... ablation=... [dry_run=true]  (Hydra entry point; thin)."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from mpoe_exp.errors import UserError


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mpoe_exp.config import run_spec, validate_config
    from mpoe_exp.dry_run import dry_run

    hydra_cfg = HydraConfig.get()
    try:
        validate_config(cfg)
        if cfg.dry_run:
            try:
                dry_run(run_spec(cfg, train=False))
            except BrokenPipeError:  # `... dry_run=true | head -2`: the reader had enough
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return
        from mpoe_exp.runner import check_task_fits_model, run

        if hydra_cfg.mode == RunMode.RUN:
            check_not_a_sweep(hydra_cfg)
        check_task_fits_model(cfg)
        run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # one failed run must not end the sweep (mpoe_exp/sweep.py)
            from mpoe_exp.sweep import record_error

            record_error(hydra_cfg.runtime.output_dir, list(hydra_cfg.overrides.task), str(err))
            return
        sys.exit(2)


def check_not_a_sweep(hydra_cfg) -> None:
    """An experiment that sweeps (hydra.sweeper.params) runs without -m only if the command fixes every swept key."""
    given = {arg.partition("=")[0].lstrip("+~") for arg in hydra_cfg.overrides.task}
    missing = [key for key in hydra_cfg.sweeper.get("params") or {} if key not in given]
    if missing:
        command = " ".join(hydra_cfg.overrides.task)
        raise UserError(
            f"this experiment is a sweep over {', '.join(missing)}: add -m to run all of it "
            f"(python -m mpoe_exp -m {command}), or fix {', '.join(k + '=...' for k in missing)} to run one of its runs"
        )


def check_command(argv: list[str]) -> None:
    """A bad choice or key on the command line: one line and exit 2 before Hydra starts (Hydra's own report is
    several lines, exit 1). Commands with Hydra's flags (--help, --cfg, ...) go to Hydra as they are."""
    from mpoe_exp.config import check_composes

    sweep_flags = ("-m", "--multirun")
    if any(a.startswith("-") and a not in sweep_flags for a in argv):
        return
    try:
        check_composes([a for a in argv if a not in sweep_flags], multirun=any(a in sweep_flags for a in argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_command(sys.argv[1:])
    main()
