"""`cpu_malloc=keep`: on CPU, keep freed memory in the process instead of page-faulting large tensors in every step.

glibc's malloc serves each request above its mmap threshold (at most 32 MB) with a fresh mapping from the kernel and
unmaps it when the block is freed. A training step allocates the same large tensors every time (a t5-base expert
layer's stacked weight gradients are 75 MB), so every step touches each of their pages for the first time again: one
page fault per 4 KB, in the kernel. `keep_freed_memory()` sets glibc's two documented tunables (mallopt(3):
M_MMAP_MAX = 0 serves every size from the heap, M_TRIM_THRESHOLD = -1 never gives the heap's top back), as starting
the process with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>` would, but from inside it. The first steps still
fault while the heap grows to its high-water mark, up to 8 times for a repeated large tensor: glibc's per-thread cache
keeps up to 7 small freed chunks of a size unmerged, and one that sits between two freed large blocks stops them from
merging into one the next request fits (tests/test_cpu_malloc.py shows it).

It is off by default because it trades memory for that time: the heap fragments and never shrinks, so the resident
size is the high-water mark of every step so far. BENCHMARKS.md measures both sides (t5-base mpoe, batch 32: a
step takes 32% less time, its peak memory is 46% higher, and mpoe++ no longer fits in 24 GB).

Not glibc (macOS, musl): nothing changes. PyTorch's own CPU launcher (`torch.backends.xeon.run_cpu`) attacks the same
cost by preloading jemalloc or tcmalloc; this needs no extra library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has mallopt but none of these tunables)
    except (OSError, AttributeError):
        return None
    return libc


def is_glibc() -> bool:
    return _libc() is not None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to serve every size from its heap and keep freed memory for reuse; False if not glibc."""
    if not is_glibc():
        return False
    libc = _libc()
    return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
