"""Where the config files lie (conf/, or $MPOE_EXP_CONF) and a method's file read from there, for what needs a
method's settings outside the composed config: a method sized to another's parameter count (moe/adapters.py,
`method.match_params`). A module of its own, below config.py and models.py, which both use it."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from omegaconf import OmegaConf

from mpoe_exp.errors import UserError

CONFIG_DIR = Path(os.environ.get("MPOE_EXP_CONF", Path(__file__).resolve().parent.parent / "conf"))


@functools.cache
def _method_file(name: str) -> dict:
    """conf/method/<name>.yaml as Hydra composes it: the method files its `defaults` name, then its own keys."""
    path = CONFIG_DIR / "method" / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"method.match_params={name}: there is no conf/method/{name}.yaml")
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    defaults = own.pop("defaults", None) or ["_self_"]
    if "_self_" not in defaults:
        defaults = [*defaults, "_self_"]
    merged = OmegaConf.create()
    for entry in defaults:
        merged = OmegaConf.merge(merged, own if entry == "_self_" else _method_file(entry))
    return OmegaConf.to_container(merged)


def method_config(name: str) -> dict:
    """The config of method `name` as its file conf/method/<name>.yaml gives it (a copy; no command-line override)."""
    return OmegaConf.to_container(OmegaConf.create(_method_file(name)))


def with_matched(method: dict) -> dict:
    """`method` plus `matched`, the config of the method its `match_params` names, when it names one: a method sized
    to another's parameter count (moe/adapters.py) is built from it, and a run's identity holds it (results.py)."""
    name = method.get("match_params")
    return {**method, "matched": method_config(name)} if name else method
