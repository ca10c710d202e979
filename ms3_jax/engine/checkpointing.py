"""Workdir layout and orbax checkpoints shared by pretraining, stage 1, fine-tuning and export.

Layout (W/config.json, W/checkpoints/<step> with items `state`, `data` and `config` and a
MANIFEST, W/checkpoints/unusable/<step>): docs/design.md, "Workdir and checkpoint layout".
Integrity: docs/choices.md, "Verified checkpoints, with fallback", "Unwritable checkpoint
directory: a real write first", "Reliability round 3".
"""
from __future__ import annotations

import errno
import glob
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from ms3_jax.engine import sharding
from ms3_jax.files import safe

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DELETED_DIR = "deleted"  # under CHECKPOINT_DIR: retired steps, removed by `purge_deleted`
UNUSABLE_DIR = "unusable"  # under CHECKPOINT_DIR: corrupt steps a resume set aside (kept for a look)
MANIFEST = "ms3_manifest.json"  # in every step directory: size + crc32 of each of its files
CONFIG_ITEM = "config"  # in every step: the job config the step was computed with (the resume guard)
# Free space asked before a save: the larger of the last step's size and the state's bytes, plus
# this fraction and this many bytes (orbax's metadata, the manifest, file-system rounding).
SAVE_MARGIN, SAVE_MARGIN_BYTES = 0.1, 16 << 20
_CHUNK = 4 << 20  # checksums read files in chunks of 4 MiB, never whole


class CheckpointError(ValueError):
    """A checkpoint step that cannot be used; names the step, the file and why."""

    def __init__(self, step: int, path: str, reason: str):
        super().__init__(f"checkpoint step {step}: {path}: {reason}")
        self.step, self.path, self.reason = step, path, reason


class SaveFailed(OSError):
    """A checkpoint save failed (in orbax's save thread or before it); carries the cause's errno,
    so a full disk reads as a usage error (`exit_codes.USER_ERRNOS`)."""

    def __init__(self, step: int, directory: str, cause: BaseException, last_saved: int | None):
        code = getattr(cause, "errno", None)
        super().__init__(code, f"checkpoint step {step} could not be saved in {directory} "
                               f"({type(cause).__name__}: {cause}); the run stopped at the next step, "
                               f"the newest saved step is {last_saved or 'none'}. Free space (or fix "
                               "the directory) and relaunch the same command to resume")


class NoUsableCheckpoint(ValueError):
    """Every checkpoint step tried was unusable; `failures` holds one `CheckpointError` per step."""

    def __init__(self, workdir: str, failures: Sequence[CheckpointError]):
        lines = "\n  ".join(str(f) for f in failures)
        super().__init__(f"no usable checkpoint in {workdir}; tried {len(failures)} step(s), "
                         f"newest first:\n  {lines}\nMove the damaged steps out of "
                         f"{os.path.join(workdir, CHECKPOINT_DIR)} to start over, or restore them "
                         "from a copy.")
        self.failures = list(failures)


_ARRAY_HANDLER_SET = False


def _configure_array_handler() -> None:
    """On the CPU backend, save replicated arrays from replica 0 whole (docs/choices.md,
    "Checkpoint atomicity: orbax's")."""
    global _ARRAY_HANDLER_SET
    if sharding.platform_of(jax.devices()) == "cpu" and not _ARRAY_HANDLER_SET:
        _ARRAY_HANDLER_SET = True
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


# The checkpoint directory must be writable: checked up front, not after orbax's barrier.
def process_flags(flag: bool) -> np.ndarray:
    """The flag of every process (a collective with several processes)."""
    if jax.process_count() == 1:
        return np.asarray([flag])
    return np.asarray(multihost_utils.process_allgather(np.asarray(flag, np.int32))).reshape(-1)


def check_writable(directory: str, create: bool = False, needed: int = 0, what: str = "") -> None:
    """Raise an OSError naming `directory` unless a file can be created and removed in it (`create`:
    make the directory first) and, with `needed`, it has that many bytes free (`safe.NotEnoughSpace`
    naming `what`, needed vs free). All processes call it together. Why a real write:
    docs/choices.md, "Unwritable checkpoint directory: a real write first" (orbax blocked ~300 s,
    then timed out)."""
    error: OSError | None = None
    try:
        if create:
            os.makedirs(directory, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ms3_write_test.", dir=directory)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.remove(probe)
        if needed:
            safe.check_free_space(directory, needed, what or "a checkpoint")
    except safe.NotEnoughSpace as e:
        error = e
    except OSError as e:
        error = e
    failed = process_flags(error is not None)
    if error is None and failed.any():
        raise OSError(errno.EIO, f"cannot save checkpoints in {directory}: process(es) "
                      f"{np.flatnonzero(failed).tolist()} cannot write there (see their logs)")
    if isinstance(error, safe.NotEnoughSpace):
        raise error
    if error is not None:
        where = "" if error.filename in (None, directory) or os.path.dirname(
            os.fspath(error.filename)) == directory else f" on {error.filename}"
        if os.path.exists(directory) and not os.path.isdir(directory):
            where += "; it is a file, not a directory"
        raise OSError(error.errno, (
            f"cannot save checkpoints: {directory} is not writable ({type(error).__name__}: "
            f"{error.strerror or error}{where}). Make it writable by this user (check its "
            "permissions, owner, free space and mount), or pass another --workdir")) from error


def tree_bytes(tree: Any) -> int:
    """Bytes of the arrays of a pytree (global shapes: what one checkpoint of it holds)."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree_util.tree_leaves(tree) if hasattr(x, "shape")))


def step_bytes(step_dir: str) -> int:
    """Bytes of the files of a step directory (0 when it is gone)."""
    return sum(os.path.getsize(os.path.join(step_dir, rel)) for rel in _step_files(step_dir)
               if os.path.isfile(os.path.join(step_dir, rel)))


class VerifiedManager(ocp.CheckpointManager):
    """orbax's manager with three checks: before each save is handed to orbax, the directory is
    writable and has room for it (`save_bytes`); process 0 writes the step's manifest once orbax
    has finished it; `raise_save_errors` turns a failure in orbax's save thread into `SaveFailed`."""

    state_bytes = 0  # the bytes of the state being saved, once the loop knows them

    def save_bytes(self) -> int:
        """What the next save asks free: the larger of the last step's size and `state_bytes`,
        plus the margin (SAVE_MARGIN, SAVE_MARGIN_BYTES)."""
        last = self.latest_step()
        size = step_bytes(os.path.join(os.fspath(self.directory), str(last))) if last else 0
        return int(max(size, self.state_bytes) * (1 + SAVE_MARGIN)) + SAVE_MARGIN_BYTES

    def check_room(self, step: int | None = None) -> None:
        """`check_writable` with `save_bytes` free (all processes together)."""
        what = f"checkpoint step {step}" if step is not None else "the next checkpoint"
        check_writable(os.fspath(self.directory), needed=self.save_bytes(), what=what)

    _saving: int | None = None  # the step of the last save handed to orbax
    _save_error: tuple[int, BaseException] | None = None  # (step, error) of a failed save

    def save(self, step: int, *args: Any, **kwargs: Any) -> bool:
        self.check_room(step)
        self._saving = step
        try:
            return super().save(step, *args, **kwargs)
        except SaveFailed:
            raise
        except OSError as e:  # raised in this thread: an earlier save's error, or this one's
            self._raise_failed(e)
            raise

    def raise_save_errors(self) -> None:
        """Raise `SaveFailed` naming the step if a save finished with an error (orbax's save
        thread, recorded by `_finalize`); nothing while saves are running or succeeded."""
        if self._save_error is not None:
            step, error = self._save_error
            self._saving = step
            self._raise_failed(error)

    def finish_saves(self) -> None:
        """`wait_until_finished`, a failed save raised as `SaveFailed`."""
        try:
            self.wait_until_finished()
        except SaveFailed:
            raise
        except Exception as e:
            self._raise_failed(e)
            raise

    def _raise_failed(self, error: BaseException) -> None:
        step = self._saving if self._saving is not None else -1
        saved = [s for s in self.all_steps() if s != step]
        raise SaveFailed(step, os.fspath(self.directory), error, max(saved) if saved else None) from error

    def _finalize(self, step: int, *args: Any, **kwargs: Any) -> None:
        # orbax's finalize (the save thread when async): when it returns, the step directory is
        # complete and renamed; `wait_until_finished` waits for this manifest too.
        try:
            super()._finalize(step, *args, **kwargs)
        except BaseException as e:  # the main thread raises it at its next step
            self._save_error = (step, e)
            raise
        if jax.process_index() == 0:
            step_dir = os.path.join(os.fspath(self.directory), str(step))
            if os.path.isdir(step_dir):
                try:
                    write_manifest(step_dir)
                except Exception as e:  # the step is complete; it just stays unverified
                    logging.warning("checkpoint step %d: could not write %s (%s: %s); the step "
                                    "stays unverified", step, os.path.join(step_dir, MANIFEST),
                                    type(e).__name__, e)


def checkpoint_manager(workdir: str, max_to_keep: int = 3,
                       item_names: tuple[str, ...] = ("state", "data", CONFIG_ITEM)
                       ) -> ocp.CheckpointManager:
    """The orbax manager of a workdir (keeps the newest `max_to_keep` complete checkpoints); raises
    an OSError naming W/checkpoints at once when it is not writable."""
    _configure_array_handler()
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    check_writable(directory, create=True)
    if jax.process_index() == 0:
        remove_half_written(directory)
    # create=True: the others wait at orbax's barrier; todelete: docs/choices.md, "Checkpoint
    # atomicity: orbax's"
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           todelete_subdir=DELETED_DIR)
    return VerifiedManager(directory, item_names=item_names, options=options)


def purge_deleted(directory: str) -> None:
    """Remove the steps orbax has retired into `directory/DELETED_DIR` (process 0 only; called at
    open and before every save, so a retired step waits on disk until the next save at most)."""
    if jax.process_index() != 0:
        return
    trash = os.path.join(directory, DELETED_DIR)
    for name in os.listdir(trash) if os.path.isdir(trash) else ():
        shutil.rmtree(os.path.join(trash, name), ignore_errors=True)


def remove_half_written(directory: str) -> list[str]:
    """Delete `<step>.orbax-checkpoint-tmp*` leftovers of saves killed before orbax's final rename,
    synchronously (docs/choices.md, "Checkpoint atomicity: orbax's"). Returns the removed paths."""
    leftovers = sorted(glob.glob(os.path.join(directory, "*" + ocp.utils.TMP_DIR_SUFFIX + "*")))
    for path in leftovers:
        logging.warning("removing half-written checkpoint %s (a save was interrupted)", path)
        shutil.rmtree(path, ignore_errors=True)
    purge_deleted(directory)
    return leftovers


def write_config(workdir: str, config: Any) -> None:
    """Store the job config as JSON next to the checkpoints (ml_collections or a plain mapping)."""
    os.makedirs(workdir, exist_ok=True)
    text = config.to_json(indent=2) if hasattr(config, "to_json") else json.dumps(config, indent=2)
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:  # replaced atomically: other processes may be reading it
        f.write(text)
    os.replace(path + ".tmp", path)


def read_config(workdir: str) -> dict[str, Any]:
    """W/config.json as a dict; a missing, unreadable or non-mapping file raises naming it."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not an ms3_jax workdir: {path} is missing")
    return _read_json_mapping(path, "the job config")


def _read_json_mapping(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {what} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {what} is not a JSON object (found {type(value).__name__})")
    return value


def step_config(directory: str, step: int) -> dict[str, Any] | None:
    """The config saved in checkpoint step `step` of `directory` (its `config` item, checked
    against the step's manifest first when it has one), or None for a step saved before steps
    held their config. Raises `CheckpointError` when it is damaged or unreadable."""
    step_dir = os.path.join(directory, str(step))
    item = os.path.join(step_dir, CONFIG_ITEM)
    if not os.path.isdir(item):
        return None
    verify_step(step_dir, step, items=(CONFIG_ITEM,))
    path = os.path.join(item, "metadata")  # the file orbax's JsonCheckpointHandler writes
    if not os.path.isfile(path):
        raise CheckpointError(step, path, "missing")
    try:
        return _read_json_mapping(path, "the saved config")
    except ValueError as e:
        raise CheckpointError(step, path, str(e).split(": ", 1)[1]) from None


# Manifests: size + crc32 of every file of a step, checked before a restore.

def _crc32(path: str) -> tuple[int, int]:
    """(size, crc32) of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(_CHUNK):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc


def _step_files(step_dir: str) -> list[str]:
    """The files under `step_dir` (relative, '/'-separated, sorted), the manifest excluded."""
    out = []
    for root, dirs, names in os.walk(step_dir):
        dirs.sort()
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
            if not rel.startswith(MANIFEST):
                out.append(rel)
    return sorted(out)


def _files_crc32(files: Mapping[str, Any]) -> str:
    """The manifest's own checksum: crc32 of its `files` as canonical JSON."""
    text = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(text.encode()):08x}"


def write_manifest(step_dir: str) -> dict[str, Any]:
    """Write `step_dir/MANIFEST`: {"format": 2, "checksum": "crc32", "files": {relative path:
    {"size": bytes, "crc32": "8 hex digits"}}, "files_crc32": crc32 of `files` (canonical JSON)}
    for every file under the step (atomic: a temporary file, fsync, rename). Call it only once
    the step is complete (orbax has renamed it)."""
    t0 = time.perf_counter()
    files = {}
    for rel in _step_files(step_dir):
        size, crc = _crc32(os.path.join(step_dir, rel))
        files[rel] = {"size": size, "crc32": f"{crc:08x}"}
    manifest = {"format": 2, "checksum": "crc32", "files": files, "files_crc32": _files_crc32(files)}
    path = os.path.join(step_dir, MANIFEST)
    with safe.atomic_output(path, "w") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
    logging.info("wrote %s (%d files, %.1f MB, %.3f s)", path, len(files),
                 sum(v["size"] for v in files.values()) / 1e6, time.perf_counter() - t0)
    return manifest


def has_manifest(step_dir: str) -> bool:
    """The step has a manifest other than a consistent empty one (not checked here:
    `verify_step` does, and names a damaged one)."""
    path = os.path.join(step_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return os.path.exists(path)
    empty = _files_crc32({})
    return not (isinstance(manifest, dict) and manifest.get("files") == {}
                and manifest.get("files_crc32", empty) == empty)


def verify_step(step_dir: str, step: int, items: Sequence[str] | None = None) -> bool:
    """Check the files of a step (those under `items` only, if given) against its manifest: True
    when they match, False when the step has no manifest or an empty one (its save was cut
    before the manifest, or it predates manifests: unverified). Raises `CheckpointError` naming
    the step and the manifest when it is unreadable or fails its own checksum, or the first file
    missing, unlisted, of another size or with another checksum (sizes of all files first)."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.isdir(step_dir):
        raise CheckpointError(step, step_dir, "the step directory is missing")
    if not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("format", 1) >= 2 and manifest.get("files_crc32") != _files_crc32(files):
            raise ValueError("its own checksum (files_crc32) does not match its contents")
        entries = [(rel, int(v["size"]), int(v["crc32"], 16)) for rel, v in files.items()
                   if items is None or rel.split("/", 1)[0] in items]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(step, path, f"unreadable manifest ({type(e).__name__}: {e})") from e
    if not files:
        return False
    unlisted = [rel for rel in _step_files(step_dir) if rel not in files
                and (items is None or rel.split("/", 1)[0] in items)]
    if unlisted:
        raise CheckpointError(step, os.path.join(step_dir, unlisted[0]), "not in the manifest")
    for rel, size, _ in entries:
        file = os.path.join(step_dir, rel)
        if not os.path.isfile(file):
            raise CheckpointError(step, file, "missing (listed in the manifest)")
        actual = os.path.getsize(file)
        if actual != size:
            what = "truncated" if actual < size else "grown"
            raise CheckpointError(step, file, f"{what}: {actual} bytes, the manifest says {size}")
    for rel, size, crc in entries:
        file = os.path.join(step_dir, rel)
        try:
            actual_size, actual = _crc32(file)
        except OSError as e:  # EIO from a bad sector, EACCES, ...
            raise CheckpointError(step, file, f"cannot be read ({type(e).__name__}: {e})") from e
        if actual != crc or actual_size != size:
            raise CheckpointError(step, file, f"checksum mismatch: crc32 {actual:08x}, the "
                                              f"manifest says {crc:08x} (the file changed on disk)")
    return True


def _failure_of(step_dir: str, step: int, error: Exception) -> CheckpointError:
    """A restore error as a `CheckpointError` naming a file: the first metadata / JSON file of the
    step that does not parse, else a path of the step in the message, else the step directory."""
    message = f"{type(error).__name__}: {error}"
    if len(message) > 500:
        message = message[:500] + " [...]"
    for rel in _step_files(step_dir):
        name = rel.rsplit("/", 1)[-1]
        if name in ("_METADATA", "_CHECKPOINT_METADATA", "_sharding") or name.endswith(".json"):
            file = os.path.join(step_dir, rel)
            try:
                with open(file) as f:
                    json.load(f)
            except (OSError, ValueError) as e:
                return CheckpointError(step, file, f"unreadable ({type(e).__name__}: {e}); "
                                                   f"restoring failed with {message}")
    text = str(error)
    for rel in sorted(_step_files(step_dir), key=len, reverse=True):
        if os.path.join(step_dir, rel) in text:
            return CheckpointError(step, os.path.join(step_dir, rel), f"restoring failed with {message}")
    return CheckpointError(step, step_dir, f"restoring failed with {message}")


def restore_first_usable(directory: str, steps: Sequence[int], restore: Callable[[int], Any],
                         workdir: str, items: Sequence[str] | None = None
                         ) -> tuple[int, Any, list[CheckpointError]]:
    """`(step, restore(step), failures)` for the newest of `steps` (in `directory`) whose files
    match its manifest (`verify_step`, on `items` only if given) and which `restore` reads
    without an exception. Each unusable step is logged (a WARNING naming the step, the file and
    why) and the next older one is tried; `failures` lists them, newest first. Raises
    `NoUsableCheckpoint` when none is usable. Processes agree on every step (process 0 checks
    the manifest; a restore failing on any process fails the step everywhere)."""
    failures: list[CheckpointError] = []
    newest_first = sorted(steps, reverse=True)
    # Steps with a manifest first (process 0 decides): a run with verified steps prefers them.
    listed = {s: bool(process_flags(jax.process_index() == 0 and has_manifest(
        os.path.join(directory, str(s))))[0]) for s in newest_first}
    ordered = [s for s in newest_first if listed[s]] + [s for s in newest_first if not listed[s]]
    for step in ordered:
        step_dir = os.path.join(directory, str(step))
        error: CheckpointError | None = None
        if jax.process_index() == 0:
            t0 = time.perf_counter()
            try:
                if verify_step(step_dir, step, items):
                    logging.info("checkpoint step %d verified against %s (%.3f s)", step, MANIFEST,
                                 time.perf_counter() - t0)
                else:
                    logging.warning("checkpoint step %d of %s is unverified: no %s, or an empty "
                                    "one (its save was cut before the manifest was written, or "
                                    "it predates manifests); restoring it without checking its "
                                    "files", step, workdir, MANIFEST)
            except CheckpointError as e:
                error = e
        bad = process_flags(error is not None).any()
        if bad and error is None:
            error = CheckpointError(step, step_dir, "failed its manifest check on process 0 (see its log)")
        result = None
        if not bad:
            try:
                result = restore(step)
            except Exception as e:  # any failure to read the step: try an older one
                error = _failure_of(step_dir, step, e)
            if process_flags(error is not None).any() and error is None:
                error = CheckpointError(step, step_dir, "restoring it failed on another process "
                                                        "(see its log)")
        if error is None:
            failed = {f.step for f in failures}
            for newer in (s for s in newest_first if listed[step] and s > step
                          and not listed[s] and s not in failed):
                failures.append(CheckpointError(newer, os.path.join(directory, str(newer)), (
                    f"unverified (no {MANIFEST}: its save was cut before the manifest) while "
                    f"step {step} is verified; the verified step is restored")))
                logging.warning("%s", failures[-1])
            if failures:
                failures.sort(key=lambda f: -f.step)
                logging.warning("restored step %d of %s instead of the latest step %d: newer "
                                "step(s) %s are unusable or unverified (above)", step, workdir,
                                newest_first[0], [f.step for f in failures])
            return step, result, failures
        failures.append(error)
        older = "; trying the next step" if step != ordered[-1] else "; no other step left"
        logging.warning("%s%s", error, older)
    raise NoUsableCheckpoint(workdir, failures)


def set_aside(directory: str, steps: Sequence[int]) -> list[str]:
    """Move unusable steps to `directory/UNUSABLE_DIR/<step>` (process 0; the other processes wait
    for it), so the run can save those steps again; they are kept for inspection. Returns the
    new paths (on process 0)."""
    moved = []
    target_dir = os.path.join(directory, UNUSABLE_DIR)
    if jax.process_index() == 0:
        for step in steps:
            target, n = os.path.join(target_dir, str(step)), 1
            while os.path.exists(target):
                target, n = os.path.join(target_dir, f"{step}.{n}"), n + 1
            os.makedirs(target_dir, exist_ok=True)
            os.rename(os.path.join(directory, str(step)), target)
            logging.warning("checkpoint step %d set aside in %s (unusable; delete it once looked at)",
                            step, target)
            moved.append(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ms3_jax checkpointing.set_aside")
    return moved


def restore_state(workdir: str, step: int | None = None) -> tuple[int, Mapping[str, Any]]:
    """The raw `state` pytree (nested dicts) of the latest (or given) complete checkpoint, on one
    local device (export, zero-shot, evaluation: any device layout may have written it).

    The step's `state` files are checked against its manifest first; without `step`, an unusable
    latest step is logged and the newest older usable one is restored (`restore_first_usable`)."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {workdir}: {directory} is missing")
    manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.StandardCheckpointHandler()})
    steps = manager.all_steps()
    root = manager.directory
    manager.close()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; have {sorted(steps)}")

    def restore(s: int) -> Mapping[str, Any]:
        # Onto this process's first device, whatever device layout wrote the checkpoint (orbax
        # refuses a target-less restore onto another topology).
        path = epath.Path(root) / str(s) / "state"  # an etils Path, as the handler wants
        handler = ocp.StandardCheckpointHandler()
        meta = handler.metadata(path)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            getattr(meta, "tree", meta))
        return handler.restore(path, args=ocp.args.StandardRestore(abstract))

    step, state, _ = restore_first_usable(os.fspath(root), steps if step is None else [step],
                                          restore, workdir, items=("state",))
    return step, state


def encoder_variables(state: Mapping[str, Any], ema: bool = False) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of the online encoder, or of the momentum encoder with `ema`."""
    prefix = "ema_" if ema else ""
    return {"params": state[prefix + "params"], "batch_stats": state[prefix + "batch_stats"]}
