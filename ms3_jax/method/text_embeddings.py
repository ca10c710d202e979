"""The language embeddings T (|Y| x C, L2-normalised) that pretraining pairs pixels with (Eq. 1/7).

File schema (`text_embeddings.npz`, written by stage 1 or from the hand template):
  names       str [|Y|]   union class names qualified by dataset ('ade20k/stairway'), union order
  datasets    str [|Y|]   the dataset of each class
  embeddings  f32 [|Y|, C] unit rows
  source      str []      'template' or 'adapted' (how T was made)
"""
from __future__ import annotations

import os

import numpy as np

from ms3_jax.data.label_space import LabelSpace
from ms3_jax.models.clip_text import encode_classes, load_clip_text

FILE_NAME = "text_embeddings.npz"
TEMPLATE = "template"  # text.embeddings: CLIP with the hand template (Tab. 4 ablation)


def save_text_embeddings(path: str, label_space: LabelSpace, embeddings: np.ndarray,
                         source: str) -> None:
    """Write T [|Y|, C] of `label_space` to `path` (the schema above)."""
    emb = np.asarray(embeddings, np.float32)
    if emb.shape[0] != label_space.num_classes:
        raise ValueError(f"{emb.shape[0]} embeddings for {label_space.num_classes} classes")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    datasets = [label_space.dataset_names[d] for d in label_space.dataset_of_class]
    np.savez(path, names=np.asarray(label_space.display_names), datasets=np.asarray(datasets),
             embeddings=emb, source=np.asarray(source))


def load_text_embeddings(path: str, label_space: LabelSpace) -> np.ndarray:
    """T for `label_space`, checked: the file's classes must be exactly the configured ones."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text embeddings file not found: {path}")
    with np.load(path) as f:
        if missing := [k for k in ("names", "embeddings") if k not in f.files]:
            raise ValueError(f"{path} lacks {missing}; expected keys names, datasets, embeddings")
        names = [str(n) for n in f["names"]]
        emb = np.asarray(f["embeddings"], np.float32)
    want = list(label_space.display_names)
    if names != want:
        extra = sorted(set(names) - set(want))[:10]
        absent = sorted(set(want) - set(names))[:10]
        raise ValueError(
            f"the classes in {path} do not match the configured datasets "
            f"{list(label_space.dataset_names)}: {len(names)} in the file vs {len(want)} configured"
            + (f"; not configured: {extra}" if extra else "")
            + (f"; missing from the file: {absent}" if absent else "")
            + ("; same classes in another order" if not extra and not absent else ""))
    if emb.ndim != 2 or emb.shape[0] != len(want):
        raise ValueError(f"{path}: embeddings have shape {emb.shape}, expected [{len(want)}, C]")
    norms = np.linalg.norm(emb, axis=1)
    if not np.all(np.isfinite(emb)) or np.max(np.abs(norms - 1.0)) > 1e-3:
        raise ValueError(f"{path}: embeddings must be finite and L2-normalised (norms {norms.min():.3f}"
                         f"..{norms.max():.3f})")
    return emb


def template_text_embeddings(clip: str, label_space: LabelSpace,
                             template: str = "a photo of a {}.") -> np.ndarray:
    """T from CLIP with the hand template (paper Tab. 1 'CLIP' row; Tab. 4 'Language')."""

    module, params, tokenizer = load_clip_text(clip)
    # The same name in two datasets ('sky') is one prompt: encode the unique names once.
    unique, index = np.unique(np.asarray(label_space.names), return_inverse=True)
    emb = encode_classes(module, params, tokenizer, [str(u) for u in unique], None, template)
    return np.asarray(emb)[index]
