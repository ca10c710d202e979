"""Pixel-embedding pairing loss (Eq. 1, 2; multi-label Eq. 7, 8) and the CE baselines (Tab. 4).

:func:`pairing_loss` is the equation as it reads (autodiff: trains I and the class embeddings E).
:func:`pairing_loss_fast` / :func:`pairing_loss_and_prediction` give the same numbers through a
custom VJP that differentiates I only (the training step's path). Nothing here stops gradients:
targets (T in stage 2, V) are wrapped in ``jax.lax.stop_gradient`` by the caller. Labels follow
:mod:`ms3_jax.method.labels`. Shape suffixes: N pixels (n: of one chunk), K classes,
C embedding dim.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ms3_jax.method.chunking import map_pixel_chunks
from ms3_jax.method.labels import IGNORE_LABEL, MASKED_LOGIT, valid_labels

TAU = 0.07
DEFAULT_CHUNK = 16384  # pixels per chunk, = configs/pretrain.py loss.chunk (22 MB at 342 classes)


def first_argmax(x_nxk: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` (the first maximum; int32) as a max and a min over the indices that
    reach it: two plain reductions, which XLA's CPU backend runs faster than argmax's paired
    (value, index) reduction (benchmarks/RESULTS.md, scaling). Rows with a NaN give K."""
    k = x_nxk.shape[-1]
    max_nx1 = jnp.max(x_nxk, axis=-1, keepdims=True)
    iota_1xk = jnp.arange(k, dtype=jnp.int32)[None, :]
    return jnp.min(jnp.where(x_nxk == max_nx1, iota_1xk, k), axis=-1)


def _valid(valid_classes: jax.Array | None, num_classes: int) -> jax.Array:
    return (jnp.ones((num_classes,), bool) if valid_classes is None
            else jnp.asarray(valid_classes, bool))


# Pairing loss, Eq. 1/2 and the multi-label extension Eq. 7/8.
def _pairing_chunk(e_nxc, y_n, class_emb_CxK, valid_K, pos_KxK, tau, ignore_label):
    """Eq. 7/8 for n pixels as it reads, with logits l = I·Eᵀ/τ (accumulated in float32):
    loss_i = logsumexp_{k valid} l_ik − logsumexp_{k ∈ {y_i} ∪ Ỹ[y_i], k valid} l_ik.
    Returns (loss_n, 0 where not counted; counted_n: y_i usable and of a valid class; and for the
    fast path the masked logits (all_nxk, pos_nxk) and their logsumexps (lse_all_n, lse_pos_n))."""
    num_classes = class_emb_CxK.shape[1]
    acc = jnp.promote_types(e_nxc.dtype, jnp.float32)  # float64 stays float64 (numerical tests)
    y_n, ok_n = valid_labels(y_n, num_classes, ignore_label)
    ok_n = ok_n & valid_K[y_n]
    logits_nxk = jnp.dot(e_nxc.astype(class_emb_CxK.dtype), class_emb_CxK,
                         preferred_element_type=acc) * (1.0 / tau)
    pos_mask_nxk = jax.nn.one_hot(y_n, num_classes, dtype=bool)
    if pos_KxK is not None:
        pos_mask_nxk = pos_mask_nxk | pos_KxK[y_n]
    all_nxk = jnp.where(valid_K[None, :], logits_nxk, MASKED_LOGIT)
    pos_nxk = jnp.where(pos_mask_nxk & valid_K[None, :], logits_nxk, MASKED_LOGIT)
    lse_all_n = jax.nn.logsumexp(all_nxk, axis=-1)
    lse_pos_n = jax.nn.logsumexp(pos_nxk, axis=-1)
    loss_n = jnp.where(ok_n, lse_all_n - lse_pos_n, 0.0)
    return loss_n, ok_n, (all_nxk, pos_nxk), (lse_all_n, lse_pos_n)


def _operands(emb, class_emb, positives, valid_classes, product_dtype):
    """(E [K, C] in the product dtype -- default: float32, float64 for float64 I --, valid_K,
    positives bool [K, K] or None)."""
    acc = jnp.promote_types(emb.dtype, jnp.float32)
    pos_KxK = None if positives is None else jnp.asarray(positives, bool)
    return (class_emb.astype(product_dtype or acc), _valid(valid_classes, class_emb.shape[0]),
            pos_KxK)


def _mean(loss: jax.Array, weight: jax.Array) -> jax.Array:
    return jnp.sum(loss) / jnp.maximum(jnp.sum(weight), 1.0)


def pairing_loss_per_pixel(
    emb: jax.Array, class_emb: jax.Array, labels: jax.Array, positives: jax.Array | None = None,
    valid_classes: jax.Array | None = None, tau: float = TAU, *,
    chunk: int | None = DEFAULT_CHUNK, ignore_label: int = IGNORE_LABEL, product_dtype: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-pixel Eq. 7/8 (Eq. 1/2 without positives): ``(loss [...], weight [...])``, float32
    loss (0 where not counted) and 0/1 weight of the pixels that count. See :func:`pairing_loss`."""
    class_emb_KxC, valid_K, pos_KxK = _operands(emb, class_emb, positives, valid_classes,
                                                product_dtype)
    class_emb_CxK = class_emb_KxC.T  # once, not per chunk

    def body(e_nxc, y_n):
        loss_n, ok_n, _, _ = _pairing_chunk(e_nxc, y_n, class_emb_CxK, valid_K, pos_KxK, tau,
                                            ignore_label)
        return loss_n, ok_n.astype(jnp.float32)

    loss_N, weight_N = map_pixel_chunks(body, (emb.reshape(-1, class_emb.shape[1]),
                                               labels.reshape(-1).astype(jnp.int32)),
                                        (0, ignore_label), chunk)
    return loss_N.reshape(labels.shape), weight_N.reshape(labels.shape)


def pairing_loss(
    emb: jax.Array, class_emb: jax.Array, labels: jax.Array, positives: jax.Array | None = None,
    valid_classes: jax.Array | None = None, tau: float = TAU, *,
    chunk: int | None = DEFAULT_CHUNK, ignore_label: int = IGNORE_LABEL, product_dtype: Any = None,
) -> jax.Array:
    """Mean pairing loss (Eq. 7/8; Eq. 1/2 without positives) over the pixels that count; a
    float32 scalar, 0 (not NaN) when none counts. Plain autodiff: differentiable w.r.t. both
    ``emb`` and ``class_emb`` (stage 1 trains T through it; stop ``class_emb`` to fit targets).

    Args:
      emb: pixel embeddings I ``[..., C]`` (any leading dims, e.g. B, H, W), any float dtype.
      class_emb: class embeddings E (T or V), ``[K, C]``.
      labels: ``[...]`` int union ids; ``ignore_label`` / ids outside ``[0, K)`` count nothing.
      positives: bool ``[K, K]``, row y is Ỹ[y] of Eq. 6 (diagonal irrelevant), or None.
      valid_classes: bool ``[K]``, classes in the softmax (e.g. V of classes with an empty bank
        are invalid), or None for all. Pixels of invalid classes count nothing.
      tau: temperature τ (0.07, following LSeg).
      chunk: pixels per chunk (rematerialised in the backward pass): at most ``[chunk, K]``
        logits live; same values. None: one chunk.
      product_dtype: operand dtype of the ``[N, K, C]`` products, which accumulate in float32
        (float64 for float64 ``emb``) as do the softmaxes. None: that accumulation dtype;
        ``bfloat16`` rounds I and E to bfloat16 inside the products (bfloat16 GEMMs).
    """
    return _mean(*pairing_loss_per_pixel(emb, class_emb, labels, positives, valid_classes, tau,
                                         chunk=chunk, ignore_label=ignore_label,
                                         product_dtype=product_dtype))


def _fast_chunks(emb_NxC, labels_N, class_emb, valid_K, pos_KxK, tau, ignore_label, chunk,
                 with_prediction, with_grad):
    """Per pixel: loss, weight, (``with_prediction``) argmax over the valid logits, and
    (``with_grad``) d loss_i / d I_i ``[N, C]``: d loss_i / d l_i = softmax(all) − softmax(pos)
    (0 on masked classes), so d loss_i / d I_i = (p_all − p_pos)·E/τ: one more
    ``[n, K] x [K, C]`` product in the forward pass, nothing to recompute in the backward."""
    class_emb_KxC, class_emb_CxK = class_emb  # the same matrix, both orientations

    def body(e_nxc, y_n):
        loss_n, ok_n, (all_nxk, pos_nxk), (lse_all_n, lse_pos_n) = _pairing_chunk(
            e_nxc, y_n, class_emb_CxK, valid_K, pos_KxK, tau, ignore_label)
        out = (loss_n, ok_n.astype(jnp.float32))
        if with_prediction:
            out += (first_argmax(all_nxk),)
        if with_grad:
            p_nxk = jnp.exp(all_nxk - lse_all_n[:, None]) - jnp.exp(pos_nxk - lse_pos_n[:, None])
            g_nxc = jnp.dot(p_nxk.astype(class_emb_KxC.dtype), class_emb_KxC,
                            preferred_element_type=jnp.promote_types(e_nxc.dtype, jnp.float32))
            out += (jnp.where(ok_n[:, None], g_nxc * (1.0 / tau), 0.0),)
        return out

    return map_pixel_chunks(body, (emb_NxC, labels_N), (0, ignore_label), chunk, remat=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _fast_pixels(emb_NxC, labels_N, class_emb, valid_K, pos_KxK, tau, ignore_label, chunk,
                 with_prediction):
    """(loss [N], weight [N][, prediction [N]]). Custom VJP: the forward pass keeps d loss_i / d I_i
    ``[N, C]`` instead of the backward pass recomputing the ``[N, K]`` logits chunk by chunk: two
    ``[N, K, C]`` products instead of three (benchmarks/RESULTS.md, scaling)."""
    return _fast_chunks(emb_NxC, labels_N, class_emb, valid_K, pos_KxK, tau, ignore_label, chunk,
                        with_prediction, False)


def _fast_pixels_fwd(emb_NxC, labels_N, class_emb, valid_K, pos_KxK, tau, ignore_label, chunk,
                     with_prediction):
    if any(p.perturbed for p in jax.tree.leaves(class_emb)):
        raise TypeError("pairing_loss_fast / pairing_loss_and_prediction differentiate the pixel "
                        "embeddings only: wrap class_emb in jax.lax.stop_gradient, or train it "
                        "with pairing_loss")
    emb_NxC, labels_N, class_emb, valid_K, pos_KxK = jax.tree.map(
        lambda p: p.value, (emb_NxC, labels_N, class_emb, valid_K, pos_KxK))
    *outs, grad_NxC = _fast_chunks(emb_NxC, labels_N, class_emb, valid_K, pos_KxK, tau,
                                   ignore_label, chunk, with_prediction, True)
    return tuple(outs), (grad_NxC, jnp.zeros((), emb_NxC.dtype))


def _fast_pixels_bwd(tau, ignore_label, chunk, with_prediction, residuals, cotangents):
    grad_NxC, like = residuals  # `like`: a scalar carrying the embeddings' dtype
    ct_loss_N = cotangents[0]
    if isinstance(ct_loss_N, jax.custom_derivatives.SymbolicZero):
        return None, None, None, None, None
    return (ct_loss_N[:, None] * grad_NxC).astype(like.dtype), None, None, None, None


_fast_pixels.defvjp(_fast_pixels_fwd, _fast_pixels_bwd, symbolic_zeros=True)


def _fast_per_pixel(emb, class_emb, labels, positives, valid_classes, tau, chunk, ignore_label,
                    product_dtype, with_prediction):
    """(loss [...], weight [...][, prediction [...]]) of the fast path."""
    class_emb_KxC, valid_K, pos_KxK = _operands(emb, class_emb, positives, valid_classes,
                                                product_dtype)
    outs = _fast_pixels(emb.reshape(-1, class_emb.shape[1]), labels.reshape(-1).astype(jnp.int32),
                        (class_emb_KxC, class_emb_KxC.T), valid_K, pos_KxK, tau, ignore_label,
                        chunk, with_prediction)
    return tuple(x.reshape(labels.shape) for x in outs)


def pairing_loss_fast(
    emb: jax.Array, class_emb: jax.Array, labels: jax.Array, positives: jax.Array | None = None,
    valid_classes: jax.Array | None = None, tau: float = TAU, *,
    chunk: int | None = DEFAULT_CHUNK, ignore_label: int = IGNORE_LABEL, product_dtype: Any = None,
) -> jax.Array:
    """:func:`pairing_loss` (same arguments and values) with the custom VJP above: differentiable
    w.r.t. ``emb`` ONLY; differentiating ``class_emb`` raises (stop it, or use pairing_loss)."""
    return pairing_loss_and_prediction(emb, class_emb, labels, positives, valid_classes, tau,
                                       chunk=chunk, ignore_label=ignore_label,
                                       product_dtype=product_dtype, with_prediction=False)[0]


def pairing_loss_and_prediction(
    emb: jax.Array, class_emb: jax.Array, labels: jax.Array, positives: jax.Array | None = None,
    valid_classes: jax.Array | None = None, tau: float = TAU, *,
    chunk: int | None = DEFAULT_CHUNK, ignore_label: int = IGNORE_LABEL, product_dtype: Any = None,
    with_prediction: bool = True,
) -> tuple[jax.Array, jax.Array | None]:
    """:func:`pairing_loss_fast` and, from the same logits (no second ``[N, K]`` product), each
    pixel's nearest class ``argmax_{k valid} I·E_k`` (int32 ``[...]``) for prediction_accuracy."""
    loss, weight, *pred = _fast_per_pixel(emb, class_emb, labels, positives, valid_classes, tau,
                                          chunk, ignore_label, product_dtype, with_prediction)
    return _mean(loss, weight), (pred[0] if with_prediction else None)


def prediction_accuracy(pred: jax.Array, labels: jax.Array, num_classes: int,
                        ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Fraction of labelled pixels (label usable) whose prediction is their label; 0 if none."""
    y_safe, ok = valid_labels(labels, num_classes, ignore_label)
    correct = ok & (pred == y_safe)
    return jnp.sum(correct.astype(jnp.float32)) / jnp.maximum(jnp.sum(ok.astype(jnp.float32)), 1.0)


def pixel_accuracy(emb: jax.Array, class_emb: jax.Array, labels: jax.Array,
                   valid_classes: jax.Array | None = None, *, chunk: int | None = DEFAULT_CHUNK,
                   ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Fraction of labelled pixels whose nearest class embedding (argmax_k I·E_k over the valid
    classes) is their label; 0 if none."""
    num_classes, dim = class_emb.shape
    class_emb_KxC = class_emb.astype(jnp.float32)
    valid_K = _valid(valid_classes, num_classes)

    def body(e_nxc: jax.Array) -> tuple[jax.Array]:
        logits_nxk = jnp.dot(e_nxc.astype(jnp.float32), class_emb_KxC.T)
        return (first_argmax(jnp.where(valid_K[None, :], logits_nxk, MASKED_LOGIT)),)

    (pred_N,) = map_pixel_chunks(body, (emb.reshape(-1, dim),), (0,), chunk, remat=False)
    return prediction_accuracy(pred_N, labels.reshape(-1).astype(jnp.int32), num_classes,
                               ignore_label)


# Cross-entropy baselines (Tab. 4).
def _masked_ce(logits: jax.Array, labels: jax.Array, class_mask: jax.Array | None,
               ignore_label: int) -> jax.Array:
    num_classes = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    y_safe, ok = valid_labels(labels, num_classes, ignore_label)
    if class_mask is not None:
        logits = jnp.where(class_mask, logits, MASKED_LOGIT)
        ok = ok & jnp.take_along_axis(jnp.broadcast_to(class_mask, logits.shape),
                                      y_safe[..., None], axis=-1)[..., 0]
    logp_y = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y_safe[..., None],
                                 axis=-1)[..., 0]
    okf = ok.astype(jnp.float32)
    return -jnp.sum(logp_y * okf) / jnp.maximum(jnp.sum(okf), 1.0)


def ce_single_head_loss(logits_union: jax.Array, labels: jax.Array, *,
                        ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Tab. 4 "single head": one classifier over the union label space, softmax over all |Y|.
    ``logits_union [..., K]``, ``labels [...]`` (union ids). Mean over usable pixels (0 if none)."""
    return _masked_ce(logits_union, labels, None, ignore_label)


def ce_multi_head_loss(logits_union: jax.Array, labels: jax.Array, dataset_id: jax.Array,
                       dataset_of_class: jax.Array, *,
                       ignore_label: int = IGNORE_LABEL) -> jax.Array:
    """Tab. 4 "multi head": one classifier per dataset, i.e. a pixel's softmax is restricted to
    the classes of its image's dataset. ``logits_union [B, ..., K]`` (the per-dataset heads side by
    side), ``labels [B, ...]``, ``dataset_id [B]``, ``dataset_of_class [K]``. A label outside the
    image's dataset is ignored."""
    batch = labels.shape[0]
    ds_b = jnp.asarray(dataset_id).reshape((batch,) + (1,) * (labels.ndim - 1) + (1,))
    class_mask = jnp.asarray(dataset_of_class)[None, ...] == ds_b  # [B, 1.., K]
    return _masked_ce(logits_union, labels, class_mask, ignore_label)
