"""Per-class ring-buffer memory bank of momentum-encoder pixel embeddings and the visual class
embeddings computed from it (Sect. 3.2, Eq. 4). Sizes: docs/choices.md, "Memory bank: slots,
picks and the write".
Shape suffixes: N pixels, K classes, C embedding dim, P picks per class, S slots."""
from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp

from ms3_jax.method.labels import IGNORE_LABEL, valid_labels


@struct.dataclass
class MemoryBank:
    """Ring buffer per class.

    feats: ``[K, slots, C]`` stored embeddings (bf16 by default).
    ptr: ``[K]`` int32, next slot to write for each class.
    count: ``[K]`` int32, number of filled slots (``min(total enqueued, slots)``): slots
      ``0 .. count[c] - 1`` of class c, the rest hold zeros (invariant kept by :func:`init_bank`
      and :func:`enqueue`, relied on by :func:`visual_embeddings`).
    """

    feats: jax.Array
    ptr: jax.Array
    count: jax.Array

    @property
    def num_classes(self) -> int:
        return self.feats.shape[0]

    @property
    def slots(self) -> int:
        return self.feats.shape[1]

    @property
    def dim(self) -> int:
        return self.feats.shape[2]

    def slot_valid(self) -> jax.Array:
        """bool ``[K, slots]``: which slots hold an embedding."""
        return jnp.arange(self.slots)[None, :] < self.count[:, None]


def init_bank(num_classes: int, slots: int, dim: int, dtype: jnp.dtype = jnp.bfloat16) -> MemoryBank:
    """An empty bank: zeros, ``ptr = count = 0``."""
    return MemoryBank(feats=jnp.zeros((num_classes, slots, dim), dtype),
                      ptr=jnp.zeros((num_classes,), jnp.int32),
                      count=jnp.zeros((num_classes,), jnp.int32))


def sample_per_class(labels_N: jax.Array, rng: jax.Array, num_classes: int, per_class: int, *,
                     ignore_label: int = IGNORE_LABEL) -> tuple[jax.Array, jax.Array]:
    """Uniform sample without replacement of at most ``per_class`` (P) pixels of each class, by
    sorting random keys per label (O(N log N), fixed shapes).

    Returns ``(idx_KxP, valid_KxP)``: pixel indices into ``labels_N`` and a mask that is False
    where class k has fewer than P pixels (those indices are arbitrary).
    """
    n = labels_N.shape[0]
    key_N, _ = valid_labels(labels_N, num_classes, ignore_label, num_classes)  # unusable: last
    rand_N = jax.random.uniform(rng, (n,))
    sorted_lab_N, _, perm_N = jax.lax.sort((key_N, rand_N, jnp.arange(n, dtype=jnp.int32)),
                                           num_keys=2)
    classes_K = jnp.arange(num_classes, dtype=jnp.int32)
    start_K = jnp.searchsorted(sorted_lab_N, classes_K, side="left")
    end_K = jnp.searchsorted(sorted_lab_N, classes_K, side="right")
    offs_P = jnp.arange(per_class, dtype=jnp.int32)
    pos_KxP = start_K[:, None] + offs_P[None, :]
    valid_KxP = pos_KxP < end_K[:, None]
    idx_KxP = perm_N[jnp.minimum(pos_KxP, n - 1)]
    return idx_KxP, valid_KxP


def enqueue(bank: MemoryBank, emb_NxC: jax.Array, labels_N: jax.Array, rng: jax.Array,
            per_class: int, *, ignore_label: int = IGNORE_LABEL) -> MemoryBank:
    """Writes at most ``per_class`` (P) uniformly sampled pixels per class into the rings.

    Class c's picks go to slots ``(ptr[c] + arange(n_c)) % slots`` (n_c = min(#pixels of c, P)),
    overwriting the oldest entries; ``ptr += n_c (mod slots)``, ``count = min(count + n_c, slots)``.
    ``ignore_label`` and labels ``>= num_classes`` are never enqueued. The embeddings are stored
    with ``stop_gradient`` in the bank dtype. ``per_class`` is static; must be ``<= slots``.
    """
    num_classes, slots, dim = bank.feats.shape
    if per_class > slots:
        raise ValueError(f"per_class={per_class} > slots={slots}: a step would overwrite itself.")
    emb_NxC = emb_NxC.reshape(-1, dim)
    labels_N = labels_N.reshape(-1)
    idx_KxP, valid_KxP = sample_per_class(labels_N, rng, num_classes, per_class,
                                          ignore_label=ignore_label)
    # Cast first, then gather: with the batch sharded over devices XLA gathers each device's own
    # picks and all-reduces the [K, P, C] result, which is then in the (bf16) bank dtype.
    vals_KxPxC = jax.lax.stop_gradient(emb_NxC).astype(bank.feats.dtype)[idx_KxP]
    n_valid_K = jnp.sum(valid_KxP, axis=1, dtype=jnp.int32)
    slot_KxP = (bank.ptr[:, None] + jnp.arange(per_class, dtype=jnp.int32)[None, :]) % slots
    slot_KxP = jnp.where(valid_KxP, slot_KxP, slots)  # out of range -> dropped by the scatter
    class_KxP = jnp.broadcast_to(jnp.arange(num_classes, dtype=jnp.int32)[:, None], slot_KxP.shape)
    # slot -> pick (-1: none), a select: docs/choices.md, "Memory bank: slots, picks and the write"
    pick_KxP = jnp.arange(num_classes * per_class, dtype=jnp.int32).reshape(num_classes, per_class)
    pick_KxS = jnp.full((num_classes, slots), -1, jnp.int32).at[class_KxP, slot_KxP].set(
        pick_KxP, mode="drop")
    vals_RxC = vals_KxPxC.reshape(num_classes * per_class, dim)
    bits = jnp.dtype(f"uint{8 * bank.feats.dtype.itemsize}")
    feats_bits = jnp.where((pick_KxS >= 0)[..., None],
                           jax.lax.bitcast_convert_type(vals_RxC, bits)[jnp.maximum(pick_KxS, 0)],
                           jax.lax.bitcast_convert_type(bank.feats, bits))
    feats = jax.lax.bitcast_convert_type(feats_bits, bank.feats.dtype)
    return bank.replace(feats=feats, ptr=(bank.ptr + n_valid_K) % slots,
                        count=jnp.minimum(bank.count + n_valid_K, slots))


def visual_embeddings(bank: MemoryBank, v_old_KxC: jax.Array, v_valid_K: jax.Array, *,
                      eps: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Visual class embeddings from the bank, Eq. 4.

    ``V_j = Σ_i w_ij M_i / n_j`` with ``w_ij = cos(M_i, V_j_old)``, re-normalised to unit norm;
    first-seen classes take the plain mean, empty-bank classes keep ``V_old`` and are invalid
    (docs/choices.md, "Eq. 4 weights"). Unfilled slots hold zeros (the bank's invariant). Computed
    in float32 (float64 for a float64 bank). Returns ``(V [K, C], valid [K] bool = count > 0)``.
    """
    acc = jnp.promote_types(bank.feats.dtype, jnp.float32)  # float64 banks: numerical tests
    v_old_KxC = v_old_KxC.astype(acc)
    v_valid_K = jnp.asarray(v_valid_K, bool)
    v_old_unit_KxC = v_old_KxC / jnp.maximum(jnp.linalg.norm(v_old_KxC, axis=-1, keepdims=True), eps)
    # w = cos(M_i, u_j) + first_j: docs/choices.md, "Memory bank: slots, picks and the write"
    u_KxC = jnp.where(v_valid_K[:, None], v_old_unit_KxC, 0.0)
    first_K = jnp.where(v_valid_K, 0.0, 1.0).astype(acc)
    m_KxSxC = bank.feats.astype(acc)
    m_norm_KxS = jnp.maximum(jnp.sqrt(jnp.sum(m_KxSxC * m_KxSxC, axis=-1)), eps)
    w_KxS = jnp.sum(m_KxSxC * u_KxC[:, None, :], axis=-1) / m_norm_KxS + first_K[:, None]
    n_K = jnp.maximum(bank.count, 1).astype(acc)
    v_KxC = jnp.sum(m_KxSxC * w_KxS[:, :, None], axis=1) / n_K[:, None]
    v_KxC = v_KxC / jnp.maximum(jnp.linalg.norm(v_KxC, axis=-1, keepdims=True), eps)
    valid_K = bank.count > 0
    return jnp.where(valid_K[:, None], v_KxC, v_old_KxC), valid_K
