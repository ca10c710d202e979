"""The mixed multi-dataset training stream (grain) and its checkpointable iterator.

Training (paper Sec. 3.1, 4.1): the datasets' records (`sources.py`) are mixed into one stream,
augmented (`augment.py`) and their labels mapped to the union label space
(`LabelSpace.to_union`; -1 = ignore). One process yields its share of the global batch, ready
for `jax.make_array_from_process_local_data(sharding, batch[k])`:

  {'image': uint8 [b, H, W, 3], 'label': int32 [b, H, W], 'dataset_id': int32 [b]}

with b = global_batch_size // jax.process_count() (plus 'unreadable' int32 [b] with
`skip_unreadable`). The iterator is saved next to the train state, as the item
`data=checkpoint_save_args(it)` of the step's `ocp.args.Composite`. Choices (docs/choices.md):
"Multi-host: one global stream, sliced per process", "Augmentation randomness from the stream
position", "Unlabeled data source and mixing", "Unreadable records: replaced by the next
readable one".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
import json
import logging
import os
import signal
from typing import Any

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from ms3_jax.data.augment import AugmentConfig, augment
from ms3_jax.data.label_space import IGNORE_INDEX, UNION_IGNORE, UNLABELED_PIXEL, LabelSpace
from ms3_jax.data.sources import (decode_image, decode_label, mixed_records, mixture_weights,
                                  open_sources, open_unlabeled_source, record_file_name)


AUTO_WORKERS = -1  # `worker_count`: one worker per core of this process's CPU set but two
CORES_FOR_TRAINING = 2  # cores `AUTO_WORKERS` leaves to the training process


def resolve_worker_count(worker_count: int) -> int:
    """grain worker processes for `LoaderOptions.worker_count`: itself, or with `AUTO_WORKERS`
    the cores this process may run on minus `CORES_FOR_TRAINING` (0 on a 2-core machine).
    A host feeding 8 accelerators needs tens of workers (benchmarks/data_throughput.py)."""
    if worker_count == AUTO_WORKERS:
        return max(0, len(os.sched_getaffinity(0)) - CORES_FOR_TRAINING)
    if worker_count < 0:
        raise ValueError(f"data.worker_count must be >= 0 or {AUTO_WORKERS} (one per core but "
                         f"{CORES_FOR_TRAINING}), got {worker_count}")
    return int(worker_count)


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
    """How batches are produced; none of it changes the batches."""
    worker_count: int = 0  # grain worker processes (0 = in the main process; -1: one per core but 2)
    worker_buffer_size: int = 2  # batches buffered per worker
    num_threads: int = 2  # grain ReadOptions: threads producing whole batches
    prefetch_buffer_size: int = 2

    def __post_init__(self):
        resolve_worker_count(self.worker_count)  # a bad value fails here, before any work


@dataclasses.dataclass(frozen=True)
class Unlabeled:
    """Images without labels (paper App. D), the fraction `ratio` in (0, 1) of the examples (the
    labeled weights are scaled by 1 - ratio). `source`: a dataset name, image folder or tfds
    dataset (`open_unlabeled_source`, `split`), or only the name of `records`, a pre-opened
    random-access source of {'image': ...}."""
    source: str
    ratio: float
    split: str = 'train'
    records: Any | None = None

    def __post_init__(self):
        if not 0.0 < float(self.ratio) < 1.0:
            raise ValueError(f'Unlabeled.ratio must be in (0, 1) (unlabeled source '
                             f'{self.source!r}), got {self.ratio!r}.')


class UnreadableRecordError(OSError):
    """A training record that cannot be read or decoded (message: dataset, record, file)."""


class BadLabelError(UnreadableRecordError, ValueError):
    """A record whose label map does not fit: label ids outside its dataset's classes, or a label
    shape other than the image's. Skipped like an unreadable record with `skip_unreadable`."""


_MAX_REPLACED = 100


def _file_of(record: Any) -> str:
    return f' (file {name!r})' if (name := record_file_name(record)) else ''


class _LoadAndAugment(grain.transforms.MapWithIndex):
    """(dataset, record) at global stream position i -> augmented example in the union label space."""

    def __init__(self, sources: Sequence[Any], luts: Sequence[np.ndarray], cfg: AugmentConfig,
                 seed: int, with_record_ids: bool, num_labeled: int | None = None,
                 names: Sequence[str] = (), skip_unreadable: bool = False):
        self._sources = list(sources)
        self._luts = [np.asarray(l, np.int32) for l in luts]
        self._cfg, self._seed, self._with_ids = cfg, int(seed), with_record_ids
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
            image = decode_image(record['image'])
            # Unlabeled: local 0 inside the image (-> UNLABELED_PIXEL), 255 in the padding (-> -1).
            label = decode_label(record['label']) if labeled else np.zeros(image.shape[:2], np.uint8)
        except Exception as e:  # tfds, PIL and file systems raise many types for a bad record
            raise UnreadableRecordError(f'dataset {name!r}, record {r}{_file_of(record)}: cannot read '
                                        f'or decode it: {type(e).__name__}: {e}') from e
        if image.ndim != 3 or image.shape[:2] != label.shape:
            raise BadLabelError(f'dataset {name!r}, record {r}{_file_of(record)}: image {image.shape} '
                             f'and label {label.shape} do not match')
        n = self._num_classes[d]
        if labeled and label.max() >= n:
            bad = np.unique(label[(label >= n) & (label != IGNORE_INDEX)])
            if bad.size:
                raise BadLabelError(f'dataset {name!r}, record {r}{_file_of(record)}: label ids '
                                 f'{bad[:10].tolist()} out of range; its {n} classes are 0..{n - 1} '
                                 f'(255 = ignore). Was it prepared with another class list?')
        return image, label


def _ignore_stop_signals(*_: Any) -> None:
    """grain worker init: SIGINT / SIGTERM are for the training process (`loop.run` saves and
    exits, then closes the workers); a Ctrl-C reaching the whole process group must not kill
    the workers first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _LocalSlice(grain.transforms.MapWithIndex):
    """Global batch i of (dataset, record) pairs -> this process's `batch_size` examples of it
    (docs/choices.md, "Multi-host: one global stream, sliced per process")."""

    def __init__(self, load: _LoadAndAugment, global_batch_size: int, batch_size: int,
                 shard_index: int):
        self._load, self._g, self._b, self._first = load, global_batch_size, batch_size, \
            shard_index * batch_size

    def map_with_index(self, index: int, element):
        datasets_G, records_G = element
        examples = [self._load.map_with_index(index * self._g + k, (int(datasets_G[k]), int(records_G[k])))
                    for k in range(self._first, self._first + self._b)]
        return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


class TrainPipeline:
    """The mixed, augmented, per-process-sharded training stream (see module docstring).

    Args:
      datasets: dataset names (tfds names, union order).
      global_batch_size: batch over all processes; each process yields global / shard_count.
      data_dir: tfds data dir holding the array_record builds.
      label_space: defaults to `LabelSpace.from_datasets(datasets)`; must list `datasets` in order.
      split, augment: the tfds split to read; the `AugmentConfig`.
      weights: mixture weights (aligned with `datasets`, or {name: weight}); None: by size.
      seed: controls record order and augmentation.
      loader: `LoaderOptions` (worker processes, buffers, threads).
      shard_index, shard_count: default jax.process_index() / jax.process_count().
      sources: optional pre-opened random-access sources (one per dataset; records with 'image'
        uint8 [H, W, 3] or encoded bytes and 'label' uint8 [H, W(, 1)]), e.g. in-memory lists.
      with_record_ids: add 'record_index' int64 [b] (the record within its dataset) to batches.
      unlabeled: `Unlabeled` images mixed into the stream (App. D), or None.
      skip_unreadable: replace an unreadable record by the next readable one of its dataset and
        add 'unreadable' int32 [b] to batches (module docstring); False: raise naming it.
    """

    def __init__(self, datasets: Sequence[str], *, global_batch_size: int,
                 data_dir: str | None = None, label_space: LabelSpace | None = None,
                 split: str = 'train', augment: AugmentConfig = AugmentConfig(),
                 weights: Sequence[float] | Mapping[str, float] | None = None, seed: int = 0,
                 loader: LoaderOptions = LoaderOptions(), shard_index: int | None = None,
                 shard_count: int | None = None, sources: Sequence[Any] | None = None,
                 with_record_ids: bool = False, unlabeled: Unlabeled | None = None,
                 skip_unreadable: bool = False):
        self.datasets = tuple(datasets)
        self.label_space = label_space or LabelSpace.from_datasets(self.datasets)
        if self.label_space.dataset_names != self.datasets:
            raise ValueError(f'Label space datasets {self.label_space.dataset_names} != pipeline '
                             f'datasets {self.datasets}.')
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
        if not 0 <= shard_index < shard_count:
            raise ValueError(f'shard_index {shard_index} not in [0, {shard_count}).')
        if global_batch_size % shard_count:
            raise ValueError(f'Global batch {global_batch_size} is not divisible by the '
                             f'{shard_count} processes.')
        self.shard_index, self.shard_count = int(shard_index), int(shard_count)
        self.global_batch_size = int(global_batch_size)
        self.batch_size = self.global_batch_size // self.shard_count
        self.augment, self.seed, self.loader = augment, int(seed), loader
        self.sources = list(sources) if sources is not None else open_sources(
            self.datasets, split, data_dir)
        if len(self.sources) != len(self.datasets):
            raise ValueError(f'{len(self.sources)} sources for {len(self.datasets)} datasets.')
        self.dataset_sizes = tuple(len(s) for s in self.sources)
        self.weights = mixture_weights(self.datasets, self.dataset_sizes, weights)
        self._with_record_ids = with_record_ids
        # The unlabeled stream, flat: its name, split and ratio are the iterator's identity.
        u = unlabeled
        self.unlabeled, self.unlabeled_split = (u.source, u.split) if u else (None, 'train')
        self.unlabeled_ratio = float(u.ratio) if u else 0.0
        self.unlabeled_source = u and (u.records if u.records is not None else
                                       open_unlabeled_source(u.source, u.split, data_dir))
        self.skip_unreadable = bool(skip_unreadable)
        self.map_dataset = self._build_map_dataset()

    def _build_map_dataset(self) -> grain.MapDataset:
        sources = list(self.sources)
        luts = [self.label_space.to_union_lut(d) for d in range(len(self.datasets))]
        names = list(self.datasets)
        if self.unlabeled_source is not None:  # App. D: one more stream, after the labeled ones
            sources.append(self.unlabeled_source)
            lut = np.full((256,), UNION_IGNORE, np.int32)
            lut[0] = UNLABELED_PIXEL
            luts.append(lut)
            names.append(f'unlabeled {self.unlabeled}')
        mixed = mixed_records(self.dataset_sizes, self.weights, self.seed,
                              None if self.unlabeled_source is None else
                              (len(self.unlabeled_source), self.unlabeled_ratio))
        load = _LoadAndAugment(sources, luts, self.augment, self.seed, self._with_record_ids,
                               num_labeled=len(self.datasets), names=names,
                               skip_unreadable=self.skip_unreadable)
        # Global batches of (dataset, record) indices (cheap), then only this process's slice loads.
        return mixed.batch(self.global_batch_size, drop_remainder=True).map_with_index(
            _LocalSlice(load, self.global_batch_size, self.batch_size, self.shard_index))

    def iter_dataset(self, start_batch: int = 0) -> grain.IterDataset:
        """The grain IterDataset of per-process batches, starting at batch `start_batch`."""
        ds = self.map_dataset[start_batch:] if start_batch else self.map_dataset
        ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self.loader.num_threads,
                                                  prefetch_buffer_size=self.loader.prefetch_buffer_size))
        if (workers := resolve_worker_count(self.loader.worker_count)) > 0:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=workers,
                per_worker_buffer_size=self.loader.worker_buffer_size),
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
    """Batch iterator whose state is the index of the next batch, with the seed, global batch
    size and mixture it belongs to (a state of another stream is refused): docs/choices.md,
    "Augmentation randomness from the stream position"."""

    def __init__(self, pipeline: TrainPipeline, start_batch: int = 0):
        super().__init__()
        self._pipeline, self._next_batch, self._it = pipeline, int(start_batch), None

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


class IteratorHandler(ocp.CheckpointHandler):
    """orbax handler for an iterator whose state is the same on every process (`TrainIterator`,
    stage 1's and fine-tuning's iterators): process 0 writes `iterator.json`; every process
    restores from it, so the checkpoint does not depend on the process count."""

    FILE = 'iterator.json'

    def save(self, directory: epath.Path, args: IteratorSave) -> None:
        if jax.process_index() == 0:
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
    """orbax args that save an iterator's state (use inside `ocp.args.Composite`)."""
    item: Any


@ocp.args.register_with_handler(IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
    """orbax args that restore the state into `item` (a freshly made iterator of the same stream)."""
    item: Any


checkpoint_save_args, checkpoint_restore_args = IteratorSave, IteratorRestore  # f(iterator) -> args
