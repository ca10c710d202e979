"""Test setup: 8 simulated CPU devices (set before JAX initialises its backend), offline hubs,
a persistent compilation cache so identical tiny programs compile once per run, shared fixtures,
and the fast tier's rule: a test not marked `slow` starts no process.

Shared helpers live in `ms3_jax.testing` (paths, configs, pretrain_inputs, toy, variables, ...):
tests import them from there, never from another test module."""
import multiprocessing.util
import os
import subprocess

from ms3_jax.testing import paths  # imports no JAX

os.environ.setdefault("XLA_FLAGS", paths.xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402

from ms3_jax.testing import synthetic_data  # noqa: E402


def pytest_configure(config):
    """Under pytest only (worker processes that import this module keep their own settings)."""
    jax.config.update("jax_compilation_cache_dir", paths.compilation_cache_dir())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# The files of the longest tests (minutes each) go first, whole, so that the two xdist workers
# start them early and end together instead of one finishing a long test alone.
LONG_FIRST = ("test_demo.py", "test_readme.py", "test_multihost.py", "test_reliability.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)  # stable: order kept within


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """synth_a/b/c at the default test size (24 train / 4 val images of 48 px), built once per
    session (per xdist worker). Read-only: a test that alters records builds its own."""
    return synthetic_data.build(tmp_path_factory.getbasetemp()).data_dir


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """configs/demo.py:quick, run once per session and shared by the xdist workers (file lock):
    (workdir, the summary read back from its demo_summary.json). Read-only."""
    import fcntl
    import json
    import shutil

    from configs import demo as demo_config
    from ms3_jax.demo import job as demo
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's directory, above the workers' own
    workdir = root / "quick_demo"
    with open(root / "quick_demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (workdir / "demo_summary.json").exists():  # first, or after a failed run
            shutil.rmtree(workdir, ignore_errors=True)
            demo.run(demo_config.get_config("quick"), str(workdir))
    return str(workdir), json.loads((workdir / "demo_summary.json").read_text())


@pytest.fixture(autouse=True)
def _fast_tests_start_no_process(request, monkeypatch):
    """The fast tier (`-m "not slow"`) starts no subprocess: outside `slow` tests, creating a
    process (subprocess, multiprocessing, fork, system, posix_spawn) raises, naming the test."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts a process but is not marked "
                           "@pytest.mark.slow: mark it slow, or call the code in-process")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", refuse)
    for name in ("fork", "forkpty", "system", "posix_spawn", "posix_spawnp", "spawnv", "spawnve",
                 "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
