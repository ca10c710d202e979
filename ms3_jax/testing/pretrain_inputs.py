"""Inputs of the tiny pretraining tests: the synthetic label space, random text embeddings
(unit rows) and random labelled batches."""
from __future__ import annotations

import functools

import numpy as np

DATASETS = ("synth_a", "synth_b", "synth_c")


@functools.lru_cache(maxsize=None)
def label_space(datasets: tuple[str, ...] = DATASETS):
    from ms3_jax.data.label_space import LabelSpace
    return LabelSpace.from_datasets(tuple(datasets))


def random_text(dim, seed=0, datasets: tuple[str, ...] = DATASETS):
    """[num_classes, dim] float32 unit rows, a pure function of `seed`."""
    t = np.random.default_rng(seed).standard_normal((label_space(tuple(datasets)).num_classes, dim))
    return (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32)


def save_random_text(path, dim, seed=0, datasets: tuple[str, ...] = DATASETS) -> str:
    """`random_text` saved as a text-embeddings file ('template' prompts) at `path`."""
    from ms3_jax.method import text_embeddings
    text_embeddings.save_text_embeddings(str(path), label_space(tuple(datasets)),
                                         random_text(dim, seed, datasets), "template")
    return str(path)


def random_batch(rng, batch=8, size=32):
    ls = label_space()
    dataset_id = rng.integers(0, ls.num_datasets, batch)
    labels = np.empty((batch, size, size), np.int32)
    for b, d in enumerate(dataset_id):
        lo, hi = ls.offsets[d], ls.offsets[d + 1]
        # Blocky labels so every 4x4 cell of the stride-4 map has one class.
        labels[b] = np.kron(rng.integers(lo, hi, (size // 8, size // 8)), np.ones((8, 8), np.int32))
    # Images that look like their labels (a colour per class, a brightness per image, noise):
    # i.i.d. noise images give the image-pooling BN a near-zero batch variance, which makes
    # any float reassociation explode and says nothing about sharding.
    palette = rng.integers(0, 256, (ls.num_classes, 3))
    gain = rng.uniform(0.5, 1.0, (batch, 1, 1, 1))
    images = palette[labels] * gain + rng.normal(0, 8, (batch, size, size, 3))
    images = np.clip(images, 0, 255).astype(np.uint8)
    labels[:, :2] = -1  # some ignored pixels
    return {"image": images, "label": labels, "dataset_id": dataset_id.astype(np.int32)}
