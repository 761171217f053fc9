"""Wall-clock time of what a newcomer waits for first: the quickstart command (train, evaluate, write results), a
dry run (parameter counts of t5-base mpoe) and BLEU of 300 hypotheses against 2,000 references.

    python benchmarks/wall_time.py [--repeats 3] [--cases quickstart dry_run bleu]

The commands run as a user types them, each in a fresh process (the quickstart into a new temporary runs folder
each time); BLEU runs in this process on random sentences, as tests/test_metrics.py builds them. Each repeat runs
every case once, in turn, so drift on a shared machine hits all alike. The table gives the median, fastest and
slowest run beside the time the README and the tests used to promise ("target"); the load average before and
after says how busy the machine was. Tests check what these commands do, never how long they take: on a busy
2-core machine the quickstart took 2 minutes (BENCHMARKS.md, "Wall-clock time"). The quickstart trains on one
thread (cpu_threads=auto), whatever the thread count the table's machine line gives for this process.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import machine  # noqa: E402

from mpoe_exp.metrics import bleu  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"quickstart": 60.0, "dry_run": 30.0, "bleu": 10.0}  # seconds
COMMANDS = {
    "quickstart": ["experiment=quickstart"],
    "dry_run": ["model=t5-base", "method=mpoe", "dry_run=true"],
}


def run_command(args: list[str]) -> float:
    """Seconds of one `python -m mpoe_exp ARGS` in a fresh process; exits with its stderr if it fails."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mpoe_exp", *args], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"error: python -m mpoe_exp {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds


def time_bleu() -> float:
    """Seconds of BLEU-4 over 300 hypotheses and 2,000 references of 15-25 words (vocabularies of 50-2,000)."""
    rng = random.Random(11)
    vocabulary = [f"w{i}" for i in range(2000)]

    def sentence() -> list[str]:
        return [rng.choice(vocabulary[: rng.choice([50, 500, 2000])]) for _ in range(rng.randint(15, 25))]

    hypotheses = [sentence() for _ in range(300)]
    references = [sentence() for _ in range(2000)]
    start = time.perf_counter()
    bleu(hypotheses, references, 4)
    return time.perf_counter() - start


def time_case(case: str, runs_dir: Path) -> float:
    if case == "quickstart":
        return run_command([*COMMANDS[case], f"runs_dir={runs_dir}"])
    if case == "bleu":
        return time_bleu()
    return run_command(COMMANDS[case])


def describe(case: str) -> str:
    if case == "bleu":
        return "BLEU-4, 300 x 2,000 sentences"
    return "python -m mpoe_exp " + " ".join(COMMANDS[case])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    seconds = {case: [] for case in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for case in args.cases:
                seconds[case].append(time_case(case, Path(tmp) / str(repeat)))
    load_after = os.getloadavg()[0]
    print(f"Wall-clock time on {machine(torch.device('cpu'))}, median of {args.repeats}; "
          f"load average (1 min) {load_before:.1f} before, {load_after:.1f} after:\n")  # fmt: skip
    print("| case | what | median s | min s | max s | target s |")
    print("|---|---|---:|---:|---:|---:|")
    for case, times in seconds.items():
        print(f"| {case} | {describe(case)} | {statistics.median(times):.1f} | {min(times):.1f} | {max(times):.1f} "
              f"| {TARGETS[case]:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
