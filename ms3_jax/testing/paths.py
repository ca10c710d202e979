"""Where the checkout is, and the environment of the subprocesses tests launch."""
from __future__ import annotations

import os

from ms3_jax.files import safe  # imports no JAX either

# The checkout (this file is ms3_jax/testing/paths.py): configs/, launch/, README.md.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# XLA's CPU backend without LLVM's optimisation passes, for test programs that compile far longer
# than they run (most: tiny models, a few steps). Runs of many steps keep XLA's default (level 3):
# `fast_compile=False`. tests/test_aot.py compiles for the accelerators at the default level.
CPU_TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int, fast_compile: bool = True) -> str:
    """XLA_FLAGS of a test process: `devices` simulated CPU devices, `CPU_TEST_XLA_FLAGS` if
    `fast_compile`."""
    return f"--xla_force_host_platform_device_count={devices}" + (
        f" {CPU_TEST_XLA_FLAGS}" if fast_compile else "")


def compilation_cache_dir() -> str:
    """The persistent JAX compilation cache the test session and its subprocesses share
    (`$MS3_TEST_XLA_CACHE`, else `~/.cache/ms3_jax/test_xla_cache`: per user, as compiled
    programs another user planted in a shared /tmp would run here)."""
    return os.environ.get("MS3_TEST_XLA_CACHE") or safe.user_cache_dir("test_xla_cache")


def subprocess_env(devices: int = 1, fast_compile: bool = True, **extra: str) -> dict:
    """`os.environ` for a child Python on `devices` simulated CPU devices (`xla_flags`), importing this
    checkout, offline, sharing the tests' compilation cache; `extra` added last."""
    return {**os.environ, "XLA_FLAGS": xla_flags(devices, fast_compile),
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1",
            "JAX_COMPILATION_CACHE_DIR": compilation_cache_dir(),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5", **extra}
