"""The CPU-fast formulations in the models equal the plain XLA / Flax ops they replace
(benchmarks/RESULTS.md): depthwise conv as shifted sums, 1x1 conv as a matmul, 2x bilinear."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ms3_jax.models.deeplab import DepthwiseConv3x3, depthwise_conv3x3, resize_bilinear
from ms3_jax.models.resnet import Conv


def _grouped_conv(x, k, d):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((d, d), (d, d)), rhs_dilation=(d, d),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])


@pytest.mark.parametrize("hw,d", [((7, 5), 1), ((9, 9), 4), ((6, 6), 6), ((5, 9), 7), ((1, 1), 1)])
def test_depthwise_equals_grouped_conv_values_and_grads(hw, d):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, *hw, 5)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 1, 5)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, *hw, 5)), jnp.float32)
    np.testing.assert_allclose(depthwise_conv3x3(x, k, d), _grouped_conv(x, k, d), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda x, k: jnp.sum(depthwise_conv3x3(x, k, d) * g), (0, 1))(x, k)
    want = jax.grad(lambda x, k: jnp.sum(_grouped_conv(x, k, d) * g), (0, 1))(x, k)
    for a, b in zip(ours, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_depthwise_module_has_nn_conv_params_and_init():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 6, 6, 4)), jnp.float32)
    ref = nn.Conv(4, (3, 3), padding=((2, 2), (2, 2)), kernel_dilation=(2, 2), feature_group_count=4,
                  use_bias=False, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
    v_ref = ref.init(jax.random.PRNGKey(0), x)
    v = DepthwiseConv3x3(2).init(jax.random.PRNGKey(0), x)
    np.testing.assert_array_equal(v["params"]["kernel"], v_ref["params"]["kernel"])
    np.testing.assert_allclose(DepthwiseConv3x3(2).apply(v, x), ref.apply(v_ref, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,stride,bias,size", [(1, 1, False, 6), (1, 2, True, 7), (3, 2, False, 7),
                                               (3, 1, True, 5)])
def test_conv_equals_nn_conv(k, stride, bias, size):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, size, size, 6)), jnp.float32)
    pad = (k - 1) // 2
    ref = nn.Conv(8, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                  use_bias=bias, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"))
    v_ref = ref.init(jax.random.PRNGKey(0), x)
    ours = Conv(8, k, stride, use_bias=bias)
    v = ours.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(v_ref)
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(v_ref)):
        np.testing.assert_array_equal(a, b)
    v = jax.tree_util.tree_map(lambda t: t + 0.1, v)  # non-zero bias
    np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda p: jnp.sum(ours.apply(p, x) ** 2))(v)
    g_ref = jax.grad(lambda p: jnp.sum(ref.apply(p, x) ** 2))(v)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(2, 9, 7, 3), (1, 1, 1, 2), (1, 2, 5, 1)])
def test_resize_bilinear_2x_matches_torch(shape):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    size = (2 * shape[1], 2 * shape[2])
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                           mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), size),
                               want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)
