"""Checkpoint integrity (issue 22): every saved step gets a manifest (size + crc32 of each file);
a restore checks the newest step against it and falls back to the newest older step that
verifies and restores, naming the step and the file of every failure; a save into an unwritable
checkpoint directory fails at once with an OSError naming it; a SIGTERM during a pending save
is honoured.

The runs are `loop.run` of the toy trainer of `tests/test_reliability.py` (a fraction of a second
each), through the real `checkpointing.checkpoint_manager`.
"""
import json
import logging
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import time
import zlib

import jax
import numpy as np
import pytest

from ms3_jax.engine import checkpointing, loop
from ms3_jax.testing.toy import ToyIterator, ToyTrainer, restore_toy, toy_config, toy_run


def step_dir(workdir, step):
    return workdir / checkpointing.CHECKPOINT_DIR / str(step)


def data_files(workdir, step):
    """The array data files (tensorstore / ocdbt chunks) of the `state` item of a step."""
    root = step_dir(workdir, step) / "state"
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name == "d")
    assert files, f"no array data files under {root}"
    return files


def flip_bit(path, offset=None):
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x04
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def resume(workdir):
    """loop.restore_latest into a fresh toy state + iterator: (step, params, iterator state)."""
    mngr = checkpointing.checkpoint_manager(str(workdir))
    try:
        it = ToyIterator()
        state, start = loop.restore_latest(mngr, ToyTrainer(toy_config()).init_state(), it, str(workdir))
        return start, np.asarray(jax.device_get(state.params)), it.get_state(), mngr.all_steps()
    finally:
        mngr.close()


@pytest.fixture
def run6(tmp_path):
    """A toy run to step 6 (checkpoints 3 and 6) and the params after every step."""
    params = []
    toy_run(tmp_path, 6, params_log=params)
    return tmp_path, dict(params)


def test_manifest_lists_every_file_and_verifies(run6):
    workdir, _ = run6
    for step in (3, 6):
        d = step_dir(workdir, step)
        manifest = json.loads((d / checkpointing.MANIFEST).read_text())
        on_disk = sorted(str(p.relative_to(d)) for p in d.rglob("*")
                         if p.is_file() and p.name != checkpointing.MANIFEST)
        assert manifest["checksum"] == "crc32" and sorted(manifest["files"]) == on_disk
        assert any(f.startswith("state/") for f in on_disk) and "data/iterator.json" in on_disk
        for rel, entry in manifest["files"].items():
            data = (d / rel).read_bytes()
            assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
        assert checkpointing.verify_step(str(d), step) is True


def test_manifest_costs_a_small_fraction_of_a_save(tmp_path):
    """The manifest (written in orbax's finalize thread, which `wait_until_finished` waits for)
    vs a whole save of the toy state + iterator."""
    import orbax.checkpoint as ocp
    from ms3_jax.data import pipeline
    mngr = checkpointing.checkpoint_manager(str(tmp_path))
    state, it, saves = ToyTrainer(toy_config()).init_state(), ToyIterator(), []
    for step in range(1, 6):
        t0 = time.perf_counter()
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=pipeline.checkpoint_save_args(it)))
        mngr.wait_until_finished()
        saves.append(time.perf_counter() - t0)
    mngr.close()
    d = str(step_dir(tmp_path, 5))
    assert checkpointing.verify_step(d, 5) is True
    t0 = time.perf_counter()
    for _ in range(5):
        checkpointing.write_manifest(d)
    manifest, save = (time.perf_counter() - t0) / 5, float(np.median(saves[1:]))
    print(f"manifest {manifest * 1e3:.2f} ms of a {save * 1e3:.1f} ms save")
    assert manifest < 0.25 * save


def test_bit_flip_in_array_data_falls_back_to_the_previous_step(run6, caplog):
    """A flipped bit in an array file of step 6 (orbax would read it without a word): a WARNING
    names step 6 and the file, step 3 is restored with its exact values and iterator, step 6 is
    set aside, and the resumed run saves step 6 again, equal to an uninterrupted run."""
    workdir, params = run6
    bad = data_files(workdir, 6)[0]
    flip_bit(bad)
    with caplog.at_level(logging.INFO):
        step, restored, data, steps = resume(workdir)
    assert step == 3 and data == {"next_batch": 3} and steps == [3]
    np.testing.assert_array_equal(restored, params[3])
    assert f"checkpoint step 6: {bad}: checksum mismatch" in caplog.text
    assert "restored step 3 of" in caplog.text and "instead of the latest step 6" in caplog.text
    assert (workdir / "checkpoints" / checkpointing.UNUSABLE_DIR / "6" / bad.relative_to(
        step_dir(workdir, 6))).is_file()  # kept for a look
    history, _ = toy_run(workdir, 9)
    assert [h["step"] for h in history] == [4, 5, 6, 7, 8, 9]
    full, _ = toy_run(workdir.parent / "full", 9)
    assert [h["loss"] for h in history] == [h["loss"] for h in full[3:]]
    assert restore_toy(workdir)[0] == 9


def test_missing_file_falls_back(run6, caplog):
    workdir, params = run6
    gone = data_files(workdir, 6)[-1]
    gone.unlink()
    with caplog.at_level(logging.WARNING):
        step, restored, _, _ = resume(workdir)
    assert step == 3 and f"checkpoint step 6: {gone}: missing (listed in the manifest)" in caplog.text
    np.testing.assert_array_equal(restored, params[3])


@pytest.mark.parametrize("manifest", [True, False], ids=["with_manifest", "old_format"])
@pytest.mark.parametrize("rel", ["state/_METADATA", "data/iterator.json"])
def test_truncated_metadata_falls_back(run6, caplog, rel, manifest):
    """A truncated `_METADATA` / iterator.json of step 6: caught by the manifest, or, in a step
    without one, by orbax's failure to read it -- either way the file and the step are named and
    step 3 is restored."""
    workdir, params = run6
    if not manifest:  # neither step has one (else the verified step 3 is preferred untried)
        for step in (3, 6):
            (step_dir(workdir, step) / checkpointing.MANIFEST).unlink()
    bad = step_dir(workdir, 6) / rel
    truncate(bad)
    with caplog.at_level(logging.WARNING):
        step, restored, data, _ = resume(workdir)
    assert step == 3 and data == {"next_batch": 3}
    np.testing.assert_array_equal(restored, params[3])
    reason = "truncated" if manifest else "unreadable (JSONDecodeError"
    assert f"checkpoint step 6: {bad}: {reason}" in caplog.text
    assert "instead of the latest step 6" in caplog.text


def test_every_step_unusable_raises_naming_each_step_and_file(run6):
    workdir, _ = run6
    flipped = data_files(workdir, 6)[-1]
    flip_bit(flipped)
    (step_dir(workdir, 3) / checkpointing.MANIFEST).unlink()
    truncated = step_dir(workdir, 3) / "state" / "_METADATA"
    truncate(truncated)
    with pytest.raises(checkpointing.NoUsableCheckpoint) as e:
        resume(workdir)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and f"no usable checkpoint in {workdir}" in msg
    assert f"checkpoint step 6: {flipped}: checksum mismatch" in msg
    assert f"checkpoint step 3: {truncated}: unreadable" in msg
    assert [f.step for f in e.value.failures] == [6, 3]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]  # nothing moved
    with pytest.raises(checkpointing.NoUsableCheckpoint, match=r"checkpoint step 6: .*\n.*checkpoint step 3"):
        checkpointing.restore_state(str(workdir))


@pytest.mark.parametrize("manifest", ["missing", "empty"])
def test_steps_without_manifest_restore_unverified(run6, caplog, manifest):
    """Workdirs from before manifests (or a manifest listing nothing) keep working, with a
    WARNING naming each unverified step; its files are not vouched for."""
    workdir, params = run6
    for step in (3, 6):
        path = step_dir(workdir, step) / checkpointing.MANIFEST
        if manifest == "missing":
            path.unlink()
        else:
            path.write_text(json.dumps({"format": 1, "checksum": "crc32", "files": {}}))
    with caplog.at_level(logging.INFO):
        step, restored, data, _ = resume(workdir)
    assert step == 6 and data == {"next_batch": 6}
    np.testing.assert_array_equal(restored, params[6])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("checkpoint step 6 of") and "is unverified" in m for m in warnings), warnings
    assert checkpointing.restore_state(str(workdir))[0] == 6


def test_a_verified_step_is_preferred_to_a_newer_unverified_one(run6, caplog):
    """Step 6 lost its manifest (killed before it was written) and has a flipped byte: the
    verified step 3 is restored, step 6 set aside with a WARNING saying why."""
    workdir, params = run6
    (step_dir(workdir, 6) / checkpointing.MANIFEST).unlink()
    flip_bit(data_files(workdir, 6)[0])
    with caplog.at_level(logging.WARNING):
        step, restored, data, steps = resume(workdir)
    assert step == 3 and steps == [3]
    np.testing.assert_array_equal(restored, params[3])
    assert "checkpoint step 6: " in caplog.text and "unverified" in caplog.text
    assert (workdir / checkpointing.CHECKPOINT_DIR / checkpointing.UNUSABLE_DIR / "6").is_dir()


@pytest.mark.parametrize("edit", ["files_emptied", "entry_changed", "entry_dropped"])
def test_an_edited_manifest_fails_its_own_checksum(run6, caplog, edit):
    """The manifest covers itself (files_crc32): emptied, changed or shortened, it no longer
    vouches for the step; step 6 is set aside naming the manifest, step 3 restored."""
    workdir, params = run6
    path = step_dir(workdir, 6) / checkpointing.MANIFEST
    manifest = json.loads(path.read_text())
    first = sorted(manifest["files"])[0]
    if edit == "files_emptied":
        manifest["files"] = {}
    elif edit == "entry_changed":
        manifest["files"][first]["crc32"] = "00000000"
    else:
        del manifest["files"][first]
    path.write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        step, restored, _, _ = resume(workdir)
    assert step == 3
    np.testing.assert_array_equal(restored, params[3])
    assert f"checkpoint step 6: {path}: unreadable manifest" in caplog.text
    assert "files_crc32" in caplog.text


def test_restore_state_falls_back_and_checks_only_the_state_item(run6, caplog):
    """`restore_state` (export, zero-shot, fine-tuning init) reads the `state` item alone: damage
    to `data` does not matter to it; damage to `state` does. A step asked for by number does not
    fall back: it raises, naming the step and the file."""
    workdir, params = run6
    flip_bit(step_dir(workdir, 6) / "data" / "iterator.json", offset=0)
    step, state = checkpointing.restore_state(str(workdir))
    assert step == 6
    np.testing.assert_array_equal(np.asarray(state["params"]), params[6])
    bad = data_files(workdir, 6)[0]
    flip_bit(bad)
    with caplog.at_level(logging.WARNING):
        step, state = checkpointing.restore_state(str(workdir))
    assert step == 3 and f"checkpoint step 6: {bad}: checksum mismatch" in caplog.text
    np.testing.assert_array_equal(np.asarray(state["params"]), params[3])
    with pytest.raises(checkpointing.NoUsableCheckpoint, match=rf"checkpoint step 6: {bad}: checksum"):
        checkpointing.restore_state(str(workdir), 6)
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]  # readers move nothing


NOBODY = 65534


def chmod_works(path):
    """Whether a 0o500 directory refuses writes to this (non-root) user."""
    probe = path / "probe"
    probe.mkdir()
    probe.chmod(0o500)
    try:
        (probe / "x").write_text("x")
    except PermissionError:
        return True
    finally:
        probe.chmod(0o700)
    return False


@pytest.fixture(params=["chmod", "not_a_directory"])
def how(request, tmp_path):
    """How W/checkpoints is made unwritable (`make_unwritable`)."""
    if request.param == "chmod" and os.getuid() != 0 and not chmod_works(tmp_path):
        pytest.skip("this file system ignores modes; the not_a_directory case covers it")
    return request.param


@pytest.fixture
def base(tmp_path, how):
    """Where the workdir goes. As root the chmod case acts as 'nobody', who must reach it (pytest's
    tmp_path is private to root)."""
    if how == "chmod" and os.getuid() == 0:
        d = tempfile.mkdtemp(prefix="ms3_jax_ckpt_test_")
        os.chmod(d, 0o755)
        yield pathlib.Path(d)
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


def make_unwritable(ckpt, how):
    """`chmod`: mode 0o500 -- as root, which ignores modes, the directory goes to 'nobody' and the
    process takes nobody's effective uid (`restore` takes it back); `not_a_directory`: a regular
    file where the directory was (refused to root too; the directory is kept aside)."""
    if how == "chmod":
        if os.getuid() == 0:
            os.chown(ckpt, NOBODY, NOBODY)
            ckpt.chmod(0o500)
            os.seteuid(NOBODY)
        else:
            ckpt.chmod(0o500)
    else:
        shutil.move(str(ckpt), str(ckpt) + ".moved")
        ckpt.write_text("not a directory")


def restore(ckpt, how):
    """Undo `make_unwritable`."""
    if os.geteuid() != os.getuid():
        os.seteuid(os.getuid())
    if how == "chmod":
        ckpt.chmod(0o700)
    elif os.path.exists(str(ckpt) + ".moved"):
        ckpt.unlink()
        shutil.move(str(ckpt) + ".moved", str(ckpt))


def test_save_into_an_unwritable_directory_fails_fast(base, how):
    """W/checkpoints becomes unwritable during a run: the next save raises an OSError naming it on
    the main thread within seconds (orbax used to block ~300 s, then raise a TimeoutError); the
    checkpoint before is intact."""
    workdir = base / "wd"
    ckpt = workdir / checkpointing.CHECKPOINT_DIR
    toy_run(workdir, 3)
    when = []

    def on_step(n):
        if n == 1:  # step 4 of the resumed run; its save at 6 is refused
            make_unwritable(ckpt, how)
            when.append(time.perf_counter())

    try:
        with pytest.raises(OSError, match=rf"cannot save checkpoints: {ckpt} is not writable") as e:
            toy_run(workdir, 9, on_step=on_step)
        elapsed = time.perf_counter() - when[0]
    finally:
        restore(ckpt, how)
    print(f"{how}: OSError {elapsed:.2f} s after the directory became unwritable: {e.value}")
    assert elapsed < 10 and "another --workdir" in str(e.value)
    assert isinstance(e.value, PermissionError if how == "chmod" else NotADirectoryError)
    assert resume(workdir)[0] == 3


def test_unwritable_directory_is_reported_when_the_manager_opens(base, how):
    """The startup check (`training.run` opens `checkpointing.checkpoint_manager` first)."""
    workdir = base / "wd"
    ckpt = workdir / checkpointing.CHECKPOINT_DIR
    ckpt.mkdir(parents=True)
    make_unwritable(ckpt, how)
    t0 = time.perf_counter()
    try:
        with pytest.raises(OSError, match=rf"cannot save checkpoints: {ckpt} is not writable") as e:
            checkpointing.checkpoint_manager(str(workdir))
    finally:
        restore(ckpt, how)
    assert time.perf_counter() - t0 < 10
    assert isinstance(e.value, PermissionError if how == "chmod" else FileExistsError)


def test_sigterm_while_a_save_is_pending_is_honoured(tmp_path, monkeypatch):
    """A checkpoint every step, the manifest of step 1 slowed to 1 s (it is written in orbax's
    finalize thread): the main thread waits for it inside the save of step 2, SIGTERM arrives
    during that wait -- and is honoured right after: `Preempted` at step 2, both steps complete
    and verified, within seconds."""
    real = checkpointing.write_manifest
    sent = []

    def slow(path):
        if not sent:
            time.sleep(0.5)
            sent.append(threading.current_thread() is not threading.main_thread())
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        return real(path)

    monkeypatch.setattr(checkpointing, "write_manifest", slow)
    t0 = time.perf_counter()
    with pytest.raises(loop.Preempted, match="preempted at step 2, checkpoint saved") as e:
        toy_run(tmp_path, 50, checkpoint_every=1, log_every=1)
    assert e.value.step == 2 and sent == [True] and time.perf_counter() - t0 < 20
    assert resume(tmp_path)[0] == 2
    for step in (1, 2):
        assert checkpointing.verify_step(str(step_dir(tmp_path, step)), step) is True


def _fail_config_item_of_step(monkeypatch, step):
    """orbax's save thread fails writing the config item of `step` with ENOSPC (a disk filling
    up mid-save; the array data goes through tensorstore, where it cannot be planted)."""
    import errno
    import orbax.checkpoint._src.handlers.json_checkpoint_handler as json_handler
    real = json_handler.JsonCheckpointHandler._save_fn

    def save_fn(self, item, directory):
        if f"/{step}.orbax-checkpoint-tmp" in str(directory):
            async def fail():
                raise OSError(errno.ENOSPC, "No space left on device", str(directory))
            return fail()
        return real(self, item, directory)

    monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", save_fn)


def test_a_failed_save_stops_the_run_at_once_and_the_relaunch_resumes(tmp_path, monkeypatch):
    """The save of step 6 fails in orbax's save thread: the run stops within two steps (it once
    ran on to the end, computing steps it threw away) with `SaveFailed` naming step 6 and the
    cause's errno (a full disk is a usage error, exit 2); the relaunch resumes from step 3, drops
    the half-written step and finishes."""
    import errno
    from ms3_jax import main as main_module
    _fail_config_item_of_step(monkeypatch, 6)
    calls = []
    with pytest.raises(checkpointing.SaveFailed) as e:
        toy_run(tmp_path, 12, on_step=calls.append)
    assert e.value.errno == errno.ENOSPC and main_module.is_usage_error(e.value)
    assert "checkpoint step 6 could not be saved" in str(e.value) and "newest saved step is 3" in str(e.value)
    assert calls[-1] < 9  # not on to the next save
    monkeypatch.undo()
    toy_run(tmp_path, 12)
    assert sorted(os.listdir(tmp_path / checkpointing.CHECKPOINT_DIR)) == ["12", "6", "9", "deleted"]


@pytest.mark.parametrize("when", ["at start-up", "before a save"])
def test_a_full_disk_is_refused_early_with_needed_and_free(tmp_path, monkeypatch, when):
    """Free space is checked before the first step (one checkpoint of the state) and before each
    save (the last step's size), plus the margin: too little is refused with needed vs free,
    before any step runs or before the save starts (it once passed with 24 KB free)."""
    from ms3_jax.files import safe
    calls = []
    if when == "at start-up":
        monkeypatch.setattr(safe, "free_bytes", lambda directory: 1_000_000)
        with pytest.raises(safe.NotEnoughSpace, match=r"for the next checkpoint: needs 16\.\d MB, 1\.0 MB free"):
            toy_run(tmp_path, 6, on_step=calls.append)
        assert calls == [] and not os.listdir(tmp_path / checkpointing.CHECKPOINT_DIR)
        return
    real = safe.free_bytes
    monkeypatch.setattr(safe, "free_bytes", lambda directory: real(directory) if len(calls) < 4
                        else checkpointing.SAVE_MARGIN_BYTES)  # the disk fills after step 3
    with pytest.raises(safe.NotEnoughSpace, match=r"for checkpoint step 6: needs 16\.\d MB") as e:
        toy_run(tmp_path, 12, on_step=calls.append)
    assert e.value.errno == 28 and calls[-1] == 6
    monkeypatch.undo()
    mngr = checkpointing.checkpoint_manager(str(tmp_path))
    try:  # the size asked for: the last step's, plus the margin
        assert mngr.all_steps() == [3]
        last = checkpointing.step_bytes(str(tmp_path / checkpointing.CHECKPOINT_DIR / "3"))
        assert last > 1000 and mngr.save_bytes() == int(last * 1.1) + checkpointing.SAVE_MARGIN_BYTES
    finally:
        mngr.close()


def test_library_errors_reach_the_console_without_tracebacks():
    """orbax's save thread logs its failure with a traceback (five of them once preceded the
    error): the console filter of `ms3_jax.main` keeps the line, drops the traceback, and keeps
    orbax's INFO chatter out."""
    import sys
    from ms3_jax import main as main_module
    try:
        raise OSError(28, "No space left on device")
    except OSError:
        exc = sys.exc_info()
    error = logging.LogRecord("orbax", logging.ERROR, "/x/orbax/checkpoint/y.py", 1,
                              "Failed to run Handler Commit operations", (), exc)
    info = logging.LogRecord("orbax", logging.INFO, "/x/orbax/checkpoint/y.py", 1, "saving", (), None)
    ours = logging.LogRecord("ms3", logging.ERROR, "/x/ms3_jax/engine/loop.py", 1, "ours", (), exc)
    assert main_module.quiet_libraries(error) and error.exc_info is None
    assert not main_module.quiet_libraries(info)
    assert main_module.quiet_libraries(ours) and ours.exc_info is not None
