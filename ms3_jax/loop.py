"""The outer loop shared by stage 1, pretraining and fine-tuning: resume, log, checkpoint.

The jitted step stays pure; this module only feeds it batches and, every `log_every` steps (and
before every checkpoint), fetches the queued metrics in one transfer: progress line with ETA,
TensorBoard scalars, and a stop on a non-finite loss -- before anything non-finite is saved.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp

from ms3_jax.data import pipeline as data_pipeline


def progress_line(step: int, num_steps: int, metrics: Mapping[str, float], rate: float) -> str:
    eta = (num_steps - step) / max(rate, 1e-9)
    parts = [f"step {step}/{num_steps}"] + [f"{k} {v:.4g}" for k, v in sorted(metrics.items())]
    return " | ".join(parts) + f" | {rate:.2f} steps/s | ETA {eta / 60:.1f} min"


def restore_latest(mngr: ocp.CheckpointManager, state: Any, iterator: Any,
                   workdir: str) -> tuple[Any, int]:
    """(state, step) of the latest complete checkpoint, restored into `state`'s shapes and
    shardings and into `iterator`; `(state, 0)` unchanged when there is none."""
    start = mngr.latest_step() or 0
    if start:
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
        restored = mngr.restore(start, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=data_pipeline.checkpoint_restore_args(iterator)))
        state = restored.state
        logging.info("resumed from step %d of %s", start, workdir)
    return state, start


def summary_writer(workdir: str) -> Any | None:
    """A TensorBoard writer (tensorboardX) in W/tensorboard on process 0; None elsewhere."""
    if jax.process_index() != 0:
        return None
    from tensorboardX import SummaryWriter
    return SummaryWriter(os.path.join(workdir, "tensorboard"))


def run(trainer: Any, state: Any, iterator: Any, config: Any, *, start: int, end: int,
        num_steps: int, mngr: ocp.CheckpointManager, writer: Any | None,
        history: list[dict[str, float]],
        after_step: Callable[[int, Any], None] | None = None) -> Any:
    """Steps `start + 1 .. end` of `trainer.step` on `trainer.global_batch(next(iterator))`;
    appends every step's metrics to `history`; returns the state.

    `iterator` is the grain iterator checkpointed with the state; `config` gives `log_every`,
    `checkpoint_every` and `batch_size`. A NaN / inf loss raises `FloatingPointError` naming the
    steps, before the next save.
    """
    log_every, checkpoint_every = config.log_every, config.checkpoint_every
    pending: list[Mapping[str, jax.Array]] = []
    t_last, s_last = time.perf_counter(), start
    for step in range(start + 1, end + 1):
        state, metrics = trainer.step(state, trainer.global_batch(next(iterator)))
        pending.append(metrics)
        save = step % checkpoint_every == 0 or step == end
        if step % log_every == 0 or save:
            fetched = jax.device_get(pending)
            pending = []
            records = [{"step": step - len(fetched) + 1 + i, **{k: float(v) for k, v in m.items()}}
                       for i, m in enumerate(fetched)]
            history.extend(records)
            bad = [r["step"] for r in records if not math.isfinite(r["loss"])]
            if bad:
                raise FloatingPointError(f"non-finite loss at step(s) {bad}; nothing saved after "
                                         f"step {mngr.latest_step() or 0}")
            now = time.perf_counter()
            rate = (step - s_last) / max(now - t_last, 1e-9)
            t_last, s_last = now, step
            last = {k: v for k, v in records[-1].items() if k != "step"}
            last["images_per_s"] = rate * config.batch_size
            if writer is not None:
                logging.info(progress_line(step, num_steps, last, rate))
                for k, v in last.items():
                    writer.add_scalar(f"train/{k}", v, step)
        if save:
            mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=data_pipeline.checkpoint_save_args(iterator)))
        if after_step is not None:
            after_step(step, state)
    mngr.wait_until_finished()
    return state
