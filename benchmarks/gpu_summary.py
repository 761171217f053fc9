"""One summary table of benchmarks/gpu_check.sh's results: the GPU tests, the layer benchmark (fp32 and bf16) and
training throughput (bf16), from the files the check wrote into its output folder.

    python benchmarks/gpu_summary.py OUT_DIR   (pytest.txt, layers_{fp32,bf16}.json, train_bf16.json there)

Prints Markdown; a part whose file is missing is reported as such, so a check cut short still says what ran.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

LAYERS = ("switch", "SwitchTransformersSparseMLP", "moe", "mpoe", "mpoe++", "cartesian", "meo")


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
            rows.append(f"| layers | {precision} | not run | | | |")
            continue
        record = json.loads(path.read_text())
        for tokens, by_layer in record["tokens"].items():
            for name in LAYERS:
                if name in by_layer:
                    r = by_layer[name]
                    rows.append(
                        f"| layer {name} | {precision}, {tokens} tokens | {r['fwd_bwd_ms']:.2f} ms fwd+bwd | "
                        f"{r['x_dense']:.2f} | {r['x_floor']:.2f} | |"
                    )
    return rows


def train_rows(out: Path) -> list[str]:
    path = out / "train_bf16.json"
    if not path.is_file():
        return ["| training | bf16 | not run | | | |"]
    record = json.loads(path.read_text())
    rows = []
    for method, r in record["methods"].items():
        ratio = f"{r['x_dense']:.2f}" if r["x_dense"] else "-"
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "-"
        where = f"{record['precision']}, {record['shape']}, batch {record['batch']}, {record['steps']} steps"
        rows.append(
            f"| training {method} | {where} | {r['step_ms']:.0f} ms/step, {r['tokens_per_s']:,.0f} tokens/s | "
            f"{ratio} | | {peak} |"
        )
    return rows


def summary(out: Path) -> str:
    machine = (out / "machine.txt").read_text().strip() if (out / "machine.txt").is_file() else "unknown machine"
    lines = [
        f"GPU check on {machine}",
        "",
        tests_line(out),
        "",
        "| what | setting | time | x dense | x floor | peak GB |",
        "|---|---|---:|---:|---:|---:|",
        *layer_rows(out),
        *train_rows(out),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check")))
