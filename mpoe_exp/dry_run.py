"""How many parameters? Build the model on the meta device (no weights, no download) and count."""

from __future__ import annotations

import dataclasses

import yaml

from mpoe_exp.conf_files import CONFIG_DIR, method_config
from mpoe_exp.models import build_model, parameter_report
from mpoe_exp.spec import RunSpec

PAPER_PARAMETERS = CONFIG_DIR / "paper" / "parameters.yaml"


def paper_figure(spec: RunSpec) -> float | None:
    """The paper's total parameter count (millions) for this model and method[-ablation], if it reports one."""
    table = yaml.safe_load(PAPER_PARAMETERS.read_text())
    return (table.get(spec.model.name) or {}).get(spec.method_label)


def matched_total(spec: RunSpec, method: str) -> int:
    """The total parameter count of the run's model with `method` (a conf/method file as it is) instead of its own."""
    model, _ = build_model(dataclasses.replace(spec, method=method_config(method)), meta=True)
    return parameter_report(model)["total"]


def dry_run(spec: RunSpec) -> dict[str, int]:
    """Print and return the parameter report of the run's model."""
    model, _ = build_model(spec, meta=True)
    report = parameter_report(model)
    paper = paper_figure(spec)
    print(f"model={spec.model.name} method={spec.method_label}")
    print(f"  total parameters     {report['total']:>15,}   ({report['total'] / 1e6:.1f}M)", end="")
    print(f"   paper: {paper}M" if paper is not None else "   paper: not reported")
    matched = spec.method.get("match_params")
    if matched:  # a method sized to another's parameter count (moe/adapters.py): that count beside ours
        total = matched_total(spec, matched)
        ours = report["total"] / total - 1
        print(f"  {'method=' + matched:<21}{total:>15,}   ({total / 1e6:.1f}M; ours {ours:+.2%})")
    print(f"  trainable parameters {report['trainable']:>15,}")
    if "moe_layers" in report:
        print(f"  MoE layers           {report['moe_layers']:>15,}   ({spec.method['num_experts']} experts each)")
        print(f"  backbone (non-FFN)   {report['backbone']:>15,}")
        print(f"  routers              {report['router']:>15,}")
        print(f"  shared by experts    {report['expert_shared']:>15,}   (central tensors when shared, biases)")
        print(f"  expert-specific      {report['expert_specific']:>15,}")
    return report
