"""mpoe-exp: reproduce and extend MPOE (Gao et al., COLING 2022) from Hydra configs.

The public names load on first use (PEP 562), so that `make tables`, which only reads results files, imports no
model code and no torch."""

from mpoe_exp.errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "build_model", "compose_config", "load_model", "run_spec", "save_model"]

_LAZY = {"compose_config": "mpoe_exp.config", "run_spec": "mpoe_exp.config", "build_model": "mpoe_exp.models",
         "load_model": "mpoe_exp.models", "save_model": "mpoe_exp.models"}  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mpoe_exp' has no attribute {name!r}")
