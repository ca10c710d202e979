"""Pixel-embedding pairing loss (Eq. 1, 2, 7, 8) and the cross-entropy baselines (Tab. 4).

All functions are pure and jit-friendly. Labels live in the union label space; ``ignore_label``
(default -1, the union ignore id) and any label outside ``[0, K)`` are ignored.

The class embeddings ``E`` passed to the pairing loss (the adapted language embeddings ``T`` or the
memory-bank visual embeddings ``V``) are *targets*, not learned parameters: they get a
``stop_gradient`` here, so the loss trains only the pixel embeddings ``I`` (Sect. 3.1: the text
encoder is discarded after producing ``T``; ``V`` comes from the momentum encoder, Eq. 4).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

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


def first_argmax(x_nxk: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` (the first maximum; int32) as a max and a min over the indices that
    reach it: two plain reductions, which XLA's CPU backend runs faster than argmax's paired
    (value, index) reduction (benchmarks/RESULTS.md, scaling). Rows with a NaN give K."""
    k = x_nxk.shape[-1]
    max_nx1 = jnp.max(x_nxk, axis=-1, keepdims=True)
    iota_1xk = jnp.arange(k, dtype=jnp.int32)[None, :]
    return jnp.min(jnp.where(x_nxk == max_nx1, iota_1xk, k), axis=-1)


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
    product_dtype: Any = None,
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
      product_dtype: operand dtype of the two ``[N, K, C]`` products (logits, gradient); they
        always accumulate in float32 (float64 for float64 embeddings), as do the softmaxes.
        None: that accumulation dtype. ``bfloat16`` (pretraining in bfloat16 compute) rounds
        ``I`` and ``E`` to 8 bits of mantissa inside the products and runs them on bfloat16 GEMMs.

    Returns:
      ``(loss [...], weight [...])``: float32 per-pixel loss (0 where not counted) and a float32
      0/1 mask of the pixels that count (label usable and of a valid class).
    """
    loss, weight, _ = _pairing_per_pixel(emb, class_emb, labels, positives, valid_classes, tau,
                                         chunk, ignore_label, product_dtype, with_prediction=False)
    return loss, weight


def _pairing_per_pixel(emb, class_emb, labels, positives, valid_classes, tau, chunk, ignore_label,
                       product_dtype, with_prediction):
    lead_shape = labels.shape
    num_classes, dim = class_emb.shape
    acc = jnp.promote_types(emb.dtype, jnp.float32)  # float64 stays float64 (numerical tests)
    class_emb_KxC = jax.lax.stop_gradient(class_emb).astype(product_dtype or acc)
    class_emb_CxK = class_emb_KxC.T  # once, not per chunk
    valid_K = (jnp.ones((num_classes,), bool) if valid_classes is None
               else jnp.asarray(valid_classes, bool))
    pos_KxK = None if positives is None else jax.lax.stop_gradient(jnp.asarray(positives, bool))
    outs = _pairing_pixels(emb.reshape(-1, dim), labels.reshape(-1).astype(jnp.int32),
                           (class_emb_KxC, class_emb_CxK), valid_K, pos_KxK, tau, ignore_label,
                           chunk, with_prediction)
    loss_N, weight_N = outs[:2]
    pred = outs[2].reshape(lead_shape) if with_prediction else None
    return loss_N.reshape(lead_shape), weight_N.reshape(lead_shape), pred


def _pairing_terms(e_nxc: jax.Array, y_n: jax.Array, class_emb: tuple[jax.Array, jax.Array],
                   valid_K: jax.Array,
                   pos_KxK: jax.Array | None, tau: float, ignore_label: int,
                   with_prediction: bool, with_grad: bool) -> tuple[jax.Array, ...]:
    """One chunk: per-pixel loss, 0/1 weight, (``with_prediction``) argmax_k over the valid
    logits, and (``with_grad``) d loss_i / d I_i ``[n, C]``.

    The gradient of ``lse_all - lse_pos`` w.r.t. the logits is ``softmax(all) - softmax(pos)``
    (masked classes get exactly 0), so ``d loss / d I = (p_all - p_pos) E / tau``: one extra
    ``[n, K] x [K, C]`` product in the forward pass, nothing to recompute in the backward.
    """
    class_emb_KxC, class_emb_CxK = class_emb  # the same matrix, both orientations
    num_classes, product = class_emb_KxC.shape[0], class_emb_KxC.dtype
    acc = jnp.promote_types(e_nxc.dtype, jnp.float32)
    y_safe_n, ok_n = _label_mask(y_n, num_classes, ignore_label)
    ok_n = ok_n & valid_K[y_safe_n]
    inv_tau = 1.0 / tau
    logits_nxk = jnp.dot(e_nxc.astype(product), class_emb_CxK, preferred_element_type=acc) * inv_tau
    all_nxk = jnp.where(valid_K[None, :], logits_nxk, _NEG)
    pos_mask_nxk = jax.nn.one_hot(y_safe_n, num_classes, dtype=bool)
    if pos_KxK is not None:
        pos_mask_nxk = pos_mask_nxk | pos_KxK[y_safe_n]
    pos_nxk = jnp.where(pos_mask_nxk & valid_K[None, :], logits_nxk, _NEG)
    lse_all_n = jax.nn.logsumexp(all_nxk, axis=-1)
    lse_pos_n = jax.nn.logsumexp(pos_nxk, axis=-1)
    out = (jnp.where(ok_n, lse_all_n - lse_pos_n, 0.0), ok_n.astype(jnp.float32))
    if with_prediction:
        out += (first_argmax(all_nxk),)
    if with_grad:
        p_nxk = jnp.exp(all_nxk - lse_all_n[:, None]) - jnp.exp(pos_nxk - lse_pos_n[:, None])
        g_nxc = jnp.dot(p_nxk.astype(product), class_emb_KxC, preferred_element_type=acc) * inv_tau
        out += (jnp.where(ok_n[:, None], g_nxc, 0.0),)
    return out


def _pairing_chunks(emb_NxC, labels_N, class_emb, valid_K, pos_KxK, tau, ignore_label, chunk,
                    with_prediction, with_grad):
    body = lambda e, y: _pairing_terms(e, y, class_emb, valid_K, pos_KxK, tau, ignore_label,
                                       with_prediction, with_grad)
    return map_pixel_chunks(body, (emb_NxC, labels_N), (0, ignore_label), chunk, remat=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _pairing_pixels(emb_NxC, labels_N, class_emb, valid_K, pos_KxK, tau, ignore_label, chunk,
                    with_prediction):
    """(loss [N], weight [N][, prediction [N]]) of Eq. 7/8 per pixel, differentiable w.r.t.
    ``emb_NxC`` only (the class embeddings are targets). Custom VJP: the forward pass keeps
    d loss_i / d I_i ``[N, C]`` (the size of the embeddings) instead of recomputing the ``[N, K]``
    logits chunk by chunk and back-propagating through the masked logsumexps: two ``[N, K, C]``
    products instead of three (benchmarks/RESULTS.md, scaling)."""
    return _pairing_chunks(emb_NxC, labels_N, class_emb, valid_K, pos_KxK, tau, ignore_label,
                           chunk, with_prediction, False)


def _pairing_pixels_fwd(emb_NxC, labels_N, class_emb, valid_K, pos_KxK, tau, ignore_label,
                        chunk, with_prediction):
    *outs, grad_NxC = _pairing_chunks(emb_NxC, labels_N, class_emb, valid_K, pos_KxK, tau,
                                      ignore_label, chunk, with_prediction, True)
    return tuple(outs), (grad_NxC, jnp.zeros((), emb_NxC.dtype))


def _pairing_pixels_bwd(tau, ignore_label, chunk, with_prediction, residuals, cotangents):
    grad_NxC, like = residuals  # `like`: a scalar carrying the embeddings' dtype
    ct_loss_N = cotangents[0]
    return ((ct_loss_N[:, None] * grad_NxC).astype(like.dtype), None, None, None, None)


_pairing_pixels.defvjp(_pairing_pixels_fwd, _pairing_pixels_bwd)


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
    product_dtype: Any = None,
) -> jax.Array:
    """Mean pairing loss (Eq. 7/8, or Eq. 1/2 without positives) over the pixels that count.

    Arguments as in :func:`pairing_loss_per_pixel`. Pixels that count: label not ignored, in
    range, and of a valid class. Returns a float32 scalar; 0 (not NaN) when no pixel counts.
    Gradients flow to ``emb`` only; ``class_emb`` is a fixed target.
    """
    return pairing_loss_and_prediction(emb, class_emb, labels, positives, valid_classes, tau,
                                       chunk=chunk, ignore_label=ignore_label,
                                       product_dtype=product_dtype, with_prediction=False)[0]


def pairing_loss_and_prediction(
    emb: jax.Array,
    class_emb: jax.Array,
    labels: jax.Array,
    positives: jax.Array | None = None,
    valid_classes: jax.Array | None = None,
    tau: float = TAU,
    *,
    chunk: int | None = DEFAULT_CHUNK,
    ignore_label: int = IGNORE_LABEL,
    product_dtype: Any = None,
    with_prediction: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """:func:`pairing_loss` and, from the same logits (no second ``[N, K]`` product), each pixel's
    nearest class ``argmax_{k valid} I·E_k`` (int32 ``[...]``) for :func:`prediction_accuracy`."""
    loss, weight, pred = _pairing_per_pixel(emb, class_emb, labels, positives, valid_classes, tau,
                                            chunk, ignore_label, product_dtype, with_prediction)
    return jnp.sum(loss) / jnp.maximum(jnp.sum(weight), 1.0), pred


def prediction_accuracy(pred: jax.Array, labels: jax.Array, num_classes: int,
                        ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Fraction of labelled pixels (label not ignored, in range) whose prediction is their label;
    0 when none count."""
    y_safe, ok = _label_mask(labels, num_classes, ignore_label)
    correct = ok & (pred == y_safe)
    return jnp.sum(correct.astype(jnp.float32)) / jnp.maximum(jnp.sum(ok.astype(jnp.float32)), 1.0)


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

    def body(e_nxc: jax.Array) -> tuple[jax.Array]:
        logits_nxk = jnp.dot(e_nxc.astype(jnp.float32), class_emb_KxC.T)
        return (first_argmax(jnp.where(valid_K[None, :], logits_nxk, _NEG)),)

    (pred_N,) = map_pixel_chunks(body, (emb_NxC,), (0,), chunk, remat=False)
    return prediction_accuracy(pred_N, labels_N, num_classes, ignore_label)


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
