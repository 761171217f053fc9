"""Does mixed precision learn less on the quickstart? Each precision trains the quickstart on the same seeds (same
initialization, dropout masks and batch order within a seed), and each mixed precision is compared with fp32 seed by
seed: the mean paired difference of validation and test MCC with its 95% t-interval.

    python benchmarks/precision_quickstart.py [--seeds 1 2 3 4 5 6 7 8] [--precisions fp32 bf16 fp16] [--runs-dir D]

Each run is `python -m mpoe_exp experiment=quickstart seed=S train.precision=P runs_dir=D` in a fresh process, as a
user types it; a run already finished in D is not trained again (the runner skips it), so an interrupted comparison
continues where it stopped. MCC here is x100 over 60 validation and 60 test examples: one changed prediction moves
it by several points, so only the paired interval says whether a precision is worse. --out writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import machine  # noqa: E402

from mpoe_exp.aggregate import load_results, paired  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "fp32"


def train(runs_dir: Path, precision: str, seed: int) -> None:
    args = ["experiment=quickstart", f"seed={seed}", f"train.precision={precision}", f"runs_dir={runs_dir}"]
    done = subprocess.run([sys.executable, "-m", "mpoe_exp", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"error: python -m mpoe_exp {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def scores(runs_dir: Path) -> dict[str, dict[str, dict[int, float]]]:
    """split -> precision -> seed -> MCC, from the finished runs' results.json."""
    records, problems = load_results(runs_dir)
    if problems:
        sys.exit("error: unreadable results:\n" + "\n".join(problems))
    out: dict[str, dict[str, dict[int, float]]] = {"validation": {}, "test": {}}
    for record in records:
        precision = record.config["train"]["precision"]
        for split in out:
            out[split].setdefault(precision, {})[int(record.seed)] = record.metric(split, "mcc")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(1, 9)))
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16", "fp16"])
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "precision_quickstart")
    parser.add_argument("--out", type=Path, help="write the per-seed scores and the paired differences as JSON")
    args = parser.parse_args(argv)
    if REFERENCE not in args.precisions:
        parser.error(f"--precisions needs {REFERENCE}, the reference of the paired differences")
    runs_dir = args.runs_dir.resolve()
    for seed in args.seeds:  # seed-major: an interrupted comparison still has whole seeds to pair
        for precision in args.precisions:
            train(runs_dir, precision, seed)
    found = scores(runs_dir)
    wanted = set(args.seeds)
    found = {s: {p: {k: v for k, v in by.items() if k in wanted} for p, by in ps.items()} for s, ps in found.items()}
    print(f"The quickstart (tiny-t5 + MPOE, CoLA demo data) per precision on {machine(torch.device('cpu'))}; "
          f"seeds {', '.join(map(str, args.seeds))}.\n")  # fmt: skip
    print("| split | precision | MCC per seed | mean | paired difference to fp32, mean [95% CI] | n |")
    print("|---|---|---|---:|---|---:|")
    report: dict = {"machine": machine(torch.device("cpu")), "seeds": args.seeds, "splits": {}}
    for split, by_precision in found.items():
        report["splits"][split] = {}
        for precision in args.precisions:
            values = by_precision.get(precision, {})
            per_seed = " ".join(f"{values[s]:.1f}" for s in sorted(values))
            mean = sum(values.values()) / len(values) if values else float("nan")
            entry = {"per_seed": values, "mean": mean}
            cell, n = "(reference)", len(values)
            if precision != REFERENCE:
                diff = paired([values], [by_precision.get(REFERENCE, {})])
                n, interval = diff.n, diff.interval
                entry["paired"] = {"seeds": diff.seeds, "mean": diff.mean, "interval": interval}
                cell = "-" if diff.mean is None else f"{diff.mean:+.1f}"
                if interval is not None:
                    cell += f" [{interval[0]:+.1f}, {interval[1]:+.1f}]"
            report["splits"][split][precision] = entry
            print(f"| {split} | {precision} | {per_seed} | {mean:.1f} | {cell} | {n} |")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
