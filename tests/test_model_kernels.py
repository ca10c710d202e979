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


# (h, w), d: both forms -- padded buffer (2d <= min(h, w)) and per-tap shifts (partly or
# wholly out-of-bounds taps).
@pytest.mark.parametrize("hw,d", [((7, 5), 1), ((9, 9), 4), ((9, 4), 2), ((5, 9), 3), ((6, 6), 6),
                                  ((5, 9), 7), ((1, 1), 1)])
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


def test_depthwise_copies_its_input_padded_only_without_autodiff():
    """Without autodiff the input goes through one `dynamic_update_slice` into a padded buffer
    (XLA does not fuse it, so the producer is not recomputed per tap); the gradient keeps the
    form without the copy (its input is a residual anyway)."""
    x = jnp.ones((1, 8, 8, 3), jnp.float32)
    k = jnp.ones((3, 3, 1, 3), jnp.float32)
    forward = str(jax.make_jaxpr(lambda x: depthwise_conv3x3(x, k, 2))(x))
    grad = str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(depthwise_conv3x3(x, k, 2))))(x))
    assert forward.count("dynamic_update_slice") == 1
    assert "dynamic_update_slice" not in grad
    # Dilation above half the map: per-tap shifts, no mostly-zero buffer.
    assert "dynamic_update_slice" not in str(jax.make_jaxpr(lambda x: depthwise_conv3x3(x, k, 5))(x))


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


def _lax_conv(x, k, s, d):
    pad = d * (k.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(x, k, (s, s), ((pad, pad), (pad, pad)), rhs_dilation=(d, d),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("k,s,d,hw,cout", [(3, 1, 1, (5, 6), 3), (3, 2, 1, (7, 7), 3),
                                           (3, 1, 4, (6, 9), 3), (1, 2, 1, (5, 5), 3),
                                           (3, 2, 2, (6, 7), 300)])
def test_wide_conv_runs_as_tap_products_equal_to_lax_conv(k, s, d, hw, cout):
    """Convs with >= TAP_PRODUCTS_MIN_CHANNELS inputs (tap products, with their written-out
    gradient: both kernel-gradient orientations, strided taps) and 1x1 convs (one product):
    float64 values and both gradients equal XLA's convolution to rounding."""
    from ms3_jax.models import resnet
    cin = resnet.TAP_PRODUCTS_MIN_CHANNELS
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, *hw, cin)))
        g = jnp.asarray(rng.standard_normal((2, (hw[0] - 1) // s + 1, (hw[1] - 1) // s + 1, cout)))
        conv = Conv(cout, k, s, d, dtype=jnp.float64)
        v = conv.init(jax.random.PRNGKey(0), x)
        kern = v["params"]["kernel"].astype(jnp.float64)
        y = conv.apply(v, x)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(y, _lax_conv(x, kern, s, d), rtol=1e-12, atol=1e-12)
        ours = jax.grad(lambda x, v: jnp.sum(conv.apply(v, x) * g), (0, 1))(x, v)
        want = jax.grad(lambda x, kern: jnp.sum(_lax_conv(x, kern, s, d) * g), (0, 1))(x, kern)
        np.testing.assert_allclose(ours[0], want[0], rtol=1e-12, atol=1e-12)
        # the kernel parameter is stored in float32: its gradient is the float64 one, rounded
        np.testing.assert_allclose(ours[1]["params"]["kernel"], want[1], rtol=2 ** -24, atol=1e-12)


def test_conv_matmul_bf16_accumulates_in_f32_forward_and_backward():
    """bfloat16 operands, float32 accumulation in all three products: each result is the float64
    product of the bfloat16 operands, rounded once (a bfloat16 accumulation over 4096 terms is
    off by far more). Gradients come back in the operands' dtype."""
    from ms3_jax.models.gemm import conv_matmul
    rng = np.random.default_rng(5)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    x, w, g = bf(rng.standard_normal((2, 8, 4096))), bf(rng.standard_normal((4096, 16))), \
        bf(rng.standard_normal((2, 8, 16)))
    f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    y = conv_matmul(x, w, jnp.float32)
    np.testing.assert_allclose(y, f64(x) @ f64(w), rtol=1e-5, atol=1e-3)
    _, vjp = jax.vjp(lambda x, w: conv_matmul(x, w, jnp.bfloat16), x, w)
    dx, dw = vjp(g)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    ref_dx, ref_dw = f64(g) @ f64(w).T, np.einsum("bpk,bpn->kn", f64(x), f64(g))
    # one bfloat16 rounding (relative 2^-8) of the exact result
    np.testing.assert_allclose(f64(dx), ref_dx, rtol=2 ** -8, atol=1e-6 * np.abs(ref_dx).max())
    np.testing.assert_allclose(f64(dw), ref_dw, rtol=2 ** -8, atol=1e-6 * np.abs(ref_dw).max())
    with pytest.raises(TypeError, match="differ in dtype: bfloat16 vs float32"):
        conv_matmul(x, w.astype(jnp.float32), jnp.float32)


def test_conv_matmul_keeps_the_batch_sharded():
    """The backward's row-major copies merge only per-image axes: with the batch sharded over 8
    devices the compiled gradient gathers no activations (its only collective is the sum of dw)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from ms3_jax.models.gemm import conv_matmul
    assert jax.device_count() == 8  # tests/conftest.py sets 8 CPU devices
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rng = np.random.default_rng(6)
    xs, ws = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    x = jax.device_put(jnp.asarray(rng.standard_normal((8, 64, 256)), jnp.bfloat16), xs)
    w = jax.device_put(jnp.asarray(rng.standard_normal((256, 32)), jnp.bfloat16), ws)
    loss = lambda x, w: jnp.sum(conv_matmul(x, w, jnp.float32) ** 2)
    fn = jax.jit(jax.grad(loss, (0, 1)), out_shardings=(xs, ws))
    hlo = fn.lower(x, w).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo and "all-reduce" in hlo
    dx, dw = fn(x, w)
    f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    y = f64(x) @ f64(w)
    np.testing.assert_allclose(f64(dw), np.einsum("bpk,bpn->kn", f64(x), 2 * y), rtol=2e-2,
                               atol=1e-2 * np.abs(f64(dw)).max())
    np.testing.assert_allclose(f64(dx), 2 * y @ f64(w).T, rtol=2e-2, atol=1e-2 * np.abs(f64(dx)).max())


@pytest.mark.parametrize("s,d,hw", [(1, 1, (5, 6)), (2, 1, (7, 6)), (1, 3, (4, 9))])
def test_conv_with_uniform_channels_equals_conv_of_the_broadcast_concat(s, d, hw):
    """The ASPP bottleneck's image-pool channels (constant per image) enter a wide 3x3 conv as
    per-tap products with border masks: float64 values and all three gradients equal the conv of
    the materialised [broadcast(u), x] concatenation, border pixels included."""
    from ms3_jax.models import resnet
    cin, n_u, cout = resnet.TAP_PRODUCTS_MIN_CHANNELS, 5, 4
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, *hw, cin)))
        u = jnp.asarray(rng.standard_normal((2, 1, 1, n_u)))
        g = jnp.asarray(rng.standard_normal((2, (hw[0] - 1) // s + 1, (hw[1] - 1) // s + 1, cout)))
        conv = Conv(cout, 3, s, d, use_bias=True, dtype=jnp.float64)
        v = conv.init(jax.random.PRNGKey(0), x, u)
        assert v["params"]["kernel"].shape == (3, 3, n_u + cin, cout)
        kern = v["params"]["kernel"].astype(jnp.float64)
        bias = v["params"]["bias"].astype(jnp.float64) + 0.5

        def ours(x, u, kern):
            return conv.apply({"params": {"kernel": kern, "bias": bias}}, x, u)

        def want(x, u, kern):
            full = jnp.concatenate([jnp.broadcast_to(u, x.shape[:3] + (n_u,)), x], -1)
            return _lax_conv(full, kern, s, d) + bias

        np.testing.assert_allclose(ours(x, u, kern), want(x, u, kern), rtol=1e-12, atol=1e-12)
        loss = lambda f: (lambda *a: jnp.sum(f(*a) * g))
        for a, b in zip(jax.grad(loss(ours), (0, 1, 2))(x, u, kern),
                        jax.grad(loss(want), (0, 1, 2))(x, u, kern)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-11)
