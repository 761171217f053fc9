"""The optimizer step alone: the trainer's AdamW (fused, `mpoe_exp.training.adamw`) against torch's default
(foreach) and its single-tensor loop, on the same parameters and gradients.

    python benchmarks/adamw.py [--millions 100] [--repeats 5] [--device cpu|cuda]

The parameters are T5-base FFN-shaped matrices (3,072 x 768) adding up to --millions million, with random
gradients; each implementation steps its own copy. Steps alternate between the implementations after one
warm-up step each (AdamW creates its moments there), so drift on a shared machine hits all alike. The table gives
the median step time, its ratio to fused, and on CPU the memory a step adds while it runs (the largest resident
set size seen during the step, sampled every 5 ms, less the size before it) or on CUDA the peak allocated.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layers import machine  # noqa: E402
from train_memory import PeakSampler, rss_bytes  # noqa: E402

from mpoe_exp.training import adamw  # noqa: E402

IMPLEMENTATIONS = {
    "fused": lambda params: adamw(params, lr=1e-4),  # the trainer's
    "foreach": lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=True),  # torch's default
    "loop": lambda params: torch.optim.AdamW(params, lr=1e-4, foreach=False),
}


def timed_step(optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[float, float]:
    """(seconds, bytes the step added at its peak) of one optimizer step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before, sampler = rss_bytes(), PeakSampler()
        sampler.start()
    start = time.perf_counter()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        seconds, peak = time.perf_counter() - start, torch.cuda.max_memory_allocated(device)
    else:
        seconds, peak = time.perf_counter() - start, sampler.stop()
    return seconds, max(peak - before, 0)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--millions", type=float, default=100.0, help="parameters, in millions")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = (3072, 768)
    count = max(1, round(args.millions * 1e6 / (shape[0] * shape[1])))
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=g) for _ in range(count)]
    grads = [torch.randn(shape, generator=g) for _ in range(count)]
    optimizers = {}
    for name, make in IMPLEMENTATIONS.items():
        params = [torch.nn.Parameter(p.to(device, copy=True)) for p in start]
        for p, grad in zip(params, grads):
            p.grad = grad.to(device, copy=True)
        optimizers[name] = make(params)
        optimizers[name].step()  # warm-up: the moments are created here
    del start, grads
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    added: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(args.repeats):
        for name, optimizer in optimizers.items():
            seconds, extra = timed_step(optimizer, device)
            times[name].append(seconds)
            added[name].append(extra)
    fused = statistics.median(times["fused"])
    lines = [
        f"AdamW step over {count * shape[0] * shape[1] / 1e6:.0f}M parameters ({count} x {shape[0]} x {shape[1]}), "
        f"{machine(device)}, median of {args.repeats}:",
        "",
        "| AdamW | step ms | x fused | memory the step adds, MB |",
        "|---|---:|---:|---:|",
    ]
    for name in optimizers:
        step = statistics.median(times[name])
        lines.append(f"| {name} | {step * 1e3:.0f} | {step / fused:.2f} | {max(added[name]) / 1e6:,.0f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
