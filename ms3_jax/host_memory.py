"""Host (CPU) memory allocator settings for long jobs that reuse the same large buffers each step.

With glibc's defaults, blocks above the mmap threshold (at most 32 MiB) get fresh `mmap`
pages that are unmapped on `free`, and threads get their own arenas, whose large blocks are also
mmapped. An XLA CPU step allocates its multi-GB scratch every call, so the kernel faults in and
zeroes every page again on every step: measured 1.3-1.5 M page faults and 3-5 s of system time per
DeepLab-v3+ step at batch 8 (benchmarks/RESULTS.md). `keep_freed_pages` makes glibc keep freed
memory for reuse instead: CPU steps 15-25 % faster. The process's resident memory then stays at its
peak, which a training job reaches every step anyway.

Opt-in (MS3_HOST_MALLOC=reuse), because the single arena also serialises the allocations of XLA's
parallel compiler: compiles take 20-45 % longer, which outweighs the faster steps in short runs
(the demo, the tests). Accelerator runs gain nothing from it (the step's buffers live on the device).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

ENV = "MS3_HOST_MALLOC"  # 'reuse' -> keep_freed_pages(); unset or 'default' -> glibc's defaults


def configure_from_env() -> str:
    """Apply MS3_HOST_MALLOC ('reuse' or 'default'/unset); returns what was done, for the log.
    Call before JAX starts its thread pools (first in `main`)."""
    mode = os.environ.get(ENV, "default") or "default"
    if mode == "default":
        return f"host malloc: glibc defaults ({ENV}=reuse for faster long CPU runs)"
    if mode != "reuse":
        raise ValueError(f"{ENV} must be 'reuse' or 'default', got {mode!r}")
    return keep_freed_pages()


def keep_freed_pages() -> str:
    """One malloc arena, no mmap for large blocks, no trimming (glibc `mallopt`).

    Call before JAX starts its thread pools: a thread keeps the arena it got at its first
    allocation. Returns what was done, for the log; a no-op off glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "host malloc: unchanged (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; -1 as the trim threshold disables trimming (man mallopt).
    ok = all(mallopt(p, v) == 1 for p, v in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
                                             (M_TRIM_THRESHOLD, -1)))
    if not ok:
        return "host malloc: unchanged (mallopt refused)"
    return "host malloc: one arena, no mmap, no trimming (freed pages are reused)"
