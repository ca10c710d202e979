"""The built-in synthetic datasets at test sizes: `build(tmp_path_factory.getbasetemp())`.

Each size gets its own directory under `root`; `prepare_synthetic` is idempotent and takes a
file lock, so test modules (and processes) asking for the same size share one build. Treat it
as read-only: a test that alters records builds its own.
"""

from __future__ import annotations

import os

from ms3_jax.data import synthetic


def build(root: str | os.PathLike, *, num_train: int = 24, num_val: int = 4,
          image_size: int = 48, seed: int = 0) -> synthetic.SyntheticInfo:
    """synth_a/b/c in `root`/synthetic_<train>_<val>_<px>_<seed>, built on first use."""
    data_dir = os.path.join(os.fspath(root), f'synthetic_{num_train}_{num_val}_{image_size}_{seed}')
    return synthetic.prepare_synthetic(data_dir, num_train=num_train, num_val=num_val,
                                       image_size=image_size, seed=seed)
