"""MS3_HOST_MALLOC=reuse (host_memory.keep_freed_pages): a large freed block is reused without the
kernel faulting its pages in again (what a JAX CPU step's scratch needs), and JAX's CPU dispatch
is synchronous (so that scratch comes from the calling thread's main heap); unset, glibc's and
JAX's defaults stay. Each case runs in a fresh interpreter (the settings are process-wide); an
unknown mode fails before changing anything, so that check runs in-process."""
import os
import platform
import subprocess
import sys

import pytest

from ms3_jax.engine import host_memory
from ms3_jax.testing.paths import ROOT

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc mallopt only")


# Allocate, touch and free 64 MiB twice; print the minor page faults of the second round and
# JAX's CPU dispatch mode.
PROBE = r"""
import ctypes, ctypes.util, resource
from ms3_jax.engine import host_memory
print(host_memory.configure_from_env())
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
def touch():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
import jax
print(jax.config.read("jax_cpu_enable_async_dispatch"))
"""


def _probe(mode: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MS3_HOST_MALLOC", None)
    if mode is not None:
        env["MS3_HOST_MALLOC"] = mode
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow  # fresh interpreters
def test_reuse_keeps_freed_pages_and_the_default_is_glibcs():
    out = _probe("reuse").stdout.splitlines()
    msg, faults = out[0], int(out[1])
    assert msg.startswith("host malloc: large blocks from the main heap, freed pages kept"), msg
    assert out[2] == "False"  # synchronous CPU dispatch
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults < pages // 20, (faults, pages)
    out = _probe(None).stdout.splitlines()
    msg, faults_default = out[0], int(out[1])
    assert msg.startswith("host malloc: glibc defaults"), msg
    assert out[2] == "True"
    # glibc's defaults: the block is mmapped and unmapped each time, so every page faults again
    # (fewer with transparent huge pages, still far more than with the setting).
    assert faults_default > 4 * max(faults, 1), (faults_default, faults)


def test_unknown_mode_is_an_error_naming_the_variable(monkeypatch):
    """Checked before anything is changed, so in this process."""
    monkeypatch.setenv("MS3_HOST_MALLOC", "fast")
    with pytest.raises(ValueError, match="MS3_HOST_MALLOC must be 'reuse' or 'default', got 'fast'"):
        host_memory.configure_from_env()
