"""One writer per workdir: an advisory lock that `ms3_jax.main` holds for the whole run.

`fcntl.flock` on `W/.lock`, which names its holder; process 0 only; `gs://` workdirs are not
locked. docs/choices.md, "One run per workdir: flock". Another user's workdir (or one that would
be created inside theirs) and a symbolic link planted at `W/.lock` are refused (`safe.UnsafePath`,
a usage error).
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

from ms3_jax.files import safe

LOCK_FILE = ".lock"


class WorkdirInUse(RuntimeError):
    """Another live run holds the workdir."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Hold the workdir's lock for the duration (process 0, local paths); raises WorkdirInUse,
    or `safe.UnsafePath` for another user's workdir or a link at W/.lock."""
    if jax.process_index() != 0 or "://" in workdir:
        yield
        return
    safe.make_own_dir(workdir, "workdir")
    path = os.path.join(workdir, LOCK_FILE)
    f = safe.open_nofollow(path, "a+")
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
