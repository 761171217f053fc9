"""How many parameters? Build the model on the meta device (no weights, no download) and count."""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf

from mpoe_exp.conf_files import method_config
from mpoe_exp.config import CONFIG_DIR, method_label, run_spec
from mpoe_exp.models import build_model, parameter_report

PAPER_PARAMETERS = CONFIG_DIR / "paper" / "parameters.yaml"


def paper_figure(cfg: DictConfig) -> float | None:
    """The paper's total parameter count (millions) for this model and method[-ablation], if it reports one."""
    table = OmegaConf.load(PAPER_PARAMETERS)
    return table.get(cfg.model.name, {}).get(method_label(cfg))


def matched_total(cfg: DictConfig, method: str) -> int:
    """The total parameter count of cfg's model with `method` (a conf/method file as it is) instead of cfg's."""
    other = dataclasses.replace(run_spec(cfg, train=False), method=method_config(method))
    model, _ = build_model(other, meta=True)
    return parameter_report(model)["total"]


def dry_run(cfg: DictConfig) -> dict[str, int]:
    """Print and return the parameter report of cfg's model."""
    model, _ = build_model(run_spec(cfg, train=False), meta=True)
    report = parameter_report(model)
    paper = paper_figure(cfg)
    print(f"model={cfg.model.name} method={method_label(cfg)}")
    print(f"  total parameters     {report['total']:>15,}   ({report['total'] / 1e6:.1f}M)", end="")
    print(f"   paper: {paper}M" if paper is not None else "   paper: not reported")
    matched = cfg.method.get("match_params")
    if matched:  # a method sized to another's parameter count (moe/adapters.py): that count beside ours
        total = matched_total(cfg, matched)
        ours = report["total"] / total - 1
        print(f"  {'method=' + matched:<21}{total:>15,}   ({total / 1e6:.1f}M; ours {ours:+.2%})")
    print(f"  trainable parameters {report['trainable']:>15,}")
    if "moe_layers" in report:
        print(f"  MoE layers           {report['moe_layers']:>15,}   ({cfg.method.num_experts} experts each)")
        print(f"  backbone (non-FFN)   {report['backbone']:>15,}")
        print(f"  routers              {report['router']:>15,}")
        print(f"  shared by experts    {report['expert_shared']:>15,}   (central tensors when shared, biases)")
        print(f"  expert-specific      {report['expert_specific']:>15,}")
    return report
