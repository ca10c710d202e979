r"""Entry point: `python -m ms3_jax.main --config=configs/<job>.py[:arg] --workdir=W`.

Dispatches on `config.mode`: 'pretrain' (stage 2), 'text_adapt' (stage 1), 'finetune' (Tab. 2/3),
'demo' (everything on the built-in synthetic data). Any field can be overridden:
`--config.batch_size=256`. Multi-host: one process per host, see `launch/` (env MS3_COORDINATOR /
MS3_NUM_PROCESSES / MS3_PROCESS_ID).

`--config` paths are taken relative to the working directory, else to the checkout this package
runs from; `--print_config` prints the resolved config and exits.

Exit codes (`exit_codes`): 0 done; 75 preempted (relaunch the same command to resume); 2 a usage
error (one line on stderr, the traceback with `--verbose`); 1 any other error. A process that
stops makes the others stop too. Details: docs/usage.md, "Exit codes and config files",
"Preemption and failures", "Multi-host: TPU pods, GPU clusters".

Long CPU runs: MS3_HOST_MALLOC=reuse makes glibc keep freed pages for reuse (`host_memory`).
"""
import signal
import sys

if __name__ == "__main__":  # `python -m ms3_jax.main`, not an import
    # SIGTERM while the heavy imports below run: the preemption exit code (75), nothing saved
    # yet. main() replaces this with `loop.terminate_outside_loop` once the workdir is known.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(75))

import logging as py_logging
import os
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from ms3_jax.demo import job as demo
from ms3_jax.engine import config_paths, exit_codes, host_memory, loop, processes, workdir_lock
from ms3_jax.stages import finetune, pretrain, text_adapt

# Raised for what the user can fix (config values, paths, data); anything else is exit code 1.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               workdir_lock.WorkdirInUse)

_CONFIG = config_flags.DEFINE_config_file(
    "config", config_paths.find_config(os.path.join("configs", "demo.py")),
    "job config: configs/<job>.py[:arg], relative to the working directory, the checkout or the "
    "installed package",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and outputs go")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the resolved config and exit")
_VERBOSE = flags.DEFINE_bool("verbose", False, "full tracebacks for usage errors too")


def resolve_config_argv(argv: list[str]) -> list[str]:
    """`--config=PATH[:arg]` (or `--config PATH[:arg]`) with PATH made absolute against the
    checkout (or the installed package's configs) when it does not exist relative to the
    working directory."""
    out = list(argv)
    for i, a in enumerate(out):
        if a.startswith("--config="):
            prefix, value = "--config=", a[len("--config="):]
        elif a == "--config" and i + 1 < len(out):
            prefix, value, i = "", out[i + 1], i + 1
        else:
            continue
        path, sep, arg = value.partition(":")
        if not os.path.exists(path) and (found := config_paths.find_config(path)):
            out[i] = prefix + found + sep + arg
    return out


def main(argv: list[str]) -> None:
    del argv
    host_malloc = host_memory.configure_from_env()  # before JAX creates its CPU client
    try:  # multi-process (MS3_* env, SLURM, TPU pod): before any JAX use
        processes.initialize_distributed()
    except processes.PeerError as e:  # a process missing at start-up: named, exit code 1
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    config = _CONFIG.value
    if _PRINT_CONFIG.value:
        print(config)
        return
    workdir = _WORKDIR.value or config.get("default_workdir")
    if not workdir:
        raise app.UsageError("--workdir is required for this config")
    logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler()
    handler.setFormatter(py_logging.Formatter("%(asctime)s %(message)s"))
    # Keep the console to our progress lines: orbax / grain chatter only from WARNING up.
    handler.addFilter(lambda r: r.levelno >= py_logging.WARNING
                      or not any(f"/{lib}/" in r.pathname for lib in ("orbax", "grain")))
    logging.info("%s", host_malloc)
    loop.terminate_outside_loop(workdir)  # exit code 75 for SIGTERM at any point, not 143
    try:
        with workdir_lock.hold(workdir):  # one run per workdir
            _dispatch(config, workdir)
    except (loop.Preempted, loop.StoppedOutsideLoop) as e:
        logging.warning("%s; exit code %d", e, exit_codes.PREEMPTED)
        logging.flush()
        sys.exit(exit_codes.PREEMPTED)
    except demo.NoBetterThanChance as e:
        logging.error("%s", e)
        logging.flush()
        sys.exit(1)
    except USER_ERRORS as e:
        if _VERBOSE.value:
            raise
        logging.flush()
        print(f"error: {e}\n(exit code {exit_codes.USAGE}; --verbose shows the traceback)",
              file=sys.stderr)
        sys.exit(exit_codes.USAGE)


def _dispatch(config: Any, workdir: str) -> None:
    if config.mode != "demo":
        demo.prepare_builtin(config)  # the tiny configs' synthetic data and tiny CLIP
    run = {"pretrain": pretrain.train_and_evaluate, "text_adapt": text_adapt.train_and_evaluate,
           "finetune": finetune.train_and_evaluate, "demo": demo.run}.get(config.mode)
    if run is None:
        raise app.UsageError(f"unknown config.mode {config.mode!r}")
    run(config, workdir)


if __name__ == "__main__":
    try:
        app.run(main, argv=resolve_config_argv(sys.argv))
    except SystemExit as e:  # the code the other processes of the job are told (`processes`)
        processes.exiting_with(e.code)
        raise
    except BaseException:
        processes.exiting_with(exit_codes.ERROR)
        raise
