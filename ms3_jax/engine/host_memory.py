"""Host (CPU) memory allocator settings for long jobs that reuse the same large buffers each step.

`keep_freed_pages` (opt-in, MS3_HOST_MALLOC=reuse) makes glibc keep freed pages for reuse and
JAX's CPU client execute synchronously: docs/choices.md, "Host allocator: opt-in page reuse".
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import jax

# glibc <malloc.h> mallopt parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

ENV = "MS3_HOST_MALLOC"  # 'reuse' -> keep_freed_pages(); unset or 'default' -> glibc's defaults


def configure_from_env() -> str:
    """Apply MS3_HOST_MALLOC ('reuse' or 'default'/unset); returns what was done, for the log.
    Call before JAX creates its CPU client (first in `main`)."""
    mode = os.environ.get(ENV, "default") or "default"
    if mode == "default":
        return f"host malloc: glibc defaults ({ENV}=reuse for faster long CPU runs)"
    if mode != "reuse":
        raise ValueError(f"{ENV} must be 'reuse' or 'default', got {mode!r}")
    return keep_freed_pages()


def keep_freed_pages() -> str:
    """No mmap for large blocks and no trimming (glibc `mallopt`), synchronous CPU dispatch.

    Call before JAX creates its CPU client (first in `main`). Returns what was done, for the log.
    Off glibc only the dispatch changes.
    """
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "host malloc: unchanged (no glibc mallopt); CPU dispatch synchronous"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; -1 as the trim threshold disables trimming (man mallopt).
    if not all(mallopt(p, v) == 1 for p, v in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))):
        return "host malloc: unchanged (mallopt refused); CPU dispatch synchronous"
    return ("host malloc: large blocks from the main heap, freed pages kept for reuse; "
            "CPU dispatch synchronous")
