"""One writer per workdir: an advisory lock that `ms3_jax.main` holds for the whole run.

Two runs on one workdir would interleave their checkpoints (one deleting the other's in-flight
save as half-written). The lock is `fcntl.flock` on `W/.lock`, which names its holder (pid, host,
start time): the second run stops at once with that name. The kernel drops the lock when its
process dies, however it dies, so a stale `.lock` file of a dead run is simply taken over. Only
process 0 of a multi-process job locks (they share the workdir); a workdir on an object store
(`gs://...`) cannot be locked and is not.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator

import jax

LOCK_FILE = ".lock"


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Hold the workdir's lock for the duration (process 0, local paths); raises WorkdirInUse."""
    if jax.process_index() != 0 or "://" in workdir:
        yield
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "an unknown process"
            raise WorkdirInUse(f"workdir {workdir} is in use by {holder} ({path}); two runs on one "
                               "workdir would corrupt its checkpoints. Wait for it, stop it, or "
                               "use another --workdir.") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": datetime.datetime.now().isoformat(timespec="seconds")}))
        f.flush()
        yield
    finally:
        f.close()  # releases the lock
