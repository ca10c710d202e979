"""Run many CLI invocations cheaply: one child process imports the package's heavy modules once,
then forks once per invocation and runs the tool as `python -m <module>` would
(`runpy.run_module(..., run_name="__main__")`). Used by tests/test_user_errors.py.

    python -m ms3_jax.testing.cli_runner CASES.json   # [[module, [args...], cwd], ...] -> JSON
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import tempfile
import traceback

# Imported once before the forks (what the tools import; never ms3_jax.main itself, whose absl
# flags may be defined once per process).
PRELOAD = ("ms3_jax.demo.job", "ms3_jax.stages.pretrain", "ms3_jax.stages.finetune",
           "ms3_jax.stages.text_adapt", "ms3_jax.data.builders", "ms3_jax.evaluation.visualize")


def run_one(module: str, args: list[str], cwd: str) -> dict:
    """Fork, run `python -m module args` in `cwd`: {'code', 'stdout', 'stderr'}."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: the tool's whole run, its exit code
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os.chdir(cwd)
                sys.argv = [module] + list(args)
                sys.modules.pop(module, None)  # imported by a preloaded module: run it afresh
                runpy.run_module(module, run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"code": os.waitstatus_to_exitcode(status), "stdout": out.read().decode(),
                "stderr": err.read().decode()}


def main(path: str) -> None:
    import importlib
    for name in PRELOAD:
        importlib.import_module(name)
    with open(path) as f:
        cases = json.load(f)
    print(json.dumps([run_one(m, a, c) for m, a, c in cases]))


if __name__ == "__main__":
    main(sys.argv[1])
