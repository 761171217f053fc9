"""python -m mpoe_exp model=... method=... ablation=... [dry_run=true]  (Hydra entry point; thin)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from mpoe_exp.errors import UserError


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from mpoe_exp.config import validate_config
    from mpoe_exp.dry_run import dry_run

    try:
        validate_config(cfg)
        if cfg.dry_run:
            dry_run(cfg)
            return
        from mpoe_exp.runner import check_task_fits_model, run

        check_task_fits_model(cfg)
        run(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
