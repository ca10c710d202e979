"""Cross-modal information exchange (Sect. 3.3): segment-mean pixel–text similarity (Eq. 5), its
running average, and the unidirectional multi-label mapping Ỹ (Eq. 6); plus a host-side report
like paper Tab. 8. Shape suffixes: N pixels, K classes, C embedding dim."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ms3_jax.method.chunking import pixel_chunk_grid, take_chunk
from ms3_jax.method.labels import IGNORE_LABEL, valid_labels


def _class_sums(emb_NxC: jax.Array, labels_N: jax.Array, num_classes: int,
                ignore_label: int) -> tuple[jax.Array, jax.Array]:
    """float32 ``(Σ_{y_k = c} F_k  [K, C],  #pixels of c  [K])``; unusable labels dropped."""
    seg_N, ok_N = valid_labels(labels_N, num_classes, ignore_label, num_classes)  # unusable: K
    acc = jnp.promote_types(emb_NxC.dtype, jnp.float32)  # float64 stays float64 (numerical tests)
    sum_KxC = jax.ops.segment_sum(emb_NxC.astype(acc), seg_N, num_classes + 1)
    count_K = jax.ops.segment_sum(ok_N.astype(jnp.int32), seg_N, num_classes + 1)
    return sum_KxC[:num_classes], count_K[:num_classes]


def segment_similarity(emb_NxC: jax.Array, labels_N: jax.Array, text_KxC: jax.Array,
                       num_classes: int, *, chunk: int | None = None,
                       ignore_label: int = IGNORE_LABEL) -> tuple[jax.Array, jax.Array]:
    """Batch estimate of Eq. 5: ``S[y, y'] = mean_{k: y_k = y} F_k · T_{y'}``.

    Summed per class first (``segment_sum``: no ``[N, K]`` map); ``chunk`` (pixels) bounds the
    float32 copy of a bfloat16 ``emb``. Embeddings are assumed L2-normalised (dot = cosine).

    Args:
      emb_NxC: pixel embeddings ``[N, C]`` (or ``[..., C]``), e.g. the visual-head output ``I_v``.
      labels_N: ``[N]`` (or ``[...]``) union ids; ``ignore_label`` / out-of-range are skipped.
      text_KxC: language embeddings ``T``, ``[K, C]`` with ``K == num_classes``.
    Returns: ``(mean_KxK float32, count_K int32)``; rows of classes absent from the batch are 0.
    """
    dim = text_KxC.shape[-1]
    if text_KxC.shape[0] != num_classes:
        raise ValueError(f"text has {text_KxC.shape[0]} rows, expected num_classes={num_classes}")
    emb_NxC = emb_NxC.reshape(-1, dim)
    labels_N = labels_N.reshape(-1)
    n = labels_N.shape[0]
    if chunk is None or chunk >= n:
        sum_KxC, count_K = _class_sums(emb_NxC, labels_N, num_classes, ignore_label)
    else:
        grids, n_chunks, _ = pixel_chunk_grid((emb_NxC, labels_N), (0, ignore_label), chunk)

        def step(carry, i):
            s, c = _class_sums(*take_chunk(grids, i), num_classes, ignore_label)
            return (carry[0] + s, carry[1] + c), None

        init = (jnp.zeros((num_classes, dim), jnp.promote_types(emb_NxC.dtype, jnp.float32)),
                jnp.zeros((num_classes,), jnp.int32))
        (sum_KxC, count_K), _ = jax.lax.scan(step, init, jnp.arange(n_chunks))
    sum_KxK = jnp.dot(sum_KxC, text_KxC.astype(sum_KxC.dtype).T)
    mean_KxK = sum_KxK / jnp.maximum(count_K, 1).astype(sum_KxC.dtype)[:, None]
    return mean_KxK, count_K


def update_similarity(S_KxK: jax.Array, batch_mean_KxK: jax.Array, count_K: jax.Array,
                      momentum: float, seen_K: jax.Array | None = None) -> jax.Array:
    """Running estimate of Eq. 5 over training: ``S_y ← m·S_y + (1−m)·batch_mean_y`` for classes
    present in the batch (``count > 0``); rows of absent classes are unchanged.

    With ``seen_K`` (bool ``[K]``), a present but unseen row takes the batch mean directly; the
    caller keeps ``seen_K ← seen_K | (count_K > 0)`` (:func:`update_seen`). Without it every row
    is treated as seen.
    """
    present_K = count_K > 0
    batch_mean_KxK = batch_mean_KxK.astype(S_KxK.dtype)
    ema_KxK = momentum * S_KxK + (1.0 - momentum) * batch_mean_KxK
    if seen_K is not None:
        ema_KxK = jnp.where(jnp.asarray(seen_K, bool)[:, None], ema_KxK, batch_mean_KxK)
    return jnp.where(present_K[:, None], ema_KxK, S_KxK)


def update_seen(seen_K: jax.Array, count_K: jax.Array) -> jax.Array:
    """``seen_K | (count_K > 0)``: classes that have had at least one labelled pixel."""
    return jnp.asarray(seen_K, bool) | (count_K > 0)


def other_dataset_matrix(dataset_of_class_K: jax.Array) -> jax.Array:
    """bool ``[K, K]``: ``[y, y']`` True iff y' belongs to another dataset than y (Eq. 6)."""
    d = jnp.asarray(dataset_of_class_K)
    return d[:, None] != d[None, :]


def multilabel_mask(S_KxK: jax.Array, other_dataset_KxK: jax.Array,
                    seen_K: jax.Array | None = None, top_k: int = 0) -> jax.Array:
    """Multi-label mapping Ỹ, Eq. 6: ``Ỹ[y, y'] = S[y, y'] ≥ S[y, y]  ∧  y' ∈ 𝒴 \\ 𝒴_i``.

    Row y lists the extra positives of pixels labelled y (as ``positives`` of the pairing loss).
    Never on the diagonal nor inside y's own dataset; not symmetrised (y ⊂ y' can map y → y'
    without y' → y, Tab. 8). Rows of classes never seen (``seen_K`` False) are all False.
    ``top_k`` > 0 (not in the paper, opt-in: ``relations.top_k``) keeps of each row only the
    pairs with the k largest S[y, y'] (ties with the k-th kept).
    """
    k = S_KxK.shape[0]
    diag_K = jnp.diagonal(S_KxK)
    mask = (S_KxK >= diag_K[:, None]) & jnp.asarray(other_dataset_KxK, bool)
    mask = mask & ~jnp.eye(k, dtype=bool)
    if seen_K is not None:
        mask = mask & jnp.asarray(seen_K, bool)[:, None]
    if top_k:
        scores_KxK = jnp.where(mask, S_KxK, -jnp.inf)
        kth_K = jax.lax.top_k(scores_KxK, min(int(top_k), k))[0][:, -1]
        mask = mask & (scores_KxK >= kth_K[:, None])
    return mask


# Report (host side, NumPy), paper Tab. 8.
@dataclasses.dataclass(frozen=True)
class Relation:
    """Class ``name`` (of ``dataset``, self-similarity ``self_sim = S[y, y]``) maps to ``targets``:
    ``(name, dataset, S[y, y'])`` sorted by similarity, highest first."""

    name: str
    dataset: str
    self_sim: float
    targets: tuple[tuple[str, str, float], ...]


def relations_table(mask: jax.Array | np.ndarray, S: jax.Array | np.ndarray, names: Sequence[str],
                    dataset_names_of_class: Sequence[str]) -> list[Relation]:
    """Structured Ỹ: one :class:`Relation` per class with at least one mapped class."""
    mask = np.asarray(mask, bool)
    S = np.asarray(S, np.float64)
    rows = []
    for y in range(mask.shape[0]):
        cols = np.flatnonzero(mask[y])
        if cols.size == 0:
            continue
        cols = sorted(cols, key=lambda c: (-S[y, c], c))
        targets = tuple((names[c], dataset_names_of_class[c], float(S[y, c])) for c in cols)
        rows.append(Relation(names[y], dataset_names_of_class[y], float(S[y, y]), targets))
    return rows


# Lines 2.. of `relations_report`: how to read the table ('#': skip them to parse the rows).
REPORT_LEGEND = (
    "# How to read this (paper Tab. 8 form; Eq. 5-6). One line per class y that is mapped to at",
    "# least one class of another dataset:",
    "#   y [y's dataset] (self S[y,y]) -> y' [y' dataset] S[y,y'], y'' [y'' dataset] S[y,y''], ...",
    "# S[y, c] (Eq. 5): the cosine between the embeddings of the training pixels labelled y (the",
    "#   head relations.pixel_head, language by default) and the language embedding T of class c,",
    "#   averaged over those pixels (a running mean over training); -1..1, higher = y's pixels",
    "#   look more like the text of c.",
    "# (self 0.215): S[y, y] = 0.215, y's pixels against y's own text T[y]: the threshold of y's line.",
    "# Each y' listed is of another dataset and has S[y, y'] >= S[y, y] (Eq. 6): y's pixels are as",
    "#   close to the text of y' as to their own, so they are also trained as y' (extra positives,",
    "#   multi-label). Targets sorted by S[y, y'], highest first.",
    "# Directed: y -> y' does not imply y' -> y (a subset maps to its superset, not back).",
    "# Classes of the same name share one T: they map to each other with S[y, y'] = S[y, y].",
    "# Classes with no target are not listed; the pairs with their S are in relations.json.",
)


def relations_report(mask: jax.Array | np.ndarray, S: jax.Array | np.ndarray,
                     names: Sequence[str], dataset_names_of_class: Sequence[str],
                     top_k: int = 0) -> str:
    """Human-readable Ỹ like Tab. 8: a summary line, the lines of REPORT_LEGEND (how to read it,
    each starting with '#'), then one line per mapped class, e.g.
    ``dirt track [ade20k] (self 0.412) -> path [coco_stuff] 0.431, road [voc] 0.420``.
    Relations are directed: ``a -> b`` means pixels of a are also pulled towards b. ``top_k``:
    the `relations.top_k` the mask was made with (said in the legend when > 0)."""
    rows = relations_table(mask, S, names, dataset_names_of_class)
    n_pairs = sum(len(r.targets) for r in rows)
    lines = [f"multi-label mapping: {n_pairs} directed pairs from {len(rows)} classes", *REPORT_LEGEND]
    if top_k:
        lines.append(f"# relations.top_k={top_k}: of each line only the {top_k} highest S[y, y'] "
                     "are kept (not in the paper).")
    if not rows:
        lines.append("# (no pairs: no class's pixels are as close to another dataset's class "
                     "text as to their own)")
    for r in rows:
        tgt = ", ".join(f"{n} [{d}] {s:.3f}" for n, d, s in r.targets)
        lines.append(f"{r.name} [{r.dataset}] (self {r.self_sim:.3f}) -> {tgt}")
    return "\n".join(lines)
