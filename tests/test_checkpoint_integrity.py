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
    if not manifest:
        (step_dir(workdir, 6) / checkpointing.MANIFEST).unlink()
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


def test_steps_without_manifest_restore_unverified(run6, caplog):
    """Workdirs from before manifests keep working: an INFO line, no warning."""
    workdir, params = run6
    for step in (3, 6):
        (step_dir(workdir, step) / checkpointing.MANIFEST).unlink()
    with caplog.at_level(logging.INFO):
        step, restored, data, _ = resume(workdir)
    assert step == 6 and data == {"next_batch": 6}
    np.testing.assert_array_equal(restored, params[6])
    assert "checkpoint step 6 of" in caplog.text and "has no ms3_manifest.json" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "checkpoint" in r.getMessage()]
    assert checkpointing.restore_state(str(workdir))[0] == 6


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
    """The startup check (`training.checkpoint_manager` -> `checkpointing.checkpoint_manager`)."""
    from ms3_jax.engine import training
    from ms3_jax.testing.configs import tiny_pretrain_config
    config = tiny_pretrain_config()
    workdir = base / "wd"
    ckpt = workdir / checkpointing.CHECKPOINT_DIR
    ckpt.mkdir(parents=True)
    make_unwritable(ckpt, how)
    t0 = time.perf_counter()
    try:
        with pytest.raises(OSError, match=rf"cannot save checkpoints: {ckpt} is not writable") as e:
            training.checkpoint_manager(config, str(workdir))
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
