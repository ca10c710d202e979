"""The JAX platforms of a run, chosen before JAX looks for its plugins (docs/choices.md, "No
plugin noise on CPU machines").

The `test` extra installs libtpu and the CUDA plugin so that the tests compile for a TPU and a
GPU without the hardware. Loaded on a machine without them, they print driver probes, a CUDA
traceback and TPU host warnings before every command's own output. `choose_platforms` (run by
`ms3_jax/__init__.py`, so before any module of the package imports JAX) does, when
JAX_PLATFORMS is unset, no accelerator device node exists (/dev/nvidia*, /dev/dxg,
/dev/accel*, /dev/vfio/*, /dev/kfd) and JAX is not imported yet: JAX_PLATFORMS=cpu, and the
CUDA plugin's modules are not loaded (its PJRT plugin becomes a module whose `initialize`
registers nothing). `ms3_jax.main` logs the choice.
A machine with an accelerator, or an explicit JAX_PLATFORMS, keeps JAX's own discovery.
"""
from __future__ import annotations

import glob
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import MutableMapping

# NVIDIA (and WSL2's GPU bridge, /dev/dxg), TPU (v2-v4: accel, v5+: vfio), AMD ROCm.
ACCELERATOR_NODES = ("/dev/nvidia[0-9]*", "/dev/dxg", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*",
                     "/dev/kfd")
CHOSEN: str | None = None  # 'cpu' once `choose_platforms` chose it (ms3_jax.main logs it)
CUDA_LIBRARIES = ("jax_cuda12_plugin", "jax_cuda13_plugin")  # jaxlib imports their kernels
CUDA_PJRT = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")  # JAX's plugin discovery


class _NoCudaPlugin(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import hook: the CUDA plugin's libraries are absent; its PJRT plugin registers nothing."""

    def find_spec(self, name: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name in CUDA_PJRT:
            return importlib.machinery.ModuleSpec(name, self)
        if name in CUDA_LIBRARIES or name.startswith(tuple(m + "." for m in CUDA_LIBRARIES)):
            raise ModuleNotFoundError(f"{name} is not loaded: this machine has no GPU "
                                      "(ms3_jax.platforms; set JAX_PLATFORMS to choose)", name=name)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: object) -> None:
        module.initialize = lambda: None


def accelerator_present(patterns: tuple[str, ...] = ACCELERATOR_NODES) -> bool:
    """A GPU (NVIDIA, AMD) or TPU device node exists on this machine."""
    return any(glob.glob(p) for p in patterns)


def choose_platforms(environ: MutableMapping[str, str] = os.environ,
                     patterns: tuple[str, ...] = ACCELERATOR_NODES) -> str | None:
    """Set JAX_PLATFORMS=cpu and skip the CUDA plugin on a machine without accelerators (module
    docstring); returns 'cpu' when it did, None when JAX decides as usual."""
    if environ.get("JAX_PLATFORMS") or "jax" in sys.modules or accelerator_present(patterns):
        return None
    environ["JAX_PLATFORMS"] = "cpu"
    if not any(isinstance(f, _NoCudaPlugin) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoCudaPlugin())
    global CHOSEN
    CHOSEN = "cpu"
    return "cpu"
