"""ResNet backbone (bottleneck, torchvision / MMSegmentation layout) with dilation for dense outputs.

`variant="v1"` is torchvision's ResNet-50 (= MMSeg `ResNet`, stride on the 3x3 conv, paper 4.1);
`variant="v1c"` is MMSeg's `ResNetV1c` (3-conv deep stem, paper Tab. 7). The output stride comes
from per-stage strides and dilations exactly as MMSeg's DeepLab configs set them, including
`contract_dilation` (the first block of a dilated stage uses half the dilation).

Submodule names mirror the PyTorch names (`layer3_5/conv2` <-> `layer3.5.conv2`) so that
`ms3_jax.export` maps weights by rule, not by table.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ms3_jax.models.gemm import conv_matmul

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
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, d, cin = self.kernel_size, self.stride, self.dilation, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, cin // self.groups, self.features),
                            jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if k == 1 and self.groups == 1:
            x = x[:, ::s, ::s] if s > 1 else x
            b, h, w = x.shape[:3]
            y = conv_matmul(x.reshape(b, h * w, cin), kernel.reshape(cin, self.features),
                            self.dtype).reshape(b, h, w, self.features)
        elif self.groups == 1 and cin >= TAP_PRODUCTS_MIN_CHANNELS:
            y = conv_as_tap_products(x, kernel, s, d)
        else:
            pad = d * (k - 1) // 2
            y = jax.lax.conv_general_dilated(
                x, kernel, (s, s), ((pad, pad), (pad, pad)), rhs_dilation=(d, d),
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,),
                               jnp.float32).astype(self.dtype)
        return y


# From this many input channels a dense k x k convolution runs as tap products: at 256+ channels
# the bfloat16 GEMMs win (1.6-1.8x the convolution, forward + backward, on the benchmark CPU); at
# 64-128 channels XLA's convolution is as fast or faster (benchmarks/RESULTS.md).
TAP_PRODUCTS_MIN_CHANNELS = 256


def conv_as_tap_products(x_BxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, stride: int,
                         dilation: int) -> jax.Array:
    """A dense k x k convolution with PyTorch padding as the sum over its k*k taps of (shifted,
    strided input) @ (tap weights), accumulated in float32 (float64 for float64 inputs)."""
    k, _, cin, features = kernel_KxKxCxF.shape
    s, d = stride, dilation
    pad = d * (k - 1) // 2
    b, h, w = x_BxHxWxC.shape[:3]
    ho, wo = (h + 2 * pad - d * (k - 1) - 1) // s + 1, (w + 2 * pad - d * (k - 1) - 1) // s + 1
    xp = jnp.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    acc = jnp.promote_types(x_BxHxWxC.dtype, jnp.float32)
    y = jnp.zeros((b, ho * wo, features), acc)
    for i in range(k):
        for j in range(k):
            tap = xp[:, i * d: i * d + (ho - 1) * s + 1: s, j * d: j * d + (wo - 1) * s + 1: s]
            y = y + conv_matmul(tap.reshape(b, ho * wo, cin), kernel_KxKxCxF[i, j], acc)
    return y.astype(x_BxHxWxC.dtype).reshape(b, ho, wo, features)


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
