"""`python -m ms3_jax.main`: configs found from any directory, --print_config, usage errors."""
import os
import subprocess
import sys

from ms3_jax import main as main_module
from tests.test_reliability import ROOT, subprocess_env


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


def test_print_config_from_another_directory_and_usage_error_exit_code(tmp_path):
    done = _main(["--config=configs/pretrain.py:tiny", "--config.loss.tau=0.5", "--print_config"],
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tau: 0.5" in done.stdout and "synth_a" in done.stdout
    bad = _main(["--config=configs/pretrain.py:tiny", f"--workdir={tmp_path / 'w'}"], cwd=tmp_path)
    assert bad.returncode == main_module.USAGE_EXIT_CODE
    assert "error: text.embeddings is unset" in bad.stderr and "Traceback" not in bad.stderr
    verbose = _main(["--config=configs/pretrain.py:tiny", f"--workdir={tmp_path / 'w'}",
                     "--verbose"], cwd=tmp_path)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
