"""grain input pipelines: the mixed multi-dataset training stream and whole-image evaluation.

Training (paper Sec. 3.1, 4.1): N datasets are read with `tfds.data_source` (array_record, random
access), mixed into one stream, augmented with "random crop, color distortion, and Gaussian
blur" at 224 x 224, and their dataset-local labels are mapped to the union label space
(`LabelSpace.to_union`; -1 = ignore, since |Y| > 255). One process yields its share of the global batch:

  {'image': uint8 [b, H, W, 3], 'label': int32 [b, H, W], 'dataset_id': int32 [b]}

with b = global_batch_size // jax.process_count(), ready for
`jax.make_array_from_process_local_data(sharding, batch[k])`.

Choices not in the paper (all are `AugmentConfig` / `TrainPipeline` arguments):
- Random scale before the crop: the short side is resized to `s * base_size` with s ~ U[0.5, 2.0]
  and base_size = crop_size / 0.875 = 256 (MMSegmentation's `ratio_range=(0.5, 2.0)` around a
  base scale; datasets of different resolutions land at the same scale), then a random 224
  crop; smaller images are padded bottom/right with the mean pixel and label 255. Images
  bilinear, labels nearest.
- Colour distortion and blur follow MoCo v2 / SimCLR: with p = 0.8 brightness, contrast,
  saturation 0.4 and hue 0.1 jitter in random order; grayscale p = 0.2; Gaussian blur p = 0.5,
  sigma ~ U[0.1, 2.0]; horizontal flip p = 0.5. All in PIL / numpy (no TensorFlow).
- Mixture: weights proportional to dataset size by default (= sampling the concatenated union
  uniformly); any weights can be given. grain's `MapDataset.mix` interleaves the per-dataset
  streams deterministically in those proportions (stratified, not i.i.d. draws); each dataset
  is shuffled per epoch and repeated forever.
- Unlabeled images (paper App. D, `unlabeled=`): an image folder or a dataset's images without
  labels, mixed in as one more stream with weight `unlabeled_ratio` (the labeled weights are
  scaled by 1 - ratio). Same augmentation; label `UNLABELED_PIXEL` (-2) inside the image, -1 in
  the crop padding, dataset_id -1. The train step pseudo-labels the -2 pixels.
- Multi-host: one global stream of global batches, the same whatever the number of processes;
  process p loads (and augments) only its slice [p * b, (p + 1) * b) of each global batch. So a
  run may resume on another process count and still see the same global batches.
- Bad records: a record that cannot be read or decoded raises `UnreadableRecordError` naming
  the dataset, the record index and its file; label ids outside the dataset's classes (other
  than 255) raise `ValueError` naming the same. With `skip_unreadable=True` an unreadable record
  is replaced by the next readable one of its dataset (r + 1, r + 2, ...: deterministic, so
  batches keep their size and a resume stays exact), a warning names it, and batches carry
  'unreadable' int32 [b] (records replaced per example; `loop.run` logs the running count).
  Worker processes ignore SIGINT / SIGTERM: the training process handles them (`loop.run`).
- Determinism: record order comes from seeded grain shuffles; the augmentation of the element
  at global stream position i draws from `np.random.default_rng([seed, i])`. Batching
  happens before the multiprocess prefetch, so batches do not depend on `worker_count`.
- Checkpointing: `TrainIterator` is a grain `DatasetIterator` whose state is the next global
  batch index (plus the seed/global batch/mixture it belongs to), so a run can resume with
  another `worker_count` or process count. Save it with orbax next to the train state:

    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=checkpoint_save_args(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=checkpoint_restore_args(it)))

  The state is one JSON file written by process 0 (`IteratorHandler`), not grain's
  per-process files, which would tie the checkpoint to the process count.

Evaluation: `make_eval_dataset` yields whole images (short side optionally resized, labels
nearest) one at a time; `sliding_window_crops` / `merge_sliding_window` implement
MMSegmentation's slide inference grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
import io
import json
import logging
import os
import signal
from typing import Any

from etils import epath
import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image, ImageEnhance, ImageFilter

from ms3_jax.data.label_space import IGNORE_INDEX, UNION_IGNORE, UNLABELED_PIXEL, LabelSpace

MEAN_PIXEL = (124, 116, 104)  # ImageNet mean (123.675, 116.28, 103.53), rounded
# UNLABELED_PIXEL (-2): union label of a pixel of an unlabeled image (paper App. D), inside the
# image; its crop padding is UNION_IGNORE (-1) as usual. Losses, bank and relations ignore it (any
# id outside [0, K)); the train step replaces it by the multimodal pseudo-label
# (`ms3_jax.pseudo_labels`).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


# --- augmentation ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (paper 4.1: random crop, colour distortion, Gaussian blur)."""
    crop_size: int | tuple[int, int] = 224  # square, or (height, width) e.g. Cityscapes (512, 1024)
    scale_range: tuple[float, float] = (0.5, 2.0)
    # Short side before the random scale: an int, 'auto' (= crop_size / 0.875, i.e. 256 for 224)
    # or 'original' (scale the image's own size).
    base_size: int | str = 'auto'
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    pad_value: tuple[int, int, int] = MEAN_PIXEL

    @classmethod
    def geometric_only(cls, **kwargs) -> AugmentConfig:
        """Scale, crop and flip only (no photometric changes): for alignment tests and debugging."""
        return cls(color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, **kwargs)

    @property
    def crop_hw(self) -> tuple[int, int]:
        c = self.crop_size
        return (int(c), int(c)) if isinstance(c, (int, np.integer)) else (int(c[0]), int(c[1]))


def _base_size(cfg: AugmentConfig) -> int:
    if cfg.base_size == 'auto':
        return int(round(min(cfg.crop_hw) / 0.875))
    if isinstance(cfg.base_size, str) or cfg.base_size <= 0:
        raise ValueError(f"base_size must be a positive int, 'auto' or 'original', not "
                         f'{cfg.base_size!r}.')
    return int(cfg.base_size)


def _as_image(x: Any) -> np.ndarray:
    if isinstance(x, (bytes, bytearray)):
        with Image.open(io.BytesIO(x)) as im:
            return np.asarray(im.convert('RGB'))
    return np.asarray(x)


def _as_label(x: Any) -> np.ndarray:
    if isinstance(x, (bytes, bytearray)):
        with Image.open(io.BytesIO(x)) as im:
            x = np.asarray(im)
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., 0]
    return x.astype(np.uint8, copy=False)


def _color_jitter(img: Image.Image, rng: np.random.Generator, cfg: AugmentConfig) -> Image.Image:
    """torchvision ColorJitter semantics (PIL backend): the four jitters in a random order."""
    factors = [rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness),
               rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast),
               rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation),
               rng.uniform(-cfg.hue, cfg.hue)]
    for op in rng.permutation(4):
        f = factors[op]
        if op == 0:
            img = ImageEnhance.Brightness(img).enhance(f)
        elif op == 1:
            img = ImageEnhance.Contrast(img).enhance(f)
        elif op == 2:
            img = ImageEnhance.Color(img).enhance(f)
        elif abs(f) > 1e-6:
            hsv = np.array(img.convert('HSV'))
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(round(f * 255))) % 256
            img = Image.fromarray(hsv, 'HSV').convert('RGB')
    return img


def augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
            cfg: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """Random scale + crop (pad) + flip + colour distortion + blur.

    Args:
      image: uint8 [H, W, 3]. label: uint8 [H, W] (local ids, 255 = ignore).
    Returns:
      image uint8 [ch, cw, 3], label uint8 [ch, cw] with (ch, cw) = cfg.crop_hw.
    """
    h, w = label.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f'Image {image.shape} and label {label.shape} sizes differ.')
    crop_h, crop_w = cfg.crop_hw
    s = rng.uniform(*cfg.scale_range)
    ratio = s if cfg.base_size == 'original' else s * _base_size(cfg) / min(h, w)
    nh, nw = max(1, int(round(h * ratio))), max(1, int(round(w * ratio)))
    img = Image.fromarray(image)
    lab = Image.fromarray(label)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.BILINEAR)
        lab = lab.resize((nw, nh), Image.NEAREST)
    ch, cw = min(crop_h, nh), min(crop_w, nw)
    y0 = int(rng.integers(0, nh - ch + 1))
    x0 = int(rng.integers(0, nw - cw + 1))
    box = (x0, y0, x0 + cw, y0 + ch)
    img, lab = img.crop(box), lab.crop(box)
    if rng.random() < cfg.flip_prob:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
        lab = lab.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < cfg.color_jitter_prob:
        img = _color_jitter(img, rng, cfg)
    if rng.random() < cfg.grayscale_prob:
        img = img.convert('L').convert('RGB')
    if rng.random() < cfg.blur_prob:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*cfg.blur_sigma)))
    out_img = np.empty((crop_h, crop_w, 3), np.uint8)
    out_img[...] = np.asarray(cfg.pad_value, np.uint8)
    out_img[:ch, :cw] = np.asarray(img)
    out_lab = np.full((crop_h, crop_w), IGNORE_INDEX, np.uint8)
    out_lab[:ch, :cw] = np.asarray(lab)
    return out_img, out_lab


# --- grain transforms -----------------------------------------------------------------------------

class _Tag(grain.transforms.Map):
    """record index -> (dataset index, record index)."""

    def __init__(self, dataset_index: int):
        self._d = dataset_index

    def map(self, record_index):
        return (self._d, int(record_index))


class _LoadAndAugment(grain.transforms.MapWithIndex):
    """(dataset, record) at global stream position i -> augmented example in the union label space."""

    def __init__(self, sources: Sequence[Any], luts: Sequence[np.ndarray], cfg: AugmentConfig,
                 seed: int, with_record_ids: bool, num_labeled: int | None = None,
                 names: Sequence[str] = (), skip_unreadable: bool = False):
        self._sources = list(sources)
        self._luts = [np.asarray(l, np.int32) for l in luts]
        self._cfg = cfg
        self._seed = int(seed)
        self._with_ids = with_record_ids
        # Sources from index `num_labeled` on are unlabeled (App. D): their label is not read.
        self._num_labeled = len(self._sources) if num_labeled is None else int(num_labeled)
        self._names = list(names) or [f'#{d}' for d in range(len(self._sources))]
        self._num_classes = [int(np.count_nonzero(l >= 0)) for l in self._luts]  # lut[:n] >= 0
        self._skip_unreadable = bool(skip_unreadable)

    def map_with_index(self, index: int, element):
        d, r = element
        image, label, r, replaced = self._read(d, int(r))
        labeled = d < self._num_labeled
        rng = np.random.default_rng([self._seed, int(index)])
        image, label = augment(image, label, rng, self._cfg)
        out = {'image': image, 'label': self._luts[d][label],
               'dataset_id': np.int32(d if labeled else -1)}
        if self._with_ids:
            out['record_index'] = np.int64(r)
        if self._skip_unreadable:
            out['unreadable'] = np.int32(replaced)
        return out

    def _read(self, d: int, r: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(image, local label, record read, records replaced): record r of dataset d or, with
        skip_unreadable, the first readable one of r + 1, r + 2, ... (at most 100 tried)."""
        size = len(self._sources[d])
        for replaced in range(min(size, _MAX_REPLACED)):
            try:
                return (*self._decode(d, (r + replaced) % size), (r + replaced) % size, replaced)
            except UnreadableRecordError as e:
                if not self._skip_unreadable:
                    raise
                logging.warning('%s; replaced by the next record (skip_unreadable)', e)
        raise UnreadableRecordError(f'dataset {self._names[d]!r}: records {r} to {r + replaced} '
                                    f'(mod {size}) are all unreadable')

    def _decode(self, d: int, r: int) -> tuple[np.ndarray, np.ndarray]:
        name, record, labeled = self._names[d], None, d < self._num_labeled
        try:
            record = self._sources[d][r]
            image = _as_image(record['image'])
            # Unlabeled: local 0 inside the image (-> UNLABELED_PIXEL), 255 in the padding (-> -1).
            label = _as_label(record['label']) if labeled else np.zeros(image.shape[:2], np.uint8)
        except Exception as e:  # tfds, PIL and file systems raise many types for a bad record
            raise UnreadableRecordError(f'dataset {name!r}, record {r}{_file_of(record)}: cannot read '
                                        f'or decode it: {type(e).__name__}: {e}') from e
        if image.ndim != 3 or image.shape[:2] != label.shape:
            raise ValueError(f'dataset {name!r}, record {r}{_file_of(record)}: image {image.shape} '
                             f'and label {label.shape} do not match')
        n = self._num_classes[d]
        if labeled and label.max() >= n:
            bad = np.unique(label[(label >= n) & (label != IGNORE_INDEX)])
            if bad.size:
                raise ValueError(f'dataset {name!r}, record {r}{_file_of(record)}: label ids '
                                 f'{bad[:10].tolist()} out of range; its {n} classes are 0..{n - 1} '
                                 f'(255 = ignore). Was it prepared with another class list?')
        return image, label


_MAX_REPLACED = 100


class UnreadableRecordError(OSError):
    """A training record that cannot be read or decoded (message: dataset, record, file)."""


def _file_of(record: Any) -> str:
    name = record.get('file_name', b'') if isinstance(record, Mapping) else b''
    name = name.decode(errors='replace') if isinstance(name, bytes) else str(name)
    return f' (file {name!r})' if name else ''


def _ignore_stop_signals(*_: Any) -> None:
    """grain worker init: SIGINT / SIGTERM are for the training process (`loop.run` saves and
    exits, then closes the workers); a Ctrl-C reaching the whole process group must not kill
    the workers first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _LocalSlice(grain.transforms.MapWithIndex):
    """Global batch i of (dataset, record) pairs -> this process's `batch_size` examples of it.

    Process p loads positions [p * b, (p + 1) * b) of every global batch, each augmented with the
    randomness of its global stream position, so the global batches (and thus training) do not
    depend on the number of processes.
    """

    def __init__(self, load: _LoadAndAugment, global_batch_size: int, batch_size: int,
                 shard_index: int):
        self._load, self._g, self._b, self._first = load, global_batch_size, batch_size, \
            shard_index * batch_size

    def map_with_index(self, index: int, element):
        datasets_G, records_G = element
        examples = [self._load.map_with_index(index * self._g + k, (int(datasets_G[k]), int(records_G[k])))
                    for k in range(self._first, self._first + self._b)]
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def _sub_seed(seed: int, *keys: int) -> int:
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


def open_sources(dataset_names: Sequence[str], split: str, data_dir: str | None) -> list[Any]:
    """`tfds.data_source` per dataset (random access to array_record; no TensorFlow).

    Names are dataset keys ('voc', 'ade20k', ... resolved to our builders' tfds names) or the
    synthetic datasets. A dataset that is not prepared fails here, naming the directory.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from ms3_jax.data import builders, synthetic  # pylint: disable=g-import-not-at-top

    sources = []
    for name in dataset_names:
        tfds_name = name if name in synthetic.SYNTHETIC_DATASETS else builders.builder_class(name).name
        hint = ("prepare_synthetic(data_dir)" if name in synthetic.SYNTHETIC_DATASETS else
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
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from ms3_jax.data import builders, synthetic  # pylint: disable=g-import-not-at-top

    try:
        known = source in synthetic.SYNTHETIC_DATASETS or bool(builders.builder_class(source))
    except builders.DatasetError:
        known = False
    if known:
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


def _process_index_and_count() -> tuple[int, int]:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_index(), jax.process_count()


class TrainPipeline:
    """The mixed, augmented, per-process-sharded training stream (see module docstring).

    Args:
      datasets: dataset names (tfds names, union order).
      data_dir: tfds data dir holding the array_record builds.
      global_batch_size: batch over all processes; each process yields global / shard_count.
      label_space: defaults to `LabelSpace.from_datasets(datasets)`; must list `datasets` in order.
      split: tfds split to read.
      augment: `AugmentConfig`.
      weights: mixture weights (sequence aligned with `datasets` or {name: weight});
        None = proportional to dataset sizes.
      seed: controls record order and augmentation.
      worker_count: grain worker processes (0 = in the main process).
      worker_buffer_size: batches buffered per worker.
      num_threads, prefetch_buffer_size: grain ReadOptions (threads producing whole batches).
      shard_index, shard_count: default jax.process_index() / jax.process_count().
      sources: optional pre-opened random-access sources (one per dataset; records with 'image'
        uint8 [H, W, 3] or encoded bytes and 'label' uint8 [H, W(, 1)]), e.g. in-memory lists.
      with_record_ids: add 'record_index' int64 [b] (the record within its dataset) to batches.
      unlabeled: images without labels mixed into the stream (paper App. D): a dataset name or an
        image folder (`open_unlabeled_source`); '' / None = none. Their examples have label
        `UNLABELED_PIXEL` (-2) inside the image, -1 in the crop padding, and dataset_id -1.
      unlabeled_split: tfds split of a dataset-name `unlabeled` source.
      unlabeled_ratio: expected fraction of each batch's examples from the unlabeled stream, in
        (0, 1); the labeled datasets share the rest in the proportions of `weights`.
      unlabeled_source: optional pre-opened random-access source for `unlabeled` (records with
        'image'); `unlabeled` then only names it (iterator identity).
      skip_unreadable: replace an unreadable record by the next readable one of its dataset and
        add 'unreadable' int32 [b] to batches (module docstring); False: raise naming it.
    """

    def __init__(self, datasets: Sequence[str], *, data_dir: str | None = None,
                 global_batch_size: int, label_space: LabelSpace | None = None,
                 split: str = 'train', augment: AugmentConfig = AugmentConfig(),
                 weights: Sequence[float] | Mapping[str, float] | None = None, seed: int = 0,
                 worker_count: int = 0, worker_buffer_size: int = 2, num_threads: int = 2,
                 prefetch_buffer_size: int = 2, shard_index: int | None = None,
                 shard_count: int | None = None, sources: Sequence[Any] | None = None,
                 with_record_ids: bool = False, unlabeled: str | None = None,
                 unlabeled_split: str = 'train', unlabeled_ratio: float = 0.0,
                 unlabeled_source: Any | None = None, skip_unreadable: bool = False):
        self.datasets = tuple(datasets)
        self.label_space = label_space or LabelSpace.from_datasets(self.datasets)
        if self.label_space.dataset_names != self.datasets:
            raise ValueError(f'Label space datasets {self.label_space.dataset_names} != pipeline '
                             f'datasets {self.datasets}.')
        if shard_index is None or shard_count is None:
            pi, pc = _process_index_and_count()
            shard_index = pi if shard_index is None else shard_index
            shard_count = pc if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ValueError(f'shard_index {shard_index} not in [0, {shard_count}).')
        if global_batch_size % shard_count:
            raise ValueError(f'Global batch {global_batch_size} is not divisible by the '
                             f'{shard_count} processes.')
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // self.shard_count
        self.augment = augment
        self.seed = int(seed)
        self.worker_count = int(worker_count)
        self._worker_buffer_size = worker_buffer_size
        self._read_options = grain.ReadOptions(num_threads=num_threads,
                                               prefetch_buffer_size=prefetch_buffer_size)
        self.sources = list(sources) if sources is not None else open_sources(
            self.datasets, split, data_dir)
        if len(self.sources) != len(self.datasets):
            raise ValueError(f'{len(self.sources)} sources for {len(self.datasets)} datasets.')
        self.dataset_sizes = tuple(len(s) for s in self.sources)
        self.weights = self._normalise_weights(weights)
        self._with_record_ids = with_record_ids
        self.unlabeled, self.unlabeled_split = unlabeled or None, unlabeled_split
        self.unlabeled_ratio = float(unlabeled_ratio) if self.unlabeled else 0.0
        self.unlabeled_source = None
        if self.unlabeled:
            if not 0.0 < self.unlabeled_ratio < 1.0:
                raise ValueError(f'unlabeled_ratio must be in (0, 1) with unlabeled='
                                 f'{self.unlabeled!r}, got {unlabeled_ratio!r}.')
            self.unlabeled_source = unlabeled_source if unlabeled_source is not None else \
                open_unlabeled_source(self.unlabeled, unlabeled_split, data_dir)
        self.skip_unreadable = bool(skip_unreadable)
        self.map_dataset = self._build_map_dataset()

    def _normalise_weights(self, weights) -> tuple[float, ...]:
        if weights is None:
            w = np.asarray(self.dataset_sizes, np.float64)
        elif isinstance(weights, Mapping):
            unknown = set(weights) - set(self.datasets)
            if unknown:
                raise ValueError(f'Weights for unknown datasets {sorted(unknown)}.')
            w = np.asarray([weights.get(n, 0.0) for n in self.datasets], np.float64)
        else:
            w = np.asarray(weights, np.float64)
        if w.shape != (len(self.datasets),) or np.any(w <= 0):
            raise ValueError(f'Need one positive weight per dataset, got {weights!r}.')
        return tuple(float(x) for x in w / w.sum())

    def _build_map_dataset(self) -> grain.MapDataset:
        per_dataset = []
        for d, size in enumerate(self.dataset_sizes):
            ds = grain.MapDataset.range(size)
            ds = ds.shuffle(seed=_sub_seed(self.seed, 0, d)).repeat().map(_Tag(d))
            per_dataset.append(ds)
        weights, sources = list(self.weights), list(self.sources)
        luts = [self.label_space.to_union_lut(d) for d in range(len(self.datasets))]
        if self.unlabeled_source is not None:  # App. D: one more stream, after the labeled ones
            u, r = len(self.datasets), self.unlabeled_ratio
            ds = grain.MapDataset.range(len(self.unlabeled_source))
            per_dataset.append(ds.shuffle(seed=_sub_seed(self.seed, 1)).repeat().map(_Tag(u)))
            weights = [w * (1.0 - r) for w in weights] + [r]
            sources.append(self.unlabeled_source)
            lut = np.full((256,), UNION_IGNORE, np.int32)
            lut[0] = UNLABELED_PIXEL
            luts.append(lut)
        mixed = grain.MapDataset.mix(per_dataset, weights=weights)
        names = list(self.datasets) + [f'unlabeled {self.unlabeled}'] * (len(sources) - len(self.datasets))
        load = _LoadAndAugment(sources, luts, self.augment, self.seed, self._with_record_ids,
                               num_labeled=len(self.datasets), names=names,
                               skip_unreadable=self.skip_unreadable)
        # Global batches of (dataset, record) indices (cheap), then only this process's slice loads.
        return mixed.batch(self.global_batch_size, drop_remainder=True).map_with_index(
            _LocalSlice(load, self.global_batch_size, self.batch_size, self.shard_index))

    def iter_dataset(self, start_batch: int = 0) -> grain.IterDataset:
        """The grain IterDataset of per-process batches, starting at batch `start_batch`."""
        ds = self.map_dataset[start_batch:] if start_batch else self.map_dataset
        ds = ds.to_iter_dataset(self._read_options)
        if self.worker_count > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.worker_count, per_worker_buffer_size=self._worker_buffer_size),
                worker_init_fn=_ignore_stop_signals)
        return ds

    def make_iterator(self, start_batch: int = 0) -> TrainIterator:
        """A checkpointable iterator over per-process batches (`get_state` / `set_state`)."""
        return TrainIterator(self, start_batch)

    def __iter__(self):
        return self.make_iterator()

    def element_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        (h, w), b = self.augment.crop_hw, self.batch_size
        spec = {'image': ((b, h, w, 3), np.dtype(np.uint8)), 'label': ((b, h, w), np.dtype(np.int32)),
                'dataset_id': ((b,), np.dtype(np.int32))}
        if self._with_record_ids:
            spec['record_index'] = ((b,), np.dtype(np.int64))
        if self.skip_unreadable:
            spec['unreadable'] = ((b,), np.dtype(np.int32))
        return spec


class TrainIterator(grain.DatasetIterator):
    """Batch iterator whose state is the index of the next batch.

    Batches are a pure function of (seed, global batch index, process slice), so the state does
    not depend on `worker_count` or the process count. The state also records the seed, global
    batch size and mixture and refuses to restore into a different stream.
    """

    def __init__(self, pipeline: TrainPipeline, start_batch: int = 0):
        super().__init__()
        self._pipeline = pipeline
        self._next_batch = int(start_batch)
        self._it = None

    def _identity(self) -> dict[str, Any]:
        p = self._pipeline
        return {'datasets': list(p.datasets), 'seed': p.seed,
                'global_batch_size': p.global_batch_size, 'weights': [round(w, 12) for w in p.weights],
                # None without unlabeled data, which is also what states saved before it give.
                'unlabeled': ([p.unlabeled, p.unlabeled_split, round(p.unlabeled_ratio, 12)]
                              if p.unlabeled else None)}

    def _ensure_started(self):
        if self._it is None:
            self._it = iter(self._pipeline.iter_dataset(self._next_batch))

    def __next__(self) -> dict[str, np.ndarray]:
        self._ensure_started()
        batch = next(self._it)
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {'next_batch': self._next_batch, **self._identity()}

    def set_state(self, state: dict[str, Any]) -> None:
        expected = self._identity()
        got = {k: state.get(k) for k in expected}
        if got != expected:
            diff = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
            raise ValueError(f'Iterator state is for a different pipeline (saved, current): {diff}.')
        self._close_inner()
        self._next_batch = int(state['next_batch'])

    def start_prefetch(self) -> None:
        self._ensure_started()
        self._it.start_prefetch()

    def _close_inner(self):
        if self._it is not None:
            self._it.close()
            self._it = None

    def close(self) -> None:
        self._close_inner()
        super().close()


def make_train_iterator(datasets: Sequence[str], *, data_dir: str | None = None,
                        global_batch_size: int, **kwargs) -> TrainIterator:
    """`TrainPipeline(...).make_iterator()`; see `TrainPipeline` for the arguments."""
    return TrainPipeline(datasets, data_dir=data_dir, global_batch_size=global_batch_size,
                         **kwargs).make_iterator()


class IteratorHandler(ocp.CheckpointHandler):
    """orbax handler for an iterator whose state is the same on every process (`TrainIterator`,
    stage 1's and fine-tuning's iterators): process 0 writes `iterator.json`; every process
    restores from it, so the checkpoint does not depend on the process count."""

    FILE = 'iterator.json'

    def save(self, directory: epath.Path, args: IteratorSave) -> None:
        if _process_index_and_count()[0] == 0:
            (directory / self.FILE).write_text(json.dumps(args.item.get_state(), indent=1))

    def restore(self, directory: epath.Path, args: IteratorRestore) -> Any:
        path = directory / self.FILE
        if not path.exists():
            raise FileNotFoundError(f'{path} is missing: not a complete ms3_jax data checkpoint')
        args.item.set_state(json.loads(path.read_text()))
        return args.item

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
    item: Any


def checkpoint_save_args(iterator: grain.DatasetIterator) -> IteratorSave:
    """orbax args that save an iterator's state (use inside `ocp.args.Composite`)."""
    return IteratorSave(iterator)


def checkpoint_restore_args(iterator: grain.DatasetIterator) -> IteratorRestore:
    """orbax args that restore the state into `iterator` (a freshly made one of the same pipeline)."""
    return IteratorRestore(iterator)


# --- evaluation -----------------------------------------------------------------------------------

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
        image, label = _as_image(record['image']), _as_label(record['label'])
        image, label = resize_short_side(image, label, self._short)
        name = record.get('file_name', b'')
        name = name.decode() if isinstance(name, bytes) else str(name)
        return {'image': np.ascontiguousarray(image), 'label': self._lut[label],
                'dataset_id': np.int32(self._d), 'file_name': name}


def make_eval_dataset(dataset: str, *, label_space: LabelSpace, data_dir: str | None = None,
                      split: str = 'validation', short_side: int | None = None,
                      shard_index: int = 0, shard_count: int = 1,
                      source: Any | None = None) -> grain.MapDataset:
    """Whole validation images of one dataset, one per element (sizes differ):

    {'image': uint8 [H, W, 3], 'label': int32 [H, W] union ids / -1, 'dataset_id': int32,
     'file_name': str}; records `shard_index::shard_count` for multi-process evaluation.
    Index it, or iterate with small buffers (full-resolution images are large), e.g.
    `ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))`.
    """
    d = label_space.dataset_index(dataset)
    src = source if source is not None else open_sources([dataset], split, data_dir)[0]
    ds = grain.MapDataset.source(src)[shard_index::shard_count]
    return ds.map(_EvalMap(d, label_space.to_union_lut(d), short_side))


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (int(x), int(x)) if np.isscalar(x) else (int(x[0]), int(x[1]))


def sliding_window_positions(height: int, width: int, crop: int | Sequence[int],
                             stride: int | Sequence[int]) -> np.ndarray:
    """MMSegmentation slide-inference windows: int32 [n, 4] rows (y1, x1, y2, x2).

    h_grids = max(H - crop_h + stride_h - 1, 0) // stride_h + 1 (same for w); windows start at
    i * stride and are shifted back inside the image at the border (clamped at 0 when the image
    is smaller than the crop).
    """
    ch, cw = _pair(crop)
    sh, sw = _pair(stride)
    h_grids = max(height - ch + sh - 1, 0) // sh + 1
    w_grids = max(width - cw + sw - 1, 0) // sw + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * sh, wi * sw
            y2, x2 = min(y1 + ch, height), min(x1 + cw, width)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out.append((y1, x1, y2, x2))
    return np.asarray(out, np.int32).reshape(-1, 4)


def sliding_window_crops(image: np.ndarray, crop: int | Sequence[int],
                         stride: int | Sequence[int], pad_value: Any = 0
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Cuts `image` [H, W, ...] into MMSeg slide-inference crops.

    Returns (crops [n, crop_h, crop_w, ...], positions int32 [n, 4] = (y1, x1, y2, x2)). Crops
    have a fixed shape (for jit): when the image is smaller than the crop, the window is padded
    bottom/right with `pad_value`; the valid part of crop k is [:y2-y1, :x2-x1].
    """
    ch, cw = _pair(crop)
    h, w = image.shape[:2]
    pos = sliding_window_positions(h, w, (ch, cw), stride)
    crops = np.empty((len(pos), ch, cw) + image.shape[2:], image.dtype)
    crops[...] = np.asarray(pad_value, image.dtype)
    for k, (y1, x1, y2, x2) in enumerate(pos):
        crops[k, :y2 - y1, :x2 - x1] = image[y1:y2, x1:x2]
    return crops, pos


def merge_sliding_window(crop_outputs: np.ndarray, positions: np.ndarray, height: int,
                         width: int) -> np.ndarray:
    """Averages per-crop outputs [n, crop_h, crop_w, C] back to [H, W, C] (MMSeg `count_mat`)."""
    out = np.zeros((height, width) + crop_outputs.shape[3:], np.float32)
    count = np.zeros((height, width) + (1,) * (crop_outputs.ndim - 3), np.float32)
    for k, (y1, x1, y2, x2) in enumerate(positions):
        out[y1:y2, x1:x2] += crop_outputs[k, :y2 - y1, :x2 - x1]
        count[y1:y2, x1:x2] += 1
    if np.any(count == 0):
        raise ValueError('Sliding windows do not cover the image.')
    return out / count
