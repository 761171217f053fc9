"""Peak memory and time of upcycling a randomly initialized model (default: t5-base-shaped, to mpoe++).

    python benchmarks/upcycle_memory.py [model=t5-base method=mpoe++ ...]

Prints one table row: the dense model's size, the upcycled model's size, and the process's peak resident memory
(VmHWM on Linux) over the whole build, which includes the Python/torch runtime (~0.3-0.4 GB). Run it in a fresh process:
the peak is per process.

With glibc the peak is of live memory: the mmap threshold is fixed at 64 KiB first, so each freed dense FFN goes back
to the system at once. glibc's default raises that threshold as large blocks are freed, and then keeps freed
weights in its heap: on the same build the peak was 0.5 GB higher on the AMD EPYC machine and about 1.4 GB higher on
another machine, what the allocator kept rather than what upcycling holds.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

from mpoe_exp import compose_config, cpu_malloc
from mpoe_exp.config import run_spec
from mpoe_exp.models import load_backbone, parameter_report, upcycle


def peak_rss_gb() -> float:
    """This process's peak resident memory. On Linux VmHWM of /proc/self/status: ru_maxrss would also count the
    peak of the process that started this one (the kernel carries it over at exec)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB, macOS: bytes (rough)


M_MMAP_THRESHOLD = -3  # mallopt(3)


def fix_mmap_threshold() -> bool:
    """glibc: serve every block of 64 KiB or more by mmap, returned to the system when freed (True when set)."""
    libc = cpu_malloc._libc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024) == 1


def main(overrides: list[str]) -> dict:
    fix_mmap_threshold()
    cfg = compose_config(["model=t5-base", "method=mpoe++", "model.pretrained=false", *overrides])
    torch.manual_seed(0)
    start = time.perf_counter()
    model = load_backbone(run_spec(cfg).model)
    dense_params = parameter_report(model)["total"]
    after_backbone = peak_rss_gb()
    upcycle(model, cfg.method)
    seconds = time.perf_counter() - start
    upcycled_params = parameter_report(model)["total"]
    result = {
        "model": cfg.model.name,
        "method": cfg.method.name,
        "dense_params": dense_params,
        "upcycled_params": upcycled_params,
        "peak_after_backbone_gb": after_backbone,
        "peak_rss_gb": peak_rss_gb(),
        "seconds": seconds,
    }
    print("| model | method | dense params | upcycled params | peak RSS after backbone | peak RSS | time |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {result['model']} | {result['method']} | {dense_params:,} | {upcycled_params:,} | "
        f"{after_backbone:.2f} GB | {result['peak_rss_gb']:.2f} GB | {seconds:.1f} s |"
    )
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
