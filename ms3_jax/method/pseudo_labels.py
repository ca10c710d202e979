"""Multimodal pseudo-labels for unlabeled images (paper App. D, Tab. 10).

A pixel is labelled when argmax cos(I_l, T) (language head) and argmax cos(I_v, V) (visual
head, valid V rows only) name the same class NAME (`name_id_K`); it takes the visual argmax's
class. Choices (docs/choices.md): "Pseudo-label rule", "The same category = the same name",
"Pseudo-label confidence" (`pseudo.threshold`), "Pseudo-labels from the online model's
forward pass".
Shape suffixes: N pixels, K classes, C embedding dim.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ms3_jax.data.label_space import UNLABELED_PIXEL
from ms3_jax.method.chunking import map_pixel_chunks
from ms3_jax.method.labels import IGNORE_LABEL, MASKED_LOGIT


def _unit(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _nearest(emb_NxC: jax.Array, class_KxC: jax.Array, valid_K: jax.Array, name_id_K: jax.Array,
             tau: float) -> tuple[jax.Array, jax.Array]:
    """(argmax_k cos(emb, class_k) over valid k [N] int32, the softmax probability at tau of its
    name, summed over the valid classes with that name [N])."""
    logits_NxK = jnp.where(valid_K[None, :], jnp.dot(emb_NxC, class_KxC.T) / tau, MASKED_LOGIT)
    best_N = jnp.argmax(logits_NxK, axis=-1).astype(jnp.int32)
    prob_NxK = jnp.exp(logits_NxK - jax.nn.logsumexp(logits_NxK, axis=-1, keepdims=True))
    same_NxK = (name_id_K[None, :] == name_id_K[best_N][:, None]) & valid_K[None, :]
    return best_N, jnp.sum(jnp.where(same_NxK, prob_NxK, 0.0), axis=-1)


def agreement_labels(lang_NxC: jax.Array, vis_NxC: jax.Array, text_KxC: jax.Array,
                     visual_KxC: jax.Array, visual_valid_K: jax.Array, name_id_K: jax.Array, *,
                     threshold: float = 0.0, tau: float = 0.07) -> tuple[jax.Array, jax.Array]:
    """The App. D rule per pixel, decided per class name.

    Args:
      lang_NxC, vis_NxC: language- / visual-head pixel embeddings (normalised here: cosine).
      text_KxC: T. visual_KxC: V; rows with `visual_valid_K` False never win (any content).
      name_id_K: int [K], class -> id of its name (`labels.distinct_names`): the same category.
      threshold: minimum softmax probability (at `tau`) of the chosen name, in both modalities.
    Returns:
      (label_N int32: the visual argmax's class where its name is the language argmax's name,
       else -1; also -1 where no V row is valid or a confidence is below `threshold`;
       agree_N bool: the two argmaxes' names agree, before the threshold).
    """
    valid_K = jnp.asarray(visual_valid_K, bool)
    name_id_K = jnp.asarray(name_id_K, jnp.int32)
    lang_best_N, lang_prob_N = _nearest(_unit(lang_NxC), _unit(text_KxC),
                                        jnp.ones(valid_K.shape, bool), name_id_K, tau)
    vis_best_N, vis_prob_N = _nearest(_unit(vis_NxC), _unit(visual_KxC), valid_K, name_id_K, tau)
    agree_N = (name_id_K[lang_best_N] == name_id_K[vis_best_N]) & jnp.any(valid_K)
    keep_N = agree_N & (lang_prob_N >= threshold) & (vis_prob_N >= threshold)
    return jnp.where(keep_N, vis_best_N, IGNORE_LABEL), agree_N


def label_unlabeled_pixels(labels_BxHxW: jax.Array, lang_BxHxWxC: jax.Array,
                           vis_BxHxWxC: jax.Array, text_KxC: jax.Array, visual_KxC: jax.Array,
                           visual_valid_K: jax.Array, name_id_K: jax.Array, *,
                           threshold: float = 0.0, tau: float = 0.07,
                           chunk: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Replaces the `UNLABELED_PIXEL` (-2) entries of `labels_BxHxW` by their App. D pseudo-label.

    -1 (crop padding) is never labelled; labelled pixels pass through. `name_id_K`: see
    `agreement_labels`. Jittable, chunked over pixels, under `stop_gradient` (docs/choices.md,
    "Pseudo-labels from the online model's forward pass").

    Returns (labels int32 [B, H, W] with -1 = ignore, metrics):
      pseudo_fraction: pseudo-labelled / unlabeled pixels (0 without unlabeled pixels);
      pseudo_agreement: unlabeled pixels whose language and visual argmax have the same name
        (before the threshold) / unlabeled pixels. Always pseudo_fraction <= pseudo_agreement.
    """
    dim = text_KxC.shape[-1]
    lang_NxC = jax.lax.stop_gradient(lang_BxHxWxC).reshape(-1, dim)
    vis_NxC = jax.lax.stop_gradient(vis_BxHxWxC).reshape(-1, dim)
    text_KxC, visual_KxC = jax.lax.stop_gradient(text_KxC), jax.lax.stop_gradient(visual_KxC)

    def body(l_nxc: jax.Array, v_nxc: jax.Array) -> tuple[jax.Array, jax.Array]:
        return agreement_labels(l_nxc, v_nxc, text_KxC, visual_KxC, visual_valid_K, name_id_K,
                                threshold=threshold, tau=tau)

    label_N, agree_N = map_pixel_chunks(body, (lang_NxC, vis_NxC), (0.0, 0.0), chunk, remat=False)
    unlabeled_BxHxW = labels_BxHxW == UNLABELED_PIXEL
    pseudo_BxHxW = label_N.reshape(labels_BxHxW.shape)
    out_BxHxW = jnp.where(unlabeled_BxHxW, pseudo_BxHxW, labels_BxHxW).astype(jnp.int32)
    n_unlabeled = jnp.maximum(jnp.sum(unlabeled_BxHxW), 1).astype(jnp.float32)
    metrics = {
        "pseudo_fraction": jnp.sum(unlabeled_BxHxW & (pseudo_BxHxW >= 0)) / n_unlabeled,
        "pseudo_agreement": jnp.sum(unlabeled_BxHxW & agree_N.reshape(labels_BxHxW.shape)) / n_unlabeled,
    }
    return out_BxHxW, metrics
