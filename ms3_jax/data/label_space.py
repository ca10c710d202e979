"""The union label space Y = Y_1 ∪ Y_2 ∪ ... of the pretraining datasets (paper Sec. 3.1).

Label spaces are concatenated, not merged: union id = offset[dataset] + local id; Eq. 6 only
relates classes of *other* datasets (`LabelSpace.other_dataset_mask()`). Ids: dataset-local
0..n_d-1 with 255 = ignore (`IGNORE_INDEX`); union 0..|Y|-1 with -1 = ignore (`UNION_IGNORE`),
int32 since |Y| > 255. docs/choices.md, "Union label space: concatenation, no merging".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ms3_jax.data import classes

UNION_IGNORE = -1  # the union ignore id (int32 labels; every id >= 0 a class)
IGNORE_INDEX = classes.IGNORE_INDEX  # dataset-local ignore id (255, uint8 label PNGs)
UNLABELED_PIXEL = -2  # a pixel of an unlabeled image (App. D): pseudo-labelled in the step


@dataclasses.dataclass(frozen=True, init=False, eq=False)
class LabelSpace:
    """Concatenated label space of several datasets.

    Construct with `LabelSpace({'voc': (...), 'ade20k': (...)})` (ordered mapping dataset name ->
    class names) or `LabelSpace.from_datasets(['voc', 'ade20k'])` for the built-in class lists.

    Attributes:
      dataset_names: the dataset names, in union order.
      class_names: per dataset, its local class names.
      offsets: int array [num_datasets + 1]; dataset d owns union ids offsets[d]:offsets[d+1].
      names: the |Y| union class names (plain, e.g. 'stairway'; these go to the text encoder).
      display_names: the |Y| names qualified by dataset, e.g. 'ade20k/stairway'.
      dataset_of_class: int32 array [|Y|], the dataset index of each union class.
      num_classes: |Y|.
    """

    dataset_names: tuple[str, ...]
    class_names: tuple[tuple[str, ...], ...]
    offsets: np.ndarray
    names: tuple[str, ...]
    display_names: tuple[str, ...]
    dataset_of_class: np.ndarray
    num_classes: int

    def __init__(self, classes_per_dataset: Mapping[str, Sequence[str]]
                 | Sequence[tuple[str, Sequence[str]]]):
        items = list(classes_per_dataset.items() if isinstance(classes_per_dataset, Mapping)
                     else classes_per_dataset)
        if not items:
            raise ValueError('LabelSpace needs at least one dataset.')
        ds_names = [str(k) for k, _ in items]
        if dups := sorted({n for n in ds_names if ds_names.count(n) > 1}):
            raise ValueError(f'Duplicate dataset names in the label space: {dups}.')
        class_names = []
        for name, cls in items:
            if isinstance(cls, str):
                raise TypeError(f'Classes of {name!r} must be a sequence of names, not a string.')
            cls = tuple(str(c) for c in cls)
            if not cls:
                raise ValueError(f'Dataset {name!r} has no classes.')
            if empty := [i for i, c in enumerate(cls) if not c.strip()]:
                raise ValueError(f'Dataset {name!r} has empty class names at positions {empty}.')
            if len(cls) > IGNORE_INDEX:
                raise ValueError(f'Dataset {name!r} has {len(cls)} classes; local ids must stay < 255.')
            if dup_cls := sorted({c for c in cls if cls.count(c) > 1}):
                raise ValueError(f'Dataset {name!r} repeats class names {dup_cls}.')
            class_names.append(cls)
        sizes = [len(c) for c in class_names]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
        offsets.setflags(write=False)
        dataset_of_class = np.repeat(np.arange(len(sizes), dtype=np.int32), sizes)
        dataset_of_class.setflags(write=False)
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_('dataset_names', tuple(ds_names))
        set_('class_names', tuple(class_names))
        set_('offsets', offsets)
        set_('names', tuple(c for cls in class_names for c in cls))
        set_('display_names', tuple(f'{d}/{c}' for d, cls in zip(ds_names, class_names) for c in cls))
        set_('dataset_of_class', dataset_of_class)
        set_('num_classes', int(offsets[-1]))

    @classmethod
    def from_datasets(cls, dataset_names: Sequence[str]) -> LabelSpace:
        """Union of the registered datasets' class lists (`registry.DATASETS`)."""
        from ms3_jax.data import registry  # (tfds, for the builders: only when needed)
        if isinstance(dataset_names, str):
            dataset_names = [dataset_names]
        known = registry.DATASETS
        if unknown := [n for n in dataset_names if n not in known]:
            raise ValueError(f'Unknown dataset name(s) {unknown}; valid names: {sorted(known)}.')
        return cls([(n, known[n].classes) for n in dataset_names])

    @property
    def num_datasets(self) -> int:
        return len(self.dataset_names)

    def dataset_index(self, dataset: str | int) -> int:
        """Index of a dataset given by name or index."""
        if isinstance(dataset, (int, np.integer)):
            if not 0 <= dataset < self.num_datasets:
                raise IndexError(f'Dataset index {dataset} out of range [0, {self.num_datasets}).')
            return int(dataset)
        try:
            return self.dataset_names.index(dataset)
        except ValueError:
            raise ValueError(f'Dataset {dataset!r} is not in this label space; it has '
                             f'{list(self.dataset_names)}.') from None

    def num_classes_of(self, dataset: str | int) -> int:
        d = self.dataset_index(dataset)
        return int(self.offsets[d + 1] - self.offsets[d])

    def class_range(self, dataset: str | int) -> range:
        """The union ids owned by `dataset`."""
        d = self.dataset_index(dataset)
        return range(int(self.offsets[d]), int(self.offsets[d + 1]))

    def union_id(self, qualified_name: str) -> int:
        """Union id of 'dataset/class' (e.g. 'ade20k/stairway')."""
        try:
            return self.display_names.index(qualified_name)
        except ValueError:
            raise KeyError(f'{qualified_name!r} is not a class of this label space '
                           "(expected 'dataset/class').") from None

    def to_union(self, local_labels: Any, dataset_index: int | str | np.ndarray) -> np.ndarray:
        """Maps dataset-local labels to union ids (int32); local 255 -> `UNION_IGNORE` (-1).

        `dataset_index` is a dataset name/index, or an int array broadcastable against the labels
        from the left (e.g. shape [b] for labels [b, H, W]). Local ids outside 0..n_d-1 other than
        255 raise, since they would silently land in another dataset's classes.
        """
        labels = np.asarray(local_labels)
        if isinstance(dataset_index, (str, int, np.integer)):
            d = np.asarray(self.dataset_index(dataset_index))
        else:
            d = np.asarray(dataset_index).astype(np.int64)
            if d.size and (d.min() < 0 or d.max() >= self.num_datasets):
                raise IndexError(f'Dataset indices {np.unique(d)} out of range '
                                 f'[0, {self.num_datasets}).')
            d = d.reshape(d.shape + (1,) * (labels.ndim - d.ndim))
        labels = labels.astype(np.int64)
        ignore = labels == IGNORE_INDEX
        n = (self.offsets[1:] - self.offsets[:-1])[d]
        bad = ~ignore & ((labels < 0) | (labels >= n))
        if np.any(bad):
            raise ValueError(f'Local labels {np.unique(labels[bad])[:10]} out of range for their '
                             'dataset (expected 0..n-1 or 255).')
        return np.where(ignore, UNION_IGNORE, labels + self.offsets[:-1][d]).astype(np.int32)

    def to_local(self, union_labels: Any) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of `to_union`: (local labels, dataset index), both int32; -1 -> (255, -1)."""
        y = np.asarray(union_labels).astype(np.int64)
        ignore = y == UNION_IGNORE
        safe = np.where(ignore, 0, y)
        d = self.dataset_of_class[safe]
        local = safe - self.offsets[:-1][d]
        return (np.where(ignore, IGNORE_INDEX, local).astype(np.int32),
                np.where(ignore, -1, d).astype(np.int32))

    def to_union_lut(self, dataset: str | int) -> np.ndarray:
        """A 256-entry int32 lookup table local id -> union id (255 and unused ids -> -1)."""
        d = self.dataset_index(dataset)
        lut = np.full((256,), UNION_IGNORE, np.int32)
        n = self.num_classes_of(d)
        lut[:n] = np.arange(n) + self.offsets[d]
        return lut

    def other_dataset_mask(self) -> np.ndarray:
        """bool [|Y|, |Y|]: True where classes y, y' come from different datasets (Eq. 6)."""
        return self.dataset_of_class[:, None] != self.dataset_of_class[None, :]

    def relation_matrix(self, relations: Sequence[Mapping[str, str]]) -> np.ndarray:
        """bool [|Y|, |Y|] from [{'from': 'ds/a', 'to': 'ds/b', ...}] (e.g. to score Eq. 6 against
        the synthetic data's planted relations); pairs outside the space are skipped."""
        index = {n: i for i, n in enumerate(self.display_names)}
        out = np.zeros((self.num_classes, self.num_classes), bool)
        for r in relations:
            if r['from'] in index and r['to'] in index:
                out[index[r['from']], index[r['to']]] = True
        return out

    def __len__(self) -> int:
        return self.num_classes

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelSpace):
            return NotImplemented
        return (self.dataset_names, self.class_names) == (other.dataset_names, other.class_names)

    def __hash__(self) -> int:
        return hash((self.dataset_names, self.class_names))

    def __repr__(self) -> str:
        parts = ', '.join(f'{d}: {len(c)}' for d, c in zip(self.dataset_names, self.class_names))
        return f'LabelSpace({parts}; |Y|={self.num_classes})'

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(zip(self.dataset_names, self.class_names))

    def __getstate__(self):
        return {'items': list(self.as_dict().items())}

    def __setstate__(self, state):
        self.__init__(state['items'])

