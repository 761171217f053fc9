"""How much a Switch-style router's training capacity drops, measured on a finished run's best checkpoint.

    python benchmarks/capacity_drop.py RUN_DIR [--data-dir DIR] [--batches N]

The routing telemetry of results.json is taken in evaluation, where capacity_factor_eval is null (no limit), so its
`dropped` is 0 and says nothing of training, where capacity_factor_train limits each expert to c N / E of a batch's
N token choices. This script measures it: it rebuilds the run's model from its recorded config, loads
checkpoints/best.pt, and routes training batches (the run's micro-batch size, a fixed shuffle) in training mode
(jitter included), without gradients or updates, recording every routed layer. Per layer it prints the share of
token choices dropped, the largest share of the kept choices one expert received, and the largest share at the
validation pass of the best checkpoint (results.json), where nothing is dropped. One pass with the final router: how
much the limit dropped earlier in training is not known from it. RUN_DIR must still hold its checkpoint (the
committed study records keep none).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mpoe_exp.aggregate import best_routing
from mpoe_exp.config import run_spec
from mpoe_exp.errors import UserError, run_command
from mpoe_exp.models import build_model
from mpoe_exp.moe.telemetry import reset_routing_stats, routing_stats
from mpoe_exp.run_record import RunRecord
from mpoe_exp.tasks.tasks import build_task


def measure(run_dir: Path, data_dir: str | None, batches: int) -> str:
    if not (run_dir / "checkpoints" / "best.pt").is_file():
        raise UserError(f"{run_dir}: no checkpoints/best.pt (a finished run that kept its checkpoint)")
    try:
        results = json.loads((run_dir / "results.json").read_text())
        record = RunRecord.from_json(results)
    except (OSError, ValueError) as err:  # BadRecord is a ValueError
        raise UserError(f"{run_dir}: not a finished run ({err})") from None
    if not record.finished:
        raise UserError(f"{run_dir}: not a finished run (status {record.status})")
    cfg = OmegaConf.create(results["config"])
    if data_dir:
        cfg.data_dir = data_dir
    capacity = cfg.method.get("router", {}).get("capacity_factor_train")
    if capacity is None:
        raise UserError(f"{run_dir}: method.router.capacity_factor_train is null: this router drops nothing")
    spec = run_spec(cfg)
    model, tokenizer = build_model(spec)
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True))
    task = build_task(spec, tokenizer)
    features = task.train_features()
    random.Random(0).shuffle(features)
    size = spec.train.batch_size
    model.train()
    torch.manual_seed(0)  # the jitter and dropout of the pass: the same numbers on a rerun
    reset_routing_stats(model)
    with torch.no_grad():
        for start in range(0, min(len(features), batches * size), size):
            task.loss(model, task.collate(features[start : start + size]), 0.0)
    measured = routing_stats(model)
    validation = best_routing(record) or {}
    lines = [
        f"{run_dir}: {min(len(features), batches * size)} training examples in batches of {size}, routed by the best "
        f"checkpoint (step {record.best_step}) in training mode; capacity_factor_train {capacity}",
        "",
        "| layer | dropped in training | top expert's share of the kept, training | top expert's share, validation |",
        "|---|---:|---:|---:|",
    ]
    for name, entry in measured.items():
        at_validation = (validation.get(name) or {}).get("load")
        shown = f"{100 * max(at_validation):.1f}%" if at_validation else "-"
        lines.append(f"| {name} | {100 * entry['dropped']:.1f}% | {100 * max(entry['load']):.1f}% | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory, with checkpoints/best.pt")
    parser.add_argument("--data-dir", help="where the task's data is now, if not where the run read it")
    parser.add_argument("--batches", type=int, default=1000, help="at most this many training batches")
    args = parser.parse_args(argv)
    return run_command(lambda: print(measure(args.run_dir, args.data_dir, args.batches)))


if __name__ == "__main__":
    sys.exit(main())
