"""Resizes with PyTorch's numbers (`F.interpolate`, `align_corners=False`), as matrices:
bilinear (the decoder, the logits, the ViT neck) and antialiased bicubic (timm's
position-embedding resample). docs/choices.md, "Bilinear resizes as interpolation matrices",
"DeiT-B: a multi-level neck for DeepLab-v3+".
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bilinear resize with `align_corners=False`."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    w = np.zeros((n_out, n_in), np.float64)
    np.add.at(w, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), i1), frac)
    return w


def _upsample_axis(x: jax.Array, axis: int, scale: int) -> jax.Array:
    """Exact bilinear upsampling by an integer `scale` along `axis` (align_corners=False):
    output scale * i + r sits at t = (r + 0.5) / scale - 0.5 from x[i], so it is
    (1 - |t|) x[i] + |t| x[i - 1] (t < 0) or x[i + 1] (t > 0), edges clamped. Elementwise, so
    XLA fuses it (2x: 0.75 x[i] + 0.25 x[i -/+ 1])."""
    n = x.shape[axis]
    take = lambda a, b: jax.lax.slice_in_dim(x, a, b, axis=axis)
    prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)
    nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)
    outs = []
    for r in range(scale):
        t = (r + 0.5) / scale - 0.5
        outs.append((1 - abs(t)) * x + abs(t) * (prev if t < 0 else nxt))
    out = jnp.stack(outs, axis=axis + 1)
    return out.reshape(x.shape[:axis] + (scale * n,) + x.shape[axis + 1:])


def upsample_bilinear(x_BxHxWxC: jax.Array, scale: int) -> jax.Array:
    """`resize_bilinear` to (scale H, scale W) for an integer `scale`, as elementwise stencils
    (no matrix products: the ViT neck's 4x; a product form failed to compile for H100)."""
    if scale == 1:
        return x_BxHxWxC
    return _upsample_axis(_upsample_axis(x_BxHxWxC, 1, scale), 2, scale)


def resize_bilinear(x_BxHxWxC: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize equal to `torch.nn.functional.interpolate(..., align_corners=False)`.

    Exact 2x upsampling (the v3+ decoder: stride 8 -> 4 at sizes divisible by 8) uses a 2-tap
    stencil that XLA fuses; other sizes multiply by the interpolation matrices.
    """
    h, w = x_BxHxWxC.shape[1:3]
    if (h, w) == tuple(size):
        return x_BxHxWxC
    if tuple(size) == (2 * h, 2 * w):
        return upsample_bilinear(x_BxHxWxC, 2)
    wh = jnp.asarray(bilinear_matrix(h, size[0]), x_BxHxWxC.dtype)
    ww = jnp.asarray(bilinear_matrix(w, size[1]), x_BxHxWxC.dtype)
    return jnp.einsum("oh,bhwc,pw->bopc", wh, x_BxHxWxC, ww)


def _cubic_aa(t: np.ndarray) -> np.ndarray:
    """The cubic convolution kernel, a = -0.5 (PIL's; torch's antialiased bicubic uses it)."""
    a, t = -0.5, np.abs(t)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return np.where(t < 1, near, np.where(t < 2, far, 0.0))


def bicubic_antialias_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float64 weights of torch's `F.interpolate(mode='bicubic', antialias=True,
    align_corners=False)` along one axis: the kernel stretched by the scale when shrinking, taps
    clipped to the input and each row renormalised to sum 1 (PIL's resampling)."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    out = np.zeros((n_out, n_in), np.float64)
    for o in range(n_out):
        center = scale * (o + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        taps = np.arange(lo, hi)
        w = _cubic_aa((taps - center + 0.5) / stretch)
        out[o, lo:hi] = w / w.sum()
    return out


def resize_position_table(table_1xLxD: jax.Array, grid: tuple[int, int],
                          new_grid: tuple[int, int], prefix: int = 1) -> jax.Array:
    """timm's `resample_abs_pos_embed`: the first `prefix` rows (the class position) kept, the
    `grid` patch rows resized to `new_grid` (bicubic, antialiased, in float32). [1, L, D] in,
    [1, prefix + Gh*Gw, D] out; the table itself when the grid is unchanged."""
    if tuple(new_grid) == tuple(grid):
        return table_1xLxD
    dim = table_1xLxD.shape[-1]
    rows_HxG = jnp.asarray(bicubic_antialias_matrix(grid[0], new_grid[0]), jnp.float32)
    cols_WxG = jnp.asarray(bicubic_antialias_matrix(grid[1], new_grid[1]), jnp.float32)
    patch_GxGxD = table_1xLxD[0, prefix:].astype(jnp.float32).reshape(*grid, dim)
    patch_HxWxD = jnp.einsum("hy,wx,yxd->hwd", rows_HxG, cols_WxG, patch_GxGxD,
                             precision=jax.lax.Precision.HIGHEST)
    patch = patch_HxWxD.reshape(1, new_grid[0] * new_grid[1], dim).astype(table_1xLxD.dtype)
    return jnp.concatenate([table_1xLxD[:, :prefix], patch], axis=1)
