"""One summary table of benchmarks/gpu_check.sh's results: each part's time, the GPU tests, the layer benchmark (fp32
and bf16) and training throughput (bf16, each setting in its own process), from the files the check wrote into its
output folder.

    python benchmarks/gpu_summary.py OUT_DIR   (phases.txt, pytest.txt, layers_{fp32,bf16}.json, train_bf16*.json)

Prints Markdown; a part whose file is missing is reported as such, so a check cut short still says what ran. A
training setting's "x dense" is its median step time over dense's at the same k, each measured in its own process.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LAYERS = (
    *("switch", "SwitchTransformersSparseMLP", "moe", "mpoe", "mpoe++", "cartesian", "meo"),
    *("mpoe no-recompute", "mpoe++ no-recompute"),
)


def tests_line(out: Path) -> str:
    log = out / "pytest.txt"
    if not log.is_file():
        return "GPU tests: not run"
    summary = [line for line in log.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return f"GPU tests (pytest -m gpu): {summary[-1].strip('= ') if summary else 'no summary line (see pytest.txt)'}"


def layer_rows(out: Path) -> list[str]:
    rows = []
    for precision in ("fp32", "bf16"):
        path = out / f"layers_{precision}.json"
        if not path.is_file():
            rows.append(f"| layers | {precision} | not run | | | | |")
            continue
        record = json.loads(path.read_text())
        for tokens, by_layer in record["tokens"].items():
            for name in LAYERS:
                if name in by_layer:
                    r = by_layer[name]
                    rows.append(
                        f"| layer {name} | {precision}, {tokens} tokens | {r['fwd_bwd_ms']:.2f} ms fwd+bwd | "
                        f"{r['x_dense']:.2f} | {r['x_physical']:.2f} | {r['x_floor']:.2f} | |"
                    )
    return rows


def training_records(out: Path) -> list[tuple[dict, dict]]:
    """(file record, method record) of every training setting the check measured, in file order."""
    found = []
    for path in sorted(out.glob("train_bf16*.json")):
        record = json.loads(path.read_text())
        found += [(record, {"method": name, "k": 1, **r}) for name, r in record["methods"].items()]
    return found


def train_rows(out: Path) -> list[str]:
    found = training_records(out)
    if not found:
        return ["| training | bf16 | not run | | | | |"]
    dense = {r["k"]: r["step_ms"] for _, r in found if r["method"] == "dense"}
    rows = []
    for record, r in found:
        ratio = f"{r['step_ms'] / dense[r['k']]:.2f}" if r["k"] in dense else "-"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        where = f"{record['precision']}, {record['shape']}, batch {record['batch']}, {record['steps']} steps"
        rows.append(
            f"| training {r['method']} k={r['k']} | {where} | {r['step_ms']:.0f} ms/step, "
            f"{r['tokens_per_s']:,.0f} tokens/s | {ratio} | | | {peak} |"
        )
    return rows


def phases_line(out: Path) -> str:
    path = out / "phases.txt"
    if not path.is_file():
        return "Parts' times: not recorded"
    return "Parts' times: " + "; ".join(line for line in path.read_text().splitlines() if line.strip())


def summary(out: Path) -> str:
    machine = (out / "machine.txt").read_text().strip() if (out / "machine.txt").is_file() else "unknown machine"
    lines = [
        f"GPU check on {machine}",
        "",
        tests_line(out),
        phases_line(out),
        "",
        "| what | setting | time | x dense | x physical floor | x floor + recompute | peak GB |",
        "|---|---|---:|---:|---:|---:|---:|",
        *layer_rows(out),
        *train_rows(out),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check")))
