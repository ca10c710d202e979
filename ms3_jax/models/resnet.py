"""ResNet backbone (bottleneck, torchvision / MMSegmentation layout) with dilation for dense outputs.

`variant="v1"` is torchvision's ResNet-50 (= MMSeg `ResNet`, stride on the 3x3 conv, paper 4.1);
`variant="v1c"` is MMSeg's `ResNetV1c` (3-conv deep stem, paper Tab. 7). The output stride comes
from per-stage strides and dilations exactly as MMSeg's DeepLab configs set them, including
`contract_dilation` (the first block of a dilated stage uses half the dilation).

Submodule names mirror the PyTorch names (`layer3_5/conv2` <-> `layer3.5.conv2`) so that
`ms3_jax.export` maps weights by rule, not by table.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ms3_jax.models.gemm import conv_matmul, product, row_major_batched, row_major_transpose

STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# (strides, dilations) per output stride, as in MMSeg's DeepLab / PSPNet configs.
OUTPUT_STRIDE_SETTINGS = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}

VARIANTS = ("v1", "v1c")


def batch_norm(train: bool, name: str, dtype: Any) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (torch momentum 0.1 == flax momentum 0.9, eps 1e-5)."""
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name
    )


class Conv(nn.Module):
    """`nn.Conv` with PyTorch's symmetric padding (`dilation * (kernel - 1) / 2` on each side):
    the same params (`kernel` [k, k, in / groups, out], optional `bias`), init and result.

    1x1 convolutions (stride s: every s-th pixel) run as a matrix product: XLA's CPU backend
    computes them, and above all their weight gradients (a convolution with an HxW window over
    transposed activations), 3-6x slower than the equivalent GEMM (benchmarks/RESULTS.md).
    Wide k x k convolutions run as k*k accumulated tap products (:func:`conv_as_tap_products`).
    All products go through :func:`ms3_jax.models.gemm.conv_matmul` (float32 accumulation).
    """

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

    @nn.compact
    def __call__(self, x: jax.Array, uniform_Bx1x1xU: jax.Array | None = None) -> jax.Array:
        """`uniform_Bx1x1xU`: input channels with one value per image, placed before x's (the
        ASPP image-pool branch, broadcast over the map). A wide k x k conv takes their share as
        k*k small products plus border masks (:func:`uniform_input_conv`) instead of sliding
        over U constant channels; other convs concatenate them."""
        k, s, d = self.kernel_size, self.stride, self.dilation
        n_uniform = 0 if uniform_Bx1x1xU is None else uniform_Bx1x1xU.shape[-1]
        cin = x.shape[-1] + n_uniform
        kernel = self.param("kernel", self.kernel_init, (k, k, cin // self.groups, self.features),
                            jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        taps = k > 1 and self.groups == 1 and cin >= TAP_PRODUCTS_MIN_CHANNELS
        if n_uniform and taps:
            offset = uniform_input_conv(uniform_Bx1x1xU.astype(self.dtype), kernel[:, :, :n_uniform],
                                        x.shape[1:3], s, d)
            y = conv_as_tap_products(x, kernel[:, :, n_uniform:], s, d, offset)
            return self._bias(y)
        if n_uniform:
            u = jnp.broadcast_to(uniform_Bx1x1xU.astype(self.dtype), x.shape[:3] + (n_uniform,))
            x = jnp.concatenate([u, x], axis=-1)
        if k == 1 and self.groups == 1:
            x = x[:, ::s, ::s] if s > 1 else x
            b, h, w = x.shape[:3]
            y = conv_matmul(x.reshape(b, h * w, cin), kernel.reshape(cin, self.features),
                            self.dtype).reshape(b, h, w, self.features)
        elif taps:
            y = conv_as_tap_products(x, kernel, s, d)
        else:
            pad = d * (k - 1) // 2
            y = jax.lax.conv_general_dilated(
                x, kernel, (s, s), ((pad, pad), (pad, pad)), rhs_dilation=(d, d),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        return self._bias(y)

    def _bias(self, y: jax.Array) -> jax.Array:
        if not self.use_bias:
            return y
        return y + self.param("bias", nn.initializers.zeros_init(), (self.features,),
                              jnp.float32).astype(self.dtype)


# From this many input channels a dense k x k convolution runs as tap products: at 256+ channels
# the bfloat16 GEMMs win (1.6-1.8x the convolution, forward + backward, on the benchmark CPU); at
# 64-128 channels XLA's convolution is as fast or faster (benchmarks/RESULTS.md).
TAP_PRODUCTS_MIN_CHANNELS = 256


def conv_as_tap_products(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, stride: int,
                         dilation: int, offset_BxHoxWoxF: jax.Array | None = None) -> jax.Array:
    """A dense k x k convolution with PyTorch padding as the sum over its k*k taps of (shifted,
    strided input) @ (tap weights), accumulated in float32 (float64 for float64 inputs), plus
    `offset` (in the accumulator's dtype) before the one rounding to the input dtype.

    The gradient is written out (:func:`_tap_products_bwd`) rather than left to autodiff, whose
    transpose of the k*k tap slices sums the input gradient in the input dtype (bfloat16 roundings
    after every tap) and assembles the kernel gradient from k*k padded, transposed pieces inside
    its consumer, the optimizer update (~20 ns per element on the benchmark CPU)."""
    if x_BxHxWxC.dtype != kernel_KxKxCxF.dtype:
        raise TypeError(f"conv_as_tap_products operands differ in dtype: {x_BxHxWxC.dtype} vs "
                        f"{kernel_KxKxCxF.dtype}")
    return _tap_products(x_BxHxWxC, kernel_KxKxCxF, offset_BxHoxWoxF, stride, dilation)


def uniform_input_conv(u_Bx1x1xU: jax.Array, kernel_KxKxUxF: jax.Array, hw: tuple[int, int],
                       stride: int, dilation: int) -> jax.Array:
    """The k x k conv (PyTorch zero padding) of an [H, W] map whose U channels are constant per
    image, ``[B, Ho, Wo, F]`` in the accumulator dtype: output pixel (r, c) sums the products
    ``u @ kernel[i, j]`` of the taps (i, j) that read inside the map (all but the border)."""
    k, _, n_u, _ = kernel_KxKxUxF.shape
    acc = jnp.promote_types(u_Bx1x1xU.dtype, jnp.float32)
    pad, ho, wo, _ = _tap_geometry(hw, k, stride, dilation)
    per_tap_BxKxKxF = product("bu,ijuf->bijf", u_Bx1x1xU.reshape(-1, n_u), kernel_KxKxUxF, acc)
    def inside(n_in: int, n_out: int) -> np.ndarray:  # [k, n_out]: tap i reads inside the map
        pos = np.arange(n_out)[None, :] * stride + np.arange(k)[:, None] * dilation - pad
        return ((pos >= 0) & (pos < n_in)).astype(np.float64)
    rows_KxHo, cols_KxWo = (jnp.asarray(inside(n, m), acc) for n, m in zip(hw, (ho, wo)))
    return jnp.einsum("ir,jc,bijf->brcf", rows_KxHo, cols_KxWo, per_tap_BxKxKxF,
                      precision=jax.lax.Precision.HIGHEST)


def _tap_geometry(hw: tuple[int, int], k: int, s: int, d: int):
    """For an [H, W] input: padding, output size and, per tap, the (start, stop) rows / columns
    it reads of the padded input (every s-th)."""
    pad = d * (k - 1) // 2
    h, w = hw
    ho, wo = (h + 2 * pad - d * (k - 1) - 1) // s + 1, (w + 2 * pad - d * (k - 1) - 1) // s + 1
    taps = [((i, j), (i * d, i * d + (ho - 1) * s + 1), (j * d, j * d + (wo - 1) * s + 1))
            for i in range(k) for j in range(k)]
    return pad, ho, wo, taps


def _taps_of(xp: jax.Array, taps, s: int) -> list[jax.Array]:
    b, c = xp.shape[0], xp.shape[-1]
    return [xp[:, r0:r1:s, c0:c1:s].reshape(b, -1, c) for _, (r0, r1), (c0, c1) in taps]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _tap_products(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array,
                  offset_BxHoxWoxF: jax.Array | None, stride: int, dilation: int) -> jax.Array:
    k, _, _, features = kernel_KxKxCxF.shape
    b = x_BxHxWxC.shape[0]
    pad, ho, wo, taps = _tap_geometry(x_BxHxWxC.shape[1:3], k, stride, dilation)
    xp = jnp.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    acc = jnp.promote_types(x_BxHxWxC.dtype, jnp.float32)
    y = jnp.zeros((b, ho * wo, features), acc)
    for ((i, j), _, _), tap in zip(taps, _taps_of(xp, taps, stride)):
        y = y + conv_matmul(tap, kernel_KxKxCxF[i, j], acc)
    if offset_BxHoxWoxF is not None:
        y = y + offset_BxHoxWoxF.astype(acc).reshape(y.shape)
    return y.astype(x_BxHxWxC.dtype).reshape(b, ho, wo, features)


def _tap_products_fwd(x, kernel, offset, stride, dilation):
    offset_dtype = None if offset is None else jnp.zeros((), offset.dtype)  # not the whole map
    return _tap_products(x, kernel, offset, stride, dilation), (x, kernel, offset_dtype)


def _tap_products_bwd(stride, dilation, residuals, g_BxHoxWoxF):
    """``dx``: each tap's ``g @ w_tap^T`` (a product rounded to the input dtype, as every
    product here) padded back to where the tap read (strided taps: with interior padding), the
    k*k summed in float32 and rounded once. ``dw``: the k*k products
    ``tap^T g`` stacked once (on CPU ``g^T tap``, the narrower operand copied transposed, when the
    input has more channels than the output)."""
    x, kernel, offset_dtype = residuals
    k, _, cin, features = kernel.shape
    b, h, w = x.shape[:3]
    s = stride
    pad, ho, wo, taps = _tap_geometry(x.shape[1:3], k, s, dilation)
    hp, wp = h + 2 * pad, w + 2 * pad
    acc = jnp.promote_types(x.dtype, jnp.float32)
    g_BxPxF = g_BxHoxWoxF.astype(x.dtype).reshape(b, ho * wo, features)
    tap_list = _taps_of(jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))), taps, s)
    zero = jnp.zeros((), acc)
    dxp = None
    for (i, j), (r0, r1), (c0, c1) in taps:
        dtap = product("bpn,nk->bpk", g_BxPxF, row_major_transpose(kernel[i, j]), x.dtype)
        placed = jax.lax.pad(dtap.reshape(b, ho, wo, cin).astype(acc), zero,
                             ((0, 0, 0), (r0, hp - r1, s - 1), (c0, wp - c1, s - 1), (0, 0, 0)))
        dxp = placed if dxp is None else dxp + placed
    dx = dxp[:, pad:pad + h, pad:pad + w].astype(x.dtype)
    if jax.default_backend() == "cpu" and cin > features:
        g_BxFxP = row_major_batched(g_BxPxF)  # once for all taps
        dw_TxFxC = jnp.stack([product("bnp,bpk->nk", g_BxFxP, tap, acc) for tap in tap_list])
        dw = jnp.swapaxes(dw_TxFxC, 1, 2)
    else:
        dw = jnp.stack([product("bkp,bpn->kn", row_major_batched(tap), g_BxPxF, acc)
                        for tap in tap_list])
    d_offset = None if offset_dtype is None else g_BxHoxWoxF.astype(offset_dtype.dtype)
    return dx, dw.reshape(kernel.shape).astype(kernel.dtype), d_offset


_tap_products.defvjp(_tap_products_fwd, _tap_products_bwd)


def conv(features: int, kernel: int, stride: int = 1, dilation: int = 1, *, name: str,
         dtype: Any, groups: int = 1, use_bias: bool = False) -> Conv:
    """Conv with PyTorch's padding and init (kaiming normal, fan_out); see :class:`Conv`."""
    return Conv(features, kernel, stride, dilation, groups, use_bias, dtype, name=name)


def max_pool_3x3_s2(x_BxHxWxC: jax.Array) -> jax.Array:
    """torch `MaxPool2d(3, stride=2, padding=1)`: pads with -inf, never with 'SAME' (0, 1)."""
    return nn.max_pool(x_BxHxWxC, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Bottleneck(nn.Module):
    """torchvision Bottleneck: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), projection shortcut."""

    planes: int
    stride: int = 1
    dilation: int = 1
    project: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        d = self.dtype
        y = conv(self.planes, 1, name="conv1", dtype=d)(x)
        y = nn.relu(batch_norm(train, "bn1", d)(y))
        y = conv(self.planes, 3, self.stride, self.dilation, name="conv2", dtype=d)(y)
        y = nn.relu(batch_norm(train, "bn2", d)(y))
        y = conv(self.planes * 4, 1, name="conv3", dtype=d)(y)
        y = batch_norm(train, "bn3", d)(y)
        if self.project:
            x = conv(self.planes * 4, 1, self.stride, name="downsample_0", dtype=d)(x)
            x = batch_norm(train, "downsample_1", d)(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet with a dict of features: `stem` (stride 2), `layer1` (4) ... `layer4` (OS).

    Input: a normalised float image [B, H, W, 3] (ImageNet mean/std, RGB), as torchvision and
    MMSegmentation feed their backbones.
    """

    depth: int = 50
    variant: str = "v1"
    output_stride: int = 8
    width: float = 1.0
    contract_dilation: bool = True
    stage_sizes: Sequence[int] | None = None  # overrides `depth` (tiny test models)
    dtype: Any = jnp.float32

    def _settings(self) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
        if self.variant not in VARIANTS:
            raise ValueError(f"ResNet variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.output_stride not in OUTPUT_STRIDE_SETTINGS:
            raise ValueError(
                f"output_stride must be one of {sorted(OUTPUT_STRIDE_SETTINGS)}, got {self.output_stride}")
        if self.stage_sizes is None and self.depth not in STAGE_SIZES:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}")
        sizes = tuple(self.stage_sizes) if self.stage_sizes is not None else STAGE_SIZES[self.depth]
        strides, dilations = OUTPUT_STRIDE_SETTINGS[self.output_stride]
        return sizes, strides, dilations

    @nn.compact
    def __call__(self, x_BxHxWx3: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        sizes, strides, dilations = self._settings()
        d = self.dtype
        base = max(1, round(64 * self.width))
        x = x_BxHxWx3.astype(d)
        if self.variant == "v1":
            x = conv(base, 7, 2, name="conv1", dtype=d)(x)
            x = nn.relu(batch_norm(train, "bn1", d)(x))
        else:  # v1c deep stem: torch indices 0/1 (conv, bn), 3/4, 6/7 (2, 5, 8 are ReLUs)
            for i, (ch, s) in enumerate(((base // 2, 2), (base // 2, 1), (base, 1))):
                x = conv(ch, 3, s, name=f"stem_{3 * i}", dtype=d)(x)
                x = nn.relu(batch_norm(train, f"stem_{3 * i + 1}", d)(x))
        feats = {"stem": x}
        x = max_pool_3x3_s2(x)
        in_ch = base
        for stage, (n_blocks, stride, dilation) in enumerate(zip(sizes, strides, dilations)):
            planes = base * 2 ** stage
            first_dilation = dilation // 2 if (self.contract_dilation and dilation > 1) else dilation
            for b in range(n_blocks):
                x = Bottleneck(
                    planes, stride=stride if b == 0 else 1,
                    dilation=first_dilation if b == 0 else dilation,
                    project=b == 0 and (stride != 1 or in_ch != planes * 4),
                    dtype=d, name=f"layer{stage + 1}_{b}",
                )(x, train)
                in_ch = planes * 4
            feats[f"layer{stage + 1}"] = x
        return feats
