"""Random-access record sources (`tfds.data_source`, image folders) and their mixture.

Mixture weights: docs/choices.md, "Mixture weights proportional to dataset size"; unlabeled
images (App. D): "Unlabeled data source and mixing".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import io
import os
from typing import Any

import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ms3_jax.data import registry

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def decode_image(x: Any) -> np.ndarray:
    """uint8 [H, W, 3] from an array or encoded image bytes."""
    if isinstance(x, (bytes, bytearray)):
        with Image.open(io.BytesIO(x)) as im:
            return np.asarray(im.convert('RGB'))
    return np.asarray(x)


def decode_label(x: Any) -> np.ndarray:
    """uint8 [H, W] from an array ([H, W] or [H, W, 1]) or encoded PNG bytes."""
    if isinstance(x, (bytes, bytearray)):
        with Image.open(io.BytesIO(x)) as im:
            x = np.asarray(im)
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., 0]
    return x.astype(np.uint8, copy=False)


def record_file_name(record: Any) -> str:
    """A record's 'file_name' as str ('' if it has none)."""
    name = record.get('file_name', b'') if isinstance(record, Mapping) else b''
    return name.decode(errors='replace') if isinstance(name, bytes) else str(name)


def open_sources(dataset_names: Sequence[str], split: str, data_dir: str | None) -> list[Any]:
    """`tfds.data_source` per dataset (random access to array_record; no TensorFlow); names of
    `registry.get` ('voc', 'synth_a', ...). A dataset not prepared fails here, naming the directory.
    """
    sources = []
    for name in dataset_names:
        entry = registry.get(name)
        tfds_name = entry.builder.name
        hint = ("prepare_synthetic(data_dir)" if entry.synthetic else
                f"python -m ms3_jax.data.prepare --dataset {name} --manual_dir DIR --data_dir "
                f"{data_dir or '~/tensorflow_datasets'}")
        where = f"dataset {name!r} (tfds {tfds_name!r}, split {split!r})"
        if data_dir and not os.path.isdir(os.path.join(data_dir, tfds_name)):
            raise FileNotFoundError(f"{where} is not prepared: {os.path.join(data_dir, tfds_name)} "
                                    f"does not exist. Prepare it with: {hint}")
        try:
            sources.append(tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False))
        except Exception as e:  # tfds raises several types for a missing / partial build
            if isinstance(e, ValueError) and 'Unknown split' in str(e):
                raise ValueError(f"{where}: no such split in {data_dir or 'the tfds data_dir'}: "
                                 f"{e}") from None
            raise FileNotFoundError(f"{where} cannot be read from {data_dir or 'the tfds data_dir'}: "
                                    f"{type(e).__name__}: {e}. Prepare it with: {hint}") from e
    return sources


class ImageFolderSource:
    """Random access to the images under a folder (unlabeled data, paper App. D).

    Files ending in .jpg / .jpeg / .png (any case), found recursively and sorted by relative
    path; records are {'image': uint8 [H, W, 3] RGB, 'file_name': relative path}. A missing or
    empty folder fails here, an unreadable image when it is read, each naming the path.
    """

    def __init__(self, root: str):
        self.root = os.path.abspath(os.path.expanduser(root))
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f'unlabeled image folder {self.root} does not exist or is not '
                                    f'a directory')

        def fail(e: OSError):
            raise PermissionError(f'cannot list unlabeled image folder {e.filename}: {e}') from e

        files = [os.path.relpath(os.path.join(dirpath, f), self.root)
                 for dirpath, _, names in os.walk(self.root, onerror=fail, followlinks=True)
                 for f in names if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise ValueError(f'unlabeled image folder {self.root} holds no '
                             f'{"/".join(IMAGE_EXTENSIONS)} files')
        self.files = tuple(sorted(files))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = os.path.join(self.root, self.files[i])
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert('RGB'))
        except (OSError, ValueError) as e:
            raise OSError(f'cannot read unlabeled image {path}: {e}') from e
        return {'image': image, 'file_name': self.files[i]}

    def __repr__(self) -> str:
        return f'ImageFolderSource({self.root!r}, {len(self)} images)'


def open_unlabeled_source(source: str, split: str, data_dir: str | None) -> Any:
    """The images of `source` without their labels (App. D): one of our dataset names (read with
    `open_sources`, label dropped), else an image folder (`ImageFolderSource`), else any prepared
    tfds dataset with an 'image' feature in `data_dir`."""
    if source in registry.NAMES:
        return open_sources([source], split, data_dir)[0]
    if os.path.isdir(os.path.expanduser(source)):
        return ImageFolderSource(source)
    try:
        src = tfds.data_source(source, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing / unknown dataset
        raise FileNotFoundError(
            f'unlabeled source {source!r}: no image folder {os.path.abspath(os.path.expanduser(source))} '
            f'and no prepared tfds dataset of that name (split {split!r}) in '
            f'{data_dir or "the tfds data_dir"} ({type(e).__name__}: {str(e).splitlines()[0]})') from e
    if not len(src) or 'image' not in src[0]:
        raise ValueError(f'unlabeled tfds source {source!r} (split {split!r}) has no records with '
                         f'an "image" feature')
    return src


def mixture_weights(datasets: Sequence[str], sizes: Sequence[int],
                    weights: Sequence[float] | Mapping[str, float] | None) -> tuple[float, ...]:
    """Normalised mixture weights: `weights` (aligned with `datasets`, or {name: weight}) or, if
    None, proportional to the dataset sizes."""
    if weights is None:
        w = np.asarray(sizes, np.float64)
    elif isinstance(weights, Mapping):
        if unknown := set(weights) - set(datasets):
            raise ValueError(f'Weights for unknown datasets {sorted(unknown)}.')
        w = np.asarray([weights.get(n, 0.0) for n in datasets], np.float64)
    else:
        w = np.asarray(weights, np.float64)
    if w.shape != (len(datasets),) or np.any(w <= 0):
        raise ValueError(f'Need one positive weight per dataset, got {weights!r}.')
    return tuple(float(x) for x in w / w.sum())


def _tag(dataset_index: int, record_index) -> tuple[int, int]:
    return (dataset_index, int(record_index))


def _sub_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def mixed_records(sizes: Sequence[int], weights: Sequence[float], seed: int,
                  unlabeled: tuple[int, float] | None = None) -> grain.MapDataset:
    """Endless (dataset index, record index) stream mixing datasets of `sizes` by `weights`.
    `unlabeled` = (size, ratio): one more stream, index len(sizes), weight `ratio` (the labeled
    weights scaled by 1 - ratio)."""
    streams = [grain.MapDataset.range(size).shuffle(seed=_sub_seed(seed, 0, d)).repeat()
               .map(functools.partial(_tag, d)) for d, size in enumerate(sizes)]
    weights = list(weights)
    if unlabeled is not None:
        size, ratio = unlabeled
        streams.append(grain.MapDataset.range(size).shuffle(seed=_sub_seed(seed, 1)).repeat()
                       .map(functools.partial(_tag, len(sizes))))
        weights = [w * (1.0 - ratio) for w in weights] + [ratio]
    return grain.MapDataset.mix(streams, weights=weights)
