"""`cpu_malloc=keep`: on CPU, glibc keeps freed memory for reuse instead of page-faulting large tensors each step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mpoe_exp import cpu_malloc
from mpoe_exp.runner import set_cpu_malloc

# Allocates and frees a 64 MB tensor 30 times and prints the page faults of the last 20. The first ones grow the heap,
# and under `keep` up to 8 of them do: each large block is followed by a small chunk (128 bytes) that is freed into
# glibc's per-thread cache, which holds up to 7 freed chunks of a size (glibc.malloc.tcache_count) and never merges
# them with their neighbours. Until that cache is full, a freed 64 MB block stays walled in, too small for the next
# 64-byte-aligned request, and the heap grows again (seen on one machine: the last growth at the 2nd, 7th, 8th or
# 9th allocation; with GLIBC_TUNABLES=glibc.malloc.tcache_count=0 always the 1st). 10 warm-up allocations cover it.
FAULTS = """
import resource, sys, torch
from mpoe_exp.cpu_malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(10):
    torch.empty(16 * 2**20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.empty(16 * 2**20).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(setting: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", FAULTS, setting], capture_output=True, text=True, check=True)
    applied, faults = done.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not cpu_malloc.is_glibc(), reason="glibc's malloc only")
@pytest.mark.slow
def test_keeping_freed_memory_stops_large_tensors_from_page_faulting_in_every_step():
    _, system = page_faults("system")
    applied, keep = page_faults("keep")
    pages = 20 * 64 * 2**20 // 4096
    assert system > pages / 2  # glibc maps each 64 MB block afresh: every page faults again
    assert applied == "True"
    assert keep < pages / 5  # reused from the heap (seen: 0 or one block's pages, 16,384 of 327,680)


def test_keeping_freed_memory_says_no_where_the_c_library_is_not_glibc(monkeypatch):
    monkeypatch.setattr(cpu_malloc, "is_glibc", lambda: False)
    assert cpu_malloc.keep_freed_memory() is False


@pytest.mark.parametrize(
    ("setting", "device", "applied"),
    [("keep", "cpu", True), ("system", "cpu", False), ("keep", "cuda", False), ("system", "cuda", False)],
)
def test_cpu_malloc_setting(monkeypatch, setting, device, applied):
    calls = []
    monkeypatch.setattr(cpu_malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    assert set_cpu_malloc(setting, torch.device(device)) is applied
    assert len(calls) == int(applied)


def test_a_run_applies_cpu_malloc_and_says_so_in_its_plan(tmp_path, monkeypatch, capsys):
    from mpoe_exp import compose_config
    from mpoe_exp.runner import run

    calls = []
    monkeypatch.setattr(cpu_malloc, "keep_freed_memory", lambda: calls.append(1) or True)  # this process stays as is
    overrides = ["model=tiny-t5", "method=switch", "task=cola", "data_dir=${mpoe_demo_data:glue}", "train.max_steps=1"]
    run(compose_config([*overrides, f"runs_dir={tmp_path}", "cpu_malloc=keep"]))
    assert calls == [1]
    assert "malloc keeps freed memory (cpu_malloc=keep)" in capsys.readouterr().out
