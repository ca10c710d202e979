"""`model.kernels`: XLA's native convolutions and the CPU plug-in (`cpu_kernels.CpuConv`) are the
same model -- same params, same outputs and gradients -- and 'auto' picks by the platform of the
devices the step is compiled for. Also: the CPU kernels one by one against XLA's convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ms3_jax.engine import sharding
from ms3_jax.models import cpu_kernels
from ms3_jax.models.cpu_kernels import CpuConv, conv_matmul, depthwise_conv3x3
from ms3_jax.models.deeplab import conv_for, encoder_from_config, resize_bilinear
from ms3_jax.models.resnet import Conv

KAIMING = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
TINY = dict(width=0.125, stage_sizes=(1, 1, 1, 1), emb_dim=16)


def _tiny(conv=Conv, dtype=jnp.float32):
    """The tiny encoder (5 classes) with `conv` and compute `dtype`, as a config selects them."""
    cfg = dict(TINY, kernels="xla" if conv is Conv else "cpu", dtype=jnp.dtype(dtype).name)
    return encoder_from_config(cfg, "cpu", num_classes=5)


def _lax_conv(x, k, s, d, groups=1):
    pad = d * (k.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(x, k, (s, s), ((pad, pad), (pad, pad)), rhs_dilation=(d, d),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


# ------------------------------------------------------------------------------ the switch
def test_auto_resolves_from_the_compile_target_platform_not_the_host():
    assert conv_for("auto", "cpu") is CpuConv
    assert conv_for("auto", "gpu") is Conv and conv_for("auto", "tpu") is Conv
    assert conv_for("xla", "cpu") is Conv and conv_for("cpu", "tpu") is CpuConv
    with pytest.raises(ValueError, match=r"model.kernels must be one of .*got 'gemm'"):
        conv_for("gemm", "cpu")
    cfg = dict(TINY, kernels="auto")
    assert encoder_from_config(cfg, "gpu").conv is Conv
    assert encoder_from_config(cfg, sharding.platform_of(jax.devices())).conv is CpuConv


def test_platform_of_reads_the_devices_and_refuses_a_mix():
    class Dev:
        def __init__(self, platform):
            self.platform = platform
    assert sharding.platform_of(jax.devices()) == "cpu"
    assert sharding.platform_of([Dev("tpu"), Dev("tpu")]) == "tpu"
    with pytest.raises(ValueError, match=r"one platform, got \['cpu', 'gpu'\]"):
        sharding.platform_of([Dev("gpu"), Dev("cpu")])


# ---------------------------------------------------------- both kernel sets, whole encoder
def _encoder_outputs_and_grads(conv, dtype, variables, images, train=True):
    """Outputs and the gradient of a fixed random linear function of the three outputs."""
    model = _tiny(conv, dtype)
    keys = ("language", "visual", "logits")

    def loss(params):
        out = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                          train=train, mutable=["batch_stats"] if train else False,
                          rngs={"dropout": jax.random.PRNGKey(2)})
        out = out[0] if train else out
        weights = [jax.random.normal(jax.random.PRNGKey(i), out[k].shape) for i, k in enumerate(keys)]
        return sum(jnp.sum(w * out[k].astype(jnp.float32)) for w, k in zip(weights, keys)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return out, grads


@pytest.fixture(scope="module")
def tiny_encoder_inputs():
    images = jax.random.randint(jax.random.PRNGKey(0), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    variables = _tiny().init(jax.random.PRNGKey(1), images)
    return images, variables


def test_both_kernel_sets_build_the_same_params(tiny_encoder_inputs):
    images, variables = tiny_encoder_inputs
    cpu = _tiny(CpuConv).init(jax.random.PRNGKey(1), images)
    assert jax.tree_util.tree_structure(cpu) == jax.tree_util.tree_structure(variables)
    for a, b in zip(jax.tree_util.tree_leaves(cpu), jax.tree_util.tree_leaves(variables)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_both_kernel_sets_give_the_same_outputs_and_gradients_float64(tiny_encoder_inputs):
    """The tiny encoder has every conv kind: 7x7 stem, strided 1x1 / 3x3, dilated 3x3, depthwise
    (dilations 12-36, taps partly outside), a 256-channel 3x3 with the image-pool channels."""
    images, variables = tiny_encoder_inputs
    with jax.enable_x64(True):
        v64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables)
        out_x, g_x = _encoder_outputs_and_grads(Conv, jnp.float64, v64, images)
        out_c, g_c = _encoder_outputs_and_grads(CpuConv, jnp.float64, v64, images)
        for k in out_x:
            np.testing.assert_allclose(out_c[k], out_x[k], rtol=1e-5, atol=1e-5 * np.abs(out_x[k]).max())
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_c), jax.tree_util.tree_leaves(g_x)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max() + 1e-12,
                                       err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_both_kernel_sets_agree_in_bfloat16(tiny_encoder_inputs):
    """bfloat16 compute (8-bit mantissa, rounded at different points by the two sets): each set is
    as close to the float32 model as the other, and both are close (BN on running statistics:
    training-mode BN over a batch of 2 amplifies rounding without bound)."""
    images, variables = tiny_encoder_inputs
    ref, g_ref = _encoder_outputs_and_grads(Conv, jnp.float32, variables, images, train=False)
    for conv in (Conv, CpuConv):
        out, grads = _encoder_outputs_and_grads(conv, jnp.bfloat16, variables, images, train=False)
        for k in ("language", "visual"):  # unit vectors, float32
            cos = jnp.sum(out[k] * ref[k], -1)
            assert float(jnp.min(cos)) > 0.99, (conv.__name__, k, float(jnp.min(cos)))
        rel = np.abs(out["logits"] - ref["logits"]).max() / np.abs(ref["logits"]).max()
        assert rel < 0.05, (conv.__name__, rel)
        flat = lambda t: np.concatenate([np.ravel(x).astype(np.float64) for x in jax.tree_util.tree_leaves(t)])
        a, b = flat(grads), flat(g_ref)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99, conv.__name__
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(g_ref)):
            a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)
            assert cos > 0.85, (conv.__name__, jax.tree_util.keystr(path), cos)  # measured >= 0.89


# ----------------------------------------------------------------- one conv at a time, float32
@pytest.mark.parametrize("conv", [Conv, CpuConv], ids=["xla", "cpu"])
@pytest.mark.parametrize("k,stride,dilation,groups,bias,size,cin", [
    (1, 1, 1, 1, False, 6, 6), (1, 2, 1, 1, True, 7, 6), (3, 2, 1, 1, False, 7, 6),
    (3, 1, 1, 1, True, 5, 6), (3, 1, 2, 8, False, 6, 8), (3, 1, 2, 1, False, 6, 256),
    (7, 2, 1, 1, False, 9, 3),
    (3, 1, 6, 8, False, 6, 8), (3, 1, 9, 8, True, 6, 8), (3, 1, 7, 1, False, 6, 6)])  # d >= size
def test_conv_equals_nn_conv_float32(conv, k, stride, dilation, groups, bias, size, cin):
    """Each conv kind of the model against flax's `nn.Conv` with torch padding: same params and
    init, values and gradients to 1e-5 (float32)."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, size, size, cin)), jnp.float32)
    pad = dilation * (k - 1) // 2
    features = 8
    ref = nn.Conv(features, (k, k), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                  kernel_dilation=(dilation, dilation), feature_group_count=groups, use_bias=bias,
                  kernel_init=KAIMING, precision=jax.lax.Precision.HIGHEST)
    v_ref = ref.init(jax.random.PRNGKey(0), x)
    ours = conv(features, k, stride, dilation, groups, use_bias=bias)
    v = ours.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(v_ref)
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(v_ref)):
        np.testing.assert_array_equal(a, b)
    v = jax.tree_util.tree_map(lambda t: t + 0.1, v)  # non-zero bias
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(ours.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)
        g_ours = jax.grad(lambda p, x: jnp.sum(jnp.sin(ours.apply(p, x))), (0, 1))(v, x)
        g_ref = jax.grad(lambda p, x: jnp.sum(jnp.sin(ref.apply(p, x))), (0, 1))(v, x)
    for a, b in zip(jax.tree_util.tree_leaves(g_ours), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("groups,hw,d", [(5, (4, 4), 4), (5, (3, 7), 5), (5, (7, 3), 4),
                                         (1, (4, 4), 6), (1, (3, 7), 3)])
def test_taps_that_read_only_padding_are_not_computed(groups, hw, d):
    """A dilation >= the map's height (width): only the centre row (column) of taps is computed;
    float64 values and gradients equal the full convolution's, the dropped taps' gradients are
    exact zeros, and a depthwise conv left with its centre tap is a product, not a convolution."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, *hw, 5)))
        g = jnp.asarray(rng.standard_normal((2, *hw, 5)))
        conv = Conv(5, 3, 1, d, groups, dtype=jnp.float64)
        v = conv.init(jax.random.PRNGKey(0), x)
        kern = v["params"]["kernel"].astype(jnp.float64)
        ours = lambda x, k: conv.apply({"params": {"kernel": k}}, x)
        full = lambda x, k: _lax_conv(x, k, 1, d, groups=groups)
        np.testing.assert_allclose(ours(x, kern), full(x, kern), rtol=1e-12, atol=1e-12)
        g_ours = jax.grad(lambda x, k: jnp.sum(ours(x, k) * g), (0, 1))(x, kern)
        g_full = jax.grad(lambda x, k: jnp.sum(full(x, k) * g), (0, 1))(x, kern)
        for a, b in zip(g_ours, g_full):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
        rows = [1] if d >= hw[0] else [0, 1, 2]
        cols = [1] if d >= hw[1] else [0, 1, 2]
        dropped = np.ones((3, 3), bool)
        dropped[np.ix_(rows, cols)] = False
        assert np.all(np.asarray(g_ours[1])[dropped] == 0.0)
        jaxpr = str(jax.make_jaxpr(ours)(x, kern))
        assert ("conv_general_dilated" in jaxpr) == (groups == 1 or len(rows) * len(cols) > 1)


@pytest.mark.parametrize("conv", [Conv, CpuConv], ids=["xla", "cpu"])
@pytest.mark.parametrize("s,d,hw,cin", [(1, 1, (5, 6), 256), (2, 1, (7, 6), 256), (1, 3, (4, 9), 256),
                                        (1, 1, (5, 5), 6)])
def test_conv_with_uniform_channels_equals_conv_of_the_broadcast_concat(conv, s, d, hw, cin):
    """The ASPP bottleneck's image-pool channels (constant per image): float64 values and all
    three gradients equal the conv of the materialised [broadcast(u), x] concatenation, border
    pixels included (CpuConv at >= 256 channels: per-tap products with border masks)."""
    n_u, cout = 5, 4
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, *hw, cin)))
        u = jnp.asarray(rng.standard_normal((2, 1, 1, n_u)))
        g = jnp.asarray(rng.standard_normal((2, (hw[0] - 1) // s + 1, (hw[1] - 1) // s + 1, cout)))
        module = conv(cout, 3, s, d, use_bias=True, dtype=jnp.float64)
        v = module.init(jax.random.PRNGKey(0), x, u)
        assert v["params"]["kernel"].shape == (3, 3, n_u + cin, cout)
        kern = v["params"]["kernel"].astype(jnp.float64)
        bias = v["params"]["bias"].astype(jnp.float64) + 0.5

        def ours(x, u, kern):
            return module.apply({"params": {"kernel": kern, "bias": bias}}, x, u)

        def want(x, u, kern):
            full = jnp.concatenate([jnp.broadcast_to(u, x.shape[:3] + (n_u,)), x], -1)
            return _lax_conv(full, kern, s, d) + bias

        np.testing.assert_allclose(ours(x, u, kern), want(x, u, kern), rtol=1e-12, atol=1e-12)
        loss = lambda f: (lambda *a: jnp.sum(f(*a) * g))
        for a, b in zip(jax.grad(loss(ours), (0, 1, 2))(x, u, kern),
                        jax.grad(loss(want), (0, 1, 2))(x, u, kern)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-11)


# ----------------------------------------------------------------------- the CPU kernels
# (h, w), d: both forms -- padded buffer (2d <= min(h, w)) and per-tap shifts (partly or
# wholly out-of-bounds taps).
@pytest.mark.parametrize("hw,d", [((7, 5), 1), ((9, 9), 4), ((9, 4), 2), ((5, 9), 3), ((6, 6), 6),
                                  ((5, 9), 7), ((1, 1), 1)])
def test_depthwise_equals_grouped_conv_values_and_grads(hw, d):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, *hw, 5)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 1, 5)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, *hw, 5)), jnp.float32)
    grouped = lambda x, k: _lax_conv(x, k, 1, d, groups=5)
    np.testing.assert_allclose(depthwise_conv3x3(x, k, d), grouped(x, k), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda x, k: jnp.sum(depthwise_conv3x3(x, k, d) * g), (0, 1))(x, k)
    want = jax.grad(lambda x, k: jnp.sum(grouped(x, k) * g), (0, 1))(x, k)
    for a, b in zip(ours, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 7, 3), (1, 1, 1, 2), (1, 2, 5, 1)])
def test_resize_bilinear_2x_matches_torch(shape):
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    size = (2 * shape[1], 2 * shape[2])
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                           mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), size),
                               want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,s,d,hw,cout", [(3, 1, 1, (5, 6), 3), (3, 2, 1, (7, 7), 3),
                                           (3, 1, 4, (6, 9), 3), (1, 2, 1, (5, 5), 3),
                                           (3, 2, 2, (6, 7), 300)])
def test_wide_conv_runs_as_tap_products_equal_to_lax_conv(k, s, d, hw, cout):
    """Convs with >= TAP_PRODUCTS_MIN_CHANNELS inputs (tap products, with their written-out
    gradient: both kernel-gradient orientations, strided taps) and 1x1 convs (one product):
    float64 values and both gradients equal XLA's convolution to rounding."""
    cin = cpu_kernels.TAP_PRODUCTS_MIN_CHANNELS
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, *hw, cin)))
        g = jnp.asarray(rng.standard_normal((2, (hw[0] - 1) // s + 1, (hw[1] - 1) // s + 1, cout)))
        conv = CpuConv(cout, k, s, d, dtype=jnp.float64)
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


def test_conv_matmul_with_the_batch_sharded():
    """With the batch sharded over 8 devices the gradient is the float64 reference's (that it
    gathers no activations: benchmarks/program_budgets.py)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    assert jax.device_count() == 8  # tests/conftest.py sets 8 CPU devices
    mesh = sharding.data_mesh(jax.devices()[:8])
    rng = np.random.default_rng(6)
    xs, ws = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    x = jax.device_put(jnp.asarray(rng.standard_normal((8, 64, 256)), jnp.bfloat16), xs)
    w = jax.device_put(jnp.asarray(rng.standard_normal((256, 32)), jnp.bfloat16), ws)
    loss = lambda x, w: jnp.sum(conv_matmul(x, w, jnp.float32) ** 2)
    fn = jax.jit(jax.grad(loss, (0, 1)), out_shardings=(xs, ws))
    dx, dw = fn(x, w)
    f64 = lambda a: np.asarray(a.astype(jnp.float32), np.float64)
    y = f64(x) @ f64(w)
    np.testing.assert_allclose(f64(dw), np.einsum("bpk,bpn->kn", f64(x), 2 * y), rtol=2e-2,
                               atol=1e-2 * np.abs(f64(dw)).max())
    np.testing.assert_allclose(f64(dx), 2 * y @ f64(w).T, rtol=2e-2, atol=1e-2 * np.abs(f64(dx)).max())
