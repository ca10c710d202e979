"""What a new user's mistakes look like on the command line (issue 32): every CLI answers each
kind of user error with one `error:` line on stderr and exit code 2 -- no traceback, no plugin
noise before it -- and `--help` exits 0. A failed start leaves no new workdir behind.

The invocations run in one child process that imports the package once and forks per command
(`ms3_jax.testing.cli_runner`), without JAX_PLATFORMS in its environment: the platform choice of
`ms3_jax.platforms` is part of what is tested (the child's own stderr, JAX's import included,
must be empty too).
"""
import json
import os
import re
import subprocess
import sys

import pytest

from ms3_jax.testing.paths import ROOT, subprocess_env

MAIN = "ms3_jax.main"
TINY = "--config=configs/pretrain.py:tiny"
# (name, module, args, what the error line must say); {w} is a fresh directory
CASES = [
    ("config typo", MAIN, [TINY, "--config.batchsize=4", "--workdir={w}/a"],
     r'--config\.batchsize: no config field .batchsize.\. Did you mean "batch_size"'),
    ("unknown config path", MAIN, ["--config=configs/nope.py", "--workdir={w}/a"],
     r"config file configs/nope\.py not found .*configs/pretrain\.py"),
    ("bad config string", MAIN, ["--config=configs/pretrain.py:bogus", "--workdir={w}/a"],
     r"unknown config string\(s\) \['bogus'\]; valid: 'deit', 'rn50', 'tiny'"),
    ("bad config value", MAIN, [TINY, "--config.batch_size=abc", "--workdir={w}/a"],
     r"--config\.batch_size=abc: invalid literal"),
    ("unknown flag", MAIN, [TINY, "--wokdir={w}/a"], r"Unknown command line flag 'wokdir'"),
    ("failed start", MAIN, [TINY, "--workdir={w}/new"], r"text\.embeddings is unset"),
    ("export without arguments", "ms3_jax.export", [],
     r"python -m ms3_jax\.export: the following arguments are required"),
    ("export of a missing workdir", "ms3_jax.export", ["--workdir", "{w}/none", "--out", "{w}/x.pth"],
     r"workdir not found: .*/none"),
    ("export with a bad extension", "ms3_jax.export", ["--workdir", "{w}", "--out", "{w}/x.zip"],
     r"must end in \.pth, \.pt or \.safetensors"),
    ("zero_shot on a missing image", "ms3_jax.zero_shot",
     ["--workdir", "{w}", "--image", "{w}/no.png", "--classes", "sky", "--out", "{w}/out"],
     r"image not found: .*/no\.png"),
    ("zero_shot without classes", "ms3_jax.zero_shot", ["--workdir", "{w}", "--image", "{w}/no.png"],
     r"the following arguments are required: --classes"),
    ("predict on a missing image", "ms3_jax.predict",
     ["--workdir", "{w}", "--image", "{w}/no.png", "--out", "{w}/out"],
     r"not found: .*/no\.png"),
    ("prepare of an unknown dataset", "ms3_jax.data.prepare",
     ["--dataset", "nope", "--manual_dir", "{w}", "--data_dir", "{w}/d"], r"nope"),
    ("prepare without archives", "ms3_jax.data.prepare",
     ["--dataset", "voc", "--manual_dir", "{w}/none", "--data_dir", "{w}/d"], r"/none"),
]
HELP = [(MAIN, ["--help"]), (MAIN, ["--config=configs/pretrain.py", "--help"]),
        ("ms3_jax.export", ["--help"]), ("ms3_jax.zero_shot", ["--help"]),
        ("ms3_jax.predict", ["--help"]), ("ms3_jax.data.prepare", ["--help"]),
        (MAIN, [TINY, "--config.loss.tau=0.5", "--print_config"])]  # from another directory


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case and every --help / --print_config, through `cli_runner` (one child process)."""
    w = str(tmp_path_factory.mktemp("user_errors"))
    cases = [[m, [a.format(w=w) for a in args], ROOT] for _, m, args, _ in CASES]
    cases += [[m, args, w] for m, args in HELP]  # configs/ found from another directory
    cases += [[MAIN, [TINY, f"--workdir={w}/v", "--verbose"], w]]  # --verbose: the traceback
    path = os.path.join(w, "cases.json")
    with open(path, "w") as f:
        json.dump(cases, f)
    env = subprocess_env()
    for name in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL"):  # as a user's shell has them: unset
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "ms3_jax.testing.cli_runner", path], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    return (w, done.stderr, dict(zip([c[0] for c in CASES], out[:len(CASES)])),
            out[len(CASES):len(CASES) + len(HELP)], out[-1])


def test_importing_the_package_prints_nothing(results):
    """JAX's plugin discovery on a CPU machine with the test extra's libtpu and CUDA plugin: no
    driver probes, no CUDA traceback, no TPU host warnings (`ms3_jax.platforms`)."""
    _, stderr, _, _, _ = results
    assert stderr == "", stderr[-3000:]


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_each_user_error_is_one_line_and_exit_2(results, name):
    w, _, by_name, _, _ = results
    expect = next(c[3] for c in CASES if c[0] == name)
    r = by_name[name]
    # Besides the run's own timestamped log lines (a started run logs), one line: the error.
    lines = [line for line in r["stderr"].splitlines()
             if line.strip() and not re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ ", line)]
    assert r["code"] == 2, r
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r["stderr"], r
    assert re.search(expect, lines[0]), lines[0]
    if name == "failed start":
        assert not os.path.exists(os.path.join(w, "new"))  # no empty workdir left behind


def test_help_exits_0_and_lists_the_flags_and_fields(results):
    _, _, _, helps, verbose = results
    for (module, args), r in zip(HELP, helps):
        assert r["code"] == 0 and "Traceback" not in r["stderr"], (module, args, r)
        assert r["stderr"] == "", (module, args, r["stderr"][-2000:])
    main_help, pretrain_help = helps[0]["stdout"], helps[1]["stdout"]
    assert "--workdir" in main_help and "configs/pretrain.py" in main_help
    assert "batch_size = 128  # global, over all devices and processes" in pretrain_help
    assert "tau: 0.5" in helps[-1]["stdout"] and "synth_a" in helps[-1]["stdout"]  # --print_config
    # --verbose: a usage error with its traceback, exit code 1.
    assert verbose["code"] == 1 and "Traceback" in verbose["stderr"], verbose
    assert "text.embeddings is unset" in verbose["stderr"]
