"""Built-in synthetic multi-dataset: tiny segmentation datasets with planted class relations.

It exercises the whole MS3 path (paper Sec. 3.1: the union label space of several datasets;
Sec. 3.3 / Tab. 8: cross-dataset relations that Eq. 6 should discover) on a laptop, with nothing
downloaded. Not from the paper; every choice here is ours:

- Visual concepts are procedural textures (sky gradient, grass noise, wavy water, stair bands,
  brick walls, ...). A class is a set of concept *variants*: classes of different datasets
  with the same variant set are synonyms (stairs/stairway, hill/mountain, ship/boat, and
  same-name classes like sky/sky); a class whose variant set is a strict subset of another's is
  a subset ('synth_b/dirt track' = the streaked variant of 'synth_a/path', 'synth_c/lake' = the
  calm variant of 'synth_a/water'). The relations file is derived from these sets, so it is the
  ground truth by construction: synonyms in both directions, subsets from subset to superset
  (Eq. 6 / Tab. 8 are unidirectional). Three datasets are for pretraining (`PRETRAIN_DATASETS`);
  synth_d, with its own names for shared concepts (vegetation, terrain, sidewalk, river), is held
  out for transfer, in Mapillary's role (paper Tab. 3).
- Fine-grained subset classes (dirt track, lake) are rare (`RARE_WEIGHT` of the others' region
  frequency), as fine-grained labels are in real data. Eq. 6 maps y to y' when y's pixels lie
  nearer T_y' than T_y; pixels that look the same get an embedding between the names they carry,
  nearer the more frequent one, so a subset is found exactly when its parent's label dominates
  the shared look. With equal class frequencies (1.1.0) 'dirt track' was the more frequent name
  of its look ('path' shows it in half of its regions only) and neither subset was found
  (docs/choices.md, "Demo budget and data").
- The datasets share one look (colour, sensor noise, texture scale; `SyntheticSpec` can vary
  them) and differ in their classes, and synth_b marks region boundaries as ignore (255) like
  VOC. With a colour cast and noise level per dataset (until 2026-12-04) the network told the
  datasets apart and so separated synonyms by their domain, never by their names (Eq. 1 pushes
  stairs from stairway when it can): relation recall 0.55 instead of 0.75 on the demo
  (docs/choices.md, "Demo budget and data").
- Images are warped Voronoi partitions (blobby regions) with one class per cell. Sizes vary
  in aspect ratio around `image_size`. Generation is deterministic for a seed: every image is
  drawn from `np.random.default_rng([seed, dataset, split, index])`.

Records have the same format as the real builders (`builders.py`): tfds features
{'image': jpeg, 'label': png uint8 [H, W, 1] dataset-local ids with 255 = ignore, 'file_name'},
written as array_record and read with `tfds.data_source(name, split, data_dir)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import os
from collections.abc import Callable, Sequence

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from ms3_jax.data import classes

IGNORE_INDEX = classes.IGNORE_INDEX
RELATIONS_FILE = 'synthetic_relations.json'
INFO_FILE = 'synthetic_info.json'
_JPEG_QUALITY = 95


# --- textures -------------------------------------------------------------------------------------
# Every texture maps (rng, h, w, scale) -> float32 [h, w, 3] roughly in [0, 1].

def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise in about [-1, 1] with feature size `cell` pixels (bicubic upsampling)."""
    cell = max(float(cell), 1.0)
    gh, gw = int(np.ceil(h / cell)) + 3, int(np.ceil(w / cell)) + 3
    grid = rng.uniform(-1.0, 1.0, (gh, gw)).astype(np.float32)
    if cell <= 1.0:
        return grid[:h, :w]
    up = Image.fromarray(grid, mode='F').resize(
        (int(round(gw * cell)), int(round(gh * cell))), Image.BICUBIC)
    oy, ox = int(cell), int(cell)
    return np.clip(np.asarray(up)[oy:oy + h, ox:ox + w], -1.5, 1.5)


def _rgb(c: Sequence[float]) -> np.ndarray:
    return np.asarray(c, np.float32)[None, None, :]


def _sky(rng, h, w, s):
    t = (np.arange(h, dtype=np.float32) / max(h - 1, 1))[:, None, None]
    base = (1 - t) * _rgb((0.42, 0.62, 0.95)) + t * _rgb((0.74, 0.84, 0.98))
    return base + 0.02 * _noise(rng, h, w, 24 * s)[..., None]


def _grass(rng, h, w, s):
    n = 0.13 * _noise(rng, h, w, 1.5 * s) + 0.05 * _noise(rng, h, w, 8 * s)
    return _rgb((0.26, 0.56, 0.18)) + n[..., None] * _rgb((0.8, 1.0, 0.5))


def _water_waves(rng, h, w, s):
    yy = np.arange(h, dtype=np.float32)[:, None]
    phase = 2 * np.pi * (yy / (6 * s) + 0.8 * _noise(rng, h, w, 20 * s))
    return _rgb((0.12, 0.34, 0.64)) + (0.10 * np.sin(phase))[..., None] * _rgb((1.0, 1.0, 0.7))


def _water_calm(rng, h, w, s):
    return _rgb((0.12, 0.34, 0.64)) + 0.035 * _noise(rng, h, w, 16 * s)[..., None]


def _stairs(rng, h, w, s):
    period = 10 * s
    yy = np.arange(h, dtype=np.float32)[:, None] + rng.uniform(0, period)
    tread = ((yy % period) < 0.62 * period).astype(np.float32)
    base = tread[..., None] * _rgb((0.74, 0.70, 0.64)) + (1 - tread[..., None]) * _rgb(
        (0.36, 0.33, 0.30))
    return base + 0.025 * _noise(rng, h, w, 2 * s)[..., None]


def _mountain(rng, h, w, s):
    n = 0.6 * _noise(rng, h, w, 24 * s) + 0.3 * _noise(rng, h, w, 8 * s) + 0.1 * _noise(
        rng, h, w, 3 * s)
    return _rgb((0.47, 0.45, 0.53)) + 0.16 * n[..., None]


def _boat(rng, h, w, s):
    period = 12 * s
    yy = np.arange(h, dtype=np.float32)[:, None] + rng.uniform(0, period)
    xx = np.arange(w, dtype=np.float32)[None, :] + rng.uniform(0, period)
    check = ((np.floor(yy / period) + np.floor(xx / period)) % 2).astype(np.float32)[..., None]
    return check * _rgb((0.92, 0.92, 0.90)) + (1 - check) * _rgb((0.76, 0.15, 0.13))


def _path_plain(rng, h, w, s):
    return _rgb((0.68, 0.55, 0.38)) + 0.08 * _noise(rng, h, w, 4 * s)[..., None]


def _path_dirt(rng, h, w, s):
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    streaks = np.sin(2 * np.pi * (xx + yy) / (7 * s) + rng.uniform(0, 2 * np.pi))
    n = 0.10 * streaks + 0.05 * _noise(rng, h, w, 3 * s)
    return _rgb((0.60, 0.47, 0.31)) + n[..., None]


def _building(rng, h, w, s):
    row_h, brick_w, mortar = 6 * s, 14 * s, max(1.0, 1.5 * s)
    yy = np.arange(h, dtype=np.float32)[:, None] + rng.uniform(0, row_h)
    xx = np.arange(w, dtype=np.float32)[None, :] + rng.uniform(0, brick_w)
    row = np.floor(yy / row_h)
    xs = xx + (row % 2) * brick_w / 2
    is_mortar = ((yy % row_h) < mortar) | ((xs % brick_w) < mortar)
    m = is_mortar.astype(np.float32)[..., None]
    base = m * _rgb((0.80, 0.78, 0.74)) + (1 - m) * _rgb((0.62, 0.29, 0.21))
    return base + 0.03 * _noise(rng, h, w, 2 * s)[..., None]


def _tree(rng, h, w, s):
    blobs = (_noise(rng, h, w, 5 * s) > 0.15).astype(np.float32)[..., None]
    base = blobs * _rgb((0.20, 0.48, 0.17)) + (1 - blobs) * _rgb((0.08, 0.28, 0.10))
    return base + 0.03 * _noise(rng, h, w, 2 * s)[..., None]


def _road(rng, h, w, s):
    return _rgb((0.28, 0.28, 0.30)) + 0.05 * _noise(rng, h, w, 1.2 * s)[..., None]


def _sand(rng, h, w, s):
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    ripples = np.sin(2 * np.pi * (xx + 0.3 * yy) / (9 * s) + rng.uniform(0, 2 * np.pi))
    n = 0.03 * ripples + 0.05 * _noise(rng, h, w, 2 * s)
    return _rgb((0.86, 0.76, 0.52)) + n[..., None]


TEXTURES: dict[str, Callable[..., np.ndarray]] = {
    'sky': _sky, 'grass': _grass, 'water_waves': _water_waves, 'water_calm': _water_calm,
    'stairs': _stairs, 'mountain': _mountain, 'boat': _boat, 'path_plain': _path_plain,
    'path_dirt': _path_dirt, 'building': _building, 'tree': _tree, 'road': _road, 'sand': _sand,
}


# --- the datasets ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """One synthetic dataset: classes (name -> concept variants) and its look."""
    name: str
    classes: tuple[tuple[str, tuple[str, ...]], ...]
    class_weights: tuple[float, ...]  # relative frequency of each class among an image's regions
    color_gain: tuple[float, float, float]
    noise_std: float          # sensor noise, in [0, 1] units
    texture_scale: float      # multiplies every texture's feature size
    ignore_boundaries: bool   # mark region boundaries 255 (VOC-style)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.classes)


def _spec(name: str, concepts: dict[str, tuple[str, ...]], rare: tuple[str, ...] = (),
          **look) -> SyntheticSpec:
    """`classes.SYNTHETIC_CLASSES[name]`, each showing `concepts[class]` or its namesake concept;
    the `rare` classes are drawn RARE_WEIGHT times as often as the others."""
    names = classes.SYNTHETIC_CLASSES[name]
    return SyntheticSpec(name, tuple((c, concepts.get(c, (c,))) for c in names),
                         tuple(RARE_WEIGHT if c in rare else 1.0 for c in names), **look)


RARE_WEIGHT = 0.25
_LOOK = dict(color_gain=(1.0, 1.0, 1.0), noise_std=0.01, texture_scale=1.0)
SPECS: tuple[SyntheticSpec, ...] = (
    _spec('synth_a',  # ADE20K-like
          {'stairway': ('stairs',), 'path': ('path_plain', 'path_dirt'),
           'water': ('water_waves', 'water_calm')}, **_LOOK, ignore_boundaries=False),
    _spec('synth_b',  # VOC-like: ignore boundaries
          {'hill': ('mountain',), 'ship': ('boat',), 'dirt track': ('path_dirt',)},
          rare=('dirt track',), **_LOOK, ignore_boundaries=True),
    _spec('synth_c',  # COCO-Stuff-like
          {'lake': ('water_calm',)}, rare=('lake',), **_LOOK, ignore_boundaries=False),
    _spec('synth_d',  # Mapillary-like: held out of pretraining, for transfer (Tab. 3)
          {'vegetation': ('tree',), 'terrain': ('grass',), 'sidewalk': ('path_plain',),
           'river': ('water_waves',)}, **_LOOK, ignore_boundaries=False),
)
SPEC_BY_NAME: dict[str, SyntheticSpec] = {s.name: s for s in SPECS}
SYNTHETIC_DATASETS: tuple[str, ...] = tuple(s.name for s in SPECS)
PRETRAIN_DATASETS: tuple[str, ...] = ('synth_a', 'synth_b', 'synth_c')
HELD_OUT_DATASET = 'synth_d'


def ground_truth_relations() -> list[dict[str, str]]:
    """Planted cross-dataset relations, derived from the classes' concept-variant sets.

    'synonym': same variant set (listed in both directions). 'subset': the 'from' class shows a
    strict subset of the 'to' class's variants (only that direction, as in Eq. 6 / Tab. 8).
    """
    out = []
    for a in SPECS:
        for b in SPECS:
            if a.name == b.name:
                continue
            for ca, va in a.classes:
                for cb, vb in b.classes:
                    sa, sb = set(va), set(vb)
                    kind = 'synonym' if sa == sb else 'subset' if sa < sb else None
                    if kind:
                        out.append({'from': f'{a.name}/{ca}', 'to': f'{b.name}/{cb}', 'kind': kind})
    return out


def _region_map(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Warped Voronoi partition: int [h, w] cell ids 0..k-1 with blobby boundaries."""
    k = int(rng.integers(3, 7))
    pts = rng.uniform(0, 1, (k, 2)) * np.array([h, w])
    amp = 0.12 * min(h, w)
    cell = max(h, w) / 3
    yy = np.arange(h, dtype=np.float32)[:, None] + amp * _noise(rng, h, w, cell)
    xx = np.arange(w, dtype=np.float32)[None, :] + amp * _noise(rng, h, w, cell)
    d = (yy[None] - pts[:, 0, None, None]) ** 2 + (xx[None] - pts[:, 1, None, None]) ** 2
    return np.argmin(d, axis=0)


def _boundary_mask(label: np.ndarray, width: int = 1) -> np.ndarray:
    b = np.zeros(label.shape, bool)
    dy = label[1:, :] != label[:-1, :]
    dx = label[:, 1:] != label[:, :-1]
    b[1:, :] |= dy
    b[:-1, :] |= dy
    b[:, 1:] |= dx
    b[:, :-1] |= dx
    for _ in range(width - 1):
        b[1:] |= b[:-1].copy()
        b[:, 1:] |= b[:, :-1].copy()
    return b


def generate_example(spec: SyntheticSpec, rng: np.random.Generator,
                     image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 [H, W, 3], label uint8 [H, W]) pair of dataset `spec`."""
    h = image_size
    w = int(round(image_size * rng.choice([0.75, 1.0, 1.25, 1.5])))
    cells = _region_map(rng, h, w)
    n_cells = int(cells.max()) + 1
    n_cls = len(spec.classes)
    p = np.asarray(spec.class_weights) / np.sum(spec.class_weights)
    cls_of_cell = rng.choice(n_cls, n_cells, p=p)
    if len(np.unique(cls_of_cell)) < 2:  # at least two classes per image
        cls_of_cell[0] = (cls_of_cell[0] + 1 + rng.integers(0, n_cls - 1)) % n_cls
    image = np.zeros((h, w, 3), np.float32)
    label = np.zeros((h, w), np.uint8)
    scale = spec.texture_scale * image_size / 128
    for c in range(n_cells):
        mask = cells == c
        if not mask.any():
            continue
        cls = int(cls_of_cell[c])
        variants = spec.classes[cls][1]
        variant = variants[int(rng.integers(len(variants)))]
        tex = TEXTURES[variant](rng, h, w, scale)
        image[mask] = tex[mask]
        label[mask] = cls
    image = image * np.asarray(spec.color_gain, np.float32) * rng.uniform(0.92, 1.08)
    image = image + spec.noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    if spec.ignore_boundaries:
        label[_boundary_mask(label)] = IGNORE_INDEX
    return image, label


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **({'quality': _JPEG_QUALITY} if fmt == 'JPEG' else {}))
    return buf.getvalue()


# --- tfds builders --------------------------------------------------------------------------------

_SPLITS = ('train', 'validation')


class _SyntheticBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds builder for one synthetic dataset (subclasses set SPEC_NAME)."""

    VERSION = tfds.core.Version('1.2.0')
    RELEASE_NOTES = {'1.0.0': 'Initial release.',
                     '1.1.0': 'One look for all datasets (no per-dataset colour cast / noise).',
                     '1.2.0': 'Fine-grained subset classes are rare; held-out synth_d.'}
    SPEC_NAME = ''

    # tfds derives `code_path` via importlib.resources, which fails for editable installs without
    # the `importlib_resources` backport; this module's own file is the right answer anyway.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(self, *, num_train: int = 300, num_val: int = 50, image_size: int = 128,
                 seed: int = 0, **kwargs):
        self._num = {'train': int(num_train), 'validation': int(num_val)}
        self._image_size = int(image_size)
        self._seed = int(seed)
        kwargs.setdefault('file_format', 'array_record')
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = SPEC_BY_NAME[self.SPEC_NAME]
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f'MS3 synthetic segmentation dataset {spec.name} '
                         f'(classes: {", ".join(spec.class_names)}).'),
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
                'label': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8,
                                             encoding_format='png'),
                'file_name': tfds.features.Text(),
            }),
            supervised_keys=None,
            metadata=tfds.core.MetadataDict(class_names=list(spec.class_names)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in _SPLITS}

    def _generate_examples(self, split):
        spec = SPEC_BY_NAME[self.SPEC_NAME]
        d = SYNTHETIC_DATASETS.index(spec.name)
        for i in range(self._num[split]):
            rng = np.random.default_rng([self._seed, d, _SPLITS.index(split), i])
            image, label = generate_example(spec, rng, self._image_size)
            name = f'{spec.name}_{split}_{i:05d}.jpg'
            yield name, {'image': _encode(image, 'JPEG'), 'label': _encode(label, 'PNG'),
                         'file_name': name}


class SynthA(_SyntheticBuilder):
    SPEC_NAME = 'synth_a'


class SynthB(_SyntheticBuilder):
    SPEC_NAME = 'synth_b'


class SynthC(_SyntheticBuilder):
    SPEC_NAME = 'synth_c'


class SynthD(_SyntheticBuilder):
    SPEC_NAME = 'synth_d'


BUILDERS: dict[str, type[_SyntheticBuilder]] = {
    'synth_a': SynthA, 'synth_b': SynthB, 'synth_c': SynthC, 'synth_d': SynthD}


@dataclasses.dataclass(frozen=True)
class SyntheticInfo:
    data_dir: str
    dataset_names: tuple[str, ...]  # the pretraining datasets (all of SYNTHETIC_DATASETS are built)
    held_out: str
    relations_path: str
    num_train: int
    num_val: int
    image_size: int
    seed: int


def prepare_synthetic(data_dir: str | os.PathLike, num_train: int = 300, num_val: int = 50,
                      image_size: int = 128, seed: int = 0) -> SyntheticInfo:
    """Builds synth_a/b/c/d as array_record under `data_dir` plus the relations JSON; idempotent.

    Re-running with the same arguments does nothing; a new data version is built next to the old
    one (tfds: a folder per version); other arguments than the build in `data_dir` had are
    refused (ValueError naming both): built data is never deleted.
    """
    data_dir = os.fspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    params = dict(num_train=int(num_train), num_val=int(num_val), image_size=int(image_size),
                  seed=int(seed))
    # Several processes of one job may call this at once (multi-host on one machine or a shared
    # filesystem): one builds, the others wait for the lock and then find the build complete.
    with open(os.path.join(data_dir, '.build.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _prepare_locked(data_dir, params)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return SyntheticInfo(data_dir=data_dir, dataset_names=PRETRAIN_DATASETS,
                         held_out=HELD_OUT_DATASET,
                         relations_path=os.path.join(data_dir, RELATIONS_FILE), **params)


def _prepare_locked(data_dir: str, params: dict[str, int]) -> None:
    info_path = os.path.join(data_dir, INFO_FILE)
    relations_path = os.path.join(data_dir, RELATIONS_FILE)
    old = None
    if os.path.exists(info_path):
        with open(info_path) as f:
            old = json.load(f)
    if old is not None and old != params:  # never delete data someone built
        raise ValueError(
            f'{data_dir} holds synthetic data built with {old}; this config asks for {params}. '
            'Point data.data_dir at another directory (or delete that one yourself).')
    built = all(
        os.path.exists(os.path.join(data_dir, n, str(_SyntheticBuilder.VERSION), 'dataset_info.json'))
        for n in SYNTHETIC_DATASETS)
    if not (built and old == params and os.path.exists(relations_path)):
        # A missing or older version is built next to what is there (tfds: one folder per version).
        with _quiet_tfds():
            for n in SYNTHETIC_DATASETS:
                BUILDERS[n](data_dir=data_dir, **params).download_and_prepare()
        with open(relations_path, 'w') as f:
            json.dump(ground_truth_relations(), f, indent=1)
        with open(info_path, 'w') as f:  # written last: marks a complete build
            json.dump(params, f)


@contextlib.contextmanager
def _quiet_tfds():
    """tfds progress bars off while building (restored afterwards)."""
    previous = getattr(tqdm_utils, '_active', True)
    tfds.display_progress_bar(False)
    try:
        yield
    finally:
        tfds.display_progress_bar(previous)


def load_relations(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path) as f:
        return json.load(f)
