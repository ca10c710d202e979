"""Evaluation data: whole validation images of one dataset, one per element, in the union label
space (inference over them, whole or MMSeg slide windows: `ms3_jax.evaluation.evaluate`)."""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from PIL import Image

from ms3_jax.data.label_space import LabelSpace
from ms3_jax.data.sources import decode_image, decode_label, open_sources, record_file_name


def resize_short_side(image: np.ndarray, label: np.ndarray | None,
                      short_side: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize so min(H, W) == short_side (image bilinear, label nearest); None = unchanged."""
    if not short_side:
        return image, label
    h, w = image.shape[:2]
    ratio = short_side / min(h, w)
    nh, nw = max(1, int(round(h * ratio))), max(1, int(round(w * ratio)))
    if (nh, nw) == (h, w):
        return image, label
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
    return image, label


class _EvalMap(grain.transforms.Map):

    def __init__(self, dataset_index: int, lut: np.ndarray, short_side: int | None):
        self._d, self._lut, self._short = dataset_index, np.asarray(lut, np.int32), short_side

    def map(self, record):
        image, label = decode_image(record['image']), decode_label(record['label'])
        image, label = resize_short_side(image, label, self._short)
        return {'image': np.ascontiguousarray(image), 'label': self._lut[label],
                'dataset_id': np.int32(self._d), 'file_name': record_file_name(record)}


def make_eval_dataset(dataset: str, *, label_space: LabelSpace, data_dir: str | None = None,
                      split: str = 'validation', short_side: int | None = None,
                      shard_index: int = 0, shard_count: int = 1,
                      source: Any | None = None) -> grain.MapDataset:
    """Whole validation images of one dataset, one per element (sizes differ):

    {'image': uint8 [H, W, 3], 'label': int32 [H, W] union ids / -1, 'dataset_id': int32,
     'file_name': str}; records `shard_index::shard_count`. Index it, or iterate with small
    buffers, e.g. `ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))`.
    """
    d = label_space.dataset_index(dataset)
    src = source if source is not None else open_sources([dataset], split, data_dir)[0]
    ds = grain.MapDataset.source(src)[shard_index::shard_count]
    return ds.map(_EvalMap(d, label_space.to_union_lut(d), short_side))
