"""What a train step does with a NaN / inf (`config.nonfinite`: 'stop' or 'skip').

`guard(step, mode)` wraps a pure `step(state, *args) -> (state, metrics)` before it is jitted and
adds, inside the step (no host round-trip):

  finite   1.0 when the loss and every floating leaf of the new state are finite, else 0.0.
           Fields a state class names in `FINITE_IMPLIED` are not read: their non-finite values
           always reach another field that is (the pretraining state's params, its EMA).
  skipped  ('skip' only) 1.0 when the step was dropped (the old state kept, step counter moved).

The loop (`loop.run`) acts on them: docs/choices.md, "Non-finite guard: check the new state".
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

MODES = ("stop", "skip")


def mode_of(config: Any) -> str:
    """`config.nonfinite` ('stop' when the field is absent), validated."""
    mode = config.get("nonfinite", "stop")
    if mode not in MODES:
        raise ValueError(f"nonfinite must be one of {MODES}, got {mode!r}")
    return mode


def max_skipped(config: Any, num_steps: int) -> int:
    """How many skipped steps a run may have (`config.nonfinite_max_skipped`, see module doc)."""
    cap = config.get("nonfinite_max_skipped", 0.1)
    if not cap > 0:
        raise ValueError(f"nonfinite_max_skipped must be > 0 (a count >= 1 or a fraction < 1 of "
                         f"the steps), got {cap!r}")
    return int(cap) if cap >= 1 else max(1, int(cap * num_steps))


def all_finite(tree: Any) -> jax.Array:
    """bool scalar: every floating leaf of `tree` is free of NaN / inf."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def guard(step_fn: Callable[..., tuple[Any, dict[str, jax.Array]]],
          mode: str) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """`step_fn` with the `finite` metric and, in 'skip' mode, bad steps dropped (see module doc).

    The state must be a flax struct with a `step` field (all our train states are)."""
    if mode not in MODES:
        raise ValueError(f"nonfinite must be one of {MODES}, got {mode!r}")

    @functools.wraps(step_fn)
    def guarded(state: Any, *args: Any) -> tuple[Any, dict[str, jax.Array]]:
        new, metrics = step_fn(state, *args)
        implied = getattr(type(new), "FINITE_IMPLIED", ())
        ok = jnp.isfinite(metrics["loss"]) & all_finite(new.replace(**dict.fromkeys(implied)))
        metrics = {**metrics, "finite": ok.astype(jnp.float32)}
        if mode == "skip":
            kept = state.replace(step=new.step)
            new = jax.lax.cond(ok, lambda n, k: n, lambda n, k: k, new, kept)
            metrics["skipped"] = 1.0 - metrics["finite"]
        return new, metrics

    return guarded
