"""The exit codes of `python -m ms3_jax.main` and the other CLIs, the same on every process of a
job, from start to exit (launchers and schedulers act on them: `launch/`), and what counts as a
usage error (exit 2, one line)."""
from __future__ import annotations

import argparse
import contextlib
import errno
import sys
from collections.abc import Iterator

DONE = 0
ERROR = 1  # a bug, a non-finite loss, a process of the job missing, dead or failed
USAGE = 2  # what the user can fix: a config value, a path, the data, a workdir in use
PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: SIGTERM / SIGINT; relaunch the same command to resume


# What the user can fix (a path, a file, a value): `error: <message>`, exit code 2, no traceback.
# Anything else (TypeError, KeyError, ...) is a bug: its traceback, exit code 1.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)
# OSErrors of the disk rather than of the code: full, over quota, read-only, no permission.
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_usage_error(error: BaseException) -> bool:
    """True for what the user can fix (`USER_ERRORS`, an OSError of `USER_ERRNOS`)."""
    return isinstance(error, USER_ERRORS) or (isinstance(error, OSError)
                                              and error.errno in USER_ERRNOS)


@contextlib.contextmanager
def usage_errors(verbose: bool = False) -> Iterator[None]:
    """The CLIs' error report (zero_shot, predict, export): a usage error (`is_usage_error`)
    becomes `error: <message>` on ONE line of stderr and exit code 2 (`USAGE`);
    `verbose` re-raises it (the traceback). Other exceptions propagate (exit code 1)."""
    try:
        yield
    except Exception as e:
        if verbose or not is_usage_error(e):
            raise
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"error: {message or type(e).__name__}", file=sys.stderr, flush=True)
        sys.exit(USAGE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the CLIs: a usage mistake (a missing or unknown argument) is one line,
    `error: <message> (--help lists the arguments)`, and exit code 2; `--help` exits 0."""

    def error(self, message: str) -> None:  # argparse's: the usage block, then the message
        print(f"error: {self.prog}: {message} (--help lists the arguments)", file=sys.stderr,
              flush=True)
        sys.exit(USAGE)
