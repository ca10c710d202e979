r"""Input-pipeline throughput on real-format COCO-Stuff-164k / ADE20K data, and host sizing.

What is measured: `pipeline.TrainPipeline` (the training stream) with the paper's full
augmentation (`AugmentConfig` defaults at --crop_size=224: JPEG/PNG decode, random scale + crop,
flip, colour distortion, grayscale, blur, union-label remap) over datasets built by the project's
own builders (`builders.prepare`, as `python -m ms3_jax.data.prepare` does) from raw files in the
official layouts:

  coco/images/train2017/*.jpg + coco/stuffthingmaps_trainval2017/train2017/*.png   (val2017 too)
  ade/ADEChallengeData2016/images/training/*.jpg + .../annotations/training/*.png  (validation too)

The raw files are generated (`write_raw`): COCO-sized JPEGs (640x480, 480x640, 640x427, ...,
~160 KB each at quality 90, like train2017's 18 GB / 118k) and ADE-sized ones (short side ~512,
varied aspect; ~190 KB, likely more bytes than ADE's own JPEGs), content that compresses like
photos (regions with smooth illumination, texture and sensor-like noise), labels with valid
class ids (some unlabeled: COCO 255, ADE 0). They are built once into the user cache
(`~/.cache/ms3_jax/data/real_format_bench/<key>`, the key from the counts, sizes and generator
version); `--data_dir` measures an already prepared data_dir instead (e.g. your real
ms3_coco_stuff164k / ms3_ade20k builds). The mixture follows the datasets' official train
sizes (COCO 118287 : ADE 20210), as the real union does.

Rates: `images/s` is wall-clock; `per core` is images per CPU-second of the process (and its
grain workers): less sensitive than wall-clock to other jobs on the machine, not immune (on a
2-core host at load average 5-7 it ranged from 74 to 95 over runs). One process with one
reader thread (`--worker_count=0 --num_threads=1`) uses one core; with `--worker_count=N` the
per-worker rate is printed too. The sizing table divides the images/s a host must feed its
chips, chips x --images_per_chip / step time (--step_ms: the MS3 step's roofline estimate per
chip, `ROOFLINE_STEP_MS`), by the per-core rate.

`--with_step`: is the training step ever waiting on data? The tiny pretraining model
(configs/pretrain.py:tiny, on ADE20K + COCO-Stuff at its crop 64 and batch 8, one CPU device) is
stepped as `engine/loop.py` does it (the next batch is read while the dispatched step runs) (a)
on one fixed in-memory batch and (b) from the pipeline iterator, per --step_loaders setting;
rounds of (a) and (b) alternate so that both see the same machine load. Per-step times are the
intervals between step completions; medians and (b) / (a) are printed.

Loader settings that keep the step fed: the reading must run beside the step, on cores the
step does not use, at >= batch / step-time images/s. Use grain worker processes,
`worker_count = ceil(images/s needed / per-core rate)` (the sizing table's "cores needed" per
host) with `num_threads=1` each and `worker_buffer_size=2` (two batches ready per worker),
and keep cores free for the training process itself. Reading inside the training process
(`worker_count=0`: grain's reader threads, `LoaderOptions()` = num_threads 2, prefetch 2, as
configs/pretrain.py:tiny does) competes with the step inside its process: in two --with_step runs
it spent more CPU per step than one worker (122-128 vs 87-100 ms; the step alone 63-76 ms) and
the step took 1.8-2.1x its fixed-batch time. More workers than free cores slow the step too
(2 workers on a 2-core host: 1.7-2.9x). On that host, loaded by other jobs (load average 5-7),
the benchmark's processes got about one core (1.0-1.1 cores busy in every feed), so the data's
CPU added to the step's and no setting matched (a); the closest was worker_count=1 (1.3-1.7x:
a 56-69 ms step plus ~25 ms of decode + augmentation per batch of 8). From those CPU times, one
worker on a free core (~25 ms of work per ~60 ms step) would keep the tiny step fed: inferred,
not measured on an idle host.

  python benchmarks/data_throughput.py                                 # 64 images / dataset, 20 x 32
  python benchmarks/data_throughput.py --num_train=64 --num_batches=15 --batch_size=32
  python benchmarks/data_throughput.py --worker_count=2                # + per-worker rate
  python benchmarks/data_throughput.py --step_ms=v5e=80,h100=15        # other step times
  python benchmarks/data_throughput.py --data_dir=~/tensorflow_datasets  # your prepared data
  python benchmarks/data_throughput.py --with_step --num_batches=5     # + the step (~1.5 min)
  python benchmarks/data_throughput.py --with_step --step_loaders=0:2,1:1,2:1 --step_rounds=4
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # a data benchmark; --with_step is on CPU
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from ms3_jax.data import builders, classes, pipeline, registry  # noqa: E402
from ms3_jax.files import safe  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per-chip milliseconds of one MS3 pretraining step (16 images per chip at 224, ResNet-50, batch 128
# on 8 chips): the roofline estimate of benchmarks/RESULTS.md, "Accelerators, round 2" (a lower
# bound on the step time, so an upper bound on the images/s needed); --step_ms overrides them.
ROOFLINE_STEP_MS = {'v5e': 20.5, 'h100': 9.3}


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    chip: str  # key of ROOFLINE_STEP_MS
    chips: int
    cores: int  # physical cores (vCPUs / 2)
    vcpus: int


HOSTS = (
    Host('v5e-8', 'v5e', chips=8, cores=112, vcpus=224),  # one v5litepod-8 host
    Host('8xH100', 'h100', chips=8, cores=104, vcpus=208),  # e.g. a3-highgpu-8g
)

# ------------------------------------------------------------------------------------------------
# Raw files in the official layouts.
# ------------------------------------------------------------------------------------------------
GENERATOR_VERSION = 1  # part of the cache key: bump when write_raw's output changes
# (width, height, weight): COCO train2017's common sizes (long side 640), ADE20K's (short side ~512).
COCO_SIZES = ((640, 480, 0.35), (640, 427, 0.2), (480, 640, 0.15), (427, 640, 0.08),
              (640, 360, 0.07), (500, 375, 0.05), (612, 612, 0.05), (640, 512, 0.05))
ADE_SIZES = ((683, 512, 0.35), (512, 683, 0.12), (512, 512, 0.15), (768, 512, 0.12),
             (910, 512, 0.06), (640, 480, 0.1), (512, 384, 0.05), (384, 512, 0.05))
JPEG_QUALITY = 90
DATASETS = ('ade20k', 'coco_stuff')


@dataclasses.dataclass(frozen=True)
class RawSpec:
    """What `write_raw` generates: counts per split and the size distributions (w, h, weight)."""
    num_train: int = 64
    num_val: int = 2
    coco_sizes: tuple[tuple[int, int, float], ...] = COCO_SIZES
    ade_sizes: tuple[tuple[int, int, float], ...] = ADE_SIZES
    quality: int = JPEG_QUALITY
    seed: int = 0

    def key(self) -> str:
        digest = hashlib.sha1(json.dumps([GENERATOR_VERSION, dataclasses.asdict(self)],
                                         sort_keys=True).encode()).hexdigest()[:10]
        return f'n{self.num_train}_v{self.num_val}_{digest}'


# Raw ids that may occur: COCO stuffthingmaps 0..181 minus the 11 unused ids (things < 91, stuff
# >= 91), 255 unlabeled; ADE 1..150 (the first ~25 are mostly stuff: wall, floor, sky, ...), 0 other.
_COCO_IDS = np.flatnonzero(classes.COCO_STUFF_LUT != classes.IGNORE_INDEX)
_RAW_IDS = {
    'coco_stuff': dict(stuff=_COCO_IDS[_COCO_IDS >= 91], things=_COCO_IDS[_COCO_IDS < 91],
                       unlabeled=255),
    'ade20k': dict(stuff=np.arange(1, 26), things=np.arange(26, 151), unlabeled=0),
}


def _field(rng: np.random.Generator, h: int, w: int, cell: float, channels: int = 1) -> np.ndarray:
    """Smooth noise [h, w, channels] (unit variance at the grid points), features ~`cell` px."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    return np.stack([np.asarray(Image.fromarray(rng.standard_normal((gh, gw)).astype(np.float32))
                                .resize((w, h), Image.BICUBIC)) for _ in range(channels)], -1)


def scene(rng: np.random.Generator, w: int, h: int, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """A photo-like RGB image uint8 [h, w, 3] and its raw label map uint8 [h, w]: 2-4 'stuff'
    bands with wavy borders, 2-7 'thing' shapes, outlines of some unlabeled; each region a colour
    under smooth illumination, with its own texture strength, plus sensor-like noise."""
    ids = _RAW_IDS[dataset]
    lab = Image.new('L', (w, h), int(ids['stuff'][0]))
    draw = ImageDraw.Draw(lab)
    k = int(rng.integers(2, 5))
    stuff = rng.choice(ids['stuff'], k, replace=False)
    xs = np.linspace(0, w, 33)
    borders = [[(x, y + a * np.sin(p + f * 2 * np.pi * x / w)) for x in xs]
               for y, a, p, f in zip(np.sort(rng.uniform(0.15, 0.9, k - 1)) * h,
                                     rng.uniform(3, h / 10, k - 1), rng.uniform(0, 2 * np.pi, k - 1),
                                     rng.uniform(0.5, 3, k - 1))]
    for c, top, bottom in zip(stuff, [[(0, -1), (w, -1)]] + borders, borders + [[(0, h), (w, h)]]):
        draw.polygon(list(top) + list(reversed(bottom)), fill=int(c))
    for c in rng.choice(ids['things'], int(rng.integers(2, 8))):
        cx, cy = rng.uniform(0, w), rng.uniform(0.2 * h, h)
        rx, ry = rng.uniform(0.03, 0.25) * w, rng.uniform(0.03, 0.3) * h
        outline = int(ids['unlabeled']) if rng.random() < 0.3 else None
        if rng.random() < 0.5:
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=int(c), outline=outline,
                         width=2)
        else:
            a = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 9))))
            r = rng.uniform(0.5, 1.0, a.size)
            draw.polygon([(cx + rx * ri * np.cos(ai), cy + ry * ri * np.sin(ai))
                          for ai, ri in zip(a, r)], fill=int(c), outline=outline, width=2)
    label = np.asarray(lab)
    colour = rng.uniform(30, 225, (256, 3)).astype(np.float32)
    texture = rng.uniform(0.3, 1.7, 256).astype(np.float32)[label][..., None]
    img = colour[label] + 12 * _field(rng, h, w, 96, 3)
    img *= 0.8 + 0.2 * _field(rng, h, w, 160)
    img += texture * (25 * _field(rng, h, w, 6) + 23 * _field(rng, h, w, 2.5))
    img += 20 * rng.standard_normal((h, w, 1), np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), label


def _layout(dataset: str, split: str, i: int) -> tuple[str, str]:
    """(image, label) paths relative to the raw root, in the dataset's official layout."""
    if dataset == 'coco_stuff':
        sub, stem = ('train2017' if split == 'train' else 'val2017'), f'{i + 1:012d}'
        return (f'coco/images/{sub}/{stem}.jpg', f'coco/stuffthingmaps_trainval2017/{sub}/{stem}.png')
    sub = 'training' if split == 'train' else 'validation'
    stem = f'ADE_{"train" if split == "train" else "val"}_{i + 1:08d}'
    return (f'ade/ADEChallengeData2016/images/{sub}/{stem}.jpg',
            f'ade/ADEChallengeData2016/annotations/{sub}/{stem}.png')


def write_raw(root: str, spec: RawSpec) -> dict[str, list[tuple[str, int, int]]]:
    """Raw JPEG / PNG files of both datasets under `root` (`root/coco`, `root/ade`: the manual
    dirs); returns {dataset: [(image path, width, height)]} (train, then validation)."""
    written: dict[str, list[tuple[str, int, int]]] = {}
    for d, dataset in enumerate(DATASETS):
        sizes = spec.coco_sizes if dataset == 'coco_stuff' else spec.ade_sizes
        p = np.asarray([s[2] for s in sizes], np.float64)
        written[dataset] = []
        for split, n in (('train', spec.num_train), ('validation', spec.num_val)):
            for i in range(n):
                rng = np.random.default_rng([spec.seed, d, split == 'train', i])
                w, h, _ = sizes[int(rng.choice(len(sizes), p=p / p.sum()))]
                image, label = scene(rng, int(w), int(h), dataset)
                image_path, label_path = (os.path.join(root, x) for x in _layout(dataset, split, i))
                for path in (image_path, label_path):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(image).save(image_path, format='JPEG', quality=spec.quality)
                Image.fromarray(label).save(label_path, format='PNG')
                written[dataset].append((image_path, int(w), int(h)))
    return written


def default_data_dir(spec: RawSpec) -> str:
    return safe.user_cache_dir('data', 'real_format_bench', spec.key())


def build(data_dir: str, spec: RawSpec) -> str:
    """Both datasets generated (`write_raw`) and built with `builders.prepare` into `data_dir`,
    once: a `.done` marker makes reruns skip the work. The raw files are removed afterwards (the
    records hold the same JPEG bytes: the builder keeps RGB JPEGs as they are)."""
    done = os.path.join(data_dir, '.done')
    if os.path.exists(done):
        return data_dir
    raw = os.path.join(data_dir, 'raw')
    shutil.rmtree(raw, ignore_errors=True)
    t = time.perf_counter()
    write_raw(raw, spec)
    t_raw = time.perf_counter() - t
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    for dataset in DATASETS:
        builders.prepare(dataset, os.path.join(raw, 'coco' if dataset == 'coco_stuff' else 'ade'),
                         data_dir)
    shutil.rmtree(raw, ignore_errors=True)
    with open(done, 'w') as f:
        json.dump(dataclasses.asdict(spec), f)
    print(f'built {spec.num_train} + {spec.num_val} images per dataset into {data_dir} '
          f'(raw files {t_raw:.0f} s, total {time.perf_counter() - t:.0f} s)', flush=True)
    return data_dir


# ------------------------------------------------------------------------------------------------
# Measuring.
# ------------------------------------------------------------------------------------------------
def encoded_stats(datasets: Sequence[str], data_dir: str, split: str = 'train',
                  limit: int = 256) -> dict[str, dict[str, Any]]:
    """Per dataset, over its first `limit` records as stored (not decoded): the image and label
    formats seen, mean image pixels (from the JPEG header) and mean JPEG bytes, and the sizes."""
    import tensorflow_datasets as tfds

    out = {}
    for name in datasets:
        src = tfds.data_source(registry.get(name).builder.name, split=split, data_dir=data_dir,
                               download=False, decoders={'image': tfds.decode.SkipDecoding(),
                                                         'label': tfds.decode.SkipDecoding()})
        pixels, nbytes, sizes, formats = [], [], [], set()
        for i in range(min(len(src), limit)):
            rec = src[i]
            with Image.open(io.BytesIO(rec['image'])) as im, \
                    Image.open(io.BytesIO(rec['label'])) as lab:
                formats.add((im.format, lab.format))
                sizes.append(im.size)
                if lab.size != im.size:
                    raise ValueError(f'{name} record {i}: label {lab.size} != image {im.size}')
            pixels.append(sizes[-1][0] * sizes[-1][1])
            nbytes.append(len(rec['image']))
        out[name] = dict(records=len(src), formats=sorted(formats), sizes=sizes,
                         mean_pixels=float(np.mean(pixels)), mean_jpeg_bytes=float(np.mean(nbytes)))
    return out


def _clock_ticks() -> int:
    return os.sysconf('SC_CLK_TCK')


def child_pids(parent: int | None = None) -> list[int]:
    """Processes whose parent is `parent` (default: this one), from /proc ([] elsewhere)."""
    parent = os.getpid() if parent is None else parent
    pids = []
    try:
        entries = os.listdir('/proc')
    except OSError:
        return []
    for e in entries:
        if e.isdigit():
            try:
                with open(f'/proc/{e}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                pids.append(int(e))
    return pids


def cpu_seconds(pids: Sequence[int] = ()) -> float:
    """User + system CPU seconds of this process (all threads) plus the live processes `pids`."""
    t = os.times()
    total = t.user + t.system
    for pid in pids:
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _clock_ticks()
        except (OSError, IndexError, ValueError):
            pass
    return total


def measure(it: Iterator[dict[str, np.ndarray]], num_batches: int, warmup: int
            ) -> dict[str, Any]:
    """Wall and CPU seconds (this process and its worker processes) of `num_batches` batches,
    after `warmup` batches (worker start-up; the prefetch buffers drained), and the rate of each
    batch in images per CPU-second (CPU spent between two batches arriving)."""
    for _ in range(warmup):
        next(it)
    workers = child_pids()
    c0, t0 = cpu_seconds(workers), time.perf_counter()
    images, c_last, per_batch = 0, c0, []
    for _ in range(num_batches):
        n = len(next(it)['dataset_id'])
        images += n
        c = cpu_seconds(workers)
        per_batch.append(n / max(c - c_last, 1e-9))
        c_last = c
    wall = time.perf_counter() - t0
    return dict(images=images, wall_s=wall, cpu_s=c_last - c0, processes=1 + len(workers),
                per_batch_rates=per_batch)


def make_pipeline(datasets: Sequence[str], data_dir: str, batch_size: int, crop_size: int,
                  loader: pipeline.LoaderOptions, label_space: Any = None,
                  seed: int = 0) -> pipeline.TrainPipeline:
    """The training stream of `datasets` (mixed by their official train sizes), full augmentation."""
    return pipeline.TrainPipeline(
        datasets, data_dir=data_dir, global_batch_size=batch_size, label_space=label_space,
        augment=pipeline.AugmentConfig(crop_size=crop_size), shard_index=0, shard_count=1,
        weights={n: registry.get(n).builder.OFFICIAL_SIZES['train'] for n in datasets},
        loader=loader, seed=seed)


# ------------------------------------------------------------------------------------------------
# Sizing.
# ------------------------------------------------------------------------------------------------
def parse_step_ms(text: str) -> dict[str, float]:
    """'v5e=74,h100=13.9' -> ROOFLINE_STEP_MS with those entries replaced."""
    out = dict(ROOFLINE_STEP_MS)
    for item in filter(None, (x.strip() for x in text.split(','))):
        chip, sep, ms = item.partition('=')
        if not sep or chip not in out:
            raise ValueError(f'--step_ms item {item!r}: expected CHIP=MS with CHIP in {sorted(out)}')
        out[chip] = float(ms)
    return out


def images_needed(chips: int, images_per_chip: int, step_ms: float) -> float:
    """Images/s a host must deliver so that its chips never wait: chips x images / step seconds."""
    return chips * images_per_chip / (step_ms / 1e3)


def sizing_rows(per_core_rate: float, step_ms: Mapping[str, float], images_per_chip: int = 16,
                hosts: Sequence[Host] = HOSTS) -> list[dict[str, Any]]:
    rows = []
    for h in hosts:
        need = images_needed(h.chips, images_per_chip, step_ms[h.chip])
        cores = need / per_core_rate
        rows.append(dict(host=h.name, chips=h.chips, step_ms=step_ms[h.chip], images_per_s=need,
                         cores_needed=cores, cores=h.cores, fits=cores <= h.cores))
    return rows


def sizing_table(rows: Sequence[Mapping[str, Any]], per_core_rate: float) -> str:
    lines = ['| host | chips | step ms | images/s needed | cores needed at '
             f'{per_core_rate:.1f} images/s/core | cores on the host | fits |',
             '|---|---:|---:|---:|---:|---:|---|']
    for r in rows:
        lines.append(f"| {r['host']} | {r['chips']} | {r['step_ms']:.1f} | {r['images_per_s']:,.0f} | "
                     f"{r['cores_needed']:.1f} | {r['cores']} | {'yes' if r['fits'] else 'no'} |")
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------
# The step fed by the pipeline.
# ------------------------------------------------------------------------------------------------
def parse_loaders(text: str) -> list[tuple[int, int]]:
    """'0:2,1:1' -> [(worker_count 0, num_threads 2), (1, 1)]."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(','))):
        w, _, t = item.partition(':')
        out.append((int(w), int(t or 2)))
    return out


def timed_steps(trainer: Any, state: Any, batches: Iterator[Mapping[str, np.ndarray]], n: int,
                pids: Sequence[int] = ()) -> tuple[Any, list[float], list[float]]:
    """`n` steps as `engine/loop.py` runs them (read the next batch while the previous step runs;
    here at most one step in flight); returns the state and, for the n - 1 intervals between
    successive step completions, their wall seconds and the CPU seconds spent in them by this
    process and the processes `pids` (the loader's workers)."""
    import jax

    times, cpus, pending, last = [], [], None, None

    def mark():
        nonlocal last
        now, cpu = time.perf_counter(), cpu_seconds(pids)
        if last is not None:
            times.append(now - last[0])
            cpus.append(cpu - last[1])
        last = (now, cpu)

    for _ in range(n):
        local = next(batches)
        state, metrics = trainer.step(state, trainer.global_batch(local))
        if pending is not None:
            jax.block_until_ready(pending)
            mark()
        pending = metrics
    jax.block_until_ready(pending)
    mark()
    return state, times, cpus


def step_benchmark(datasets: Sequence[str], data_dir: str, loaders: Sequence[tuple[int, int]],
                   steps: int, rounds: int, buffers: tuple[int, int] = (2, 2)) -> None:
    """--with_step: the tiny pretraining step fed by a fixed batch and by the pipeline (per
    loader setting), alternating in rounds; prints the medians and the ratios."""
    import jax

    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from configs.pretrain import get_config
    from ms3_jax.data.label_space import LabelSpace
    from ms3_jax.stages import pretrain

    cfg = get_config('tiny')
    cfg.data.datasets, cfg.data.data_dir = tuple(datasets), data_dir
    batch, crop = cfg.batch_size, cfg.data.crop_size
    ls = LabelSpace.from_datasets(datasets)
    text = np.random.default_rng(0).standard_normal((ls.num_classes, cfg.model.emb_dim))
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    trainer = pretrain.Trainer(cfg, ls, text, num_steps=10_000, devices=jax.devices()[:1])
    state = trainer.init_state(jax.random.PRNGKey(0))
    prefetch, worker_buffer = buffers

    def make(w: int, t: int) -> pipeline.TrainIterator:
        return make_pipeline(datasets, data_dir, batch, crop, pipeline.LoaderOptions(
            worker_count=w, num_threads=t, prefetch_buffer_size=prefetch,
            worker_buffer_size=worker_buffer), label_space=ls, seed=cfg.seed).make_iterator()

    first = make(0, 1)
    fixed = next(first)
    first.close()
    t = time.perf_counter()
    state, _, _ = timed_steps(trainer, state, itertools.repeat(fixed), 2)
    print(f'tiny MS3 step (configs/pretrain.py:tiny), batch {batch} at {crop} px, on '
          f'{jax.devices()[0].device_kind}: compiled + 2 steps in {time.perf_counter() - t:.1f} s',
          flush=True)
    feeds: dict[str, Iterator] = {'(a) fixed in-memory batch': itertools.repeat(fixed)}
    iterators = []
    for w, th in loaders:
        it = make(w, th)
        for _ in range(1 + w * worker_buffer + prefetch):  # start-up; buffers drained
            next(it)
        iterators.append(it)
        feeds[f'(b) pipeline worker_count={w} num_threads={th}'] = it
    # Steps fed from what the loader buffered while other feeds ran are not timed: per block,
    # 1 + the batches its buffers hold (grain's prefetch, the workers' buffers).
    skips = [1] + [1 + prefetch + w * worker_buffer for w, _ in loaders]
    times: dict[str, list[list[float]]] = {k: [] for k in feeds}  # per round
    cpus: dict[str, list[list[float]]] = {k: [] for k in feeds}
    pids = child_pids()  # the workers of every loader (idle ones cost nothing)
    try:
        for _ in range(rounds):
            for (name, feed), skip in zip(feeds.items(), skips):
                state, ts, cs = timed_steps(trainer, state, feed, steps + skip + 1, pids)
                times[name].append(ts[skip:])
                cpus[name].append(cs[skip:])
    finally:
        for it in iterators:
            it.close()
    a = '(a) fixed in-memory batch'
    print(f'{steps} timed steps x {rounds} rounds per feed (feeds alternate), load '
          f'{" ".join(f"{x:.2f}" for x in os.getloadavg())}. CPU: this process + the loader '
          f'workers; ratio: median over rounds of (b) / (a) in the same round')
    for name in feeds:
        flat, cpu = sum(times[name], []), sum(cpus[name], [])
        med = statistics.median(flat)
        ratio = statistics.median(statistics.median(b) / statistics.median(x)
                                  for b, x in zip(times[name], times[a]))
        print(f'  {name:<46} median {1e3 * med:6.1f} ms/step ({batch / med:5.1f} images/s), '
              f'CPU {1e3 * sum(cpu) / len(cpu):5.1f} ms/step ({sum(cpu) / sum(flat):.2f} cores '
              f'busy), ratio to (a) {ratio:.3f}')


# ------------------------------------------------------------------------------------------------
# Main.
# ------------------------------------------------------------------------------------------------
_DATA_DIR = flags.DEFINE_string('data_dir', '', 'A prepared tfds data_dir to measure (default: the '
                                'generated real-format data in the user cache, built on first use).')
_DATASETS = flags.DEFINE_list('datasets', list(DATASETS), 'Datasets of the stream (only '
                              'ade20k, coco_stuff are generated; others need --data_dir).')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 64, 'Generated train images per dataset.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 20, 'Timed batches (after the warm-up).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Batch size of the throughput measurement.')
_WORKER_COUNT = flags.DEFINE_integer('worker_count', 0, 'grain worker processes (0: in this one).')
_NUM_THREADS = flags.DEFINE_integer('num_threads', 1, 'grain reader threads per process.')
_PREFETCH = flags.DEFINE_integer('prefetch_buffer_size', 2, 'grain ReadOptions prefetch buffer.')
_WORKER_BUFFER = flags.DEFINE_integer('worker_buffer_size', 2, 'Batches buffered per worker.')
_CROP = flags.DEFINE_integer('crop_size', 224, 'Crop size.')
_STEP_MS = flags.DEFINE_string('step_ms', ','.join(f'{k}={v}' for k, v in ROOFLINE_STEP_MS.items()),
                               'Per-chip MS3 step time in ms, CHIP=MS comma-separated (default: '
                               'the roofline estimate, ROOFLINE_STEP_MS).')
_IMAGES_PER_CHIP = flags.DEFINE_integer('images_per_chip', 16, 'Images per chip per step.')
_WITH_STEP = flags.DEFINE_bool('with_step', False, 'Also time the tiny pretraining step fed by '
                               'a fixed batch and by the pipeline (module docstring).')
_STEP_LOADERS = flags.DEFINE_string('step_loaders', '0:2,1:1', '--with_step: pipeline settings '
                                    'to try, worker_count:num_threads comma-separated.')
_STEP_STEPS = flags.DEFINE_integer('step_steps', 6, '--with_step: timed steps per feed per round.')
_STEP_ROUNDS = flags.DEFINE_integer('step_rounds', 4, '--with_step: rounds (feeds alternate).')


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # tfds's INFO lines
    datasets = tuple(_DATASETS.value)
    step_ms = parse_step_ms(_STEP_MS.value)
    if _DATA_DIR.value:
        data_dir = os.path.expanduser(_DATA_DIR.value)
    else:
        if set(datasets) - set(DATASETS):
            raise app.UsageError(f'only {DATASETS} are generated; pass --data_dir for '
                                 f'{sorted(set(datasets) - set(DATASETS))}')
        spec = RawSpec(num_train=_NUM_TRAIN.value)
        data_dir = build(default_data_dir(spec), spec)
    print(f'# {time.strftime("%Y-%m-%d %H:%M")}, {os.cpu_count()} CPUs, load average '
          f'{" ".join(f"{x:.2f}" for x in os.getloadavg())}; data {data_dir}')
    loader = pipeline.LoaderOptions(worker_count=_WORKER_COUNT.value, num_threads=_NUM_THREADS.value,
                                    prefetch_buffer_size=_PREFETCH.value,
                                    worker_buffer_size=_WORKER_BUFFER.value)
    pipe = make_pipeline(datasets, data_dir, _BATCH_SIZE.value, _CROP.value, loader)
    stats = encoded_stats(datasets, data_dir)
    for (name, s), w in zip(stats.items(), pipe.weights):
        formats = ', '.join('/'.join(f) for f in s['formats'])
        print(f'  {name}: {s["records"]} train records, {formats}, mean '
              f'{s["mean_pixels"] / 1e3:.0f} kpixel (e.g. {s["sizes"][0][0]}x{s["sizes"][0][1]}), '
              f'mean JPEG {s["mean_jpeg_bytes"] / 1e3:.0f} KB; mixture weight {w:.3f}')
    mean_px = sum(w * s['mean_pixels'] for w, s in zip(pipe.weights, stats.values()))
    mean_kb = sum(w * s['mean_jpeg_bytes'] for w, s in zip(pipe.weights, stats.values())) / 1e3
    print(f'  stream mean source: {mean_px / 1e3:.0f} kpixel, {mean_kb:.0f} KB JPEG')

    it = pipe.make_iterator()
    try:
        r = measure(it, _NUM_BATCHES.value,
                    warmup=1 + _WORKER_COUNT.value * _WORKER_BUFFER.value + _PREFETCH.value)
    finally:
        it.close()
    wall_rate, core_rate = r['images'] / r['wall_s'], r['images'] / r['cpu_s']
    print(f'{r["images"]} images ({_NUM_BATCHES.value} batches of {_BATCH_SIZE.value}) at '
          f'{_CROP.value} px, full augmentation, worker_count={_WORKER_COUNT.value}, '
          f'num_threads={_NUM_THREADS.value}: {r["wall_s"]:.2f} s wall, {r["cpu_s"]:.2f} CPU-s '
          f'in {r["processes"]} process(es)')
    q = np.percentile(r['per_batch_rates'], [0, 50, 100])
    print(f'  {wall_rate:.1f} images/s wall; per core {core_rate:.1f} images per CPU-second '
          f'({r["cpu_s"] / r["wall_s"]:.2f} cores busy; per batch min / median / max '
          f'{q[0]:.0f} / {q[1]:.0f} / {q[2]:.0f})'
          + (f'; per worker {wall_rate / _WORKER_COUNT.value:.1f} images/s'
             if _WORKER_COUNT.value else ''))
    print(f'\nSizing at {_IMAGES_PER_CHIP.value} images per chip per step and the measured '
          f'{core_rate:.1f} images per CPU-second per core:')
    print(sizing_table(sizing_rows(core_rate, step_ms, _IMAGES_PER_CHIP.value), core_rate))
    print('fits: cores needed <= cores on the host, with no core kept for the training '
          'process itself.')
    if _WITH_STEP.value:
        print()
        step_benchmark(datasets, data_dir, parse_loaders(_STEP_LOADERS.value), _STEP_STEPS.value,
                       _STEP_ROUNDS.value, (_PREFETCH.value, _WORKER_BUFFER.value))


if __name__ == '__main__':
    app.run(main)
