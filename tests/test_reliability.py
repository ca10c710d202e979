"""Reliability (failure injection): preemption by SIGTERM / SIGINT, kill -9 during a save,
non-finite losses and gradients, a clear early error for every bad input, and a soak test
(tiny pretraining with SIGTERM + 3 random kill -9 / resume cycles == an uninterrupted run).

Most tests drive `loop.run` in-process with a toy trainer (compiles in a fraction of a second);
only a real kill -9, a signal to main.py, and two processes run as subprocesses:
`python -m ms3_jax.testing.reliability_worker '<json args>'`.
"""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from ms3_jax.engine import checkpointing, exit_codes, loop, nonfinite
from ms3_jax.method.train_state import ema_update, init_train_state
from ms3_jax.testing import synthetic_data
from ms3_jax.testing.configs import tiny_pretrain_config
from ms3_jax.testing.paths import ROOT, subprocess_env
from ms3_jax.testing.toy import ToyIterator, restore_toy, toy_run


# --- 1. preemption -------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_state_and_data_and_resume_is_exact(tmp_path, signum):
    """A signal during step 4 (not a log / checkpoint step): the step finishes, state + iterator
    are saved at 4, `Preempted` names the step, the handlers are restored; the resumed run gives
    the losses of an uninterrupted run bit for bit."""
    full, _ = toy_run(tmp_path / "full", 10)
    before = signal.getsignal(signum)
    kill_at_4 = lambda n: os.kill(os.getpid(), signum) if n == 4 else None
    with pytest.raises(loop.Preempted, match=r"preempted at step 4, checkpoint saved in .*split"):
        toy_run(tmp_path / "split", 10, on_step=kill_at_4)
    assert signal.getsignal(signum) is before
    step, _, data = restore_toy(tmp_path / "split")
    assert step == 4 and data == {"next_batch": 4}
    rest, _ = toy_run(tmp_path / "split", 10)
    assert [h["step"] for h in rest] == list(range(5, 11))
    assert [h["loss"] for h in rest] == [h["loss"] for h in full[4:]]
    np.testing.assert_array_equal(restore_toy(tmp_path / "split")[1], restore_toy(tmp_path / "full")[1])


def test_second_ctrl_c_quits_without_saving(tmp_path):
    def twice(n):
        if n == 4:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        toy_run(tmp_path, 10, on_step=twice)
    assert restore_toy(tmp_path)[0] == 3  # the last regular checkpoint, complete


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    """A save killed before orbax's final rename leaves `<step>.orbax-checkpoint-tmp` (planted
    here exactly so, with a truncated file): it is not listed, resume takes the last complete
    checkpoint, and the leftover is removed synchronously when a manager opens (orbax's
    background cleanup raced with a second manager's on the same `rmtree`: a CI failure)."""
    toy_run(tmp_path, 6)
    ckpt = tmp_path / checkpointing.CHECKPOINT_DIR
    import shutil

    def plant(name):
        partial = ckpt / name
        shutil.copytree(ckpt / "6", partial)
        for f in sorted(p for p in partial.rglob("*") if p.is_file())[:3]:
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
        return partial

    partial = plant("9.orbax-checkpoint-tmp")
    assert ocp.CheckpointManager(str(ckpt)).all_steps() == [3, 6]  # never listed
    mngr = checkpointing.checkpoint_manager(str(tmp_path))
    assert not partial.exists() and mngr.all_steps() == [3, 6] and mngr.latest_step() == 6
    mngr.close()
    partial = plant("9.orbax-checkpoint-tmp-1764000000")  # orbax's timestamped form, too
    history, _ = toy_run(tmp_path, 9)
    assert [h["step"] for h in history] == [7, 8, 9]
    assert not partial.exists() and restore_toy(tmp_path)[0] == 9


# --- 2. non-finite loss / gradients --------------------------------------------------------------

@pytest.mark.parametrize("kind,at,match", [
    ("loss", 5, r"non-finite loss at step 5 \(non-finite steps: \[5, 6\]\); nothing saved after step 3"),
    ("grad", 6, r"non-finite gradients / state \(the loss .* is finite\) at step 6 .*nothing saved "
                r"after step 3.*nonfinite='skip'"),
])
def test_nonfinite_stops_naming_the_step_and_never_saves_it(tmp_path, kind, at, match):
    with pytest.raises(FloatingPointError, match=match):
        toy_run(tmp_path, 12, bad={at: kind}, checkpoint_every=3, log_every=4)
    mngr = checkpointing.checkpoint_manager(str(tmp_path))
    steps = mngr.all_steps()
    mngr.close()
    assert steps == [3]
    assert np.all(np.isfinite(restore_toy(tmp_path)[1]))


def test_nonfinite_skip_drops_the_step_and_counts_it(tmp_path, caplog):
    params = []
    with caplog.at_level(logging.WARNING):
        history, state = toy_run(tmp_path, 8, bad={3: "loss", 6: "grad"}, nonfinite="skip",
                                 nonfinite_max_skipped=2, params_log=params)
    assert [h["skipped"] for h in history] == [0, 0, 1, 0, 0, 1, 0, 0]
    p = dict(params)
    np.testing.assert_array_equal(p[3], p[2])
    np.testing.assert_array_equal(p[6], p[5])
    assert not np.array_equal(p[4], p[3]) and all(np.all(np.isfinite(v)) for v in p.values())
    assert int(state.step) == 8 and restore_toy(tmp_path)[0] == 8
    assert "step 6: non-finite loss or gradients, step skipped (2 in this run" in caplog.text


def test_nonfinite_skip_stops_beyond_the_cap(tmp_path):
    """27 of 30 steps skipped used to exit 0: more than `nonfinite_max_skipped` stops the run."""
    bad = {s: "loss" for s in range(2, 31)}
    with pytest.raises(FloatingPointError, match=r"4 steps skipped .* \(3 of 30 steps; the last at "
                                                 r"step 5\); nothing saved after step 3"):
        toy_run(tmp_path / "fraction", 30, bad=bad, nonfinite="skip", nonfinite_max_skipped=0.1)
    with pytest.raises(FloatingPointError, match=r"2 steps skipped .* \(1 of 30 steps"):
        toy_run(tmp_path / "count", 30, bad=bad, nonfinite="skip", nonfinite_max_skipped=1)
    with pytest.raises(ValueError, match="nonfinite_max_skipped must be > 0"):
        toy_run(tmp_path / "bad", 30, nonfinite="skip", nonfinite_max_skipped=0)


@pytest.mark.slow
def test_real_step_with_nonfinite_update_is_skipped_whole():
    """The guard in a real (fine-tuning) step: lr = inf makes the update non-finite while the loss
    is finite -- the gradient / state path of the check. 'skip' keeps params, BN statistics and
    optimizer state bit for bit and moves the step counter. (The pretraining step runs in 'skip'
    mode in the soak test below.)"""
    from configs.finetune import voc
    from ms3_jax.stages import finetune
    config = voc.get_config("tiny")
    config.nonfinite, config.optim.lr = "skip", float("inf")
    trainer = finetune.Trainer(config, 7, devices=jax.devices()[:1])
    state = trainer.create_state(trainer.init_variables(jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
    before = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), jax.device_get(state))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
             "label": rng.integers(0, 7, (8, 32, 32)).astype(np.int32)}
    new, metrics = jax.device_get(trainer.step(state, trainer.global_batch(batch)))
    assert np.isfinite(metrics["loss"]) and metrics["finite"] == 0.0 and metrics["skipped"] == 1.0
    assert int(new.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(before.replace(step=new.step)), jax.tree_util.tree_leaves(new)):
        np.testing.assert_array_equal(a, b)


# --- 3. bad input: one clear error, before any long work ------------------------------------------

@pytest.fixture
def no_long_work(monkeypatch):
    """Building a trainer (model, compile) or preparing data counts as long work: fail if reached."""
    from ms3_jax.data import synthetic
    from ms3_jax.engine import training

    def reached(*args, **kwargs):
        raise AssertionError("long work started before the bad input was reported")

    for owner, name in ((training.Trainer, "__init__"), (synthetic, "prepare_synthetic")):
        monkeypatch.setattr(owner, name, reached)


def pretrain_config(data_dir, text_path="never_read_text_embeddings.npz", **overrides):
    """The tiny pretraining on `data_dir`; `text_path` is only read by runs that get that far."""
    config = tiny_pretrain_config(**{"data.data_dir": data_dir, **overrides})
    config.data.synthetic = None
    config.text.embeddings = text_path
    return config


def save_text(path, datasets):
    from ms3_jax.data.label_space import LabelSpace
    from ms3_jax.method import text_embeddings
    ls = LabelSpace.from_datasets(datasets)
    t = np.random.default_rng(0).standard_normal((ls.num_classes, 32))
    text_embeddings.save_text_embeddings(str(path), ls, (t / np.linalg.norm(t, axis=1, keepdims=True)
                                                         ).astype(np.float32), "template")
    return str(path)


@pytest.mark.parametrize("overrides,match", [
    ({"batch_size": 12}, "batch_size 12 does not divide over 8 devices"),
    ({"model.output_stride": 4}, "model.output_stride must be 8, 16 or 32, got 4"),
    ({"bank.per_class": 128}, r"bank.per_class \(P=128\) must be <= bank.slots \(S=64\)"),
    ({"nonfinite": "ignore"}, r"nonfinite must be one of \('stop', 'skip'\), got 'ignore'"),
    ({"data.datasets": ("synth_a", "synth_x")},
     r"Unknown dataset name\(s\) \['synth_x'\]; valid names: \[.*'synth_a'"),
])
def test_inconsistent_config_fails_first(tmp_path, no_long_work, overrides, match):
    """Config errors come before everything else (the data_dir does not even exist)."""
    config = pretrain_config(str(tmp_path / "no_data"), **overrides)
    with pytest.raises(ValueError, match=match):
        from ms3_jax.stages import pretrain
        pretrain.train_and_evaluate(config, str(tmp_path / "wd"))


@pytest.mark.parametrize("job", ["text_adapt", "finetune"])
def test_inconsistent_config_fails_first_in_stage1_and_finetuning(tmp_path, no_long_work, job):
    import importlib
    if job == "text_adapt":
        from configs import text_adapt as cfg
        config = cfg.get_config("tiny")
    else:
        from configs.finetune import voc as cfg
        config = cfg.get_config("tiny")
    config.batch_size = 12
    config.data.data_dir = str(tmp_path / "no_data")
    with pytest.raises(ValueError, match="batch_size 12 does not divide over 8 devices"):
        importlib.import_module(f"ms3_jax.stages.{job}").train_and_evaluate(config, str(tmp_path / "wd"))


def test_missing_dataset_directory_is_named(tmp_path, no_long_work):
    from ms3_jax.stages import pretrain
    config = pretrain_config(str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError, match=r"dataset 'synth_a' \(tfds 'synth_a', split 'train'\) "
                                                r"is not prepared: .*data/synth_a does not exist"):
        pretrain.train_and_evaluate(config, str(tmp_path / "wd"))


def test_missing_split_is_named(tmp_path, synthetic_dir, no_long_work):
    from configs.finetune import voc
    from ms3_jax.stages import finetune
    config = voc.get_config("tiny")
    config.data.data_dir, config.data.synthetic = synthetic_dir, None
    config.eval.split = "valdation"
    with pytest.raises(ValueError, match=r"dataset 'synth_a' \(tfds 'synth_a', split 'valdation'\): "
                                         r"no such split .*\['train', 'validation'\]"):
        finetune.train_and_evaluate(config, str(tmp_path / "wd"))


@pytest.mark.parametrize("classes,match", [
    (("sky", " "), r"Dataset 'mine' has empty class names at positions \[1\]"),
    (("sky", "road", "sky"), r"Dataset 'mine' repeats class names \['sky'\]"),
    ((), "Dataset 'mine' has no classes"),
])
def test_empty_or_duplicate_class_names(classes, match):
    from ms3_jax.data.label_space import LabelSpace
    with pytest.raises(ValueError, match=match):
        LabelSpace({"voc": ("background", "cat"), "mine": classes})


def test_text_embeddings_of_other_datasets(tmp_path, synthetic_dir, no_long_work):
    from ms3_jax.stages import pretrain
    text = save_text(tmp_path / "T.npz", ["synth_a", "synth_b"])
    config = pretrain_config(synthetic_dir, text)
    with pytest.raises(ValueError, match=r"T.npz do not match the configured datasets.*missing "
                                         r"from the file: \['synth_c/"):
        pretrain.train_and_evaluate(config, str(tmp_path / "wd"))


@pytest.mark.parametrize("missing,match", [
    ("tokenizer", r"no CLIP tokenizer files in .*clip: expected vocab.json \+ merges.txt"),
    ("weights", r"no CLIP weights in .*clip: expected model.safetensors"),
    ("directory", r"CLIP checkpoint directory not found: .*nowhere"),
])
def test_clip_without_weights_or_tokenizer(tmp_path, synthetic_dir, no_long_work, missing, match):
    from ms3_jax.demo import tiny_clip
    from ms3_jax.method import text_embeddings
    from ms3_jax.stages import pretrain
    clip = tmp_path / "clip"
    clip.mkdir()
    tiny_clip.text_config().save_pretrained(clip)
    if missing != "tokenizer":
        tiny_clip.write_tokenizer(clip)
    config = pretrain_config(synthetic_dir, text_path=text_embeddings.TEMPLATE)
    config.text.clip = str(clip) if missing != "directory" else str(tmp_path / "nowhere")
    with pytest.raises((FileNotFoundError, OSError), match=match):
        pretrain.train_and_evaluate(config, str(tmp_path / "wd"))


def _png(array):
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def memory_records(n=6, size=24, bad_label=None, corrupt=None):
    """Records as `tfds.data_source` gives them (encoded here), with planted faults."""
    rng = np.random.default_rng(0)
    out = []
    for r in range(n):
        image = rng.integers(0, 256, (size, size, 3), np.uint8)
        label = rng.integers(0, 7, (size, size), np.uint8)
        if r == bad_label:
            label[3, 4] = 200
        out.append({"image": b"\x89PNG\r\n not an image" if r == corrupt else _png(image),
                    "label": _png(label), "file_name": f"img_{r}.png".encode()})
    return out


def memory_pipeline(records, **kwargs):
    from ms3_jax.data import pipeline
    return pipeline.TrainPipeline(["synth_a"], sources=[records], global_batch_size=4,
                                  augment=pipeline.AugmentConfig(crop_size=16), shard_index=0,
                                  shard_count=1, with_record_ids=True, **kwargs)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_label_ids_out_of_range_name_dataset_and_record():
    with pytest.raises(ValueError, match=r"dataset 'synth_a', record 3 \(file 'img_3.png'\): label ids "
                                         r"\[200\] out of range; its 7 classes are 0..6"):
        take(memory_pipeline(memory_records(bad_label=3)).make_iterator(), 3)


def test_label_ids_out_of_range_are_skipped_and_counted(caplog):
    """skip_unreadable also replaces a badly labelled record (a relaunch does not crash-loop on
    it): by the next good one, named in a warning, counted in the batch."""
    with caplog.at_level(logging.WARNING):
        batches = take(memory_pipeline(memory_records(bad_label=3), skip_unreadable=True).make_iterator(), 4)
    assert "record 3 (file 'img_3.png'): label ids [200] out of range" in caplog.text
    ids = np.concatenate([b["record_index"] for b in batches])
    replaced = np.concatenate([b["unreadable"] for b in batches])
    assert 3 not in ids and set(ids[replaced == 1]) == {4}
    assert all(b["label"].max() < 7 for b in batches)


def test_unreadable_image_is_named_or_skipped_and_counted(caplog):
    from ms3_jax.data import pipeline
    with pytest.raises(pipeline.UnreadableRecordError,
                       match=r"dataset 'synth_a', record 2 \(file 'img_2.png'\): cannot read or "
                             r"decode it: UnidentifiedImageError"):
        take(memory_pipeline(memory_records(corrupt=2)).make_iterator(), 3)
    # skip_unreadable: record 2 is replaced by record 3, batches keep their size, the count is in
    # the batch, and the stream is the same when resumed from any batch.
    with caplog.at_level(logging.WARNING):
        pipe = memory_pipeline(memory_records(corrupt=2), skip_unreadable=True)
        batches = take(pipe.make_iterator(), 4)
    assert "record 2 (file 'img_2.png')" in caplog.text and "replaced by the next record" in caplog.text
    assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)
    ids = np.concatenate([b["record_index"] for b in batches])
    replaced = np.concatenate([b["unreadable"] for b in batches])
    assert 2 not in ids and replaced.sum() >= 1 and set(ids[replaced == 1]) == {3}
    resumed = take(pipe.make_iterator(start_batch=2), 2)
    for a, b in zip(batches[2:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_loop_logs_the_running_count_of_replaced_records(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        toy_run(tmp_path, 4, unreadable={2: 1, 4: 2})
    assert "step 2: 1 unreadable record(s) replaced (1 in this run" in caplog.text
    assert "step 4: 2 unreadable record(s) replaced (3 in this run" in caplog.text


def test_step_rate_and_eta_leave_out_the_compile_and_evaluations(tmp_path, caplog):
    """An evaluation of 1 s after steps 2 and 4 (and the first step's compile): the logged rate
    is the steps' own (toy steps take milliseconds), not steps / wall time (< 2 steps/s), and the
    ETA follows it; a window holding only the compile shows no rate ('--')."""
    from ms3_jax.testing.toy import ToyTrainer, toy_config

    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[(tag, step)] = value

    config = toy_config(log_every=2, checkpoint_every=100)
    trainer, writer = ToyTrainer(config), Writer()
    mngr = checkpointing.checkpoint_manager(str(tmp_path))
    try:
        with caplog.at_level(logging.INFO):
            loop.run(trainer, trainer.init_state(), ToyIterator(), config, start=0, end=6,
                     num_steps=6, mngr=mngr, writer=writer, history=[],
                     after_step=lambda step, s: time.sleep(1.0) if step in (2, 4) else None)
    finally:
        mngr.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    rates = {int(m.group(1)): float(m.group(2)) for m in
             (re.match(r"step (\d+)/6 .*\| ([\d.]+) steps/s \| ETA", line) for line in lines) if m}
    assert set(rates) == {2, 4, 6} and min(rates.values()) > 20, lines
    assert writer.scalars[("train/images_per_s", 4)] == pytest.approx(rates[4] * 8, rel=1e-3)
    assert "step 1: compiled and ran in" in caplog.text
    assert loop.progress_line(1, 6, {"loss": 1.0}, float("nan")).endswith("| -- steps/s | ETA --")


# --- subprocesses: kill -9 during a save, two processes, the soak test -----------------------------

def launch(cmd, log_path, devices=1, fast_compile=True):
    """A subprocess with its output in `log_path`, in its own session (signals reach only it)."""
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(devices, fast_compile), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(proc, log_path, pattern, timeout=180):
    """Poll the output until `pattern` appears (returns the match)."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        with open(log_path) as f:
            m = re.search(pattern, f.read())
        if m:
            return m
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {pattern!r}:\n"
                                 + open(log_path).read()[-3000:])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n" + open(log_path).read()[-3000:])


def test_old_steps_are_retired_by_rename_then_purged(tmp_path):
    """orbax removes steps beyond `max_to_keep` by an atomic rename into checkpoints/deleted (an
    rmtree in place, killed -9, left a listed step without its 'data' item); the next save or
    open purges them."""
    from ms3_jax.data import pipeline
    mngr = checkpointing.checkpoint_manager(str(tmp_path), max_to_keep=1)
    it = ToyIterator()
    for step in (1, 2):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(4) * step}),
                                                data=pipeline.checkpoint_save_args(it)))
        mngr.wait_until_finished()
    trash = tmp_path / checkpointing.CHECKPOINT_DIR / checkpointing.DELETED_DIR
    assert mngr.all_steps() == [2] and sorted(os.listdir(trash)) == ["1"]
    assert sorted(os.listdir(trash / "1")) == sorted(os.listdir(tmp_path / "checkpoints" / "2"))
    checkpointing.checkpoint_manager(str(tmp_path), max_to_keep=1)
    assert os.listdir(trash) == []


@pytest.mark.slow
def test_kill_9_during_save_leaves_only_complete_checkpoints(tmp_path):
    """Saves of a 32 MB state back to back (~50 ms each with the tmp dir alive), killed -9 three
    times: twice within 20 ms of a `<step>.orbax-checkpoint-tmp` dir appearing (mid-save), once at
    a random time. Every listed checkpoint then restores completely (state and iterator of the
    same step), the latest is the one resumed from, and saving goes on."""
    from ms3_jax.data import pipeline
    rng = np.random.default_rng(0)
    ckpt = tmp_path / checkpointing.CHECKPOINT_DIR
    is_tmp = lambda: [p.name for p in ckpt.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    template = {"w": jnp.zeros((8 << 20,), jnp.float32)}
    mid_save, resumed = 0, []
    for cycle in range(3):
        log = tmp_path / f"log{cycle}.txt"
        proc = launch([sys.executable, "-m", "ms3_jax.testing.reliability_worker",
                       json.dumps({"mode": "save_forever", "workdir": str(tmp_path)})], log)
        resumed.append(int(wait_for(proc, log, r"resumed from (\d+)").group(1)))
        wait_for(proc, log, r"saved \d+")
        if cycle < 2:
            while not is_tmp() and proc.poll() is None:
                time.sleep(0.001)
            time.sleep(rng.uniform(0.0, 0.02))
        else:
            time.sleep(rng.uniform(0.0, 0.5))
        proc.kill()
        proc.wait()
        mid_save += bool(is_tmp())
        mngr = checkpointing.checkpoint_manager(str(tmp_path), max_to_keep=2)
        try:
            for step in mngr.all_steps():
                it = ToyIterator()
                restored = mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(template), data=pipeline.checkpoint_restore_args(it)))
                assert it.next_batch == step
                np.testing.assert_array_equal(np.asarray(restored.state["w"]),
                                              np.full((8 << 20,), step, np.float32))
            latest = mngr.latest_step()
        finally:
            mngr.close()
        assert latest and latest >= resumed[-1]
    print(f"kill -9 during save: resumed from {resumed}; {mid_save} of 3 kills left a tmp dir")
    assert mid_save >= 1 and resumed[1] > 0


@pytest.mark.slow  # two processes
def test_two_processes_agree_on_the_preemption_step(tmp_path):
    """Only process 1 is signalled (during step 3); both stop at the next log boundary (step 4),
    both exit 75, and the checkpoint of step 4 is complete."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [launch([sys.executable, "-m", "ms3_jax.testing.reliability_worker", json.dumps(
        {"mode": "two_processes", "coordinator": f"127.0.0.1:{port}", "process_id": i,
         "workdir": str(tmp_path / "wd")})], tmp_path / f"p{i}.txt", devices=4) for i in range(2)]
    outs = []
    for i, p in enumerate(procs):
        try:
            p.wait(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(open(tmp_path / f"p{i}.txt").read())
    for p, out in zip(procs, outs):
        assert p.returncode == exit_codes.PREEMPTED, out[-3000:]
        assert '{"preempted": 4, "latest": 4}' in out
    assert "SIGTERM received" in outs[1] and "SIGTERM received" not in outs[0]


SOAK_STEPS = 12


def soak_command(workdir, data_dir, text_path):
    return [sys.executable, "-m", "ms3_jax.main", "--config=configs/pretrain.py:tiny",
            f"--workdir={workdir}", f"--config.num_steps={SOAK_STEPS}", "--config.log_every=1",
            "--config.checkpoint_every=2", f"--config.data.data_dir={data_dir}",
            f"--config.text.embeddings={text_path}", "--config.data.crop_size=32",
            "--config.nonfinite=skip"]


@pytest.mark.slow
def test_soak_sigterm_and_three_kill_9_resume_to_the_uninterrupted_params(tmp_path):
    """`python -m ms3_jax.main` tiny pretraining for 12 steps: SIGTERM (exit 75, checkpoint named)
    then 3 kill -9 at random times, each followed by a resume; the final state equals that of an
    uninterrupted run (launched alongside) bit for bit. Both run with nonfinite='skip': the guard
    of the pretraining step is there and changes nothing when every step is finite."""
    data_dir = synthetic_data.build(tmp_path, num_train=64, num_val=16, image_size=96).data_dir  # = tiny's
    text = save_text(tmp_path / "T.npz", ["synth_a", "synth_b", "synth_c"])
    t0 = time.perf_counter()
    progress = r"step (\d+)/12"
    # The uninterrupted run goes alongside, once it has compiled (and filled the compilation cache).
    reference = launch(soak_command(tmp_path / "ref", data_dir, text), tmp_path / "ref.txt",
                       fast_compile=False)  # many steps: XLA's default level
    wait_for(reference, tmp_path / "ref.txt", progress, timeout=300)
    workdir = tmp_path / "soak"
    rng = np.random.default_rng(0)
    log = tmp_path / "run0.txt"
    proc = launch(soak_command(workdir, data_dir, text), log, fast_compile=False)
    wait_for(proc, log, progress)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == exit_codes.PREEMPTED, open(log).read()[-3000:]
    saved = int(re.search(r"preempted at step (\d+), checkpoint saved", open(log).read()).group(1))
    latest, mid_save = [saved], 0
    for cycle in range(1, 4):
        # A random moment: during a random one of the steps left (each save takes ~1 s).
        target = int(rng.integers(latest[-1] + 1, SOAK_STEPS))
        log = tmp_path / f"run{cycle}.txt"
        proc = launch(soak_command(workdir, data_dir, text), log, fast_compile=False)
        wait_for(proc, log, rf"step {target}/12")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        assert proc.wait() == -signal.SIGKILL, "the run ended before its kill"
        mid_save += any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").iterdir())
        mngr = checkpointing.checkpoint_manager(str(workdir))
        latest.append(mngr.latest_step() or 0)
        mngr.close()
    log = tmp_path / "final.txt"
    proc = launch(soak_command(workdir, data_dir, text), log, fast_compile=False)
    assert proc.wait(timeout=300) == 0, open(log).read()[-3000:]
    final = open(log).read()
    assert f"resumed from step {latest[-1]}" in final and "skipped_steps 0 |" in final
    assert reference.wait(timeout=300) == 0, open(tmp_path / "ref.txt").read()[-3000:]
    print(f"soak: latest checkpoint after SIGTERM and each kill -9: {latest} ({mid_save} kills "
          f"left a half-written checkpoint); {time.perf_counter() - t0:.0f} s")
    step_a, a = checkpointing.restore_state(str(workdir))
    step_b, b = checkpointing.restore_state(str(tmp_path / "ref"))
    assert step_a == step_b == SOAK_STEPS
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0))
               for x, y in zip(la, lb))
    print(f"soak: max |difference| over all state leaves {diff:.3g}")
    assert diff == 0.0


def _save_step(wd, config, step=1, with_config=True):
    """A checkpoint step of `wd` as `loop.run` saves it (the config item unless `with_config`)."""
    mngr = checkpointing.checkpoint_manager(wd)
    items = {"state": ocp.args.StandardSave({"x": np.zeros(2)})}
    if with_config:
        items[checkpointing.CONFIG_ITEM] = ocp.args.JsonSave(json.loads(config.to_json()))
    mngr.save(step, args=ocp.args.Composite(**items))
    mngr.wait_until_finished()
    mngr.close()


def _resume_guard(config, wd):
    from ms3_jax.engine import training
    mngr = checkpointing.checkpoint_manager(wd)
    try:
        return training.check_resume(mngr, config, wd)
    finally:
        mngr.close()


@pytest.mark.parametrize("config_json", ["kept", "missing", "null", "truncated"])
def test_resume_guard_reads_the_config_saved_in_the_checkpoint(tmp_path, config_json):
    """The guard compares with the config saved in the newest step, whatever W/config.json holds
    (missing, `null`, truncated: it once resumed a changed tau from step 20 and exit 0): a changed
    tau / lr is listed unless `resume_overrides` names it; free fields (logging) pass; a refused
    attempt writes nothing, so the original command still resumes; config.json is written after
    the guard (`record_config`), the earlier one kept as config.<n>.json."""
    from ms3_jax.engine import training
    wd, path = str(tmp_path), tmp_path / "config.json"
    config = tiny_pretrain_config()
    checkpointing.write_config(wd, config)
    _save_step(wd, config)
    if config_json == "missing":
        path.unlink()
    elif config_json == "null":
        path.write_text("null")
    elif config_json == "truncated":
        path.write_text(path.read_text()[:200])
    before = path.read_bytes() if path.exists() else None
    changed = tiny_pretrain_config(**{"loss.tau": 0.5, "optim.base_lr": 0.3, "log_every": 7})
    with pytest.raises(ValueError) as e:
        _resume_guard(changed, wd)
    msg = str(e.value)
    assert "holds a run (step 1)" in msg and "from checkpoint step 1" in msg
    assert "loss.tau: 0.07 -> 0.5" in msg and "optim.base_lr: 0.1 -> 0.3" in msg and "log_every" not in msg
    assert (path.read_bytes() if path.exists() else None) == before  # the refused attempt wrote nothing
    assert _resume_guard(config, wd) == 1  # the original command resumes
    allowed = tiny_pretrain_config(**{"loss.tau": 0.5, "optim.base_lr": 0.3, "log_every": 7,
                                      "resume_overrides": ("loss.tau", "optim")})
    assert _resume_guard(allowed, wd) == 1
    training.record_config(allowed, wd)
    assert json.loads(path.read_text())["loss"]["tau"] == 0.5
    if config_json == "kept":
        assert json.loads((tmp_path / "config.1.json").read_text())["loss"]["tau"] == 0.07
    elif config_json != "missing":  # the unreadable one is kept for a look
        assert (tmp_path / "config.1.json").read_bytes() == before


@pytest.mark.parametrize("config_json", ["missing", "truncated"])
def test_steps_without_a_saved_config_need_a_readable_config_json(tmp_path, config_json):
    """A step saved before steps held their config is compared with W/config.json, which must
    then be there and parse: missing or unreadable, it is named and the resume refused."""
    wd, path = str(tmp_path), tmp_path / "config.json"
    config = tiny_pretrain_config()
    checkpointing.write_config(wd, config)
    _save_step(wd, config, with_config=False)
    assert _resume_guard(config, wd) == 1
    if config_json == "missing":
        path.unlink()
        match = rf"{path} is missing and checkpoint step 1 predates saved configs"
    else:
        path.write_text(path.read_text()[:200])
        match = rf"{path}: the job config is unreadable \(JSONDecodeError"
    with pytest.raises(ValueError, match=match):
        _resume_guard(tiny_pretrain_config(**{"loss.tau": 0.1}), wd)


def test_workdirs_from_before_the_backbone_fields_resume():
    """A config.json written before `model.backbone` / `optim.optimizer` existed resumes with them
    at 'resnet' / 'sgd' (what that run computed), and not with 'deit' / 'adamw'."""
    from ms3_jax.engine import training
    saved = json.loads(tiny_pretrain_config().to_json())
    del saved["model"]["backbone"], saved["optim"]["optimizer"]
    assert training.resume_changes(saved, json.loads(tiny_pretrain_config().to_json())) == []
    now = json.loads(tiny_pretrain_config(**{"model.backbone": "deit",
                                             "optim.optimizer": "adamw"}).to_json())
    assert training.resume_changes(saved, now) == [
        "model.backbone: '(absent)' -> 'deit'", "optim.optimizer: '(absent)' -> 'adamw'"]


@pytest.mark.parametrize("momentum", [0.999, 1.0])
def test_pretrain_guard_sees_bad_params_through_their_ema(momentum):
    """The pretraining state's params are not read by the guard (`TrainState.FINITE_IMPLIED`):
    a NaN / inf parameter is still caught, through the EMA every step writes (even at momentum
    1: inf * 0 is NaN). A step that broke that invariant would go unseen: the proof that params
    are not read."""
    state = init_train_state({"params": {"w": jnp.ones((3,))}}, optax.sgd(1.0), 2, 4, 2,
                             jnp.float32, jax.random.PRNGKey(0))

    def step(state, g, ema):
        params = jax.tree_util.tree_map(lambda p: p - g, state.params)
        ema_params = ema_update(state.ema_params, params, momentum) if ema else state.ema_params
        return state.replace(params=params, ema_params=ema_params), {"loss": jnp.float32(0.0)}

    guarded = jax.jit(nonfinite.guard(step, "stop"), static_argnums=2)
    for bad in (np.inf, -np.inf, np.nan):
        g = jnp.asarray([0.0, bad, 0.0])
        assert float(guarded(state, g, True)[1]["finite"]) == 0.0
        assert float(guarded(state, g, False)[1]["finite"]) == 1.0
    assert float(guarded(state, jnp.full((3,), 0.5), True)[1]["finite"]) == 1.0
