"""`python -m ms3_jax.main` and the launchers: configs found from any directory, --print_config,
usage errors, the exit-code contract (0 / 75 / 1 / 2) through local_multiprocess.sh and SLURM."""
import os
import subprocess
import sys

import pytest

from ms3_jax import main as main_module
from ms3_jax.engine import exit_codes
from ms3_jax.testing.paths import ROOT, subprocess_env


def _main(args, cwd):
    return subprocess.run([sys.executable, "-m", "ms3_jax.main", *args], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_config_paths_resolve_against_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert main_module.resolve_config_argv(["m", "--config=configs/demo.py:quick"]) == [
        "m", f"--config={os.path.join(ROOT, 'configs', 'demo.py')}:quick"]
    assert main_module.resolve_config_argv(["m", "--config", "configs/pretrain.py"]) == [
        "m", "--config", os.path.join(ROOT, "configs", "pretrain.py")]
    os.makedirs(tmp_path / "configs")
    (tmp_path / "configs" / "demo.py").write_text("")
    # A file that exists relative to the working directory wins.
    assert main_module.resolve_config_argv(["m", "--config=configs/demo.py"]) == [
        "m", "--config=configs/demo.py"]


def test_pyproject_lists_every_package():
    """pyproject.toml lists the packages (configs/ is mapped into ms3_jax.configs): none missing."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        tool = tomllib.load(f)["tool"]["setuptools"]
    found = set()
    for top, name in (("ms3_jax", "ms3_jax"), ("configs", "ms3_jax.configs")):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files:
                rel = os.path.relpath(d, os.path.join(ROOT, top))
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    assert set(tool["packages"]) == found
    assert tool["package-dir"] == {"ms3_jax.configs": "configs"}


@pytest.mark.slow
def test_configs_resolve_from_a_wheel_install(tmp_path):
    """A wheel carries configs/: `--config=configs/...` works with no checkout in sight."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", ROOT, "-w", str(tmp_path / "wheel")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("ms3_jax-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                              str(tmp_path / "site"), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    env = {**subprocess_env(), "PYTHONPATH": str(tmp_path / "site")}  # before the editable install
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    where = run("-c", "import ms3_jax.main as m; print(m.__file__)")
    assert where.stdout.strip().startswith(str(tmp_path / "site")), where.stderr[-2000:]
    for config, expect in (("configs/demo.py:quick", "mode: demo"),
                           ("configs/finetune/voc.py:tiny", "mode: finetune")):
        done = run("-m", "ms3_jax.main", f"--config={config}", "--print_config")
        assert done.returncode == 0 and expect in done.stdout, done.stderr[-2000:]


@pytest.mark.slow  # subprocesses
def port_is_free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _fake(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("codes, expected", [((0, 0), 0), ((75, 75), 75), ((75, 0), 75),
                                             ((75, 1), 1), ((2, 75), 2), ((1, 2), 1)])
def test_local_launcher_passes_the_exit_code_contract(tmp_path, codes, expected):
    """launch/local_multiprocess.sh: 75 (relaunch to resume) survives, a failure outranks it."""
    python = _fake(tmp_path / "python", 'codes=(%s); exit "${codes[$MS3_PROCESS_ID]}"\n'
                   % " ".join(map(str, codes)))
    done = subprocess.run(["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), "2", "1",
                           "--", "--config=x"], env={**os.environ, "PYTHON": python, "PORT": "1",
                                                     "LOG_DIR": str(tmp_path / "logs")},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == expected, done.stderr


def _slurm_job(tmp_path, srun_body: str, job_id: int = 123):
    """launch/slurm_gpu.sbatch inside a simulated 2-node job: `srun` and `scontrol` are fakes (the
    node list expands to localhost and node2; `scontrol requeue` is recorded)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _fake(bin_dir / "srun", srun_body)
    _fake(bin_dir / "scontrol", 'if [[ "$1 $2" == "show hostnames" ]]; then printf "localhost\\nnode2\\n"; '
          f'else echo "$@" > {tmp_path / "scontrol.args"}; fi\n')
    path = f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    return subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "slurm_gpu.sbatch"), "--config=configs/pretrain.py:tiny",
         "--print_config"],
        env={**subprocess_env(devices=4), "PATH": path, "SLURM_JOB_ID": str(job_id),
             "SLURM_JOB_NODELIST": "localhost,node2", "SLURM_NNODES": "2",
             "SLURM_SUBMIT_DIR": ROOT}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("rc", [0, 75, 1])
def test_slurm_script_requeues_on_75(tmp_path, rc):
    done = _slurm_job(tmp_path, f"exit {rc}\n")
    assert done.returncode == rc, done.stderr
    requeued = (tmp_path / "scontrol.args").exists()
    assert requeued == (rc == 75)
    if requeued:
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "123"]


@pytest.mark.slow  # subprocesses
def test_slurm_script_runs_one_process_per_node_on_all_its_devices(tmp_path):
    """The script's own variables (MS3_COORDINATOR on the first node, MS3_PROCESS_ID per task)
    start a 2-process job whose processes each drive all their local devices; srun's tasks are
    run here as local processes."""
    srun = ('while [[ "$1" == --* ]]; do shift; done\n'  # srun's options
            'pids=(); for ((i = 0; i < SLURM_NNODES; i++)); do\n'
            f'  SLURM_PROCID=$i SLURM_LOCALID=0 "$@" > {tmp_path}/task_$i.log 2>&1 & pids+=($!)\n'
            'done\nrc=0; for p in "${pids[@]}"; do wait $p; r=$?; (( r > rc )) && rc=$r; done\n'
            'exit $rc\n')
    import random
    port = next(p for p in iter(lambda: random.randrange(20000, 39999), None)  # the script's
                if port_is_free(p) and port_is_free(p + 1))  # 20000 + job id % 20000, and + 1
    done = _slurm_job(tmp_path, srun, job_id=port - 20000)
    logs = [(tmp_path / f"task_{i}.log").read_text() for i in range(2)]
    assert done.returncode == 0, done.stderr + "\n".join(log[-2000:] for log in logs)
    for i, log in enumerate(logs):
        assert (f"jax.distributed: process {i} of 2, coordinator localhost:{port} (explicit), "
                "4 local devices") in log, log[-2000:]


@pytest.mark.slow  # subprocesses
def test_second_run_on_a_workdir_stops_naming_the_first(tmp_path):
    """The lock of a live run refuses a second one (pid and host named); a dead run's lock file
    is taken over (the kernel released its lock)."""
    from ms3_jax.engine import workdir_lock
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ms3_jax.engine import workdir_lock\n"
        f"with workdir_lock.hold({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        bad = _main(["--config=configs/pretrain.py:tiny", f"--workdir={tmp_path}"], cwd=tmp_path)
        assert bad.returncode == exit_codes.USAGE
        assert f"workdir {tmp_path} is in use by" in bad.stderr
        assert f'"pid": {holder.pid}' in bad.stderr
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock.hold(str(tmp_path)):  # taken over from the killed holder
        assert str(os.getpid()) in (tmp_path / workdir_lock.LOCK_FILE).read_text()


def _catches_sigterm(pid: int) -> bool:
    """Linux: the process has a SIGTERM handler (bit 15 of SigCgt in /proc/<pid>/status)."""
    import signal
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGTERM - 1) & 1)


@pytest.mark.slow  # subprocesses
@pytest.mark.parametrize("when", ["imports", "compiling the first step"])
def test_sigterm_outside_the_loop_exits_75(tmp_path, when):
    """The exit-code contract from process start: SIGTERM while the modules import, or while
    stage 1 compiles its first step, gives 75, not 143 -- within seconds, not after the compile,
    the step and a save (a Python handler would wait for the compile: `loop`'s watcher thread)."""
    import signal
    import time
    args = [sys.executable, "-m", "ms3_jax.main", "--config=configs/text_adapt.py:tiny",
            f"--workdir={tmp_path / 'w'}", f"--config.data.data_dir={tmp_path / 'data'}",
            f"--config.text.tiny_clip_dir={tmp_path / 'clip'}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    try:
        if when == "imports":  # as soon as the process catches SIGTERM (the top of ms3_jax.main)
            deadline = time.monotonic() + 60
            while not _catches_sigterm(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        else:  # the loop's line before the first step's compile
            for line in proc.stderr:
                if "compiling the training step" in line:
                    break
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 75, err[-2000:]
    if when != "imports":
        assert "SIGTERM before the first training step: nothing new saved" in err, err[-2000:]
        assert not (tmp_path / "w" / "checkpoints" / "1").exists() and took < 5, took
