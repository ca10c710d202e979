"""Built-in synthetic multi-dataset: tiny segmentation datasets with the paper's difficulties.

Exercises the MS3 path (Sec. 3.1 union label space; Sec. 3.3 / Tab. 8 relations that Eq. 6
should discover) with nothing downloaded. Not from the paper: concepts, planted synonyms and
subsets, `Difficulty` and `RARE_WEIGHT` are described in docs/choices.md, "Synthetic demo data
2.0". `PRETRAIN_DATASETS` are for pretraining; synth_d is held out for transfer (Tab. 3).

Records have the real builders' format: docs/usage.md, "Record format".
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
from collections.abc import Callable, Sequence

from etils import epath
import numpy as np
from PIL import Image, ImageFilter
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

from ms3_jax.data import builders, classes
from ms3_jax.files import safe

IGNORE_INDEX = classes.IGNORE_INDEX
DATA_VERSION = '2.0.0'  # 1.x: built by the code of commit 91a0f6d (git checkout it)
RELATIONS_FILE = 'synthetic_relations.json'
INFO_FILE = 'synthetic_info.json'


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


def _paving(rng, h, w, s):
    """Square slabs with dark joints and a per-slab tone (data 2.0: synth_d's sidewalk)."""
    slab, joint = 9 * s, max(1.0, 1.2 * s)
    yy = np.arange(h, dtype=np.float32)[:, None] + rng.uniform(0, slab)
    xx = np.arange(w, dtype=np.float32)[None, :] + rng.uniform(0, slab)
    iy, ix = np.floor(yy / slab).astype(int), np.floor(xx / slab).astype(int)
    tone = rng.uniform(-0.06, 0.06, (iy.max() + 1, ix.max() + 1)).astype(np.float32)[iy, ix]
    is_joint = ((yy % slab) < joint) | ((xx % slab) < joint)
    grey = np.where(is_joint, 0.30, 0.62 + tone).astype(np.float32)[..., None]
    return grey * _rgb((1.0, 0.98, 0.95)) + 0.02 * _noise(rng, h, w, 2 * s)[..., None]


TEXTURES: dict[str, Callable[..., np.ndarray]] = {
    'sky': _sky, 'grass': _grass, 'water_waves': _water_waves, 'water_calm': _water_calm,
    'stairs': _stairs, 'mountain': _mountain, 'boat': _boat, 'path_plain': _path_plain,
    'path_dirt': _path_dirt, 'building': _building, 'tree': _tree, 'road': _road, 'sand': _sand,
    'paving': _paving,
}


def family(variant: str) -> str:
    """The concept a texture variant draws: 'water_calm' -> 'water', 'path_dirt' -> 'path'."""
    return variant.split('_')[0]


@functools.cache
def _mean_color(variant: str) -> np.ndarray:
    """Mean RGB of a texture (one 64 x 64 draw at scale 1), the anchor of look-alike shifts."""
    return TEXTURES[variant](np.random.default_rng(0), 64, 64, 1.0).reshape(-1, 3).mean(0)


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """The knobs of the paper's difficulties (`synthetic.*` in the configs); what each one draws:
    docs/choices.md, "Synthetic demo data 2.0". domain_gap scales each dataset's own look (0 = one
    look for all, 1 = the specs' values); synonym_similarity 1 = a concept is drawn alike in every
    dataset, below 1 it gets a per-dataset offset of std `STYLE_COLOR_STD` / `STYLE_SCALE_STD` x
    (1 - similarity); cooccurrence is the probability that an image is a scene (`SCENES`);
    lookalike moves a `LOOKALIKES` texture's mean colour towards its look-alike's (1 = the same)."""
    domain_gap: float = 1.0
    synonym_similarity: float = 0.5
    cooccurrence: float = 0.8
    lookalike: float = 0.6


STYLE_COLOR_STD, STYLE_SCALE_STD = 0.12, 0.5
# Unrelated concepts that look alike (paper Tab. 8's mistakes: 'tree' / 'vegetable', 'grass' /
# 'gravel'): texture -> the texture whose mean colour it is drawn towards.
LOOKALIKES = {'sand': 'path_plain', 'water_calm': 'sky', 'road': 'mountain', 'grass': 'tree'}
# Scenes: the concept families that appear together; 'boat' is an object placed inside water.
SCENES: dict[str, tuple[str, ...]] = {
    'coast': ('sky', 'water', 'sand', 'boat'),
    'highland': ('sky', 'mountain', 'grass', 'tree'),
    'town': ('sky', 'building', 'road', 'paving', 'stairs', 'path'),
    'park': ('grass', 'tree', 'path', 'water', 'stairs'),
}
OBJECTS = {'boat': 'water'}  # object family -> the family it sits in
_UNANNOTATED_WEIGHT = 0.25  # relative frequency of a scene concept the dataset has no class for


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """One synthetic dataset: classes (name -> concept variants) and its look."""
    name: str
    classes: tuple[tuple[str, tuple[str, ...]], ...]
    class_weights: tuple[float, ...]  # relative frequency of each class among an image's regions
    color_gain: tuple[float, float, float]  # colour cast (at Difficulty.domain_gap 1)
    noise_std: float          # sensor noise, in [0, 1] units (at domain_gap 1)
    blur: float               # Gaussian blur radius in pixels at image_size 128 (at domain_gap 1)
    texture_scale: float      # multiplies every texture's feature size (at domain_gap 1)
    ignore_boundaries: bool   # mark region boundaries 255 (VOC-style)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c for c, _ in self.classes)


def _spec(name: str, names: tuple[str, ...], concepts: dict[str, tuple[str, ...]],
          rare: tuple[str, ...] = (), **look) -> SyntheticSpec:
    """Classes `names`, each showing `concepts[class]` or its namesake concept; the `rare`
    classes are drawn RARE_WEIGHT times as often as the others."""
    return SyntheticSpec(name, tuple((c, concepts.get(c, (c,))) for c in names),
                         tuple(RARE_WEIGHT if c in rare else 1.0 for c in names), **look)


RARE_WEIGHT = 0.25
SPECS: tuple[SyntheticSpec, ...] = (
    _spec('synth_a',  # ADE20K-like: warm, clean
          ('sky', 'grass', 'stairway', 'mountain', 'path', 'building', 'water'),
          {'stairway': ('stairs',), 'path': ('path_plain', 'path_dirt'),
           'water': ('water_waves', 'water_calm')},
          color_gain=(1.08, 1.0, 0.90), noise_std=0.01, blur=0.0, texture_scale=1.0,
          ignore_boundaries=False),
    _spec('synth_b',  # VOC-like: cool, noisy, finer textures, ignore boundaries
          ('sky', 'stairs', 'hill', 'ship', 'dirt track', 'tree', 'road'),
          {'hill': ('mountain',), 'ship': ('boat',), 'dirt track': ('path_dirt',)},
          rare=('dirt track',), color_gain=(0.92, 0.98, 1.10), noise_std=0.035, blur=0.0,
          texture_scale=0.85, ignore_boundaries=True),
    _spec('synth_c',  # COCO-Stuff-like: green cast, soft, coarser textures
          ('sky', 'boat', 'mountain', 'sand', 'lake', 'tree'),
          {'lake': ('water_calm',)}, rare=('lake',), color_gain=(1.0, 1.06, 0.94),
          noise_std=0.015, blur=0.9, texture_scale=1.15, ignore_boundaries=False),
    _spec('synth_d',  # Mapillary-like: held out of pretraining, for transfer (Tab. 3)
          ('sky', 'road', 'building', 'vegetation', 'terrain', 'sidewalk', 'river'),
          {'vegetation': ('tree',), 'terrain': ('grass',), 'sidewalk': ('paving',),
           'river': ('water_waves',)}, color_gain=(1.05, 0.95, 1.05), noise_std=0.02, blur=0.5,
          texture_scale=1.0, ignore_boundaries=False),
)
SPEC_BY_NAME: dict[str, SyntheticSpec] = {s.name: s for s in SPECS}
SYNTHETIC_DATASETS: tuple[str, ...] = tuple(s.name for s in SPECS)
PRETRAIN_DATASETS: tuple[str, ...] = ('synth_a', 'synth_b', 'synth_c')
HELD_OUT_DATASET = 'synth_d'


def ground_truth_relations() -> list[dict[str, str]]:
    """Planted cross-dataset relations, derived from the classes' concept-variant sets.

    'synonym': same variant set (listed in both directions). 'subset': the 'from' class shows a
    strict subset of the 'to' class's variants (only that direction, as in Eq. 6 / Tab. 8).
    Look-alikes and scene neighbours are not relations.
    """
    out = []
    for a in SPECS:
        for b in SPECS:
            if a.name == b.name:
                continue
            for ca, va in a.classes:
                for cb, vb in b.classes:
                    sa, sb = set(va), set(vb)
                    if kind := ('synonym' if sa == sb else 'subset' if sa < sb else None):
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


@functools.cache
def _style(dataset: str, variant: str, similarity: float,
           lookalike: float) -> tuple[np.ndarray, float]:
    """(RGB offset, feature-scale factor) of `variant` as `dataset` draws it: a fixed draw per
    (dataset, variant) times (1 - similarity), plus the look-alike shift."""
    r = np.random.default_rng([SYNTHETIC_DATASETS.index(dataset), list(TEXTURES).index(variant)])
    shift = r.normal(0.0, STYLE_COLOR_STD, 3) * (1.0 - similarity)
    scale = float(np.exp(r.normal(0.0, STYLE_SCALE_STD) * (1.0 - similarity)))
    if variant in LOOKALIKES:
        shift = shift + lookalike * (_mean_color(LOOKALIKES[variant]) - _mean_color(variant))
    return shift.astype(np.float32), scale


def _scene_regions(spec: SyntheticSpec, rng: np.random.Generator, cells: np.ndarray,
                   difficulty: Difficulty) -> list[tuple[np.ndarray, int, str]]:
    """(mask, label, variant) per region of one image: a scene (with probability
    `cooccurrence`) or independent classes per cell; label IGNORE_INDEX = painted, not annotated."""
    n_cells = int(cells.max()) + 1
    weights = np.asarray(spec.class_weights, np.float64)
    class_of = {family(v): i for i, (_, vs) in enumerate(spec.classes) for v in vs}

    def pick(fam_or_class):
        if isinstance(fam_or_class, (int, np.integer)):
            variants, label = spec.classes[fam_or_class][1], int(fam_or_class)
        elif fam_or_class in class_of:
            variants, label = spec.classes[class_of[fam_or_class]][1], class_of[fam_or_class]
        else:
            variants = tuple(v for v in TEXTURES if family(v) == fam_or_class)
            label = IGNORE_INDEX
        return label, variants[int(rng.integers(len(variants)))]

    scenes = [fams for fams in SCENES.values() if sum(f in class_of for f in fams) >= 2]
    if not scenes or rng.uniform() >= difficulty.cooccurrence:
        cls_of_cell = rng.choice(len(spec.classes), n_cells, p=weights / weights.sum())
        if len(np.unique(cls_of_cell)) < 2:  # at least two classes per image
            cls_of_cell[0] = (cls_of_cell[0] + 1 + rng.integers(0, len(spec.classes) - 1)) % len(
                spec.classes)
        return [(cells == c, *pick(int(cls_of_cell[c]))) for c in range(n_cells)]
    scene = scenes[int(rng.integers(len(scenes)))]
    stuff = [f for f in scene if f not in OBJECTS]
    rows = [np.nonzero(cells == c)[0] for c in range(n_cells)]  # a warped cell may be empty
    top = int(np.argmin([r.mean() if r.size else np.inf for r in rows]))
    fam_of_cell: dict[int, str] = {}
    if 'sky' in stuff and rng.uniform() < 0.75:  # the sky on top, nowhere else
        fam_of_cell[top] = 'sky'
        stuff = [f for f in stuff if f != 'sky']
    p = np.array([weights[class_of[f]] if f in class_of else _UNANNOTATED_WEIGHT for f in stuff])
    for c in range(n_cells):
        fam_of_cell.setdefault(c, stuff[rng.choice(len(stuff), p=p / p.sum())])
    regions = [(cells == c, *pick(fam_of_cell[c])) for c in range(n_cells)]
    for obj, host in OBJECTS.items():  # boats on water
        hosts = [c for c, f in fam_of_cell.items() if f == host and rows[c].size]
        if obj not in scene or not hosts or rng.uniform() >= 0.8:
            continue
        h, w = cells.shape
        for _ in range(int(rng.integers(1, 4))):
            ys, xs = np.nonzero(cells == hosts[int(rng.integers(len(hosts)))])
            i = int(rng.integers(len(ys)))
            ry, rx = rng.uniform(0.08, 0.16) * h, rng.uniform(0.12, 0.25) * w
            ellipse = (((np.arange(h)[:, None] - ys[i]) / ry) ** 2
                       + ((np.arange(w)[None, :] - xs[i]) / rx) ** 2) <= 1.0
            regions.append((ellipse & np.isin(cells, hosts), *pick(obj)))
    return regions


def generate_example(spec: SyntheticSpec, rng: np.random.Generator, image_size: int,
                     difficulty: Difficulty = Difficulty()) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 [H, W, 3], label uint8 [H, W]) pair of dataset `spec`."""
    h = image_size
    w = int(round(image_size * rng.choice([0.75, 1.0, 1.25, 1.5])))
    cells = _region_map(rng, h, w)
    gap = difficulty.domain_gap
    scale = (1.0 + gap * (spec.texture_scale - 1.0)) * image_size / 128
    image = np.zeros((h, w, 3), np.float32)
    label = np.full((h, w), IGNORE_INDEX, np.uint8)
    for mask, cls, variant in _scene_regions(spec, rng, cells, difficulty):
        if not mask.any():
            continue
        shift, factor = _style(spec.name, variant, difficulty.synonym_similarity,
                               difficulty.lookalike)
        image[mask] = (TEXTURES[variant](rng, h, w, scale * factor) + shift)[mask]
        label[mask] = cls
    gain = 1.0 + gap * (np.asarray(spec.color_gain, np.float32) - 1.0)
    image = np.clip(image * gain * rng.uniform(0.92, 1.08), 0.0, 1.0)
    radius = gap * spec.blur * image_size / 128
    if radius > 0:
        blurred = Image.fromarray(np.round(image * 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(radius))
        image = np.asarray(blurred, np.float32) / 255
    noise_std = max(0.01 + gap * (spec.noise_std - 0.01), 0.0)
    image = image + noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    if spec.ignore_boundaries:
        label[_boundary_mask(label)] = IGNORE_INDEX
    return image, label


_SPLITS = ('train', 'validation')


class _SyntheticBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """tfds builder for one synthetic dataset (`BUILDERS`: one subclass per spec, same name)."""

    VERSION = tfds.core.Version(DATA_VERSION)
    RELEASE_NOTES = {'1.0.0': 'Initial release.',
                     '1.1.0': 'One look for all datasets (no per-dataset colour cast / noise).',
                     '1.2.0': 'Fine-grained subset classes are rare; held-out synth_d.',
                     '2.0.0': 'The paper\'s difficulties (`Difficulty`): a look per dataset, '
                              'synonyms drawn per dataset, scenes, look-alikes, a new concept '
                              'in synth_d.'}

    # tfds derives `code_path` via importlib.resources, which fails for editable installs without
    # the `importlib_resources` backport; this module's own file is the right answer anyway.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(self, *, num_train: int = 300, num_val: int = 50, image_size: int = 128,
                 seed: int = 0, difficulty: Difficulty = Difficulty(), **kwargs):
        self._num = {'train': int(num_train), 'validation': int(num_val)}
        self._image_size, self._seed, self._difficulty = int(image_size), int(seed), difficulty
        kwargs.setdefault('file_format', 'array_record')
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        spec = SPEC_BY_NAME[self.name]
        return tfds.core.DatasetInfo(
            builder=self, features=builders.features(), supervised_keys=None,
            description=(f'MS3 synthetic segmentation dataset {spec.name} '
                         f'(classes: {", ".join(spec.class_names)}).'),
            metadata=tfds.core.MetadataDict(class_names=list(spec.class_names)))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in _SPLITS}

    def _generate_examples(self, split):
        spec = SPEC_BY_NAME[self.name]
        d = SYNTHETIC_DATASETS.index(spec.name)
        for i in range(self._num[split]):
            rng = np.random.default_rng([self._seed, d, _SPLITS.index(split), i])
            image, label = generate_example(spec, rng, self._image_size, self._difficulty)
            name = f'{spec.name}_{split}_{i:05d}.jpg'
            yield name, {'image': builders.image_bytes(Image.fromarray(image), 'JPEG'),
                         'label': builders.image_bytes(Image.fromarray(label), 'PNG'),
                         'file_name': name}


# One tfds builder per spec (SynthA: 'synth_a'), also a module attribute so that pickling (grain's
# worker processes) finds it by reference.
BUILDERS: dict[str, type[_SyntheticBuilder]] = {
    s.name: type(s.name.title().replace('_', ''), (_SyntheticBuilder,),
         {'name': s.name, '__module__': __name__})
    for s in SPECS}
globals().update({b.__name__: b for b in BUILDERS.values()})


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
    difficulty: Difficulty


def prepare_synthetic(data_dir: str | os.PathLike, num_train: int = 300, num_val: int = 50,
                      image_size: int = 128, seed: int = 0, **difficulty: float) -> SyntheticInfo:
    """Builds synth_a/b/c/d as array_record under `data_dir` plus the relations JSON; idempotent.

    `difficulty`: fields of `Difficulty` (the paper's difficulties; unset ones at their defaults).
    Re-running with the same arguments does nothing; other arguments or another data version than
    the build in `data_dir` had are refused (ValueError naming both): built data is never deleted.
    Another user's `data_dir` (or one that would be created inside theirs) and a symbolic link at
    its `.build.lock` are refused too (`safe.UnsafePath`): their data could be anything.
    """
    data_dir = os.fspath(data_dir)
    if unknown := sorted(set(difficulty) - {f.name for f in dataclasses.fields(Difficulty)}):
        raise ValueError(f'synthetic: unknown fields {unknown}; valid: num_train, num_val, '
                         f'image_size, seed, {", ".join(f.name for f in dataclasses.fields(Difficulty))}')
    knobs = Difficulty(**{k: float(v) for k, v in difficulty.items()})
    safe.make_own_dir(data_dir, 'data_dir')
    params = dict(num_train=int(num_train), num_val=int(num_val), image_size=int(image_size),
                  seed=int(seed))
    # Several processes of one job may call this at once (multi-host on one machine or a shared
    # filesystem): one builds, the others wait for the lock and then find the build complete.
    with safe.open_nofollow(os.path.join(data_dir, '.build.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _prepare_locked(data_dir, params, knobs)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return SyntheticInfo(data_dir=data_dir, dataset_names=PRETRAIN_DATASETS,
                         held_out=HELD_OUT_DATASET,
                         relations_path=os.path.join(data_dir, RELATIONS_FILE), **params,
                         difficulty=knobs)


def _prepare_locked(data_dir: str, params: dict[str, int], knobs: Difficulty) -> None:
    params = dict(params, version=DATA_VERSION, **dataclasses.asdict(knobs))
    info_path = os.path.join(data_dir, INFO_FILE)
    relations_path = os.path.join(data_dir, RELATIONS_FILE)
    old = None
    if os.path.exists(info_path):
        with open(info_path) as f:
            old = json.load(f)
    if old is not None and old != params:  # never delete data someone built
        raise ValueError(
            f'{data_dir} holds synthetic data {old.get("version", "1.x")} built with {old}; this '
            f'config asks for data {DATA_VERSION} with {params}. Point data.data_dir at another '
            'directory (or delete that one yourself).')
    built = all(
        os.path.exists(os.path.join(data_dir, n, str(_SyntheticBuilder.VERSION), 'dataset_info.json'))
        for n in SYNTHETIC_DATASETS)
    if not (built and old == params and os.path.exists(relations_path)):
        # A missing or older version is built next to what is there (tfds: one folder per version).
        with _quiet_tfds():
            for n in SYNTHETIC_DATASETS:
                BUILDERS[n](data_dir=data_dir, difficulty=knobs, **{
                    k: params[k] for k in ('num_train', 'num_val', 'image_size', 'seed')}
                ).download_and_prepare()
        with safe.atomic_output(relations_path, 'w') as f:
            json.dump(ground_truth_relations(), f, indent=1)
        with safe.atomic_output(info_path, 'w') as f:  # written last: marks a complete build
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
