"""Build one dataset into array_record files that `tfds.data_source` / grain read.

    python -m ms3_jax.data.prepare --dataset ade20k --manual_dir ~/raw/ade --data_dir ~/tfds

`--dataset` is a non-synthetic name of `registry.DATASETS` (voc, ade20k, coco_stuff, cityscapes,
mapillary), an alias (voc_aug, coco_stuff164k) or the tfds name (ms3_ade20k, ...). The expected
layout of `--manual_dir` is in `ms3_jax/data/builders.py`. Prints a progress bar per split and a
summary (examples per split against the official count, skipped corrupt files).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import tensorflow_datasets as tfds

from ms3_jax.data import builders, registry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ms3_jax.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    real = [d for d in registry.DATASETS.values() if not d.synthetic]
    p.add_argument("--dataset", required=True, help=" | ".join(d.name for d in real) + " (or "
                   + ", ".join(a for d in real for a in d.aliases) + ", ms3_* tfds names)")
    p.add_argument("--manual_dir", required=True, help="folder with the official archives or "
                   "their extracted folders")
    p.add_argument("--data_dir", required=True, help="tfds data_dir to write to")
    p.add_argument("--skip_corrupt", action="store_true", help="skip (and count) images / "
                   "labels PIL cannot decode instead of failing")
    p.add_argument("--config", default=None, help="builder config; only mapillary has "
                   "some: v1.2 (default, 66 classes as in MMSeg) or v1.2_unlabeled_ignored "
                   "(65 'Unlabeled' -> 255)")
    return p


def summary(builder: builders.SegmentationBuilder) -> str:
    lines = [f"{builder.name} -> {builder.data_dir}"]
    for split, n in builders.split_sizes(builder).items():
        official = builder.OFFICIAL_SIZES.get(split)
        note = "" if official is None else f" (official: {official})"
        lines.append(f"  {split}: {n} examples{note}")
    # `builder.skipped` is empty when the data was already prepared: read what was recorded.
    files = builder.skipped or dict(builder.info.metadata.get("skipped_files", {}))
    skipped = {k: len(v) for k, v in files.items()}
    if not builder.skipped and "skipped" in builder.info.metadata:
        skipped = dict(builder.info.metadata["skipped"])
    lines.append(f"  skipped: {sum(skipped.values())}"
                 + (f" {skipped}" if any(skipped.values()) else ""))
    for split, names in files.items():
        for f in names[:20]:
            lines.append(f"    skipped ({split}): {f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> builders.SegmentationBuilder:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cls = registry.get(args.dataset, real_only=True).builder
    except builders.DatasetError as e:
        parser.error(str(e))
    kwargs = {}
    if args.config is not None:
        names = [c.name for c in cls.BUILDER_CONFIGS or ()]
        if args.config not in names:
            parser.error(f"{cls.name} has no config {args.config!r}; configs: {names or 'none'}")
        kwargs["config"] = args.config
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    tfds.disable_progress_bar()  # ours has a total; tfds's does not
    builder = builders.prepare(cls.name, args.manual_dir, args.data_dir,
                               skip_corrupt=args.skip_corrupt, progress=True, **kwargs)
    print(summary(builder))
    return builder


if __name__ == "__main__":
    try:
        main()
    except builders.DatasetError as e:
        sys.exit(f"error: {e}")
