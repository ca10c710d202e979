"""Input-pipeline throughput: images/s (total and per worker) of the full training augmentation.

Decode + random scale/crop to 224 + flip + colour distortion + blur + union-label remap, on the
built-in synthetic data (paper 4.1 augmentations; see ms3_jax/data/augment.py).

  python benchmarks/data_throughput.py --num_batches=20 --worker_count=0 --batch_size=32
"""

import time

from absl import app
from absl import flags

from ms3_jax.data import pipeline
from ms3_jax.data import synthetic
from ms3_jax.files import safe

_DATA_DIR = flags.DEFINE_string('data_dir', safe.user_cache_dir('data', 'synthetic_bench'),
                                 'Synthetic data dir (default: per user, not /tmp).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 384, 'Synthetic source image short side.')
_NUM_TRAIN = flags.DEFINE_integer('num_train', 64, 'Synthetic train images per dataset.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', 20, 'Timed batches (after one warm-up).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Per-process batch size.')
_WORKER_COUNT = flags.DEFINE_integer('worker_count', 0, 'grain worker processes.')
_NUM_THREADS = flags.DEFINE_integer('num_threads', 1, 'grain reader threads per process.')
_CROP = flags.DEFINE_integer('crop_size', 224, 'Crop size.')


def main(argv):
    del argv
    info = synthetic.prepare_synthetic(_DATA_DIR.value, num_train=_NUM_TRAIN.value, num_val=2,
                                       image_size=_IMAGE_SIZE.value)
    pipe = pipeline.TrainPipeline(
        info.dataset_names, data_dir=info.data_dir, global_batch_size=_BATCH_SIZE.value,
        augment=pipeline.AugmentConfig(crop_size=_CROP.value), shard_index=0, shard_count=1,
        loader=pipeline.LoaderOptions(worker_count=_WORKER_COUNT.value, num_threads=_NUM_THREADS.value))
    it = pipe.make_iterator()
    next(it)  # warm-up (worker start-up)
    t0 = time.perf_counter()
    for _ in range(_NUM_BATCHES.value):
        next(it)
    dt = time.perf_counter() - t0
    if hasattr(it, 'close'):
        it.close()
    images = _NUM_BATCHES.value * _BATCH_SIZE.value
    workers = max(_WORKER_COUNT.value, 1)
    print(f'{images} images in {dt:.2f} s at {_CROP.value}px from {_IMAGE_SIZE.value}px sources, '
          f'worker_count={_WORKER_COUNT.value}, num_threads={_NUM_THREADS.value}: '
          f'{images / dt:.1f} images/s total, {images / dt / workers:.1f} images/s per worker')


if __name__ == '__main__':
    app.run(main)
