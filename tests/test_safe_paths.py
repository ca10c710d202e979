"""Issue 31: no write follows a planted link or lands in another user's directory; no default
path in world-writable /tmp; `ms3_jax.data.prepare` stops cleanly on SIGTERM; a resumed demo
summarises real losses. One test per attack, all in-process (file system only, no compile)
except the launchers', which runs one bash script.

Another user is simulated without a second account: as root, a directory is given to uid 4242
(`os.chown`); otherwise `os.getuid` is made to return another uid, so that this user's own
directories look foreign (`safe.refuse_foreign_dir` decides, with `os.getuid`, alone).
"""
import json
import math
import os
import re
import signal
import subprocess
import tempfile
import time

import ml_collections
import pytest
import tensorflow_datasets as tfds
from tensorboardX import SummaryWriter

from configs import demo as demo_config
from configs import pretrain as pretrain_config
from configs import text_adapt as text_adapt_config
from configs.finetune import ade20k, cityscapes, coco_stuff, mapillary, voc
from ms3_jax.data import prepare, synthetic
from ms3_jax.demo import job as demo
from ms3_jax.demo import tiny_clip
from ms3_jax.engine import exit_codes, workdir_lock
from ms3_jax.files import safe
from ms3_jax.testing.paths import ROOT

OTHER_UID = 4242


def _foreign(path, monkeypatch) -> None:
    """Make `path` (which exists) another user's directory, as far as this process can tell."""
    if os.getuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
    else:
        real = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real + 1)


def _victim(tmp_path):
    """A file of the user's that a planted link points at; must stay as it is."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    return victim


# Attack 1: a lock file opened through a symbolic link planted at its path.
def test_lock_files_refuse_a_planted_symlink(tmp_path):
    victim = _victim(tmp_path)
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / workdir_lock.LOCK_FILE).symlink_to(victim)
    with pytest.raises(safe.UnsafePath, match=rf"{re.escape(str(workdir / '.lock'))} is a symbolic link"):
        with workdir_lock.hold(str(workdir)):
            pass
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / ".build.lock").symlink_to(victim)
    with pytest.raises(safe.UnsafePath, match=r"\.build\.lock is a symbolic link .*victim\.txt"):
        synthetic.prepare_synthetic(str(data_dir), num_train=1, num_val=1, image_size=16)
    for mode in ("w", "a+", "wb"):
        with pytest.raises(safe.UnsafePath):
            safe.open_nofollow(str(data_dir / ".build.lock"), mode)
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(data_dir)) == [".build.lock"]  # nothing built
    # Without the link: the lock is taken and names its holder.
    (workdir / workdir_lock.LOCK_FILE).unlink()
    with workdir_lock.hold(str(workdir)):
        assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
    # Every module that takes a file lock opens it with open_nofollow.
    for dirpath, _, files in os.walk(os.path.join(ROOT, "ms3_jax")):
        for name in files:
            text = open(os.path.join(dirpath, name)).read() if name.endswith(".py") else ""
            if "fcntl.flock(" in text:
                assert "open_nofollow(" in text, os.path.join(dirpath, name)


# Attack 1: the launchers' logs and the pod's archive at fixed /tmp names.
@pytest.mark.slow  # one bash process (it runs the launchers with fake python / tar / gcloud)
def test_launchers_write_logs_and_archive_in_fresh_private_dirs(tmp_path):
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (tmp_path / "tmpdir").mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {
        "python": "exit 0\n",
        "tar": 'prev=; for a; do [[ $prev == -czf ]] && { echo "$a" > "$REC/tar_out"; : > "$a"; }; '
               'prev=$a; done\n',
        "gcloud": 'echo "$*" >> "$REC/gcloud"; [[ $4 == scp && -f $5 ]] && echo "$5" > "$REC/scp_src"\n'
                  'exit 0\n',
    }.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    if os.getuid() == 0:
        os.chown(foreign, OTHER_UID, OTHER_UID)
    else:
        foreign = "/"  # root's: not the user's
    local, pod = (os.path.join(ROOT, "launch", n) for n in ("local_multiprocess.sh", "tpu_vm_pod.sh"))
    script = f"""
set -u
bash -n {local} && bash -n {pod} && echo syntax=ok
run() {{ PYTHON=python PORT=1 bash {local} 1 1 -- --config=x; }}
out=$(run 2>&1); echo "default_rc=$?"; echo "default_out=$out"
out=$(LOG_DIR={tmp_path}/link run 2>&1); echo "link_rc=$?"; echo "link_out=$out"
out=$(LOG_DIR={foreign} run 2>&1); echo "foreign_rc=$?"; echo "foreign_out=$out"
TPU_NAME=t CREATE=0 WORKDIR=gs://b/w DATA_DIR=gs://b/d bash {pod} >/dev/null 2>&1; echo "pod_rc=$?"
"""
    os.symlink(victim_dir, tmp_path / "link")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path / "tmpdir"),
           "REC": str(tmp_path)}
    env.pop("LOG_DIR", None)
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    out = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line and
               line.split("=", 1)[0] in ("syntax", "default_rc", "default_out", "link_rc", "link_out",
                                          "foreign_rc", "foreign_out", "pod_rc"))
    assert out.get("syntax") == "ok", done.stderr
    # The default log directory: a fresh mktemp -d one (private), printed.
    assert out["default_rc"] == "0", out
    log_dir = re.search(r"logs in (\S+)", out["default_out"]).group(1)
    assert re.fullmatch(re.escape(str(tmp_path / "tmpdir")) + r"/ms3_local_multiprocess\.\w{6}", log_dir)
    assert os.path.isfile(os.path.join(log_dir, "process_0.log"))
    assert os.stat(log_dir).st_mode & 0o077 == 0
    # An explicit LOG_DIR that is a link, or another user's: refused (usage error), nothing written.
    assert out["link_rc"] == "2" and "symbolic link" in out["link_out"], out
    assert out["foreign_rc"] == "2" and "not a directory of yours" in out["foreign_out"], out
    assert os.listdir(victim_dir) == []
    # The pod archive: built in a fresh directory under $TMPDIR, copied from there, then removed.
    assert out["pod_rc"] == "0", out
    archive = (tmp_path / "tar_out").read_text().strip()
    assert re.fullmatch(re.escape(str(tmp_path / "tmpdir")) + r"/ms3_jax_pod\.\w{6}/ms3_jax\.tgz", archive)
    assert (tmp_path / "scp_src").read_text().strip() == archive
    assert not os.path.exists(os.path.dirname(archive))


# Attack 2: default data, tiny CLIP and demo paths in world-writable /tmp.
def test_default_paths_are_per_user_not_in_tmp(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/home/someone/.cache")  # only named, never created
    cache = "/home/someone/.cache/ms3_jax"
    configs = {"demo": demo_config.get_config(None), "demo:rn50": demo_config.get_config("rn50"),
               "pretrain:tiny": pretrain_config.get_config("tiny"),
               "text_adapt:tiny": text_adapt_config.get_config("tiny"),
               "text_adapt:rn50,tiny": text_adapt_config.get_config("rn50,tiny")}
    configs.update({f"finetune/{m.__name__.split('.')[-1]}:tiny": m.get_config("tiny")
                    for m in (ade20k, cityscapes, coco_stuff, mapillary, voc)})

    def strings(tree, prefix=""):
        if isinstance(tree, (dict, ml_collections.ConfigDict)):
            for k, v in tree.items():
                yield from strings(v, f"{prefix}{k}.")
        elif isinstance(tree, str):
            yield prefix[:-1], tree
    tmp_roots = ("/tmp", "/var/tmp", tempfile.gettempdir())
    in_tmp = [f"{name}: {k}={v}" for name, c in configs.items() for k, v in strings(c)
              if v.startswith(tmp_roots)]
    assert not in_tmp, in_tmp
    assert configs["pretrain:tiny"].data.data_dir == os.path.join(cache, "data", "synthetic")
    assert configs["finetune/voc:tiny"].data.data_dir == os.path.join(cache, "data", "finetune_synthetic")
    assert configs["text_adapt:tiny"].text.tiny_clip_dir == os.path.join(cache, "tiny_clip_2towers")
    assert configs["text_adapt:rn50,tiny"].text.tiny_clip_dir == os.path.join(cache, "tiny_clip_rn50")
    assert configs["demo"].default_workdir == os.path.join("runs", "demo")
    # The docs quote the demo's workdir as the config has it, and no /tmp default anywhere.
    readme = open(os.path.join(ROOT, "README.md")).read()
    usage = open(os.path.join(ROOT, "docs", "usage.md")).read()
    assert "--config=configs/demo.py --workdir=runs/demo\n" in readme
    assert "`runs/demo/`" in usage and "--workdir runs/demo" in usage
    stale = ("/tmp/ms3_demo", "/tmp/ms3_jax_data", "/tmp/ms3_local_multiprocess", "/tmp/ms3_jax.tgz",
             "ms3_jax_test_xla_cache")
    found = []
    for top in ("README.md", "docs", "configs", "launch", "ms3_jax", "notebooks", "benchmarks"):
        paths = [os.path.join(ROOT, top)] if top.endswith(".md") else [
            os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, top)) for f in fs
            if f.endswith((".py", ".md", ".sh", ".sbatch", ".ipynb")) and f != "RESULTS.md"]
        found += [f"{p}: {s}" for p in paths for s in stale if s in open(p).read()]
    assert not found, found


# Attack 3: a data dir, tiny CLIP dir or workdir that another user created (or one inside theirs).
def test_another_users_directories_are_refused(tmp_path, monkeypatch):
    own = tmp_path / "own"
    safe.make_own_dir(str(own / "a" / "b"))  # the user's own: created, no complaint
    safe.refuse_foreign_dir(str(own))
    data_dir, clip_dir, workdir = (tmp_path / n for n in ("data", "clip", "w"))
    for d in (data_dir, clip_dir, workdir):
        d.mkdir()
    (clip_dir / "config.json").write_text('{"planted": true}')  # would be read as a checkpoint
    for d in (data_dir, clip_dir, workdir):
        _foreign(d, monkeypatch)
    if os.getuid() != 0:  # every directory of the user's looks foreign now
        assert pytest.raises(safe.UnsafePath, safe.refuse_foreign_dir, str(own))
    synth = dict(num_train=1, num_val=1, image_size=16)
    calls = [
        ("data_dir", data_dir, lambda: synthetic.prepare_synthetic(str(data_dir), **synth)),
        ("data_dir", data_dir, lambda: demo.prepare_builtin(ml_collections.ConfigDict(
            {"data": {"synthetic": synth, "data_dir": str(data_dir)}}))),
        ("text.tiny_clip_dir", clip_dir, lambda: tiny_clip.write_for_config(
            ml_collections.ConfigDict({"text": {"tiny_clip_dir": str(clip_dir)}, "encoder": "clip"}))),
        ("workdir", workdir, lambda: workdir_lock.hold(str(workdir)).__enter__()),
    ]
    for what, path, call in calls:
        with pytest.raises(safe.UnsafePath, match=rf"^{re.escape(what)} {re.escape(str(path))} "
                           r"belongs to another user \(uid \d+\); refusing"):
            call()
    # One that would be created inside another user's world-writable directory is refused too;
    # inside their group-shared one (a project's scratch space, not writable by all) it is fine.
    data_dir.chmod(0o777)
    with pytest.raises(safe.UnsafePath, match=r"data_dir .*/data/new would be created inside .*/data, which "
                       r"belongs to another user \(uid \d+\) and anyone may write in it"):
        synthetic.prepare_synthetic(str(data_dir / "new"), **synth)
    assert sorted(os.listdir(data_dir)) == [] and sorted(os.listdir(workdir)) == []
    data_dir.chmod(0o775)
    safe.refuse_foreign_dir(str(data_dir / "new"), "data_dir", creating=True)
    # safe.py is the single place that looks at owners.
    owners = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "ms3_jax")) for f in fs
              if f.endswith(".py") and re.search(r"st_uid|getuid|geteuid", open(os.path.join(d, f)).read())]
    assert owners == [os.path.join(ROOT, "ms3_jax", "files", "safe.py")], owners


# Attack 4: SIGTERM during `python -m ms3_jax.data.prepare`: exit 143 and incomplete.* left.
def test_prepare_sigterm_exits_75_and_removes_its_incomplete_dir(tmp_path, monkeypatch, capsys):
    data_dir = tmp_path / "tfds"
    other = data_dir / "ms3_ade20k" / "incomplete.OTHER1_1.0.0"  # another build's: stays
    other.mkdir(parents=True)

    def build(name, manual_dir, data_dir_, **kwargs):
        # tfds's own incomplete directory, and one the signal catches before tfds's cleanup runs.
        stray = data_dir / "ms3_ade20k" / "cfg" / "incomplete.STRAY2_1.0.0"
        stray.mkdir(parents=True)
        (stray / "shard-00000").write_bytes(b"x")
        with tfds.core.utils.incomplete_dir(os.path.join(data_dir_, "ms3_ade20k", "1.0.0")) as tmp:
            open(os.path.join(tmp, "shard-00000"), "wb").close()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # not reached: the handler raises
        raise AssertionError("SIGTERM did not stop the build")

    monkeypatch.setattr(prepare.builders, "prepare", build)
    monkeypatch.setattr(prepare.tfds, "disable_progress_bar", lambda: None)
    monkeypatch.setattr(prepare.logging, "basicConfig", lambda **kwargs: None)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        prepare.main(["--dataset", "ade20k", "--manual_dir", str(tmp_path), "--data_dir", str(data_dir)])
    assert stopped.value.code == prepare.PREEMPTED == exit_codes.PREEMPTED == 75
    assert prepare.incomplete_dirs(str(data_dir)) == {str(other)}
    assert sorted(os.listdir(data_dir / "ms3_ade20k")) == ["cfg", other.name]
    err = capsys.readouterr().err
    assert "stopped by SIGTERM" in err and "STRAY2" in err and "exit code 75" in err
    assert signal.getsignal(signal.SIGTERM) is before


# Attack 5: a resumed demo wrote NaN for loss_first / loss_last.
def test_resumed_demo_summary_has_real_losses(tmp_path):
    pre_dir = tmp_path / "pretrain"
    tb = str(pre_dir / "tensorboard")
    # Attempt 1 logged steps 100..700 and was preempted after its checkpoint at 500; attempt 2
    # redid 600, 700 and finished at 1500 (every 100 steps, as the demo logs).
    for attempt, steps, offset in ((1, range(100, 800, 100), 0.5), (2, range(600, 1600, 100), 0.0)):
        writer = SummaryWriter(tb, filename_suffix=f".attempt{attempt}")
        for s in steps:
            writer.add_scalar("train/loss", 3.0 - s / 1000 + offset, s, walltime=1000.0 * attempt + s)
            writer.add_scalar("train/lr", 0.1, s, walltime=1000.0 * attempt + s)
        writer.close()
    with open(next(os.path.join(tb, f) for f in os.listdir(tb) if f.endswith("attempt2")), "ab") as f:
        f.write(b"\x40\x00\x00")  # a record cut short by a kill
    logged = demo.logged_scalars(tb, "train/loss")
    assert sorted(logged) == list(range(100, 1600, 100))
    assert logged[600] == pytest.approx(2.4) and logged[500] == pytest.approx(3.0)  # latest wins
    want_first, want_last = (sum(logged[s] for s in steps) / 3 for steps in ((100, 200, 300),
                                                                            (1300, 1400, 1500)))
    # Attempt 3 found pretraining finished (no step in memory), or resumed at 1000.
    for history in ([], [{"step": s, "loss": 1.0, "lr": 0.1} for s in range(1001, 1501)]):
        summary = demo.loss_summary(history, str(pre_dir))
        assert summary["loss_first"] == pytest.approx(want_first)
        assert summary["loss_last"] == pytest.approx(want_last)
        assert "tensorboard" in summary["loss_from"]
        json.dumps(summary, allow_nan=False)  # real numbers
    # A run that was not resumed keeps its every-step figures (skipped, non-finite steps out).
    fresh = [{"step": s, "loss": float(s)} for s in range(1, 11)] + [{"step": 11, "loss": math.nan}]
    assert demo.loss_summary(fresh, str(tmp_path / "none")) == {
        "loss_first": 1.5, "loss_last": 9.5, "loss_from": "every step"}
    nothing = demo.loss_summary([], str(tmp_path / "none"))
    assert nothing["loss_first"] is None and json.dumps(nothing, allow_nan=False)
    assert "loss_summary(history, pre_dir)" in open(demo.__file__).read()  # what run() writes
