"""The device mesh: one 'data' axis over every device of every process; each process feeds its
share of the global batch (`training.Trainer.global_batch`)."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental.layout import Layout, with_layout_constraint
from jax.sharding import Mesh


def platform_of(devices: Sequence[Any]) -> str:
    """The platform ('cpu', 'gpu', 'tpu') of `devices` -- those a step is compiled for, which may
    be an ahead-of-time topology's, not the host's default backend."""
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
        raise ValueError(f"devices must share one platform, got {sorted(platforms)}")
    return platforms.pop()


def row_major(x: jax.Array) -> jax.Array:
    """`x` constrained to the default (row-major) layout inside a jitted program, where XLA might
    otherwise keep a producer's layout (e.g. cuDNN's filter layout for a weight gradient)."""
    return with_layout_constraint(x, Layout(tuple(range(x.ndim)))) if x.ndim > 1 else x


def data_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def check_global_batch(batch_size: int, num_devices: int, num_processes: int = 1) -> None:
    """The global batch must split evenly over the devices and over the processes feeding it."""
    if batch_size % num_devices:
        raise ValueError(f"batch_size {batch_size} does not divide over {num_devices} devices")
    if batch_size % num_processes:
        raise ValueError(f"batch_size {batch_size} does not divide over {num_processes} processes")
