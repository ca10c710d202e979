"""The language embeddings T (|Y| x C, L2-normalised) that pretraining pairs pixels with (Eq. 1/7).

File schema (`text_embeddings.npz`, written by stage 1 or from the hand template):
  names       str [|Y|]   union class names qualified by dataset ('ade20k/stairway'), union order
  datasets    str [|Y|]   the dataset of each class
  embeddings  f32 [|Y|, C] unit rows
  source      str []      'template' or 'adapted' (how T was made)

Written atomically; every error reading one (missing, empty, truncated, not an npz, pickled
objects, wrong keys / shapes / classes) is a ValueError / FileNotFoundError naming the file and
the reason (`ms3_jax.main`: one line, exit code 2).
"""
from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np

from ms3_jax.data.label_space import LabelSpace
from ms3_jax.files import safe
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
    if not path.endswith(".npz"):
        path += ".npz"  # as np.savez names it
    with safe.atomic_output(path, "wb") as f:  # whole or not at all
        np.savez(f, names=np.asarray(label_space.display_names), datasets=np.asarray(datasets),
                 embeddings=emb, source=np.asarray(source))


def load_text_embeddings(path: str, label_space: LabelSpace) -> np.ndarray:
    """T for `label_space`, checked: the file's classes must be exactly the configured ones."""
    names, emb = _read(path)
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


def _read(path: str) -> tuple[list[str], np.ndarray]:
    """(names, embeddings float32) of the npz at `path`; errors name the file and the reason."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory, not a text embeddings .npz file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text embeddings file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the text embeddings file is empty (0 bytes)")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # np.load would try pickle (and hint
            # at allow_pickle, without the file's name)
            raise ValueError(f"{path}: not an .npz archive (starts with {magic!r}); expected the "
                             "file stage 1 writes")
        with np.load(path, allow_pickle=False) as f:
            if missing := [k for k in ("names", "embeddings") if k not in f.files]:
                raise ValueError(f"{path} lacks {missing}; expected keys names, datasets, embeddings")
            names, emb = np.asarray(f["names"]), np.asarray(f["embeddings"])
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: unreadable text embeddings ({e})") from e
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path}: unreadable (truncated or damaged?) text embeddings "
                         f"({type(e).__name__}: {e})") from e
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise ValueError(f"{path}: 'names' must be a list of strings, got {names.dtype} "
                         f"{names.shape}")
    if emb.dtype.kind not in "fiu":
        raise ValueError(f"{path}: 'embeddings' must be numbers, got {emb.dtype}")
    return [str(n) for n in names], emb.astype(np.float32)


def template_text_embeddings(clip: str, label_space: LabelSpace,
                             template: str = "a photo of a {}.") -> np.ndarray:
    """T from CLIP with the hand template (paper Tab. 1 'CLIP' row; Tab. 4 'Language')."""

    module, params, tokenizer = load_clip_text(clip)
    # The same name in two datasets ('sky') is one prompt: encode the unique names once.
    unique, index = np.unique(np.asarray(label_space.names), return_inverse=True)
    emb = encode_classes(module, params, tokenizer, [str(u) for u in unique], None, template)
    return np.asarray(emb)[index]
