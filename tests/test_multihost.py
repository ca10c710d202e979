"""Multi-host: 2 processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) train
like 1 process x 8 devices on the same global batches, checkpoint, and fail fast when a peer dies.

The workers: `python -m ms3_jax.testing.multihost_worker '<json args>'`.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from ms3_jax.engine import processes, sharding
from ms3_jax.testing.multihost_worker import NUM_STEPS, make_config
from ms3_jax.testing.paths import ROOT, compilation_cache_dir, xla_flags

pytestmark = pytest.mark.slow  # end-to-end runs: the full tier (.ci/run), not `-m "not slow"`

STOP_AT = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_step_env(process_id: int, coordinator_port: int) -> dict:
    """A simulated 2-task SLURM step on this host, as srun sets it (JAX_COORDINATOR_PORT moves
    JAX's port, derived from the job id, to a free one)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(process_id), "SLURM_LOCALID": str(process_id),
            "JAX_COORDINATOR_PORT": str(coordinator_port)}


def spawn(args: dict, process_id: int, extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(extra_env or {}), "XLA_FLAGS": xla_flags(4) + " --xla_cpu_collective_timeout_seconds=600",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,  # conftest's compilation cache
           "JAX_COMPILATION_CACHE_DIR": compilation_cache_dir(),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    return subprocess.Popen([sys.executable, "-m", "ms3_jax.testing.multihost_worker",
                             json.dumps({**args, "process_id": process_id})],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_two_processes(args: dict, timeout: float = 300) -> list[dict]:
    """Both processes' histories (asserted equal: replicated metrics) of one 2 x 4 run."""
    procs = [spawn(args, i) for i in range(2)]
    t0 = time.perf_counter()
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    print(f"2-process run: {time.perf_counter() - t0:.1f} s")
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    h0, h1 = (json.load(open(args["out"] + f".{i}")) for i in range(2))
    assert h0 == h1
    return h0


def assert_histories_close(got, want, what):
    assert [h["step"] for h in got] == [h["step"] for h in want], what
    for a, b in zip(got, want):
        rel = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for k in b)
        worst = max(b, key=lambda k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-6))
        print(f"{what}, step {b['step']}: max relative difference {rel:.1e} ({worst})")
        assert set(a) == set(b)
        for k in b:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=f"{what} step {b['step']} {k}")


def assert_states_close(a, b, what, rtol=1e-5):
    """Every leaf of two raw state trees within `rtol` (the worst leaves are printed)."""
    import jax
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    errors = []
    for (path, x), y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, jax.tree_util.keystr(path)
        rel = np.abs(x - y) / (rtol * np.abs(y) + 1e-7)  # <= 1 passes assert_allclose(rtol, 1e-7)
        errors.append((float(rel.max()) if x.size else 0.0, jax.tree_util.keystr(path)))
    errors.sort(reverse=True)
    print(f"{what}: worst leaves (difference / ({rtol} |ref| + 1e-7)): {errors[:3]}")
    assert errors[0][0] <= 1.0, f"{what}: {[e for e in errors if e[0] > 1.0]}"


def test_two_processes_train_like_one_and_resume_across_layouts(tmp_path):
    """2 processes x 4 devices == 1 process x 8 devices (losses every step, the whole state at the
    checkpoint; 8 devices == 1: tests/test_pretrain.py); the 2-process checkpoint resumes on both
    layouts to the same end."""
    import jax
    from ms3_jax.engine import checkpointing
    from ms3_jax.method import text_embeddings
    from ms3_jax.stages import pretrain
    from ms3_jax.testing import synthetic_data
    from ms3_jax.testing.pretrain_inputs import label_space, random_text
    data_dir, text_path = synthetic_data.build(tmp_path).data_dir, str(tmp_path / "T.npz")
    config = make_config(data_dir, text_path)
    text_embeddings.save_text_embeddings(text_path, label_space(), random_text(config.model.emb_dim),
                                         "template")
    args = {"mode": "train", "coordinator": f"127.0.0.1:{free_port()}", "heartbeat": 30,
            "data_dir": data_dir, "text": text_path, "workdir": str(tmp_path / "wd"),
            "out": str(tmp_path / "history.json"), "stop_at": STOP_AT}
    first = run_two_processes(args)
    assert [h["step"] for h in first] == list(range(1, STOP_AT + 1))
    wd = tmp_path / "wd"
    # Only process 0 wrote the user-facing files (no relations report before the last step).
    assert (wd / "config.json").exists() and not (wd / "relations.txt").exists()
    assert len(list((wd / "tensorboard").iterdir())) == 1
    assert checkpointing.checkpoint_manager(str(wd)).all_steps() == [2, 4]
    shutil.copytree(wd, tmp_path / "wd_one")

    with jax.enable_x64(True):
        ref = pretrain.train_and_evaluate(config, str(tmp_path / "ref"))  # 1 process x 8, straight
        resumed_one = pretrain.train_and_evaluate(config, str(tmp_path / "wd_one"))
        _, ref_state_4 = checkpointing.restore_state(str(tmp_path / "ref"), STOP_AT)
        _, two_state_4 = checkpointing.restore_state(str(wd), STOP_AT)  # written by 2 x 4
    assert_histories_close(first, ref[:STOP_AT], "2 x 4 vs 1 x 8")
    assert two_state_4["params"]["backbone"]["conv1"]["kernel"].dtype == np.float64
    assert_states_close(two_state_4, ref_state_4, "2 x 4 vs 1 x 8 state at step 4")
    assert ref[STOP_AT - 1]["relations"] > 0 and ref[STOP_AT - 1]["loss_visual"] > 0

    # The 2-process checkpoint resumes on 1 x 8 (above) and on 2 x 4, both like the straight run.
    resumed_two = run_two_processes({**args, "coordinator": f"127.0.0.1:{free_port()}", "stop_at": None})
    assert_histories_close(resumed_one, ref[STOP_AT:], "resumed on 1 x 8")
    assert_histories_close(resumed_two, ref[STOP_AT:], "resumed on 2 x 4")
    with jax.enable_x64(True):
        _, ref_end = checkpointing.restore_state(str(tmp_path / "ref"))
        _, two_end = checkpointing.restore_state(str(wd))
        _, one_end = checkpointing.restore_state(str(tmp_path / "wd_one"))
    assert int(two_end["step"]) == int(one_end["step"]) == NUM_STEPS
    # After the resume the float64 differences stay where they were at step 4 (losses 1e-13; the
    # whole state within rtol 1e-5, 6e4 times over), as a resume on the same layout is
    # bit-exact. (Synthetic data 1.1.0 with the heads on the decoder had shown losses 1e-9 and
    # momentum traces 1.7e-4 off two steps after the resume; measured again 2026-12-04: gone.)
    assert_states_close(two_end, ref_end, "resumed on 2 x 4, final state")
    assert_states_close(one_end, ref_end, "resumed on 1 x 8, final state")
    assert (wd / "relations.txt").exists()


def wait_until_initialised(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    while line and "initialised" not in line:
        line = proc.stdout.readline()
    assert line, proc.communicate()[0][-3000:]
    return line.strip()


@pytest.mark.parametrize("killed, launch", [(1, "explicit"), (0, "explicit"), (0, "slurm")])
def test_dead_peer_fails_the_other_process_fast(killed, launch):
    """kill -9 of either process: the other ends with exit code 1 within seconds, naming it
    (`processes.watch_peers`; the heartbeat is set to 60 s, so XLA's abort is not what ends it).
    Also in a SLURM step found by JAX's cluster detection (launch 'slurm', no MS3_*)."""
    if launch == "explicit":
        args, envs = {"coordinator": f"127.0.0.1:{free_port()}"}, [None, None]
    else:
        port = free_port()
        args, envs = {"coordinator": None}, [slurm_step_env(i, port) for i in range(2)]
    args.update(mode="wait", heartbeat=60)
    procs = [spawn(args, i, envs[i]) for i in range(2)]
    try:
        for p in procs:  # both past initialize
            wait_until_initialised(p)
        procs[killed].send_signal(signal.SIGKILL)
        t0 = time.perf_counter()
        survivor = procs[1 - killed]
        out = survivor.communicate(timeout=60)[0]
        elapsed = time.perf_counter() - t0
        print(f"process {1 - killed} exited {elapsed:.1f} s after process {killed} was killed, "
              f"code {survivor.returncode}")
        assert survivor.returncode == 1, out[-3000:]
        assert f"process {killed} of the job is gone" in out and elapsed < 15, out[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("mode, code, stopper, n", [("raise", 1, 1, 2), ("preempt", 75, 1, 2),
                                                    ("raise", 1, 0, 2), ("preempt", 75, 2, 3)])
def test_a_process_that_stops_alone_stops_the_others_with_its_code(mode, code, stopper, n):
    """Process `stopper` exits on its own (an error: 1; SIGTERM before the loop: 75) while the
    others wait in collectives: they stop within MS3_PEER_EXIT_GRACE (3 s here) with 1 / 75,
    naming it (process 0 tells the others), instead of waiting for XLA's timeouts; and it keeps
    its own exit code (it waits in jax.distributed's shutdown barrier, which they join)."""
    args = {"coordinator": f"127.0.0.1:{free_port()}", "heartbeat": 60, "num_processes": n}
    grace = {"MS3_PEER_EXIT_GRACE": "3"}
    procs = [spawn({**args, "mode": mode if i == stopper else "wait"}, i, grace) for i in range(n)]
    others = [i for i in range(n) if i != stopper]
    try:
        wait_until_initialised(procs[others[0]])
        t0 = time.perf_counter()
        outs = {i: procs[i].communicate(timeout=120)[0] for i in others}
        elapsed = time.perf_counter() - t0
        procs[stopper].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    print(f"{mode} in process {stopper} of {n}: exit codes {codes}, the others within {elapsed:.1f} s")
    assert codes == [code] * n, {i: out[-3000:] for i, out in outs.items()}
    what = "was preempted (exit code 75)" if code == 75 else "stopped with exit code 1"
    for i in others:
        assert (f"process {stopper} of the job {what}; process {i} stops too, exit code {code}"
                in outs[i]), outs[i][-3000:]
    assert elapsed < 30, elapsed  # the stopper's start-up + the 3 s grace


def test_sigterm_to_one_process_before_the_loop_ends_the_job_with_75(tmp_path):
    """`python -m ms3_jax.main` on 2 processes: SIGTERM to process 1 just after start-up (75,
    nothing saved) makes process 0 exit 75 too, naming it, within MS3_PEER_EXIT_GRACE."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(4),
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1",
           "MS3_COORDINATOR": f"127.0.0.1:{free_port()}", "MS3_NUM_PROCESSES": "2",
           "MS3_PEER_EXIT_GRACE": "5"}
    args = [sys.executable, "-m", "ms3_jax.main", "--config=configs/text_adapt.py:tiny",
            f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={tmp_path / 'data'}",
            f"--config.text.tiny_clip_dir={tmp_path / 'clip'}"]
    procs = [subprocess.Popen(args, cwd=ROOT, env={**env, "MS3_PROCESS_ID": str(i)},
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        for line in procs[1].stderr:
            if "jax.distributed: process 1 of 2" in line:
                break
        procs[1].send_signal(signal.SIGTERM)
        t0 = time.perf_counter()
        errs = [p.communicate(timeout=120)[1] for p in procs]
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"exit codes {[p.returncode for p in procs]}, {elapsed:.1f} s after the SIGTERM")
    assert [p.returncode for p in procs] == [75, 75], [e[-2000:] for e in errs]
    assert ("process 1 of the job was preempted (exit code 75); process 0 stops too, exit code "
            "75") in errs[0], errs[0][-2000:]
    assert elapsed < 60, elapsed


def test_a_death_is_relayed_by_process_0_naming_the_dead_process():
    """Three processes; process 2 is killed: process 0 sees it and stops at once, telling
    process 1, which names process 2 (not process 0) and stops too."""
    args = {"coordinator": f"127.0.0.1:{free_port()}", "mode": "wait", "heartbeat": 60,
            "num_processes": 3}
    procs = [spawn(args, i) for i in range(3)]
    try:
        for p in procs:
            wait_until_initialised(p)
        procs[2].send_signal(signal.SIGKILL)
        outs = [p.communicate(timeout=60)[0] for p in procs[:2]]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i in (0, 1):
        assert procs[i].returncode == 1, outs[i][-3000:]
        assert (f"process 2 of the job is gone (killed or crashed: its connection closed without "
                f"a goodbye); process {i} stops too, exit code 1") in outs[i], outs[i][-3000:]


@pytest.mark.parametrize("launch", ["explicit", "slurm"])
def test_the_gpus_a_process_drives_inside_a_slurm_step(launch):
    """In a SLURM step JAX's detection gives process i the GPU SLURM_LOCALID only (one process per
    GPU, a bare `srun`); MS3_* (launch/slurm_gpu.sbatch: one process per node) must keep all
    of them, which a bare `jax.distributed.initialize` in a SLURM step did not."""
    port = free_port()
    envs = [slurm_step_env(i, port) for i in range(2)]
    if launch == "explicit":
        coordinator = f"127.0.0.1:{free_port()}"
        for i, env in enumerate(envs):
            env.update(MS3_COORDINATOR=coordinator, MS3_NUM_PROCESSES="2", MS3_PROCESS_ID=str(i))
    procs = [spawn({"coordinator": None, "mode": "exit", "heartbeat": 60}, i, envs[i])
             for i in range(2)]
    try:
        lines = [wait_until_initialised(p) for p in procs]
        outs = [p.communicate(timeout=60)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    expected = ["all", "all"] if launch == "explicit" else ["0", "1"]
    assert [line.rsplit(" ", 1)[1] for line in lines] == expected, lines
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outs]


def test_check_global_batch_names_the_numbers():
    sharding.check_global_batch(16, 8, 2)
    with pytest.raises(ValueError, match="batch_size 12 does not divide over 8 devices"):
        sharding.check_global_batch(12, 8, 1)
    with pytest.raises(ValueError, match="batch_size 9 does not divide over 2 processes"):
        sharding.check_global_batch(9, 1, 2)


def test_single_process_does_not_initialize(monkeypatch):
    for k in ("MS3_COORDINATOR", "MS3_NUM_PROCESSES", "MS3_PROCESS_ID", "SLURM_NTASKS",
              "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(processes, "_auto_detectable", lambda: False)
    assert processes.initialize_distributed() is False
    assert processes.initialize_distributed("127.0.0.1:1", 1, 0) is False
    with pytest.raises(ValueError, match="needs all of"):
        processes.initialize_distributed("127.0.0.1:1")
    mesh = sharding.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == 8


def test_an_incomplete_cluster_environment_is_named(monkeypatch):
    """SLURM_NTASKS > 1 outside an srun step (no SLURM_JOB_ID, node list, task id): an error
    naming what JAX's detection found, not a 300 s wait for a coordinator at None."""
    for k in ("MS3_COORDINATOR", "MS3_NUM_PROCESSES", "MS3_PROCESS_ID", "SLURM_JOB_ID",
              "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    with pytest.raises(processes.PeerError, match=r"SLURM_NTASKS='2'.*gave coordinator None, None "
                       r"processes, process id None.*MS3_COORDINATOR"):
        processes.initialize_distributed()


@pytest.mark.parametrize("present, launch", [(0, "explicit"), (1, "explicit"), (0, "slurm")])
def test_a_missing_process_is_named_and_the_job_exits_1(present, launch):
    """MS3_PEER_TIMEOUT: the process that came ends with exit code 1 within the timeout, naming
    the one that did not (jax.distributed alone aborted with 134 after 300 s, naming none). Also
    in a SLURM step found by JAX's cluster detection (no MS3_*)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT, "MS3_PEER_TIMEOUT": "3"}
    if launch == "explicit":
        env.update(MS3_COORDINATOR=f"127.0.0.1:{free_port()}", MS3_NUM_PROCESSES="2",
                   MS3_PROCESS_ID=str(present))
    else:
        env.update(slurm_step_env(present, free_port()))
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ms3_jax.main", "--config=configs/pretrain.py:tiny",
                           "--print_config"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.perf_counter() - t0
    assert done.returncode == 1, done.stderr[-2000:]
    expected = ("process(es) [1] of 2 did not reach the rendezvous" if present == 0 else
                "process 1: process 0 did not answer at the rendezvous")
    assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert elapsed < 60, elapsed  # start-up (imports) + the 3 s timeout

