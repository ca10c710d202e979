"""Multi-host setup: start `jax.distributed`, one 'data' mesh over every device of every process.

One process per host (TPU VM worker, SLURM node, or a local CPU process in tests), or per GPU
under a bare `srun` (JAX's SLURM model); each feeds its share of the global batch
(`training.Trainer.global_batch`). Launchers: `launch/`.
"""
from __future__ import annotations

import atexit
import glob
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "MS3_COORDINATOR", "MS3_NUM_PROCESSES", "MS3_PROCESS_ID"
# Seconds the processes of a job wait for each other at start-up (`rendezvous`); also
# jax.distributed's initialization_timeout.
ENV_PEER_TIMEOUT, DEFAULT_PEER_TIMEOUT = "MS3_PEER_TIMEOUT", 300.0


class PeerError(RuntimeError):
    """A process of a multi-process job did not show up at start-up, or process 0 did not answer
    (`rendezvous`): the job stops, naming which."""


def _peer_timeout() -> float:
    value = os.environ.get(ENV_PEER_TIMEOUT, "")
    try:
        timeout = float(value) if value else DEFAULT_PEER_TIMEOUT
    except ValueError:
        raise ValueError(f"{ENV_PEER_TIMEOUT}={value!r} is not a number of seconds") from None
    if timeout <= 0:
        raise ValueError(f"{ENV_PEER_TIMEOUT}={value!r} must be > 0 seconds")
    return timeout


def rendezvous(coordinator_address: str, num_processes: int, process_id: int,
               timeout: float) -> dict[int, socket.socket]:
    """All processes meet at the coordinator's port + 1 before `jax.distributed` starts.

    Process 0 listens and waits up to `timeout` s for every other process id; then it tells them
    to go on, or to stop, and raises `PeerError` naming the ids that never came. The others
    connect (retrying) and wait for that answer up to `timeout` s, else raise `PeerError`. Without
    it a missing process makes jax.distributed abort the others (SIGABRT, exit 134) after its
    initialization_timeout, naming none. Returns the open connections ({peer id: socket}: all
    others on process 0, process 0 elsewhere) for `watch_peers`.
    """
    host, port = coordinator_address.rsplit(":", 1)
    address = (host, int(port) + 1)
    deadline = time.monotonic() + timeout
    where = f"the rendezvous at {host}:{address[1]} ({ENV_PEER_TIMEOUT}={timeout:g} s)"
    if process_id == 0:
        peers: dict[int, socket.socket] = {}
        try:
            server = socket.create_server(("", address[1]))
        except OSError as e:
            raise PeerError(f"process 0 cannot listen for {where}: {e} (the port after the "
                            "coordinator's must be free)") from e
        with server:
            server.settimeout(0.2)
            try:
                while len(peers) < num_processes - 1 and time.monotonic() < deadline:
                    try:
                        conn, _ = server.accept()
                    except socket.timeout:
                        continue
                    conn.settimeout(5.0)
                    try:
                        peers[int(conn.recv(32).decode().strip())] = conn
                    except (OSError, ValueError):
                        conn.close()
                missing = sorted(set(range(1, num_processes)) - set(peers))
                answer = f"stop: process(es) {missing} missing" if missing else "go"
                for conn in peers.values():
                    try:
                        conn.sendall(answer.encode())
                    except OSError:
                        pass
            except BaseException:
                for conn in peers.values():
                    conn.close()
                raise
        if missing:
            for conn in peers.values():
                conn.close()
            raise PeerError(f"process(es) {missing} of {num_processes} did not reach {where}: "
                            "the job stops (did they start? with the same coordinator address?)")
        return peers
    while True:
        try:
            conn = socket.create_connection(address, timeout=2.0)
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise PeerError(f"process {process_id}: process 0 did not answer at {where}: the "
                                "job stops (did it start? is the address right?)") from None
            time.sleep(0.2)
    conn.sendall(f"{process_id}".encode())
    conn.settimeout(max(deadline - time.monotonic(), 1.0))
    try:
        answer = conn.recv(256).decode().strip()
    except OSError:
        answer = ""
    if answer != "go":
        conn.close()
        raise PeerError(f"process {process_id}: process 0 stopped the job at {where}"
                        + (f" ({answer})" if answer else ": no answer"))
    return {0: conn}


_BYE = b"bye"
PEER_LOST_EXIT_CODE = 1


def watch_peers(connections: dict[int, socket.socket], process_id: int) -> None:
    """Keep the rendezvous connections open for the life of the process: one that closes without
    a goodbye (its process was killed or crashed) ends this process at once with exit code 1,
    naming it -- before XLA's heartbeat would abort it (134). Process 0 watches every other
    process, the others watch process 0, so a death anywhere reaches all. At a normal exit (any
    code: done, preempted, error) `atexit` says goodbye first."""

    exiting = threading.Event()

    def watch(peer: int, conn: socket.socket) -> None:
        conn.settimeout(None)
        try:
            data = conn.recv(16)
        except OSError:
            data = b""
        if data.startswith(_BYE) or exiting.is_set():  # the peer, or this process, is exiting
            return
        message = (f"error: process {peer} of the job is gone (killed or crashed: its connection "
                   f"to process {process_id} closed without a goodbye); process {process_id} "
                   f"stops too, exit code {PEER_LOST_EXIT_CODE}")
        logging.error("%s", message)
        print(message, file=sys.stderr, flush=True)
        os._exit(PEER_LOST_EXIT_CODE)

    def goodbye() -> None:
        exiting.set()  # before anything can wake a watcher of this process
        for conn in connections.values():
            try:
                conn.sendall(_BYE)  # the socket closes with the process
            except OSError:
                pass

    atexit.register(goodbye)
    for peer, conn in connections.items():
        threading.Thread(target=watch, args=(peer, conn), daemon=True,
                         name=f"ms3-watch-process-{peer}").start()


def _auto_detectable() -> bool:
    """A multi-task SLURM step, or a Cloud TPU VM (JAX reads the pod layout from its metadata)."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES")
                or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _env_local_device_ids() -> list[int] | None:
    value = os.environ.get("JAX_LOCAL_DEVICE_IDS", "")
    return [int(i) for i in value.split(",")] if value else None


def detected_cluster(timeout: float) -> tuple[str, int, int, list[int] | None]:
    """(coordinator address, number of processes, process id, local device ids) from JAX's own
    cluster detection -- what a bare `jax.distributed.initialize()` would use. SLURM: one process
    per GPU (device `SLURM_LOCALID`), coordinator on the step's first node; Cloud TPU: one process
    per VM worker, from the TPU metadata. `JAX_COORDINATOR_ADDRESS`, `JAX_COORDINATOR_PORT` and
    `JAX_LOCAL_DEVICE_IDS` override, as in JAX."""
    # jax.distributed.initialize's detection; no public API returns its values.
    from jax._src import clusters
    coordinator, count, process_id, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        os.environ.get("JAX_COORDINATOR_ADDRESS") or None, None, None, _env_local_device_ids(),
        None, int(timeout))
    if None in (coordinator, count, process_id):
        raise PeerError(
            f"this looks like a cluster (SLURM_NTASKS={os.environ.get('SLURM_NTASKS')!r}, or a "
            f"Cloud TPU VM) but JAX's cluster detection gave coordinator {coordinator!r}, "
            f"{count!r} processes, process id {process_id!r}: launch with srun / the TPU "
            f"launcher, or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}")
    return coordinator, int(count), int(process_id), None if local is None else list(local)


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kwargs: Any) -> bool:
    """Call `jax.distributed.initialize` when this is one of several processes; True if it did.

    Explicit when the three values are given (arguments, else env `MS3_COORDINATOR`,
    `MS3_NUM_PROCESSES`, `MS3_PROCESS_ID`): one process per host, driving all its devices (even
    inside a SLURM step, whose detection would give each process one GPU). Else from JAX's cluster
    detection (`detected_cluster`) when this is a multi-task SLURM step or a Cloud TPU VM. A single
    process does nothing. Idempotent. Either way the processes first meet (`rendezvous`;
    `MS3_PEER_TIMEOUT` s, default 300): a missing one is a `PeerError` naming it; then they stay
    connected (`watch_peers`): one that dies ends the others with exit code 1, naming it.
    Must run before anything touches the JAX backend. `kwargs` go to `jax.distributed.initialize`
    (e.g. `heartbeat_timeout_seconds`).
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
    if not all(given) and not _auto_detectable():
        return False
    timeout = _peer_timeout()
    local_device_ids = _env_local_device_ids()
    source = "explicit"
    if not all(given):
        coordinator_address, num_processes, process_id, local_device_ids = detected_cluster(timeout)
        source = "JAX's cluster detection"
    if num_processes == 1:
        return False
    connections = rendezvous(coordinator_address, num_processes, process_id, timeout)
    kwargs.setdefault("initialization_timeout", int(timeout))
    # Detection is done (or the values are explicit): JAX must not redo it, which inside a SLURM
    # step would narrow an explicit process to the GPU `SLURM_LOCALID`.
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids,
                               cluster_detection_method="deactivate", **kwargs)
    watch_peers(connections, process_id)
    logging.info("jax.distributed: process %d of %d, coordinator %s (%s), %d local devices",
                 jax.process_index(), jax.process_count(), coordinator_address, source,
                 jax.local_device_count())
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
