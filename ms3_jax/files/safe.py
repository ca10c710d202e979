"""Safe local writes, shared by every layer (docs/choices.md, "Reliability round 3").

- `open_nofollow`: open for writing without following a symlink at the final component
  (O_NOFOLLOW); a planted link is refused with one line naming it.
- `refuse_foreign_dir`: a directory that exists and belongs to another user is not reused;
  `make_own_dir` creates one only where that holds.
- `atomic_output`: write to a temporary file beside the target, fsync, rename; a failure (disk
  full, a bug) leaves the target as it was and no temporary behind.
- `user_cache_dir`: the per-user default for data and tiny models ($XDG_CACHE_HOME/ms3_jax or
  ~/.cache/ms3_jax), never world-writable /tmp.
- `check_free_space`: refuse before a write of known size when the disk cannot hold it.
- `check_output_dir`: a directory the user can write in (a real write probe), checked before
  long work.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from typing import IO


class UnsafePath(ValueError):
    """A path this user must not write through: a planted link, another user's directory."""


class NotEnoughSpace(OSError):
    """The disk cannot hold a write of known size; names the directory, needed and free bytes."""


def user_cache_dir(*parts: str) -> str:
    """`$XDG_CACHE_HOME/ms3_jax/<parts>` (default `~/.cache/ms3_jax/<parts>`): private to the user."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "ms3_jax", *parts)


def _trusted(uid: int) -> bool:
    """The one ownership rule: this user's, or root's (system paths like /tmp itself)."""
    return uid in (os.getuid(), 0)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _not_yours(path: str) -> str | None:
    """Why the existing `path` is not this user's to use (None when it is): a symbolic link that
    another user owns, or that dangles or points at another user's directory; another user's
    directory."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        target = os.stat(path) if os.path.exists(path) else None
        if target is not None and _trusted(target.st_uid) and _trusted(st.st_uid):
            return None  # the user's own link (or a system one)
        where = ("dangles" if target is None else "is owned by another user" if not
                 _trusted(st.st_uid) else f"points at another user's files (uid {target.st_uid})")
        return f"is a symbolic link (-> {os.readlink(path)}) that {where}"
    if not _trusted(st.st_uid):
        return f"belongs to another user (uid {st.st_uid})"
    return None


def _unsafe_parent(path: str) -> str | None:
    """Why a new directory must not be created inside the existing `path` (None: it may): a link
    that is not this user's, or another user's directory that anyone may write in. Another
    user's group-shared directory (a project's scratch space) is fine: they granted the access."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return _not_yours(path)
    if not _trusted(st.st_uid) and st.st_mode & stat.S_IWOTH:
        return f"belongs to another user (uid {st.st_uid}) and anyone may write in it"
    return None


def refuse_foreign_dir(path: str | os.PathLike, what: str = "directory", *,
                       creating: bool = False) -> None:
    """Raise `UnsafePath` if `path` exists and is a symlink to, or a directory owned by, another
    user (root-owned system paths are fine). Nothing happens for a missing path, unless
    `creating`: then the nearest existing ancestor, where it would be created, must not be a
    planted link or another user's world-writable directory (`_unsafe_parent`). The one
    place that decides whose a directory is (with `_trusted`)."""
    path = os.fspath(path)
    if "://" in path:  # gs://...: not a local directory
        return
    if not os.path.lexists(path):
        if creating and (why := _unsafe_parent(parent := _nearest_existing(path))):
            raise UnsafePath(f"{what} {path} would be created inside {parent}, which {why}; "
                             "refusing (its owner could swap what is written there). Choose "
                             "another path.")
        return
    if why := _not_yours(path):
        raise UnsafePath(f"{what} {path} {why}; refusing to use it (its contents could be "
                         "anything). Remove it or choose another path.")


def make_own_dir(path: str | os.PathLike, what: str = "directory") -> str:
    """`os.makedirs(path, exist_ok=True)` for a directory this run writes into, refusing (with
    `refuse_foreign_dir`) one that is another user's or would be created inside one; checked
    again once it exists. Returns `path`."""
    path = os.fspath(path)
    refuse_foreign_dir(path, what, creating=True)
    os.makedirs(path, exist_ok=True)
    refuse_foreign_dir(path, what)
    return path


def open_nofollow(path: str, mode: str = "w", perm: int = 0o644) -> IO:
    """`open(path, mode)` for writing ('w', 'a', 'a+', 'wb', ...) that refuses a symbolic link at
    `path` (O_NOFOLLOW) with `UnsafePath` naming it, instead of writing where the link points."""
    flags = os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_RDWR if "+" in mode else os.O_WRONLY
    flags |= os.O_APPEND if "a" in mode else os.O_TRUNC if "w" in mode else 0
    try:
        fd = os.open(path, flags, perm)
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):
            raise UnsafePath(f"{path} is a symbolic link (-> {os.readlink(path)}); refusing to write "
                             "through it. Remove it if you did not plant it.") from None
        raise
    try:
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


@contextlib.contextmanager
def atomic_output(path: str, mode: str = "wb") -> Iterator[IO]:
    """A file object for `path` that appears there whole or not at all: written to a temporary
    file in the same directory (created exclusively), fsynced and renamed over `path` on
    success; removed on any failure, leaving `path` as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_copy(src: str, dst: str) -> None:
    """Copy the file `src` to `dst` through `atomic_output`."""
    with open(src, "rb") as fin, atomic_output(dst) as fout:
        shutil.copyfileobj(fin, fout)


def free_bytes(directory: str) -> int:
    """Bytes this user may still write under `directory` (its nearest existing ancestor)."""
    path = os.path.abspath(directory)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_free_space(directory: str, needed: int, what: str) -> None:
    """Raise `NotEnoughSpace` (errno ENOSPC) naming `directory`, `what`, and the bytes needed vs
    free, unless `directory` has room for `needed` bytes."""
    free = free_bytes(directory)
    if free < needed:
        raise NotEnoughSpace(errno.ENOSPC, f"not enough space in {directory} for {what}: needs "
                             f"{needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free. Free some space "
                             "or choose another directory.")


def check_output_dir(out_dir: str | os.PathLike, what: str = "output directory") -> None:
    """Raise a one-line error unless `out_dir` is (or can be created as) a directory this user
    can write in: a real write probe in it or its nearest existing parent (catches read-only
    mounts, for root too). Creates nothing."""
    path = os.path.abspath(os.fspath(out_dir))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    where = path if existing == path else f"{existing} (the nearest existing parent of {path})"
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{what}: {where} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}: cannot write in {where} (permission denied)")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ms3_write_test.", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{what}: cannot write in {where} ({e.strerror or e})") from e
