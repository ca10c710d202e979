"""Pixel-embedding pairing loss (Eq. 1, 2, 7, 8) and the cross-entropy baselines (Tab. 4).

All functions are pure and jit-friendly. Labels live in the union label space; ``ignore_label``
(default -1, the union ignore id) and any label outside ``[0, K)`` are ignored.

The class embeddings ``E`` passed to the pairing loss (the adapted language embeddings ``T`` or the
memory-bank visual embeddings ``V``) are *targets*, not learned parameters: they get a
``stop_gradient`` here, so the loss trains only the pixel embeddings ``I`` (Sect. 3.1: the text
encoder is discarded after producing ``T``; ``V`` comes from the momentum encoder, Eq. 4).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

IGNORE_LABEL = -1  # union-space ignore id (label_space.UNION_IGNORE); ids outside [0, K) are ignored too
TAU = 0.07
DEFAULT_CHUNK = 16384  # pixels per chunk: 16384 x 342 classes x 4 B = 22 MB of logits.
_NEG = -1e30  # finite "minus infinity" for masked logits: keeps softmax gradients NaN-free.


# ---------------------------------------------------------------------------------------------
# Pixel chunking.
# ---------------------------------------------------------------------------------------------
def chunk_layout(n: int, chunk: int) -> tuple[int, int]:
    """``(n_chunks, chunk')`` with ``chunk' <= chunk``: the smallest ``n_chunks >= ceil(n / chunk)``
    (up to twice that) that divides ``n`` -- so no padding is needed -- else ``ceil(n / chunk)``
    chunks of ``chunk`` pixels with padding."""
    n0 = -(-n // chunk)
    for n_chunks in range(n0, 2 * n0 + 1):
        if n % n_chunks == 0:
            return n_chunks, n // n_chunks
    return n0, chunk


def pixel_chunk_grid(arrays: Sequence[jax.Array], pad_values: Sequence[float | int],
                     chunk: int) -> tuple[list[jax.Array], int, int]:
    """Pads ``[N, ...]`` arrays to ``n_chunks * chunk`` and views them as ``[chunk, n_chunks, ...]``
    (a free reshape, no transpose); chunk ``j`` is ``grid[:, j]`` = pixels ``j, j + n_chunks, ...``.

    Taking a chunk along axis 1 keeps it evenly spread over a pixel axis sharded across devices
    (data parallelism), so looping over chunks needs neither communication nor a transposed copy.
    Returns ``(grids, n_chunks, chunk)``.
    """
    n = arrays[0].shape[0]
    n_chunks, chunk = chunk_layout(n, chunk)
    n_pad = n_chunks * chunk - n
    grids = []
    for x, pad in zip(arrays, pad_values):
        if n_pad:
            x = jnp.pad(x, [(0, n_pad)] + [(0, 0)] * (x.ndim - 1), constant_values=pad)
        grids.append(x.reshape((chunk, n_chunks) + x.shape[1:]))
    return grids, n_chunks, chunk


def take_chunk(grids: Sequence[jax.Array], i: jax.Array) -> list[jax.Array]:
    """Chunk ``i`` (``[chunk, ...]``) of each grid from :func:`pixel_chunk_grid`."""
    return [jax.lax.dynamic_index_in_dim(g, i, axis=1, keepdims=False) for g in grids]


def map_pixel_chunks(
    body: Callable[..., tuple[jax.Array, ...]],
    arrays: Sequence[jax.Array],
    pad_values: Sequence[float | int],
    chunk: int | None,
    *,
    remat: bool = True,
) -> tuple[jax.Array, ...]:
    """Applies ``body`` to pixel chunks of at most ``chunk`` pixels, returns per-pixel outputs.

    ``arrays`` all have leading dim N (pixels) and are padded with ``pad_values`` if ``chunk``
    does not fit N (see :func:`chunk_layout`). ``body`` maps ``[chunk, ...]`` arrays to a tuple of
    ``[chunk, ...]`` arrays; the result is the tuple of ``[N, ...]`` arrays. With ``remat`` the
    body is ``jax.checkpoint``-ed, so the backward pass recomputes one chunk at a time and only
    ``[chunk, K]``-sized intermediates are ever live. ``chunk=None`` or ``>= N``: a single call.
    """
    n = arrays[0].shape[0]
    if chunk is None or chunk >= n:
        return tuple(body(*arrays))
    grids, n_chunks, chunk = pixel_chunk_grid(arrays, pad_values, chunk)

    def one(i: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(body(*take_chunk(grids, i)))

    if remat:
        one = jax.checkpoint(one, prevent_cse=False)
    outs = jax.lax.map(one, jnp.arange(n_chunks))  # each [n_chunks, chunk, ...]
    return tuple(jnp.swapaxes(y, 0, 1).reshape((n_chunks * chunk,) + y.shape[2:])[:n]
                 for y in outs)


def _label_mask(labels: jax.Array, num_classes: int, ignore_label: int) -> tuple[jax.Array, jax.Array]:
    """Returns (in-range labels with ignored ones set to 0, bool mask of usable labels)."""
    labels = labels.astype(jnp.int32)
    ok = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
    return jnp.where(ok, labels, 0), ok


# ---------------------------------------------------------------------------------------------
# Pairing loss, Eq. 1/2 and the multi-label extension Eq. 7/8.
# ---------------------------------------------------------------------------------------------
def pairing_loss_per_pixel(
    emb: jax.Array,
    class_emb: jax.Array,
    labels: jax.Array,
    positives: jax.Array | None = None,
    valid_classes: jax.Array | None = None,
    tau: float = TAU,
    *,
    chunk: int | None = DEFAULT_CHUNK,
    ignore_label: int = IGNORE_LABEL,
) -> tuple[jax.Array, jax.Array]:
    """Per-pixel pairing loss (Eq. 7/8; Eq. 1/2 when ``positives`` is None or empty).

    loss_i = logsumexp_{k valid} (I_i·E_k/τ) − logsumexp_{k valid, k ∈ {y_i} ∪ Ỹ[y_i]} (I_i·E_k/τ)

    Args:
      emb: pixel embeddings ``I``, ``[..., C]`` (any leading dims, e.g. B, H, W); any float dtype.
      class_emb: class embeddings ``E`` (``T`` or ``V``), ``[K, C]``; a target (stop_gradient).
      labels: ``[...]`` int, union label ids; ``ignore_label`` / out-of-range ids are ignored.
      positives: bool ``[K, K]``, row ``y`` is ``Ỹ_y`` of Eq. 6 (diagonal irrelevant), or None.
      valid_classes: bool ``[K]``: classes that take part in the softmax (e.g. ``V`` of classes
        with an empty bank are invalid), or None for all. Pixels of invalid classes count nothing.
      tau: temperature τ (0.07, following LSeg).
      chunk: pixels per chunk; at most ``[chunk, K]`` float32 logits are live, forward and backward.
      ignore_label: label id to ignore.

    Returns:
      ``(loss [...], weight [...])``: float32 per-pixel loss (0 where not counted) and a float32
      0/1 mask of the pixels that count (label usable and of a valid class).
    """
    lead_shape = labels.shape
    num_classes, dim = class_emb.shape
    emb_NxC = emb.reshape(-1, dim)
    labels_N = labels.reshape(-1).astype(jnp.int32)
    acc = jnp.promote_types(emb.dtype, jnp.float32)  # float64 stays float64 (numerical tests)
    class_emb_KxC = jax.lax.stop_gradient(class_emb).astype(acc)
    valid_K = (jnp.ones((num_classes,), bool) if valid_classes is None
               else jnp.asarray(valid_classes, bool))
    pos_KxK = None if positives is None else jax.lax.stop_gradient(jnp.asarray(positives, bool))
    inv_tau = 1.0 / tau

    def body(e_nxc: jax.Array, y_n: jax.Array) -> tuple[jax.Array, jax.Array]:
        y_safe_n, ok_n = _label_mask(y_n, num_classes, ignore_label)
        ok_n = ok_n & valid_K[y_safe_n]
        logits_nxk = jnp.dot(e_nxc.astype(acc), class_emb_KxC.T,
                             preferred_element_type=acc) * inv_tau
        all_nxk = jnp.where(valid_K[None, :], logits_nxk, _NEG)
        pos_mask_nxk = jax.nn.one_hot(y_safe_n, num_classes, dtype=bool)
        if pos_KxK is not None:
            pos_mask_nxk = pos_mask_nxk | pos_KxK[y_safe_n]
        pos_nxk = jnp.where(pos_mask_nxk & valid_K[None, :], logits_nxk, _NEG)
        loss_n = jax.nn.logsumexp(all_nxk, axis=-1) - jax.nn.logsumexp(pos_nxk, axis=-1)
        loss_n = jnp.where(ok_n, loss_n, 0.0)
        return loss_n, ok_n.astype(jnp.float32)

    loss_N, weight_N = map_pixel_chunks(body, (emb_NxC, labels_N), (0, ignore_label), chunk)
    return loss_N.reshape(lead_shape), weight_N.reshape(lead_shape)


def pairing_loss(
    emb: jax.Array,
    class_emb: jax.Array,
    labels: jax.Array,
    positives: jax.Array | None = None,
    valid_classes: jax.Array | None = None,
    tau: float = TAU,
    *,
    chunk: int | None = DEFAULT_CHUNK,
    ignore_label: int = IGNORE_LABEL,
) -> jax.Array:
    """Mean pairing loss (Eq. 7/8, or Eq. 1/2 without positives) over the pixels that count.

    Arguments as in :func:`pairing_loss_per_pixel`. Pixels that count: label not ignored, in
    range, and of a valid class. Returns a float32 scalar; 0 (not NaN) when no pixel counts.
    Gradients flow to ``emb`` only; ``class_emb`` is a fixed target.
    """
    loss, weight = pairing_loss_per_pixel(emb, class_emb, labels, positives, valid_classes, tau,
                                          chunk=chunk, ignore_label=ignore_label)
    return jnp.sum(loss) / jnp.maximum(jnp.sum(weight), 1.0)


def pixel_accuracy(
    emb: jax.Array,
    class_emb: jax.Array,
    labels: jax.Array,
    valid_classes: jax.Array | None = None,
    *,
    chunk: int | None = DEFAULT_CHUNK,
    ignore_label: int = IGNORE_LABEL,
) -> jax.Array:
    """Fraction of labelled pixels whose nearest class embedding (argmax_k I·E_k over the valid
    classes) is their label. Ignored / out-of-range labels don't count; 0 when none count."""
    num_classes, dim = class_emb.shape
    emb_NxC = emb.reshape(-1, dim)
    labels_N = labels.reshape(-1).astype(jnp.int32)
    class_emb_KxC = class_emb.astype(jnp.float32)
    valid_K = (jnp.ones((num_classes,), bool) if valid_classes is None
               else jnp.asarray(valid_classes, bool))

    def body(e_nxc: jax.Array, y_n: jax.Array) -> tuple[jax.Array, jax.Array]:
        y_safe_n, ok_n = _label_mask(y_n, num_classes, ignore_label)
        logits_nxk = jnp.dot(e_nxc.astype(jnp.float32), class_emb_KxC.T)
        pred_n = jnp.argmax(jnp.where(valid_K[None, :], logits_nxk, _NEG), axis=-1)
        return (ok_n & (pred_n == y_safe_n)).astype(jnp.float32), ok_n.astype(jnp.float32)

    correct_N, ok_N = map_pixel_chunks(body, (emb_NxC, labels_N), (0, ignore_label), chunk,
                                       remat=False)
    return jnp.sum(correct_N) / jnp.maximum(jnp.sum(ok_N), 1.0)


# ---------------------------------------------------------------------------------------------
# Cross-entropy baselines (Tab. 4).
# ---------------------------------------------------------------------------------------------
def _masked_ce(logits: jax.Array, labels: jax.Array, class_mask: jax.Array | None,
               ignore_label: int) -> jax.Array:
    num_classes = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    y_safe, ok = _label_mask(labels, num_classes, ignore_label)
    if class_mask is not None:
        logits = jnp.where(class_mask, logits, _NEG)
        ok = ok & jnp.take_along_axis(jnp.broadcast_to(class_mask, logits.shape),
                                      y_safe[..., None], axis=-1)[..., 0]
    logp_y = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y_safe[..., None],
                                 axis=-1)[..., 0]
    okf = ok.astype(jnp.float32)
    return -jnp.sum(logp_y * okf) / jnp.maximum(jnp.sum(okf), 1.0)


def ce_single_head_loss(logits_union: jax.Array, labels: jax.Array, *,
                        ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Tab. 4 "single head": one classifier over the union label space, softmax over all |Y|.

    ``logits_union [..., K]``, ``labels [...]`` (union ids). Mean over non-ignored pixels (0 if none).
    """
    return _masked_ce(logits_union, labels, None, ignore_label)


def ce_multi_head_loss(logits_union: jax.Array, labels: jax.Array, dataset_id: jax.Array,
                       dataset_of_class: jax.Array, *,
                       ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Tab. 4 "multi head": one classifier per dataset, i.e. the softmax of a pixel is restricted
    to the classes of its image's own dataset.

    Args:
      logits_union: ``[B, ..., K]`` union-space logits (the per-dataset heads side by side).
      labels: ``[B, ...]`` union label ids.
      dataset_id: ``[B]`` int, dataset of each image.
      dataset_of_class: ``[K]`` int, dataset that owns each union class.
    A label that does not belong to the image's dataset is treated as ignored.
    """
    batch = labels.shape[0]
    ds_b = jnp.asarray(dataset_id).reshape((batch,) + (1,) * (labels.ndim - 1) + (1,))
    class_mask = jnp.asarray(dataset_of_class)[None, ...] == ds_b  # [B, 1.., K]
    return _masked_ce(logits_union, labels, class_mask, ignore_label)
