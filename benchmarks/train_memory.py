"""Peak memory of training steps per method: the process's resident memory while it trains, beside the training
state (parameters, gradients, AdamW moments) that a parameter count alone predicts.

    python benchmarks/train_memory.py [--shape t5-base] [--batch 32] [--steps 2] [--methods dense switch mpoe mpoe++]
                                      [--grad-accum 1 8] [--set ++method.recompute=true ...] [--malloc keep|system]
                                      [--adamw fused|foreach]

Each method runs in a fresh process (peaks are per process): it builds the model (random weights, offline), takes
one warm-up step, then --steps steps of the trainer's TrainingStep on a batch of --batch sequences of 128 source and
16 target tokens (k such micro-batches per optimizer step with `--grad-accum k`; each k its own process too),
while a thread samples the resident set size (/proc/self/statm) every 5 ms. The table gives the
peak over the training steps less the resident size just before them ("step peak": what training adds on top of
the model), the training state measured after the steps, and ratios to switch. On CPU the resident set is what
a GPU's allocator would hold (activations, saved tensors, materialized expert matrices, gradients, moments).
`--malloc keep` measures training with `cpu_malloc=keep` (glibc keeps freed memory for reuse, so the resident size
never shrinks); the default is glibc's own policy, which returns blocks above 32 MB to the kernel when freed.
`--adamw foreach` steps with torch's default AdamW instead of the trainer's fused one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


class PeakSampler(threading.Thread):
    """The largest resident set size seen while running, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self.running = interval, rss_bytes(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, rss_bytes())


def child(
    method: str, shape: str, batch: int, steps: int, overrides: list[str], malloc: str, optimizer: str, k: int = 1
) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from layers import set_malloc
    from train_throughput import Run, make_batch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    applied = set_malloc(malloc, torch.device("cpu"))
    run = Run(method, torch.device("cpu"), shape, overrides=overrides, optimizer=optimizer)
    micro = make_batch(batch, run.vocab, torch.device("cpu"))
    run.step([micro] * k)  # warm-up: AdamW creates its moments here
    before = rss_bytes()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    for _ in range(steps):
        run.step([micro] * k)
    seconds = (time.perf_counter() - start) / steps
    peak = sampler.stop()
    adam = run.step_fn.optimizer
    params = [p for group in adam.param_groups for p in group["params"]]
    size = sum(p.numel() * p.element_size() for p in params)
    moments = sum(t.numel() * t.element_size() for s in adam.state.values() for t in s.values() if t.dim() > 0)
    return {
        "method": method,
        "k": k,
        "peak_gb": peak / 1e9,
        "step_peak_gb": (peak - before) / 1e9,
        "state_gb": (2 * size + moments) / 1e9,
        "step_s": seconds,
        "malloc": applied,
    }


def table(results: list[dict], shape: str, batch: int, overrides: list[str], malloc: str, optimizer: str) -> str:
    switches = {r.get("k", 1): r for r in results if r["method"] == "switch" and "peak_gb" in r}
    lines = [
        f"Training memory, {shape} shape, batch {batch} x (128 + 16) tokens, CPU, fp32, {optimizer} AdamW, "
        f"malloc {malloc}" + (f", {' '.join(overrides)}" if overrides else "") + ":",
        "",
        "| method | k | peak RSS GB | step peak GB | training state GB | peak x switch (same k) | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        k = r.get("k", 1)
        if "error" in r:
            lines.append(f"| {r['method']} | {k} | failed: {r['error']} | | | | |")
            continue
        switch = switches.get(k)
        ratio = f"{r['peak_gb'] / switch['peak_gb']:.2f}" if switch else "-"
        lines.append(
            f"| {r['method']} | {k} | {r['peak_gb']:.2f} | {r['step_peak_gb']:.2f} | {r['state_gb']:.2f} | {ratio} | "
            f"{r['step_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="t5-base")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["dense", "switch", "mpoe", "mpoe++"])
    parser.add_argument("--grad-accum", type=int, nargs="+", default=[1], help="micro-batches per optimizer step")
    parser.add_argument(
        "--set", nargs="*", default=[], help="config overrides for every method but dense (++method.recompute=true)"
    )
    parser.add_argument("--malloc", choices=("system", "keep"), default="system", help="as in benchmarks/layers.py")
    parser.add_argument("--adamw", choices=("fused", "foreach"), default="fused", help="as in train_throughput.py")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        k = args.grad_accum[0]
        print(json.dumps(child(args.child, args.shape, args.batch, args.steps, args.set, args.malloc, args.adamw, k)))
        return ""
    results = []
    for k, method in ((k, m) for k in args.grad_accum for m in args.methods):
        command = [sys.executable, __file__, "--child", method, "--shape", args.shape, "--batch", str(args.batch)]
        command += ["--steps", str(args.steps), "--malloc", args.malloc, "--adamw", args.adamw, "--grad-accum", str(k)]
        command += ["--set", *args.set]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            continue
        print(f"{method} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        killed = -done.returncode == signal.SIGKILL  # what the kernel's out-of-memory killer sends
        last = (done.stderr.strip().splitlines() or ["?"])[-1][:120]
        results.append({"method": method, "k": k, "error": "killed (SIGKILL: out of memory?)" if killed else last})
    applied = next((r["malloc"] for r in results if "malloc" in r), args.malloc)
    text = table(results, args.shape, args.batch, args.set, applied, args.adamw)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(1 if "failed:" in main() else 0)
