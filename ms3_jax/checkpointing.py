"""Workdir layout and orbax checkpoints shared by pretraining, stage 1, fine-tuning and export.

    W/config.json        the job's ml_collections config (model fields build the encoder)
    W/checkpoints/<step> orbax: item `state` (the TrainState pytree) and item `data` (grain iterator)
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from ms3_jax import sharding

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DELETED_DIR = "deleted"  # under CHECKPOINT_DIR: retired steps, removed by `purge_deleted`


_ARRAY_HANDLER_SET = False


def _configure_array_handler() -> None:
    """On the CPU backend, save replicated arrays from replica 0 whole.

    orbax's replica-parallel save splits every replicated array across its replicas, compiling a
    slice per array shape: minutes for the first save of a small model on 8 simulated CPU devices
    instead of a fraction of a second. On GPU / TPU (real replicas, real bandwidth) orbax's
    default stays.
    """
    global _ARRAY_HANDLER_SET
    if sharding.platform_of(jax.devices()) == "cpu" and not _ARRAY_HANDLER_SET:
        _ARRAY_HANDLER_SET = True
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def checkpoint_manager(workdir: str, max_to_keep: int = 3,
                       item_names: tuple[str, ...] = ("state", "data")) -> ocp.CheckpointManager:
    """The orbax manager of a workdir (keeps the newest `max_to_keep` complete checkpoints)."""
    _configure_array_handler()
    directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    if jax.process_index() == 0:
        remove_half_written(directory)
    # The other processes wait for process 0 at the root-directory barrier orbax runs when
    # `create=True`, so no save starts before the leftovers are gone.
    # Old steps are renamed into DELETED_DIR (atomic) instead of orbax's rmtree in place, which a
    # kill -9 can interrupt, leaving a listed step without some of its items.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           todelete_subdir=DELETED_DIR)
    return ocp.CheckpointManager(directory, item_names=item_names, options=options)


def purge_deleted(directory: str) -> None:
    """Remove the steps orbax has retired into `directory/DELETED_DIR` (process 0 only; called at
    open and before every save, so a retired step waits on disk until the next save at most)."""
    if jax.process_index() != 0:
        return
    trash = os.path.join(directory, DELETED_DIR)
    for name in os.listdir(trash) if os.path.isdir(trash) else ():
        shutil.rmtree(os.path.join(trash, name), ignore_errors=True)


def remove_half_written(directory: str) -> list[str]:
    """Delete `<step>.orbax-checkpoint-tmp*` leftovers of saves killed before orbax's final rename.

    They are never listed as checkpoints; this removes them now, synchronously. (orbax's own
    `cleanup_tmp_directories` runs in a background thread, and two managers opened on one workdir
    in a row -- or a resumed run saving the very step that was interrupted -- race on the same
    `rmtree`.) Returns the removed paths.
    """
    leftovers = sorted(glob.glob(os.path.join(directory, "*" + ocp.utils.TMP_DIR_SUFFIX + "*")))
    for path in leftovers:
        logging.warning("removing half-written checkpoint %s (a save was interrupted)", path)
        shutil.rmtree(path, ignore_errors=True)
    purge_deleted(directory)
    return leftovers


def write_config(workdir: str, config: Any) -> None:
    """Store the job config as JSON next to the checkpoints (ml_collections or a plain mapping)."""
    os.makedirs(workdir, exist_ok=True)
    text = config.to_json(indent=2) if hasattr(config, "to_json") else json.dumps(config, indent=2)
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:  # replaced atomically: other processes may be reading it
        f.write(text)
    os.replace(path + ".tmp", path)


def read_config(workdir: str) -> dict[str, Any]:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not an ms3_jax workdir: {path} is missing")
    with open(path) as f:
        return json.load(f)


def restore_state(workdir: str, step: int | None = None) -> tuple[int, Mapping[str, Any]]:
    """The raw `state` pytree (nested dicts) of the latest (or given) complete checkpoint, on one
    local device (export, zero-shot, evaluation: any device layout may have written it)."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints in {workdir}: {directory} is missing")
    manager = ocp.CheckpointManager(directory, item_handlers={"state": ocp.StandardCheckpointHandler()})
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    if step is None:
        step = manager.latest_step()
    elif step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; have {sorted(steps)}")
    # Onto this process's first device, whatever device layout wrote the checkpoint (orbax
    # refuses a target-less restore onto another topology).
    # The `state` item alone: the manager would also look at the `data` (iterator) item and warn
    # that it has no handler for it.
    path = manager.directory / str(step) / "state"  # an etils Path, as the handler wants
    manager.close()
    handler = ocp.StandardCheckpointHandler()
    meta = handler.metadata(path)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), getattr(meta, "tree", meta))
    return step, handler.restore(path, args=ocp.args.StandardRestore(abstract))


def encoder_variables(state: Mapping[str, Any], ema: bool = False) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of the online encoder, or of the momentum encoder with `ema`."""
    prefix = "ema_" if ema else ""
    return {"params": state[prefix + "params"], "batch_stats": state[prefix + "batch_stats"]}
