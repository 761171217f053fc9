"""The performance targets of the MPO expert layers, read from `benchmarks/layers.py --json` files: one column per
run and token count, each ratio against its target (a layer's fwd+bwd time over its floor, both in one run).

    python benchmarks/layer_targets.py run1.json run2.json

- mpoe, mpoe++ with `method.recompute=false` ("<name> no-recompute") over the physical floor (the tokens' FFN work
  and one contraction of every expert matrix, forward and backward, at the dense FFN's rate): <= 1.2 and <= 1.25;
- mpoe, mpoe++ with recompute (the default) over the physical floor plus the recompute work: <= 1.2 each.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = [  # (label, layer, ratio key, target)
    ("mpoe no-recompute / physical floor", "mpoe no-recompute", "x_physical", 1.20),
    ("mpoe++ no-recompute / physical floor", "mpoe++ no-recompute", "x_physical", 1.25),
    ("mpoe / (physical + recompute)", "mpoe", "x_floor", 1.20),
    ("mpoe++ / (physical + recompute)", "mpoe++", "x_floor", 1.20),
]


def table(runs: dict[str, dict]) -> str:
    columns = [(name, tokens) for name, run in runs.items() for tokens in run["tokens"]]
    head = " | ".join(f"{name}, {int(tokens):,}" for name, tokens in columns)
    lines = [f"| criterion | target | {head} | met |", "|---|---:|" + "---:|" * len(columns) + "---|"]
    for label, layer, key, target in TARGETS:
        values = [runs[name]["tokens"][tokens].get(layer, {}).get(key) for name, tokens in columns]
        shown = " | ".join("-" if v is None else f"{v:.2f}" for v in values)
        found = [v for v in values if v is not None]
        met = sum(v <= target for v in found)
        lines.append(f"| {label} | <= {target:.2f} | {shown} | {met} of {len(found)} |")
    machines = sorted({run["machine"] for run in runs.values()})
    return "\n".join(lines) + "\n\n" + "; ".join(machines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="layers.py --json files, one per run")
    args = parser.parse_args(argv)
    print(table({path.stem: json.loads(path.read_text()) for path in args.runs}))


if __name__ == "__main__":
    main()
