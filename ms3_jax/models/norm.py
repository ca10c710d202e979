"""BatchNorm (+ ReLU) with the train-mode gradient written out: `BatchNorm`, flax's
`nn.BatchNorm` (same variables, same forward numbers) whose backward pass reads the activations in
two passes, not three.

Autodiff of flax's BatchNorm leaves XLA a graph it fuses into three passes over the activation:
the ReLU's masked gradient written out with one sum, a second reduction over it, then dx. Written
out (:func:`normalize_train`), the two sums are one pass over (x, dy) and dx a second one, the ReLU
mask recomputed from x in each: docs/choices.md, "BatchNorm's gradient written out".
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _stats(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean, E[x^2] - mean^2, var): flax's `use_fast_variance` statistics (at least float32);
    var is the difference clipped at 0."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean, mean2 = xf.mean(axes), jax.lax.square(xf).mean(axes)
    diff = mean2 - jax.lax.square(mean)
    return mean, diff, jnp.maximum(0.0, diff)


def _normalize(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array,
               epsilon: float, relu: bool, dtype: Any) -> jax.Array:
    """relu?((x - mean) * rsqrt(var + eps) * scale + bias) in `dtype`, flax's order of operations."""
    mul = jax.lax.rsqrt(var + epsilon) * scale
    y = jnp.asarray((x - mean) * mul + bias, dtype)
    return jax.nn.relu(y) if relu else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def normalize_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, relu: bool,
                    dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode BatchNorm over all axes but the last: ``(y, mean, var)``, y = relu?(...) in
    `dtype`, mean / var the batch statistics (float32 or wider). Gradient: module doc."""
    return _normalize_train_fwd(x, scale, bias, epsilon, relu, dtype)[0]


def _normalize_train_fwd(x, scale, bias, epsilon, relu, dtype):
    mean, diff, var = _stats(x, tuple(range(x.ndim - 1)))
    y = _normalize(x, mean, var, scale, bias, epsilon, relu, dtype)
    return (y, mean, var), (x, scale, bias, mean, diff, var)


def relu_masks(x: jax.Array, mean: jax.Array, mul: jax.Array,
               bias: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ReLU's mask ``(x - mean) * mul + bias > 0`` as a threshold on x per channel, spelled
    two ways (the same booleans): ``x * sign(mul) > u`` and ``lo < x < hi``. One comparison of x
    each, so XLA fuses each into its pass; one shared mask, it writes the masked gradient out.
    Equal to the forward's mask except where y is within float32 rounding of 0."""
    xf, sign = x.astype(mean.dtype), jnp.sign(mul)
    live = bias > 0  # mul == 0: y = bias everywhere
    t = mean - bias / jnp.where(sign == 0, 1, mul)  # y > 0 <=> x > t (mul > 0), x < t (mul < 0)
    u = jnp.where(sign == 0, jnp.where(live, -1.0, 1.0), t * sign)
    inf = jnp.asarray(jnp.inf, mean.dtype)
    lo = jnp.where(sign > 0, t, jnp.where((sign < 0) | live, -inf, inf))
    hi = jnp.where(sign < 0, t, jnp.where((sign > 0) | live, inf, -inf))
    return xf * sign > u, (xf > lo) & (xf < hi)


def _normalize_train_bwd(epsilon, relu, dtype, residuals, cotangents):
    """The derivative of the forward's own formula (`_stats`, `_normalize`), as autodiff takes it:
    with g = dy masked by the ReLU, S1 = sum g, S2 = sum g (x - mean), r = rsqrt(var + eps),
    dbias = S1, dscale = S2 r, dvar = -scale r^3 S2 / 2 (+ the var cotangent; times max's
    derivative at the clip: 1, 1/2 at 0, 0 below), dx = g scale r + (dmean - scale r S1) / n
    + 2 (x - mean) dvar / n."""
    x, scale, bias, mean, diff, var = residuals
    dy, dmean, dvar_out = cotangents
    axes = tuple(range(x.ndim - 1))
    n = x.size // x.shape[-1]
    r = jax.lax.rsqrt(var + epsilon)
    mul = r * scale
    xc = x.astype(mean.dtype) - mean
    g1 = g2 = dy.astype(mean.dtype)
    if relu:  # the forward's ReLU mask, recomputed from x in each pass (no saved output)
        mask1, mask2 = relu_masks(x, mean, mul, bias)
        g1, g2 = jnp.where(mask1, g1, 0), jnp.where(mask2, g2, 0)
    s1, s2 = g1.sum(axes), (g1 * xc).sum(axes)  # one pass over (x, dy)
    clip = jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0)).astype(mean.dtype)
    dvar = clip * (-0.5 * scale * r * r * r * s2 + dvar_out)
    dx = g2 * mul + (dmean - mul * s1) / n + xc * (2.0 * dvar / n)  # a second pass
    return dx.astype(x.dtype), (s2 * r).astype(scale.dtype), s1.astype(bias.dtype)


normalize_train.defvjp(_normalize_train_fwd, _normalize_train_bwd)


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis (variables `scale`, `bias`; `batch_stats` `mean`, `var`;
    running averages updated with `momentum` in training, not during init) with an optional ReLU:
    ``BatchNorm(...)(x, relu=True)`` is ``nn.relu(nn.BatchNorm(...)(x))``, same numbers; in training
    the gradient of :func:`normalize_train`."""

    use_running_average: bool
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, relu: bool = False) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        if self.use_running_average:
            return _normalize(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon, relu, dtype)
        y, mean, var = normalize_train(x, scale, bias, self.epsilon, relu, jnp.dtype(dtype))
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
