"""`norm.BatchNorm` is flax's `nn.BatchNorm` (+ ReLU): same variables and forward numbers, and the
written-out train-mode gradient equals autodiff of flax's BatchNorm (float64), every cotangent
included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ms3_jax.models.norm import BatchNorm, normalize_train, relu_masks


def _inputs(dtype, shape=(3, 5, 4, 6), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 2.0 + 0.5
    x[..., 1] = 3.0  # a constant channel: variance 0, the clip of E[x^2] - mean^2
    return jnp.asarray(x, dtype)


def _flax(train, relu, dtype):
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
    return lambda v, x: (lambda y, m: (nn.relu(y) if relu else y, m))(
        *bn.apply(v, x, mutable=["batch_stats"]))


def _ours(train, relu, dtype):
    bn = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
    return lambda v, x: bn.apply(v, x, relu, mutable=["batch_stats"])


def _variables(c, seed=1):
    rng = np.random.default_rng(seed)
    scale = rng.standard_normal(c).astype(np.float32)
    scale[2] = -abs(scale[2]) - 0.5  # a negative scale flips the ReLU's side
    return {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(rng.standard_normal(c) * 0.3,
                                                                       jnp.float32)},
            "batch_stats": {"mean": jnp.asarray(rng.standard_normal(c), jnp.float32),
                            "var": jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)}}


def test_same_variables_as_flax_batchnorm():
    x = _inputs(jnp.float32)
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5).init(
        jax.random.PRNGKey(0), x)
    ours = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5).init(
        jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(ref)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_forward_and_statistics_equal_flax_bitwise(dtype, train, relu):
    x = _inputs(dtype)
    v = _variables(x.shape[-1])
    y_ref, m_ref = jax.jit(_flax(train, relu, dtype))(v, x)
    y, m = jax.jit(_ours(train, relu, dtype))(v, x)
    assert y.dtype == y_ref.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for a, b in zip(jax.tree_util.tree_leaves(m), jax.tree_util.tree_leaves(m_ref)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("relu", [True, False])
def test_train_gradient_equals_autodiff_of_flax_float64(relu):
    """d/d(x, scale, bias) of a loss of the output, float64: to 1e-12 of autodiff through flax."""
    with jax.enable_x64(True):
        x = _inputs(jnp.float64)
        v = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _variables(x.shape[-1]))
        w = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape))

        def loss(f):
            return lambda p, x: jnp.sum(jnp.sin(f({**v, "params": p}, x)[0]) * w)

        g_ref = jax.grad(loss(_flax(True, relu, jnp.float64)), (0, 1))(v["params"], x)
        g = jax.grad(loss(_ours(True, relu, jnp.float64)), (0, 1))(v["params"], x)
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_statistics_cotangents_follow_the_forward_formula_float64():
    """The mean / var outputs are differentiable too (their cotangents reach x), as autodiff of
    the same formula gives them: E[x^2] - mean^2 clipped at 0, rsqrt(var + eps)."""
    def reference(x, scale, bias):
        mean, mean2 = x.mean((0, 1, 2)), (x * x).mean((0, 1, 2))
        var = jnp.maximum(0.0, mean2 - mean * mean)
        y = jax.nn.relu((x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias)
        return y, mean, var

    with jax.enable_x64(True):
        x = _inputs(jnp.float64)
        p = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), _variables(x.shape[-1]))["params"]
        rng = np.random.default_rng(4)
        wy, wm, wv = (jnp.asarray(rng.standard_normal(s)) for s in (x.shape, x.shape[-1:], x.shape[-1:]))

        def loss(f):
            def value(x, scale, bias):
                y, mean, var = f(x, scale, bias)
                return jnp.sum(y * wy) + jnp.sum(jnp.cos(mean) * wm) + jnp.sum(var * var * wv)
            return value

        ours = lambda x, s, b: normalize_train(x, s, b, 1e-5, True, jnp.dtype(jnp.float64))
        g = jax.grad(loss(ours), (0, 1, 2))(x, p["scale"], p["bias"])
        g_ref = jax.grad(loss(reference), (0, 1, 2))(x, p["scale"], p["bias"])
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_bfloat16_gradient_close_to_flax():
    """bfloat16 activations: the two gradients differ by float32 rounding order only."""
    x = _inputs(jnp.bfloat16, shape=(4, 6, 6, 8), seed=5)
    v = _variables(8, seed=6)
    w = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), jnp.float32)

    def loss(f):
        return lambda p, x: jnp.sum(f({**v, "params": p}, x)[0].astype(jnp.float32) * w)

    g_ref = jax.grad(loss(_flax(True, True, jnp.bfloat16)), (0, 1))(v["params"], x)
    g = jax.grad(loss(_ours(True, True, jnp.bfloat16)), (0, 1))(v["params"], x)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(b).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_relu_masks_are_the_forward_relus_mask(dtype):
    """Both spellings of the backward's mask equal y > 0 of the forward, for positive, negative
    and zero scales (zero: the bias decides) -- y computed here in float64, away from 0."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((4, 5, 5, 6)) * 2.0, dtype)
    mean = jnp.asarray(rng.standard_normal(6) * 0.5, jnp.float32)
    mul = jnp.asarray([1.3, -0.7, 0.0, 0.0, 2e-3, -4.0], jnp.float32)
    bias = jnp.asarray([0.2, -0.1, 0.5, -0.5, 0.01, 0.3], jnp.float32)
    y = (np.asarray(x, np.float64) - np.asarray(mean, np.float64)) * np.asarray(mul, np.float64) \
        + np.asarray(bias, np.float64)
    away = np.abs(y) > 1e-5
    assert away.mean() > 0.99
    for mask in jax.jit(relu_masks)(x, mean, mul, bias):
        np.testing.assert_array_equal(np.asarray(mask)[away], (y > 0)[away])
    assert np.asarray(mask)[..., 2].all() and not np.asarray(mask)[..., 3].any()
