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
import re
import shutil
from typing import Any, NoReturn

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ms3_jax import platforms
from ms3_jax.demo import job as demo
from ms3_jax.engine import config_paths, exit_codes, host_memory, loop, processes, workdir_lock
from ms3_jax.stages import finetune, pretrain, text_adapt

def config_error(error: BaseException, argv: list[str]) -> str:
    """A config file's or override's exception as one readable line: an unknown field names the
    override and carries ml_collections' 'did you mean' hint."""
    while isinstance(error, AttributeError) and error.args and isinstance(error.args[0], KeyError):
        error = error.args[0]
    if isinstance(error, KeyError) and error.args:
        name, _, hint = str(error.args[0]).partition("\n")
        name = name.strip("'\"")
        flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                     and re.search(rf"[.]{re.escape(name)}(=|$|[.])", a.split("=")[0])), None)
        return (f"{flag or 'config'}: no config field {name!r}" + (f". {hint}" if hint else "")
                + "; --print_config lists the fields")
    return f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)


# Raised for what the user can fix (config values, paths, data); anything else is exit code 1.
USER_ERRORS = exit_codes.USER_ERRORS + (workdir_lock.WorkdirInUse,)

try:  # ml_collections applies the command line's --config.<field> overrides here already
    _CONFIG = config_flags.DEFINE_config_file(
        "config", config_paths.find_config(os.path.join("configs", "demo.py")),
        "job config: configs/<job>.py[:arg], relative to the working directory, the checkout or "
        "the installed package",
        lock_config=True)
except (AttributeError, KeyError, ValueError, TypeError) as e:
    if __name__ != "__main__" or "--verbose" in sys.argv:
        raise
    print(f"error: {config_error(e, sys.argv)} (exit code 2)", file=sys.stderr, flush=True)
    sys.exit(2)
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
        if not os.path.exists(path):
            if not (found := config_paths.find_config(path)):
                fail(f"config file {path} not found (relative to {os.getcwd()}, the checkout or "
                     f"the installed package); the configs: {', '.join(config_paths.available())}")
            out[i] = prefix + found + sep + arg
    return out


def fail(message: str, traceback_hint: bool = False) -> NoReturn:
    """A usage error: one line on stderr, exit code 2."""
    hint = "; --verbose shows the traceback" if traceback_hint else ""
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    print(f"error: {message} (exit code {exit_codes.USAGE}{hint})", file=sys.stderr, flush=True)
    sys.exit(exit_codes.USAGE)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with the config loaded at once, its mistakes (unknown flag or field,
    bad config string or value) one line and exit 2; `--help` prints `help_text`, exit 0."""
    if any(a in ("--help", "-h", "--helpshort", "--helpfull", "-?") for a in argv[1:]):
        print(help_text(argv))
        sys.exit(0)
    verbose = "--verbose" in argv or "--verbose=true" in argv
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value  # loads the config file and applies the overrides now
    except flags.Error as e:
        if verbose:
            raise
        text, cause = str(e), e.__cause__ or e.__context__
        if "Traceback" in text:  # a config file's get_config raised: the flag and its last line
            fail(f"{text.split(': ')[0]}: " + [line for line in text.splitlines() if line.strip()][-1])
        fail(config_error(cause, argv) if isinstance(cause, (KeyError, AttributeError))
             else text.splitlines()[0])
    except (AttributeError, KeyError, ValueError, TypeError, OSError) as e:
        if verbose:
            raise
        fail(config_error(e.__cause__ or e if isinstance(e, OSError) else e, argv))
    return rest


def help_text(argv: list[str]) -> str:
    """The flags, then the chosen config's docstring and its fields with their comments."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
                config_paths.find_config(os.path.join("configs", "demo.py")))
    file = path.partition(":")[0]
    lines = ["usage: python -m ms3_jax.main --config=configs/<job>.py[:arg] --workdir=W "
             "[--config.<field>=<value> ...]", "", "flags:"]
    for name in ("config", "workdir", "print_config", "verbose"):
        lines.append(f"  --{name}: {flags.FLAGS[name].help}")
    lines += ["", f"configs: {', '.join(config_paths.available())}", ""]
    if os.path.isfile(file):
        lines += [f"{file}:", config_paths.docstring(file), "",
                  "fields (override with --config.<field>=<value>; --print_config shows them all):"]
        lines += config_paths.field_docs(file)
    return "\n".join(lines)


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
        fail("--workdir is required for this config (where checkpoints, logs and outputs go)")
    logging.set_verbosity(logging.INFO)
    handler = logging.get_absl_handler()
    handler.setFormatter(py_logging.Formatter("%(asctime)s %(message)s"))
    handler.addFilter(quiet_libraries)
    logging.info("%s", host_malloc)
    if platforms.CHOSEN:  # said, not silent: which devices the run uses and why
        logging.info("JAX runs on the CPU: no GPU or TPU device found on this machine (set "
                     "JAX_PLATFORMS to choose; ms3_jax/platforms.py)")
    loop.terminate_outside_loop(workdir)  # exit code 75 for SIGTERM at any point, not 143
    new_workdir = not os.path.exists(workdir)
    try:
        try:
            with workdir_lock.hold(workdir):  # one run per workdir
                _dispatch(config, workdir)
        finally:
            if new_workdir:
                remove_if_untouched(workdir)
    except (loop.Preempted, loop.StoppedOutsideLoop) as e:
        logging.warning("%s; exit code %d", e, exit_codes.PREEMPTED)
        logging.flush()
        sys.exit(exit_codes.PREEMPTED)
    except demo.NoBetterThanChance as e:
        logging.error("%s", e)
        logging.flush()
        sys.exit(1)
    except (*USER_ERRORS, OSError) as e:
        if _VERBOSE.value or not is_usage_error(e):
            raise
        logging.flush()
        fail(str(e), traceback_hint=True)


def remove_if_untouched(workdir: str) -> None:
    """Remove a workdir this run created when it holds nothing but the lock and empty folders
    (a start that failed leaves no empty workdir behind)."""
    if jax.process_index() != 0 or "://" in workdir or not os.path.isdir(workdir):
        return
    for _, _, names in os.walk(workdir):
        if any(name != workdir_lock.LOCK_FILE for name in names):
            return
    shutil.rmtree(workdir, ignore_errors=True)


def is_usage_error(error: BaseException) -> bool:
    """What the user can fix (exit 2, one line): `exit_codes.is_usage_error` (a value, a path,
    the disk), or a workdir in use."""
    return isinstance(error, workdir_lock.WorkdirInUse) or exit_codes.is_usage_error(error)


def quiet_libraries(record: py_logging.LogRecord) -> bool:
    """The console keeps to our lines: orbax / grain only from WARNING up, and their errors
    without tracebacks (a failed save is reported once, by the loop: `checkpointing.SaveFailed`)."""
    if not any(f"/{lib}/" in record.pathname for lib in ("orbax", "grain")):
        return True
    if record.levelno >= py_logging.ERROR:
        record.exc_info, record.exc_text = None, None
    return record.levelno >= py_logging.WARNING


def _dispatch(config: Any, workdir: str) -> None:
    if config.mode != "demo":
        demo.prepare_builtin(config)  # the tiny configs' synthetic data and tiny CLIP
    run = {"pretrain": pretrain.train_and_evaluate, "text_adapt": text_adapt.train_and_evaluate,
           "finetune": finetune.train_and_evaluate, "demo": demo.run}.get(config.mode)
    if run is None:
        raise ValueError(f"unknown config.mode {config.mode!r}: 'pretrain', 'text_adapt', "
                         "'finetune' or 'demo'")
    run(config, workdir)


if __name__ == "__main__":
    try:
        app.run(main, argv=resolve_config_argv(sys.argv), flags_parser=parse_flags)
    except SystemExit as e:  # the code the other processes of the job are told (`processes`)
        processes.exiting_with(e.code)
        raise
    except BaseException:
        processes.exiting_with(exit_codes.ERROR)
        raise
