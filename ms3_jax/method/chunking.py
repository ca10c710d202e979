"""Pixel chunking: evaluate ``[N, ...] -> [N, ...]`` maps a chunk of pixels at a time, so only
``[chunk, K]`` logits are ever live. Shape suffixes: N pixels, K classes, C embedding dim."""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def batch_chunk(chunk_per_device: int | None, data_shards: int) -> int | None:
    """Pixels per chunk of a batch split over `data_shards` devices, for `chunk_per_device` on each
    (`config.loss.chunk`): a chunk takes pixels from every device's share (:func:`pixel_chunk_grid`).
    None: one chunk."""
    return None if chunk_per_device is None else chunk_per_device * data_shards


def chunk_layout(n: int, chunk: int) -> tuple[int, int]:
    """``(n_chunks, chunk')`` with ``chunk' <= chunk``: the smallest ``n_chunks >= ceil(n / chunk)``
    (up to twice that) that divides ``n`` -- no padding -- else ``ceil(n / chunk)`` chunks of
    ``chunk`` pixels with padding."""
    n0 = -(-n // chunk)
    for n_chunks in range(n0, 2 * n0 + 1):
        if n % n_chunks == 0:
            return n_chunks, n // n_chunks
    return n0, chunk


def pixel_chunk_grid(arrays: Sequence[jax.Array], pad_values: Sequence[float | int],
                     chunk: int) -> tuple[list[jax.Array], int, int]:
    """Pads ``[N, ...]`` arrays to ``n_chunks * chunk`` and views them as ``[chunk, n_chunks, ...]``
    (a free reshape, no transpose): chunk ``j`` is ``grid[:, j]`` = pixels ``j, j + n_chunks, ...``,
    evenly spread over a pixel axis sharded across devices, so a loop over chunks needs neither
    communication nor a transposed copy. Returns ``(grids, n_chunks, chunk)``."""
    n = arrays[0].shape[0]
    n_chunks, chunk = chunk_layout(n, chunk)
    n_pad = n_chunks * chunk - n
    grids = []
    for x, pad in zip(arrays, pad_values):
        if n_pad:
            x = jnp.pad(x, [(0, n_pad)] + [(0, 0)] * (x.ndim - 1), constant_values=pad)
        grids.append(x.reshape((chunk, n_chunks) + x.shape[1:]))
    return grids, n_chunks, chunk


def take_chunk(grids: Sequence[jax.Array], i: jax.Array) -> list[jax.Array]:
    """Chunk ``i`` (``[chunk, ...]``) of each grid from :func:`pixel_chunk_grid`."""
    return [jax.lax.dynamic_index_in_dim(g, i, axis=1, keepdims=False) for g in grids]


def map_pixel_chunks(body: Callable[..., tuple[jax.Array, ...]], arrays: Sequence[jax.Array],
                     pad_values: Sequence[float | int], chunk: int | None, *,
                     remat: bool = True) -> tuple[jax.Array, ...]:
    """``body`` (``[chunk, ...]`` arrays -> tuple of ``[chunk, ...]``) over chunks of at most
    ``chunk`` pixels of ``arrays`` (leading dim N, padded with ``pad_values`` if needed); returns
    the tuple of ``[N, ...]`` outputs. ``remat``: the body is ``jax.checkpoint``-ed, so autodiff
    recomputes one chunk at a time. ``chunk=None`` or ``>= N``: one call of ``body``."""
    n = arrays[0].shape[0]
    if chunk is None or chunk >= n:
        return tuple(body(*arrays))
    grids, n_chunks, chunk = pixel_chunk_grid(arrays, pad_values, chunk)

    def one(i: jax.Array) -> tuple[jax.Array, ...]:
        return tuple(body(*take_chunk(grids, i)))

    if remat:
        one = jax.checkpoint(one, prevent_cse=False)
    outs = jax.lax.map(one, jnp.arange(n_chunks))  # each [n_chunks, chunk, ...]
    return tuple(jnp.swapaxes(y, 0, 1).reshape((n_chunks * chunk,) + y.shape[2:])[:n] for y in outs)
