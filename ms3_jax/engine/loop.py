"""The outer loop shared by stage 1, pretraining and fine-tuning: resume, log, checkpoint, stop.

The jitted step stays pure; every `log_every` steps (and before every checkpoint) this module
fetches the queued metrics in one transfer: progress line with ETA, TensorBoard scalars, and
the non-finite check (`ms3_jax.engine.nonfinite`). SIGTERM / SIGINT save state + data iterator
and raise `Preempted` (exit 75). docs/choices.md, "Preemption: exit 75", "Multi-host agreement
on the stop step", "Checkpoint atomicity: orbax's", "Verified checkpoints, with fallback".
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from ms3_jax.data import pipeline as data_pipeline
from ms3_jax.engine import checkpointing, exit_codes, nonfinite

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """A stop signal ended the run after `step`, whose checkpoint (state + data) is complete."""

    def __init__(self, step: int, workdir: str):
        super().__init__(f"preempted at step {step}, checkpoint saved in {workdir}; "
                         "relaunch the same command to resume")
        self.step = step


class StoppedOutsideLoop(BaseException):
    """SIGTERM outside the training loop (start-up, compiling, evaluation, final outputs): nothing
    new is saved. A BaseException (like KeyboardInterrupt): no `except Exception` on the way (data
    builders, loaders) can swallow it."""

    def __init__(self, signal_name: str, workdir: str):
        super().__init__(f"{signal_name} outside the training loop: nothing new saved, the "
                         f"checkpoints in {workdir} are as they were; relaunch the same command "
                         "to resume")


def terminate_outside_loop(workdir: str) -> None:
    """From now on (main thread) SIGTERM raises `StoppedOutsideLoop`, so a job stopped before or
    after its loop still exits with the preemption code (75); `StopRequest` takes SIGTERM over
    while the loop runs and gives it back after."""
    def handle(signum: int, frame: Any) -> None:
        del frame
        raise StoppedOutsideLoop(signal.Signals(signum).name, workdir)

    signal.signal(signal.SIGTERM, handle)
    _watch_for_early_stop(workdir)


_first_step_done = threading.Event()  # set once a step of this process's loop has run


def _watch_for_early_stop(workdir: str) -> None:
    """Until the loop's first step has run, SIGTERM ends the process within a second with exit
    75, even while XLA compiles (a Python handler runs only between bytecodes, so it would wait
    for the compile): a thread woken by the signal's C-level handler (`signal.set_wakeup_fd`)
    exits at once; nothing has been saved by this run yet. Afterwards the handlers decide.
    Single-process jobs only: the processes of a multi-process job leave together through
    `jax.distributed`'s shutdown barrier, which an immediate exit would skip."""
    if (threading.current_thread() is not threading.main_thread() or _first_step_done.is_set()
            or jax.process_count() > 1):
        return
    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    try:
        signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main interpreter
        return

    def watch() -> None:
        while True:
            received = receiver.recv(64)
            if not received:
                return
            if signal.SIGTERM in received and not _first_step_done.is_set():
                # Straight to the file descriptor and out: no lock the main thread may hold
                # (logging's, a stream's) stands between the signal and the exit.
                os.write(2, (f"SIGTERM before the first training step: nothing new saved, the "
                             f"checkpoints in {workdir} are as they were; relaunch the same "
                             f"command to resume; exit code {exit_codes.PREEMPTED}\n").encode())
                os._exit(exit_codes.PREEMPTED)  # at once: the main thread may be compiling

    threading.Thread(target=watch, daemon=True, name="ms3-early-sigterm").start()
    _watch_for_early_stop.sockets = (receiver, sender)  # kept open for the life of the process


def progress_line(step: int, num_steps: int, metrics: Mapping[str, float], rate: float) -> str:
    """`step s/n | metrics | steps/s | ETA`; the rate leaves out compiles and evaluations (NaN:
    none measured yet, shown as '--')."""
    parts = [f"step {step}/{num_steps}"] + [f"{k} {v:.4g}" for k, v in sorted(metrics.items())]
    if not math.isfinite(rate):
        return " | ".join(parts) + " | -- steps/s | ETA --"
    eta = (num_steps - step) / max(rate, 1e-9)
    return " | ".join(parts) + f" | {rate:.2f} steps/s | ETA {eta / 60:.1f} min"


def restore_latest(mngr: ocp.CheckpointManager, state: Any, iterator: Any,
                   workdir: str) -> tuple[Any, int]:
    """(state, step) of the latest usable checkpoint, restored into `state`'s shapes and
    shardings and into `iterator`; `(state, 0)` unchanged when there is none. Unusable newer steps
    are logged and set aside (`checkpointing.restore_first_usable`; docs/choices.md, "Verified
    checkpoints, with fallback"). None usable: raises `checkpointing.NoUsableCheckpoint`."""
    steps = mngr.all_steps()
    if not steps:
        return state, 0
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)

    def restore(step: int) -> Any:
        return mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=data_pipeline.checkpoint_restore_args(iterator))).state

    directory = os.fspath(mngr.directory)
    start, state, failures = checkpointing.restore_first_usable(directory, steps, restore, workdir)
    if failures:
        checkpointing.set_aside(directory, [f.step for f in failures])
        mngr.reload()
    logging.info("resumed from step %d of %s", start, workdir)
    return state, start


def tag(*parts: str) -> str:
    """A TensorBoard tag from parts that may hold spaces (class names): 'a/dirt_track'."""
    return "/".join(str(p).replace(" ", "_") for p in parts)


def summary_writer(workdir: str, config: Any | None = None) -> Any | None:
    """A TensorBoard writer (tensorboardX) in W/tensorboard on process 0; None elsewhere. The
    `config` (an ml_collections ConfigDict) goes in as text, 'config'."""
    if jax.process_index() != 0:
        return None
    writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if config is not None:
        writer.add_text("config", "    " + str(config).replace("\n", "\n    "), 0)
    return writer


class StopRequest:
    """Context manager: SIGTERM / SIGINT set `signal_name` instead of killing the process; the
    previous handlers come back on exit. A second SIGINT raises KeyboardInterrupt (force quit).
    Handlers can only be set in the main thread; elsewhere the signals keep their handlers."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        logging.warning("%s received: finishing the current step, then saving a checkpoint and "
                        "exiting (Ctrl-C again to quit without saving)", self.signal_name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in _STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        else:
            logging.warning("loop.run outside the main thread: SIGTERM / SIGINT are not caught")
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective: all processes must call it
    at the same point); just `flag` with one process."""
    return bool(checkpointing.process_flags(flag).any())


def _nonfinite_error(records: list[dict[str, float]], saved: int) -> FloatingPointError | None:
    """The error for the first non-finite step that was not skipped, or None."""
    bad = [r for r in records if not r.get("skipped")
           and (not math.isfinite(r["loss"]) or r.get("finite", 1.0) == 0.0)]
    if not bad:
        return None
    first = bad[0]
    what = ("loss" if not math.isfinite(first["loss"]) else
            f"gradients / state (the loss {first['loss']:.4g} is finite)")
    steps = [r["step"] for r in bad]
    return FloatingPointError(
        f"non-finite {what} at step {first['step']} (non-finite steps: {steps}); nothing saved "
        f"after step {saved}. Set config.nonfinite='skip' to drop such steps and continue.")


def run(trainer: Any, state: Any, iterator: Any, config: Any, *, start: int, end: int,
        num_steps: int, mngr: ocp.CheckpointManager, writer: Any | None,
        history: list[dict[str, float]],
        after_step: Callable[[int, Any], None] | None = None) -> Any:
    """Steps `start + 1 .. end` of `trainer.step` on `trainer.global_batch(next(iterator))`;
    appends every step's metrics to `history`; returns the state.

    `iterator` is the grain iterator checkpointed with the state; `config` gives `log_every`,
    `checkpoint_every` and `batch_size`. A NaN / inf loss (or state, with the `finite` metric of
    `nonfinite.guard`) raises `FloatingPointError` naming the step, before the next save; steps the
    guard skipped are logged and counted, and so are records replaced by the data pipeline (batches
    with an 'unreadable' count). SIGTERM / SIGINT raise `Preempted` after saving (module docstring).
    """
    log_every, checkpoint_every = config.log_every, config.checkpoint_every
    workdir = os.path.dirname(os.fspath(mngr.directory))
    pending: list[Mapping[str, jax.Array]] = []
    # The step rate (and the ETA) leave out the first step's compile and the evaluations: the time
    # spent in them since the last progress line is `excluded`, the steps they took `steps_excluded`.
    t_last, s_last = time.perf_counter(), start
    excluded, steps_excluded = 0.0, 0
    skipped, unreadable = 0, 0
    cap = nonfinite.max_skipped(config, num_steps)

    def flush(step: int) -> None:
        """Fetch the queued metrics: history, the non-finite check, the progress line."""
        nonlocal pending, t_last, s_last, skipped, excluded, steps_excluded
        fetched = jax.device_get(pending)
        pending = []
        records = [{"step": step - len(fetched) + 1 + i, **{k: float(v) for k, v in m.items()}}
                   for i, m in enumerate(fetched)]
        history.extend(records)
        error = _nonfinite_error(records, mngr.latest_step() or 0)
        if error is not None:
            raise error
        for r in records:
            if r.get("skipped"):
                skipped += 1
                logging.warning("step %d: non-finite loss or gradients, step skipped (%d in this "
                                "run; nonfinite='skip')", r["step"], skipped)
                if skipped > cap:
                    raise FloatingPointError(
                        f"{skipped} steps skipped for a non-finite loss or gradients in this run, "
                        f"more than nonfinite_max_skipped allows ({cap} of {num_steps} steps; the "
                        f"last at step {r['step']}); nothing saved after step "
                        f"{mngr.latest_step() or 0}. The run diverges: lower the learning rate, "
                        "check the data, or raise config.nonfinite_max_skipped.")
        now = time.perf_counter()
        steps = step - s_last - steps_excluded
        rate = steps / max(now - t_last - excluded, 1e-9) if steps > 0 else float("nan")
        t_last, s_last, excluded, steps_excluded = now, step, 0.0, 0
        last = {k: v for k, v in records[-1].items() if k not in ("step", "finite", "skipped")}
        if "skipped" in records[-1]:
            last["skipped_steps"] = skipped
        if math.isfinite(rate):
            last["images_per_s"] = rate * config.batch_size
        if writer is not None:
            logging.info(progress_line(step, num_steps, last, rate))
            for k, v in last.items():
                writer.add_scalar(f"train/{k}", v, step)

    saved_config = json.loads(config.to_json()) if hasattr(config, "to_json") else dict(config)
    if isinstance(mngr, checkpointing.VerifiedManager):
        mngr.state_bytes = checkpointing.tree_bytes(state)
        mngr.check_room()  # a disk too full for one checkpoint: refused before the first step

    def save(step: int) -> None:
        checkpointing.purge_deleted(str(mngr.directory))
        mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=data_pipeline.checkpoint_save_args(iterator),
            **{checkpointing.CONFIG_ITEM: ocp.args.JsonSave(saved_config)}))

    if start < end:
        logging.info("step %d: compiling the training step (the first step waits for it)", start + 1)
    with StopRequest() as stop:
        try:
            for step in range(start + 1, end + 1):
                local = next(iterator)
                if "unreadable" in local:  # records replaced under data.skip_unreadable
                    if n := int(np.sum(local["unreadable"])):
                        unreadable += n
                        logging.warning("step %d: %d unreadable record(s) replaced (%d in this run; "
                                        "data.skip_unreadable)", step, n, unreadable)
                t_step = time.perf_counter()
                state, metrics = trainer.step(state, trainer.global_batch(local))
                if step == start + 1:  # the compile: out of the step rate
                    jax.block_until_ready(metrics)
                    excluded += time.perf_counter() - t_step
                    steps_excluded += 1
                    logging.info("step %d: compiled and ran in %.1f s", step,
                                 time.perf_counter() - t_step)
                _first_step_done.set()
                pending.append(metrics)
                if isinstance(mngr, checkpointing.VerifiedManager):
                    mngr.raise_save_errors()  # a failed save stops the run here, not at the end
                scheduled = step % checkpoint_every == 0 or step == end
                boundary = scheduled or step % log_every == 0
                if boundary:
                    flush(step)
                if scheduled:
                    save(step)
                # Checked after the fetch, during which a signal usually lands. Several processes
                # agree only at boundaries (the same steps everywhere).
                if step < end and (boundary or jax.process_count() == 1) \
                        and any_process(stop.signal_name is not None):
                    if not boundary:
                        flush(step)  # the non-finite check comes before any save
                    if not scheduled:
                        save(step)
                    finish_saves(mngr)
                    error = Preempted(step, workdir)
                    logging.warning("%s (%s)", error,
                                    stop.signal_name or "another process was signalled")
                    raise error
                if after_step is not None:
                    t_after = time.perf_counter()
                    after_step(step, state)  # evaluations: out of the step rate
                    excluded += time.perf_counter() - t_after
        except Exception as flying:
            try:
                mngr.wait_until_finished()  # an earlier, finite checkpoint still completes
            except Exception as e:  # that save failed too (unless it is the error in flight)
                if not isinstance(flying, checkpointing.SaveFailed):
                    logging.warning("a pending checkpoint save failed as well (%s: %s)",
                                    type(e).__name__, e)
            raise
        finish_saves(mngr)
    return state


def finish_saves(mngr: ocp.CheckpointManager) -> None:
    """Wait for the pending save; a failed one raises `checkpointing.SaveFailed`."""
    if isinstance(mngr, checkpointing.VerifiedManager):
        mngr.finish_saves()
    else:
        mngr.wait_until_finished()
