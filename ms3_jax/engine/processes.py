"""Multi-process jobs: start `jax.distributed` (MS3_* variables, SLURM, TPU pods), wait for
every process (`rendezvous`), watch the peers, and exit together (`exiting_with`).

One process per host (TPU VM worker, SLURM node, or a local CPU process in tests), or per GPU
under a bare `srun` (JAX's SLURM model); launchers: `launch/`.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ms3_jax.engine import exit_codes
from ms3_jax.engine.sharding import data_mesh, platform_of

ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "MS3_COORDINATOR", "MS3_NUM_PROCESSES", "MS3_PROCESS_ID"
# Seconds the processes of a job wait for each other at start-up (`rendezvous`); also
# jax.distributed's initialization_timeout.
ENV_PEER_TIMEOUT, DEFAULT_PEER_TIMEOUT = "MS3_PEER_TIMEOUT", 300.0


class PeerError(RuntimeError):
    """A process of a multi-process job did not show up at start-up, or process 0 did not answer
    (`rendezvous`): the job stops, naming which."""


def _positive_seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        seconds = float(value) if value else default
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{name}={value!r} must be > 0 seconds")
    return seconds


def rendezvous(coordinator_address: str, num_processes: int, process_id: int,
               timeout: float) -> dict[int, socket.socket]:
    """All processes meet at the coordinator's port + 1 before `jax.distributed` starts.

    Process 0 waits up to `timeout` s for every other process id, then tells them to go on or to
    stop, and raises `PeerError` naming the ids that never came; the others connect (retrying) and
    wait up to `timeout` s for that answer, else raise `PeerError`. Returns the open connections
    ({peer id: socket}: all others on process 0, process 0 elsewhere) for `watch_peers`.
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
                    with contextlib.suppress(OSError):
                        conn.sendall(answer.encode())
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


# Seconds the others give a process that stopped with an error or a preemption to be followed by
# their own exit (a preemption stops every process at the same step, within seconds) before
# they stop too.
ENV_PEER_EXIT_GRACE, DEFAULT_PEER_EXIT_GRACE = "MS3_PEER_EXIT_GRACE", 60.0
_GONE = -1  # the code a goodbye relays for a process that died without one
_exit_code: int | None = None


def exiting_with(code: Any) -> None:
    """Record the exit code this process is leaving with (`sys.exit`'s argument: None is 0, a
    message 1), for the goodbye `watch_peers` sends. Without it an uncaught exception reads as
    1 and anything else as 0."""
    global _exit_code
    _exit_code = 0 if code is None else code if isinstance(code, int) else 1


def _own_exit_code() -> int:
    if _exit_code is not None:
        return _exit_code
    return 1 if getattr(sys, "last_value", None) is not None else 0


def watch_peers(connections: dict[int, socket.socket], process_id: int) -> None:
    """Keep the rendezvous connections open for the life of the process, so that no process
    outlives the job. Process 0 watches the others and relays; the others watch process 0. At exit
    `atexit` says goodbye with the exit code (`exiting_with`): 0 nothing; a closed connection
    without goodbye: stop at once with 1; another code: stop after `MS3_PEER_EXIT_GRACE` s with
    75 for a preemption, else 1, naming the process. docs/choices.md, "Reliability: what an
    adversarial user tried"."""
    grace = _positive_seconds(ENV_PEER_EXIT_GRACE, DEFAULT_PEER_EXIT_GRACE)
    exiting = threading.Event()
    stop_lock = threading.Lock()

    def say_goodbye(code: int, origin: int, skip: int | None = None) -> None:
        for peer, conn in connections.items():
            if peer != skip:
                with contextlib.suppress(OSError):
                    conn.sendall(f"bye {code} {origin}\n".encode())  # closes with the process

    def stop(code: int, origin: int, sender: int) -> None:
        with stop_lock:  # held until os._exit: `goodbye` of the main thread waits behind it
            if exiting.is_set():
                return
            exiting.set()
            exit_code = exit_codes.PREEMPTED if code == exit_codes.PREEMPTED else exit_codes.ERROR
            what = ("is gone (killed or crashed: its connection closed without a goodbye)"
                    if code == _GONE else "was preempted (exit code 75)"
                    if code == exit_codes.PREEMPTED else f"stopped with exit code {code}")
            message = (f"error: process {origin} of the job {what}; process {process_id} stops "
                       f"too, exit code {exit_code}")
            logging.error("%s", message)
            print(message, file=sys.stderr, flush=True)
            say_goodbye(code, origin, skip=sender)
            if code != _GONE:
                # join the exited one's shutdown barrier: docs/choices.md, "Reliability: what an
                # adversarial user tried"
                shutdown = threading.Thread(target=jax.distributed.shutdown, daemon=True)
                shutdown.start()
                shutdown.join(grace)
            os._exit(exit_code)

    def watch(peer: int, conn: socket.socket) -> None:
        conn.settimeout(None)
        data = b""
        with contextlib.suppress(OSError):
            while not data.endswith(b"\n"):
                chunk = conn.recv(64)
                if not chunk:
                    break
                data += chunk
        if exiting.is_set():  # this process is exiting: whatever the peer does is its echo
            return
        try:
            _, code, origin = data.decode().split()
            code, origin = int(code), int(origin)
        except ValueError:  # closed without a (whole) goodbye
            code, origin = _GONE, peer
        if code == 0:
            return
        if code != _GONE and origin == peer and exiting.wait(grace):
            return  # this process ended by itself within the grace
        stop(code, origin, peer)

    def goodbye() -> None:
        with stop_lock:  # a watcher stopping this process ends it with the job's exit code
            exiting.set()  # before anything can wake a watcher of this process
            say_goodbye(_own_exit_code(), process_id)

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
    detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    coordinator, count, process_id, local = detect(
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
    `MS3_NUM_PROCESSES`, `MS3_PROCESS_ID`), else `detected_cluster` (SLURM / Cloud TPU VM); a
    single process does nothing. Idempotent. Then `rendezvous` (`MS3_PEER_TIMEOUT`) and
    `watch_peers`. Call before anything touches the JAX backend; `kwargs` go to
    `jax.distributed.initialize`. docs/usage.md, "Multi-host: TPU pods, GPU clusters".
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
    timeout = _positive_seconds(ENV_PEER_TIMEOUT, DEFAULT_PEER_TIMEOUT)
    local_device_ids = None  # explicit: all local devices, or JAX_LOCAL_DEVICE_IDS (read by JAX)
    source = "explicit"
    if not all(given):
        coordinator_address, num_processes, process_id, local_device_ids = detected_cluster(timeout)
        source = "JAX's cluster detection"
    if num_processes == 1:
        return False
    connections = rendezvous(coordinator_address, num_processes, process_id, timeout)
    kwargs.setdefault("initialization_timeout", int(timeout))
    sigterm = signal.getsignal(signal.SIGTERM)
    # Detection is done (or the values are explicit): JAX must not redo it, which inside a SLURM
    # step would narrow an explicit process to the GPU `SLURM_LOCALID`.
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               local_device_ids=local_device_ids,
                               cluster_detection_method="deactivate", **kwargs)
    if sigterm is not None and threading.current_thread() is threading.main_thread():
        # undo JAX's preemption handler: docs/choices.md, "Reliability: what an adversarial user
        # tried"
        signal.signal(signal.SIGTERM, sigterm)
    watch_peers(connections, process_id)
    logging.info("jax.distributed: process %d of %d, coordinator %s (%s), %d local devices",
                 jax.process_index(), jax.process_count(), coordinator_address, source,
                 jax.local_device_count())
    if platform_of(jax.devices()) == "cpu":
        _build_cpu_communicator()
    return True


def _build_cpu_communicator() -> None:
    """One all-reduce over every device, now, while the processes are in step (docs/choices.md,
    "Multi-process CPU runs: one all-reduce at start-up")."""
    mesh = data_mesh()
    ones = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), np.ones((jax.local_device_count(),), np.int32))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones)
    if int(total) != jax.device_count():
        raise RuntimeError(f"all-reduce over {jax.device_count()} devices returned {int(total)}")
