r"""Entry point: `python -m ms3_jax.main --config=configs/<job>.py[:arg] --workdir=W`.

Dispatches on `config.mode`: 'pretrain' (stage 2), 'text_adapt' (stage 1), 'finetune' (Tab. 2/3),
'demo' (everything on the built-in synthetic data). Any field can be overridden: `--config.batch_size=256`.
Multi-host: one process per host, see `launch/` (env MS3_COORDINATOR / MS3_NUM_PROCESSES / MS3_PROCESS_ID).

Exit codes: 0 done; 75 preempted -- SIGTERM / SIGINT saved a checkpoint (state + data iterator),
relaunch the same command to resume exactly (`loop.PREEMPTED_EXIT_CODE`); 1 an error (named in
the traceback: bad input, non-finite loss, ...).

Long CPU runs: MS3_HOST_MALLOC=reuse makes glibc keep freed pages for reuse (20-25 % faster
steps; `host_memory`).
"""
import logging as py_logging
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from ms3_jax import demo, finetune, host_memory, loop, pretrain, sharding, text_adapt

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "job config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and outputs go")


def main(argv: list[str]) -> None:
    del argv
    host_malloc = host_memory.configure_from_env()  # before JAX creates its CPU client
    sharding.initialize_distributed()  # multi-process (MS3_* env, SLURM, TPU pod): before any JAX use
    config = _CONFIG.value
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
    try:
        _dispatch(config, workdir)
    except loop.Preempted as e:
        logging.warning("%s; exit code %d", e, loop.PREEMPTED_EXIT_CODE)
        logging.flush()
        sys.exit(loop.PREEMPTED_EXIT_CODE)


def _dispatch(config: Any, workdir: str) -> None:
    if config.mode == "pretrain":
        pretrain.train_and_evaluate(config, workdir)
    elif config.mode == "text_adapt":
        text_adapt.train_and_evaluate(config, workdir)
    elif config.mode == "finetune":
        finetune.train_and_evaluate(config, workdir)
    elif config.mode == "demo":
        demo.run(config, workdir)
    else:
        raise app.UsageError(f"unknown config.mode {config.mode!r}")


if __name__ == "__main__":
    app.run(main)
