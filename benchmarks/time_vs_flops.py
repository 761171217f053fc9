"""Does training time follow counted FLOPs? Each training setting in its own process, in rounds.

    python benchmarks/time_vs_flops.py [--methods dense switch mpoe] [--grad-accum 1 8] [--rounds 2] [--steps 3]
                                       [--shape t5-base] [--batch 4] [--malloc keep] [--out DIR]

Every (method, k) runs `train_throughput.py --methods METHOD --grad-accum K` alone in a fresh process: its own heap
and nothing else's memory beside it (a t5-base Switch's 16 GB training state next to the dense model's nears a
24 GB machine's memory). Round after round: every setting once, then every setting again, so that drift on a shared
machine hits all alike. A setting's step time is the median over rounds of its processes' median step, timed after
two warm-up steps (the first counts the step's FLOPs, train_throughput.py; on CPU the step after it could still be
twice as slow as the rest). Three timed steps by default: with two, the median is their mean, and one slow step
(one of 30 s among steps of 21 s has happened) moves it. The table gives, against dense at the same k, time per
token, counted FLOPs per token and their quotient, time / FLOPs: how far a method's time strays from its arithmetic
(1.00: it runs at dense's rate; the performance target asks for at most 1.15). The same quotient for the forward and
backward passes alone, and the time of the step's optimizer update (clipping, AdamW), which no FLOP count sees, say
where a step strays: a method with E copies of each FFN updates E times the FFN parameters. Each process's table and
JSON land in `--out` (default time_vs_flops/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = 1.15


def run_setting(args: argparse.Namespace, method: str, k: int, round_: int) -> dict:
    """One process of train_throughput.py for this setting; its record (step_ms, flops_per_token, ...)."""
    stem = args.out / f"round{round_}_{method}_k{k}"
    command = [
        sys.executable, str(HERE / "train_throughput.py"), "--methods", method, "--grad-accum", str(k),
        "--shape", args.shape, "--batch", str(args.batch), "--steps", str(args.steps), "--warm-up", "1",
        "--malloc", args.malloc, "--device", "cpu", "--json", f"{stem}.json",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    stem.with_suffix(".md").write_text(done.stdout + done.stderr[-4000:])
    if done.returncode != 0:
        sys.exit(f"error: {method} k={k} (round {round_}) failed with exit {done.returncode}; see {stem}.md")
    written = json.loads(Path(f"{stem}.json").read_text())
    (record,) = written["methods"].values()
    print(f"round {round_}: {method} k={k}: {record['step_ms']:,.0f} ms/step", file=sys.stderr, flush=True)
    return {**record, "machine": written["machine"]}


def table(records: dict[tuple[str, int], list[dict]], header: str) -> str:
    """The Markdown table of the settings' medians over rounds, each against dense at the same k: the whole step's
    time against its counted FLOPs (the target's quotient), then the forward and backward passes' alone (the step
    less its optimizer update: clipping and AdamW, whose work no FLOP count sees) and the update's time."""
    step = {s: statistics.median(r["step_ms"] for r in rs) for s, rs in records.items()}
    flops = {s: rs[0]["flops_per_token"] for s, rs in records.items()}
    timed_apart = {s: rs for s, rs in records.items() if all("passes_ms" in r for r in rs)}
    passes = {s: statistics.median(r["passes_ms"] for r in rs) for s, rs in timed_apart.items()}
    update = {s: statistics.median(r["step_ms"] - r["passes_ms"] for r in rs) for s, rs in timed_apart.items()}
    lines = [
        header,
        "",
        "| method | k | step ms (per round) | time per token x dense | FLOPs x dense | time / FLOPs "
        f"(target <= {TARGET}) | passes' time / FLOPs | update ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (method, k), runs in records.items():
        rounds = ", ".join(f"{r['step_ms']:,.0f}" for r in runs)
        shown_update = f"{update[method, k]:,.0f}" if (method, k) in update else "-"
        if ("dense", k) not in step:
            lines.append(f"| {method} | {k} | {rounds} | - | - | - | - | {shown_update} |")
            continue
        flop_ratio = flops[method, k] / flops["dense", k]
        time_ratio = step[method, k] / step["dense", k]
        quotients = [time_ratio / flop_ratio]
        if (method, k) in passes and ("dense", k) in passes:
            quotients.append(passes[method, k] / passes["dense", k] / flop_ratio)
        shown = [f"{q:.2f}" if q <= TARGET else f"**{q:.2f}**" for q in quotients] + ["-"] * (2 - len(quotients))
        lines.append(
            f"| {method} | {k} | {rounds} | {time_ratio:.2f} | {flop_ratio:.2f} | {shown[0]} | {shown[1]} "
            f"| {shown_update} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["dense", "switch", "mpoe"])
    parser.add_argument("--grad-accum", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after two warm-up steps)")
    parser.add_argument("--shape", default="t5-base")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--malloc", choices=("system", "keep"), default="keep")
    parser.add_argument("--out", type=Path, default=Path("time_vs_flops"))
    args = parser.parse_args(argv)
    if "dense" not in args.methods:
        parser.error("--methods must include dense: every ratio is against it")
    args.out.mkdir(parents=True, exist_ok=True)
    settings = [(m, k) for k in args.grad_accum for m in args.methods]
    records: dict[tuple[str, int], list[dict]] = {s: [] for s in settings}
    for round_ in range(1, args.rounds + 1):
        for method, k in settings:
            records[method, k].append(run_setting(args, method, k, round_))
    machines = sorted({r["machine"] for rs in records.values() for r in rs})
    header = (
        f"Time against counted FLOPs, {args.shape} shape, micro-batch {args.batch}, each setting in its own process, "
        f"{args.rounds} rounds of {args.steps} timed steps (median of each process's steps, then over rounds); "
        f"{' / '.join(machines)}:"
    )
    text = table(records, header)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
