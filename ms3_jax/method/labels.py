"""Union label-space conventions shared by the losses, bank, relations and pseudo-labels.

Union ids are int32 ``0..K-1``; ``IGNORE_LABEL`` (-1) and any id outside ``[0, K)`` count nothing
(|Y| = 342 > 255, so 255 is a class). Shape suffixes: N pixels, K classes.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ms3_jax.data.label_space import UNION_IGNORE

IGNORE_LABEL = UNION_IGNORE  # -1, the union ignore id
MASKED_LOGIT = -1e30  # a class masked out of a softmax: finite "-inf" keeps gradients NaN-free


def valid_labels(labels_N: jax.Array, num_classes: int, ignore_label: int = IGNORE_LABEL,
                 fill: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(labels with the unusable ones set to fill (int32), bool mask of the usable ones)``;
    usable: ``!= ignore_label`` and in ``[0, num_classes)``. Any shape."""
    labels_N = labels_N.astype(jnp.int32)
    ok_N = (labels_N != ignore_label) & (labels_N >= 0) & (labels_N < num_classes)
    return jnp.where(ok_N, labels_N, fill), ok_N


def downsample_labels(labels_BxHxW: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of label maps to the embeddings' grid `hw` ([H/4, W/4], or
    [H/os, W/os] with the heads after the ASPP) (torch `interpolate(mode='nearest')` indexing)."""
    h, w = labels_BxHxW.shape[1:3]
    rows = (np.arange(hw[0]) * h) // hw[0]
    cols = (np.arange(hw[1]) * w) // hw[1]
    return labels_BxHxW[:, rows][:, :, cols]


def distinct_names(names: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """(distinct names in first-seen order, int32 index [len(names)] into them).

    Names equal up to case and whitespace are one prompt (CLIP lowercases), e.g. 'sky' of three
    datasets: they get the same embedding (stage 1), and App. D's "same category" is decided on
    this index (`pseudo_labels.agreement_labels`).
    """
    keys: dict[str, int] = {}
    out: list[str] = []
    index = []
    for name in names:
        key = " ".join(str(name).lower().split())
        if key not in keys:
            keys[key] = len(out)
            out.append(str(name).strip())
        index.append(keys[key])
    return tuple(out), np.asarray(index, np.int32)
