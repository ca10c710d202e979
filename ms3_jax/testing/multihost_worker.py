"""Subprocess side of tests/test_multihost.py: `python -m ms3_jax.testing.multihost_worker
'<json args>'`, one process of a 2 (or n) x 4 CPU-device job (see `worker`)."""
from __future__ import annotations

import json
import sys
import time

from ms3_jax.engine import processes
from ms3_jax.testing.configs import tiny_pretrain_config

NUM_STEPS = 6


def make_config(data_dir: str, text_path: str):
    """The tiny pretraining in float64 (bank, V, S, multi-label mask and both losses active from
    step 3), so that layouts are compared without float32 reassociation noise: in float32 the
    Eq. 6 mask (a `>=` between similarities) flips on 1e-7 differences and the tiny BN net
    amplifies 1e-7 to 1e-3 within two steps."""
    config = tiny_pretrain_config(**{"num_steps": NUM_STEPS, "checkpoint_every": 2, "log_every": 2,
                            "data.data_dir": data_dir, "relations.warmup_steps": 2,
                            "optim.warmup_steps": 1, "model.dtype": "float64",
                            "bank.dtype": "float64"})
    config.data.synthetic = None
    config.text.embeddings = text_path
    return config


def worker(args: dict) -> None:
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_x64", True)
    n = args.get("num_processes", 2)
    if args["coordinator"]:
        processes.initialize_distributed(args["coordinator"], n, args["process_id"],
                                        heartbeat_timeout_seconds=args["heartbeat"])
    else:  # from the environment: MS3_* or a (simulated) SLURM step
        processes.initialize_distributed(heartbeat_timeout_seconds=args["heartbeat"])
    assert jax.process_count() == n and jax.device_count() == 4 * n and jax.local_device_count() == 4
    assert jax.process_index() == args["process_id"]
    from jax._src import xla_bridge  # the GPUs this process drives (JAX's flag; 'all' by default)
    print("initialised; visible GPUs:", xla_bridge.CUDA_VISIBLE_DEVICES.value, flush=True)
    if args["mode"] == "exit":
        return
    if args["mode"] == "raise":  # an error in this process alone
        raise RuntimeError(f"an error in process {args['process_id']} alone")
    if args["mode"] == "preempt":  # SIGTERM before the loop: exit 75 (ms3_jax.main)
        sys.exit(75)
    if args["mode"] == "wait":  # keep talking to the peer until it disappears
        from jax.experimental import multihost_utils
        for i in range(600):
            multihost_utils.sync_global_devices(f"tick{i}")
            time.sleep(0.5)
        return
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from ms3_jax.stages import pretrain
    history = pretrain.train_and_evaluate(make_config(args["data_dir"], args["text"]), args["workdir"],
                                          stop_at=args.get("stop_at"))
    with open(args["out"] + f".{args['process_id']}", "w") as f:
        json.dump(history, f)


if __name__ == "__main__":
    try:  # as ms3_jax.main does: the exit code goes into the goodbye to the other processes
        worker(json.loads(sys.argv[1]))
    except SystemExit as e:
        processes.exiting_with(e.code)
        raise
    except BaseException:
        processes.exiting_with(1)
        raise
