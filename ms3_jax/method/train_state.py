"""The whole pretraining state as one pytree (docs/design.md "State").

Everything that changes during training lives here, so one orbax checkpoint of it (plus the grain
iterator) resumes a run exactly. Replicated over the mesh; only the batch is sharded.
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ms3_jax.method.memory_bank import MemoryBank, init_bank


@struct.dataclass
class TrainState:
    """step; online encoder F (params, batch_stats); momentum encoder F-hat (ema_*); optimiser;
    memory bank (Sect. 3.2); visual embeddings V (Eq. 4) and which are valid; cross-modal
    similarity S (Eq. 5) and which rows have been seen; the base RNG key."""

    step: jax.Array
    params: Any
    batch_stats: Any
    ema_params: Any
    ema_batch_stats: Any
    opt_state: Any
    bank: MemoryBank
    visual_emb: jax.Array  # V [|Y|, C]
    visual_valid: jax.Array  # [|Y|] bool
    sim: jax.Array  # S [|Y|, |Y|]
    sim_seen: jax.Array  # [|Y|] bool
    rng: jax.Array

    # Not read by the non-finite guard (`nonfinite.guard`): every step writes ema_params =
    # m ema + (1 - m) params, so a NaN / inf parameter always makes its EMA non-finite (inf * 0
    # is NaN), and that is read. Reading params too made XLA:GPU copy each updated parameter
    # (docs/choices.md, "Non-finite guard: check the new state").
    FINITE_IMPLIED: ClassVar[tuple[str, ...]] = ("params",)


def init_train_state(variables: dict[str, Any], tx: optax.GradientTransformation,
                     num_classes: int, emb_dim: int, bank_slots: int, bank_dtype: Any,
                     rng: jax.Array) -> TrainState:
    """A fresh state: the momentum encoder starts as a copy of the online one, the bank empty."""
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        ema_params=copy(params), ema_batch_stats=copy(batch_stats), opt_state=tx.init(params),
        bank=init_bank(num_classes, bank_slots, emb_dim, bank_dtype),
        visual_emb=jnp.zeros((num_classes, emb_dim), jnp.float32),
        visual_valid=jnp.zeros((num_classes,), bool),
        sim=jnp.zeros((num_classes, num_classes), jnp.float32),
        sim_seen=jnp.zeros((num_classes,), bool), rng=rng)


def ema_update(ema_tree: Any, tree: Any, momentum: float) -> Any:
    """Momentum encoder update F-hat <- m F-hat + (1 - m) F (MoCo), one tree_map."""
    return jax.tree_util.tree_map(lambda e, p: momentum * e + (1.0 - momentum) * p, ema_tree, tree)
