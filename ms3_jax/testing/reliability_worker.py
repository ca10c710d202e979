"""Subprocess side of tests/test_reliability.py: `python -m ms3_jax.testing.reliability_worker
'<json args>'` (see `worker`)."""
from __future__ import annotations

import json
import os
import signal
import sys

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ms3_jax.engine import checkpointing, exit_codes, loop
from ms3_jax.testing.toy import ToyIterator, ToyTrainer, toy_config


def worker(args: dict) -> None:
    """Subprocess modes. 'save_forever': save checkpoints of a 32 MB state as fast as possible
    (to be killed). 'two_processes': the toy loop as one of two processes; process 1 signals
    itself during step 3."""
    if args["mode"] == "save_forever":
        from ms3_jax.data import pipeline
        mngr = checkpointing.checkpoint_manager(args["workdir"], max_to_keep=2)
        it = ToyIterator()
        template = {"w": jnp.zeros((8 << 20,), jnp.float32)}
        _, start = loop.restore_latest(mngr, template, it, args["workdir"])
        print("resumed from", start, flush=True)
        for step in range(start + 1, 1 << 30):
            it.next_batch = step
            mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave({"w": jnp.full((8 << 20,), step, jnp.float32)}),
                data=pipeline.checkpoint_save_args(it)))
            mngr.wait_until_finished()
            print("saved", step, flush=True)
    elif args["mode"] == "two_processes":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        from ms3_jax.engine import processes
        processes.initialize_distributed(args["coordinator"], 2, args["process_id"])
        pid = args["process_id"]
        config = toy_config(log_every=2, checkpoint_every=100)
        on_step = (lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 3 else None) if pid == 1 else None
        trainer = ToyTrainer(config, on_step=on_step)
        mngr = checkpointing.checkpoint_manager(args["workdir"])
        iterator = ToyIterator(shard=(pid, 2))
        try:
            loop.run(trainer, trainer.init_state(), iterator, config, start=0, end=10, num_steps=10,
                     mngr=mngr, writer=None, history=[])
        except loop.Preempted as e:
            print(json.dumps({"preempted": e.step, "latest": mngr.latest_step()}), flush=True)
            sys.exit(exit_codes.PREEMPTED)


if __name__ == "__main__":
    worker(json.loads(sys.argv[1]))
