"""Multi-host setup: start `jax.distributed`, one 'data' mesh over every device of every process.

One process per host (TPU VM worker, SLURM node, or a local CPU process in tests); each feeds
its share of the global batch (`training.Trainer.global_batch`). Launchers: `launch/`.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "MS3_COORDINATOR", "MS3_NUM_PROCESSES", "MS3_PROCESS_ID"


def _auto_detectable() -> bool:
    """A multi-task SLURM step, or a Cloud TPU VM (JAX reads the pod layout from its metadata)."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES")
                or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kwargs: Any) -> bool:
    """Call `jax.distributed.initialize` when this is one of several processes; True if it did.

    Explicit when the three values are given (arguments, else env `MS3_COORDINATOR`,
    `MS3_NUM_PROCESSES`, `MS3_PROCESS_ID`); with no arguments when JAX can detect the cluster
    (SLURM with `SLURM_NTASKS` > 1, Cloud TPU). A single process does nothing. Idempotent.
    Must run before anything touches the JAX backend. `kwargs` go to `jax.distributed.initialize`
    (e.g. `heartbeat_timeout_seconds`: how soon the others fail when one process dies).
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    if num_processes is None and env.get(ENV_NUM_PROCESSES):
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and env.get(ENV_PROCESS_ID):
        process_id = int(env[ENV_PROCESS_ID])
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError(f"multi-process needs all of coordinator_address ({ENV_COORDINATOR}), "
                         f"num_processes ({ENV_NUM_PROCESSES}) and process_id ({ENV_PROCESS_ID}); "
                         f"got {coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if all(given):
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    elif _auto_detectable():
        jax.distributed.initialize(**kwargs)
    else:
        return False
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    if platform_of(jax.devices()) == "cpu":
        _build_cpu_communicator()
    return True


def _build_cpu_communicator() -> None:
    """One all-reduce over every device, now, while the processes are in step.

    gloo (the CPU collectives) builds its communicator at the first collective over a device set
    and fails if the processes reach it more than 30 s apart (e.g. different compile times);
    later collectives wait `--xla_cpu_collective_timeout_seconds` (set by the launchers).
    """
    mesh = data_mesh()
    ones = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), np.ones((jax.local_device_count(),), np.int32))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones)
    if int(total) != jax.device_count():
        raise RuntimeError(f"all-reduce over {jax.device_count()} devices returned {int(total)}")


def platform_of(devices: Sequence[Any]) -> str:
    """The platform ('cpu', 'gpu', 'tpu') of `devices` -- those a step is compiled for, which may
    be an ahead-of-time topology's, not the host's default backend."""
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
        raise ValueError(f"devices must share one platform, got {sorted(platforms)}")
    return platforms.pop()


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
