"""A toy trainer with the interface `loop.run` expects (compiles in a fraction of a second), for
the reliability tests: preemption, non-finite steps, checkpoint integrity."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ms3_jax.engine import checkpointing, loop, nonfinite

TRUE_W = np.asarray([1.0, -2.0, 3.0, 0.5], np.float32)


@struct.dataclass
class ToyState:
    step: jax.Array
    params: jax.Array
    opt_state: Any


class ToyIterator:
    """Batches that are a pure function of their index, like `TrainIterator` (the state is the
    next index). `bad[step]` plants a NaN loss ('loss') or a NaN gradient with a finite loss
    ('grad') in the batch of that step; `unreadable[step]` reports replaced records."""

    def __init__(self, bad=None, unreadable=None, batch=8, shard=(0, 1)):
        self.next_batch, self.bad, self.unreadable = 0, bad or {}, unreadable
        self.batch, self.shard = batch, shard

    def __next__(self):
        i = self.next_batch
        self.next_batch += 1
        rng = np.random.default_rng(i)
        x = rng.normal(size=(self.batch, 4)).astype(np.float32)
        y = (x @ TRUE_W + rng.normal(0, 0.1, self.batch)).astype(np.float32)
        c = np.ones((self.batch,), np.float32)
        kind = self.bad.get(i + 1)
        if kind == "loss":
            x[0, 0] = np.nan
        elif kind == "grad":
            c[:] = 0.0  # sqrt(|w0| * 0): value 0, gradient inf * 0 = NaN
        p, n = self.shard
        b = self.batch // n
        out = {"x": x[p * b:(p + 1) * b], "y": y[p * b:(p + 1) * b], "c": c[p * b:(p + 1) * b]}
        if self.unreadable is not None:  # records replaced, per example
            out["unreadable"] = np.zeros((b,), np.int32)
            out["unreadable"][0] = self.unreadable.get(i + 1, 0)
        return out

    def get_state(self):
        return {"next_batch": self.next_batch}

    def set_state(self, state):
        self.next_batch = state["next_batch"]


class ToyTrainer:
    """Linear regression + sqrt(|w0| c), SGD with momentum, jitted over a 'data' mesh with the
    non-finite guard, like the real trainers. `on_step(n)` runs after the n-th step call."""

    def __init__(self, config, devices=None, on_step=None):
        mesh = Mesh(np.asarray(devices or jax.devices()), ("data",))
        self.replicated, self.data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        self.tx = optax.sgd(0.05, momentum=0.9)
        self.calls, self.on_step = 0, on_step

        def train_step(state, batch):
            def loss_fn(w):
                fit = jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
                return fit + jnp.mean(jnp.sqrt(jnp.abs(w[0]) * batch["c"]))

            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                 opt_state=opt_state), {"loss": loss}

        self._step = jax.jit(nonfinite.guard(train_step, nonfinite.mode_of(config)),
                             in_shardings=(self.replicated, self.data),
                             out_shardings=(self.replicated, self.replicated), donate_argnums=0)

    def init_state(self):
        params = jnp.ones((4,), jnp.float32)
        return jax.device_put(ToyState(step=jnp.zeros((), jnp.int32), params=params,
                                       opt_state=self.tx.init(params)), self.replicated)

    def global_batch(self, local):
        return {k: jax.make_array_from_process_local_data(self.data, local[k]) for k in ("x", "y", "c")}

    def step(self, state, batch):
        out = self._step(state, batch)
        self.calls += 1
        if self.on_step is not None:
            self.on_step(self.calls)
        return out


def toy_config(**overrides):
    c = ml_collections.ConfigDict(dict(log_every=2, checkpoint_every=3, batch_size=8,
                                       nonfinite="stop"))
    c.update(overrides)
    return c


def toy_run(workdir, end, *, bad=None, unreadable=None, on_step=None, params_log=None, **overrides):
    """loop.run of the toy from the latest checkpoint in `workdir` to `end`: (history, state)."""
    config = toy_config(**overrides)
    trainer = ToyTrainer(config, on_step=on_step)
    mngr = checkpointing.checkpoint_manager(str(workdir))
    iterator = ToyIterator(bad, unreadable)
    state, start = loop.restore_latest(mngr, trainer.init_state(), iterator, str(workdir))
    after = None
    if params_log is not None:
        after = lambda step, s: params_log.append((step, np.array(jax.device_get(s.params), copy=True)))
    history = []
    try:
        state = loop.run(trainer, state, iterator, config, start=start, end=end, num_steps=end,
                         mngr=mngr, writer=None, history=history, after_step=after)
    finally:
        mngr.close()
    return history, state


def restore_toy(workdir, step=None):
    """(step, params, iterator state) of the latest (or given) complete checkpoint."""
    mngr = checkpointing.checkpoint_manager(str(workdir))
    try:
        step = step or mngr.latest_step()
        it = ToyIterator()
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                          ToyTrainer(toy_config()).init_state())
        from ms3_jax.data import pipeline
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=pipeline.checkpoint_restore_args(it)))
        return step, np.asarray(restored.state.params), it.get_state()
    finally:
        mngr.close()
