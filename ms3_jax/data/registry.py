"""The dataset registry: each dataset's name, classes, tfds builder and fine-tuning defaults.

Adding a dataset = its builder (`builders.py`) and one entry here, which the builders, the prepare
CLI, `LabelSpace`, `open_sources` and `configs/finetune/` read. Synthetic ones: `synthetic.SPECS`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tensorflow_datasets as tfds

from ms3_jax.data import builders, classes, synthetic


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One dataset: train id i is `classes[i]` (255 = ignore); `builder.name` is its tfds name."""
    name: str
    classes: tuple[str, ...]
    builder: type[tfds.core.DatasetBuilder]
    finetune: dict[str, Any] | None = None  # kwargs of configs/finetune/common.py:get_config
    aliases: tuple[str, ...] = ()
    synthetic: bool = False  # built by synthetic.prepare_synthetic, not the prepare CLI


# Fine-tuning: paper Tab. 2 / 3, MMSeg's schedules (batch 8 = 4 GPUs x 2). Cityscapes, Mapillary:
# unseen in pretraining; Cityscapes' images are all 1024 x 2048: evaluated on every local device.
DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset("voc", classes.VOC_CLASSES, builders.Ms3VocAug, aliases=("voc_aug",),
            finetune=dict(crop_size=513, batch_size=16, num_steps=40_000, base_size=512)),
    Dataset("ade20k", classes.ADE20K_CLASSES, builders.Ms3Ade20k,
            finetune=dict(crop_size=512, batch_size=16, num_steps=80_000, base_size=512)),
    Dataset("coco_stuff", classes.COCO_STUFF_CLASSES, builders.Ms3CocoStuff164k,
            aliases=("coco_stuff164k",),
            finetune=dict(crop_size=512, batch_size=16, num_steps=80_000, base_size=512)),
    Dataset("cityscapes", classes.CITYSCAPES_CLASSES, builders.Ms3Cityscapes,
            finetune=dict(crop_size=(512, 1024), batch_size=8, num_steps=40_000, base_size=1024,
                          eval_devices=0)),
    Dataset("mapillary", classes.MAPILLARY_CLASSES, builders.Ms3Mapillary,
            finetune=dict(crop_size=768, batch_size=8, num_steps=40_000, base_size=1024)),
    *(Dataset(s.name, s.class_names, synthetic.BUILDERS[s.name], synthetic=True)
      for s in synthetic.SPECS),
)}
# Every name a dataset answers to: its name, its tfds name and its aliases.
NAMES: dict[str, Dataset] = {n: d for d in DATASETS.values()
                             for n in (d.name, d.builder.name, *d.aliases)}


def get(name: str, *, real_only: bool = False) -> Dataset:
    """The entry of a dataset name, alias or tfds name (`real_only`: not the synthetic ones);
    an unknown `name` raises `builders.DatasetError` listing the valid names."""
    d = NAMES.get(name)
    if d is None or (real_only and d.synthetic):
        valid = sorted(n for n, e in NAMES.items() if not (real_only and e.synthetic))
        raise builders.DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(valid)}")
    return d
