"""ResNet backbone (bottleneck, torchvision / MMSegmentation layout) with dilation for dense outputs.

`variant="v1"` is torchvision's ResNet-50 (= MMSeg `ResNet`, stride on the 3x3 conv, paper 4.1);
`variant="v1c"` is MMSeg's `ResNetV1c` (3-conv deep stem, paper Tab. 7). The output stride comes
from per-stage strides and dilations exactly as MMSeg's DeepLab configs set them, including
`contract_dilation` (the first block of a dilated stage uses half the dilation).

Submodule names mirror the PyTorch names (`layer3_5/conv2` <-> `layer3.5.conv2`) so that
`ms3_jax.models.torch_format` maps weights by rule, not by table.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ms3_jax.models.norm import BatchNorm

STAGE_SIZES = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}

# (strides, dilations) per output stride, as in MMSeg's DeepLab / PSPNet configs.
OUTPUT_STRIDE_SETTINGS = {
    8: ((1, 2, 1, 1), (1, 1, 2, 4)),
    16: ((1, 2, 2, 1), (1, 1, 1, 2)),
    32: ((1, 2, 2, 2), (1, 1, 1, 1)),
}

VARIANTS = ("v1", "v1c")
ModuleDef = Callable[..., nn.Module]


def batch_norm(train: bool, name: str, dtype: Any) -> BatchNorm:
    """BatchNorm with PyTorch's defaults (torch momentum 0.1 == flax momentum 0.9, eps 1e-5);
    `(x, relu=True)` adds the ReLU (`norm.BatchNorm`)."""
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                     name=name)


class Conv(nn.Module):
    """A convolution with PyTorch's conventions, run as XLA's native convolution: symmetric
    padding ``dilation * (kernel - 1) / 2``, kaiming-normal (fan_out) init, params `kernel`
    [k, k, in / groups, out] and optional `bias` (those of `nn.Conv`). `groups == in` is a
    depthwise convolution. `cpu_kernels.CpuConv` is a plug-in for it (docs/choices.md, "Kernels:
    one switch, decided from the compile target")."""

    features: int
    kernel_size: int
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

    def kernel_param(self, cin: int) -> jax.Array:
        k = self.kernel_size
        return self.param("kernel", self.kernel_init, (k, k, cin // self.groups, self.features),
                          jnp.float32)

    def add_bias(self, y: jax.Array) -> jax.Array:
        if not self.use_bias:
            return y
        return y + self.param("bias", nn.initializers.zeros_init(), (self.features,),
                              jnp.float32).astype(self.dtype)

    @nn.compact
    def __call__(self, x: jax.Array, uniform_Bx1x1xX: jax.Array | None = None) -> jax.Array:
        """`uniform_Bx1x1xX`: input channels with one value per image (the ASPP image-pool
        branch), placed before x's and broadcast over the map."""
        if uniform_Bx1x1xX is not None:
            u = jnp.broadcast_to(uniform_Bx1x1xX, x.shape[:3] + uniform_Bx1x1xX.shape[-1:])
            x = jnp.concatenate([u.astype(x.dtype), x], axis=-1)
        kernel = self.kernel_param(x.shape[-1])
        pad = self.dilation * (self.kernel_size - 1) // 2
        rows, cols = (live_taps(self.kernel_size, self.dilation, n) for n in x.shape[1:3])
        if self.stride == 1 and (rows, cols) != (slice(None), slice(None)):
            # Taps that only ever read the zero padding are not computed: same result, exact
            # zeros for their gradients (docs/choices.md, "Taps that read only padding are not
            # computed").
            kernel, pads = kernel[rows, cols], [(0, 0) if t != slice(None) else (pad, pad)
                                                for t in (rows, cols)]
            if kernel.shape[:2] == (1, 1) and self.groups == x.shape[-1] == self.features:
                return self.add_bias(x.astype(self.dtype) * kernel[0, 0, 0].astype(self.dtype))
        else:
            pads = [(pad, pad), (pad, pad)]
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride), pads,
            rhs_dilation=(self.dilation, self.dilation),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)
        return self.add_bias(y)


def live_taps(kernel_size: int, dilation: int, n: int) -> slice:
    """The taps along one axis of a stride-1 'same'-padded window over `n` pixels that can read
    inside the map: all of them, or only the centre when the dilation is at least `n` (the ASPP's
    rate 36 on a 28-pixel map: every other tap lands in the padding, for every output pixel)."""
    if kernel_size == 1 or dilation < n:
        return slice(None)
    return slice(kernel_size // 2, kernel_size // 2 + 1)


def max_pool_3x3_s2(x_BxHxWxC: jax.Array) -> jax.Array:
    """torch `MaxPool2d(3, stride=2, padding=1)`: pads with -inf, never with 'SAME' (0, 1)."""
    return nn.max_pool(x_BxHxWxC, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class Bottleneck(nn.Module):
    """torchvision Bottleneck: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), projection shortcut."""

    planes: int
    conv: ModuleDef
    stride: int = 1
    dilation: int = 1
    project: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(batch_norm, train, dtype=self.dtype)
        y = norm("bn1")(conv(self.planes, 1, name="conv1")(x), relu=True)
        y = norm("bn2")(conv(self.planes, 3, self.stride, self.dilation, name="conv2")(y), relu=True)
        y = norm("bn3")(conv(self.planes * 4, 1, name="conv3")(y))
        if self.project:
            x = norm("downsample_1")(conv(self.planes * 4, 1, self.stride, name="downsample_0")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet backbone (`deeplab.Backbone`): `__call__` gives `(layer1, layer4)` (strides 4 and
    OS; with `with_aux` also `layer3`, MMSeg's auxiliary-head input, Tab. 7), `features` the dict
    `stem` (stride 2), `layer1` (4) ... `layer4` (OS).

    Input: a normalised float image [B, H, W, 3] (ImageNet mean/std, RGB), as torchvision and
    MMSegmentation feed their backbones. `conv`: the convolution module (:class:`Conv`, or the
    CPU plug-in `cpu_kernels.CpuConv`: same params, same numbers).
    """

    torch_format: ClassVar[str] = "resnet"  # torchvision / MMSeg names (`torch_format.BACKBONES`)
    aux_feature: ClassVar[str] = "layer3"  # MMSeg FCNHead `in_index=2` (stride 16, 8 with OS 8)

    depth: int = 50
    variant: str = "v1"
    output_stride: int = 8
    width: float = 1.0
    contract_dilation: bool = True
    stage_sizes: Sequence[int] | None = None  # overrides `depth` (tiny test models)
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv

    def _settings(self) -> tuple[Sequence[int], Sequence[int], Sequence[int]]:
        if self.variant not in VARIANTS:
            raise ValueError(f"ResNet variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.output_stride not in OUTPUT_STRIDE_SETTINGS:
            raise ValueError(f"output_stride must be one of {sorted(OUTPUT_STRIDE_SETTINGS)}, "
                             f"got {self.output_stride}")
        if self.stage_sizes is None and self.depth not in STAGE_SIZES:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_SIZES)}, got {self.depth}")
        sizes = tuple(self.stage_sizes) if self.stage_sizes is not None else STAGE_SIZES[self.depth]
        strides, dilations = OUTPUT_STRIDE_SETTINGS[self.output_stride]
        return sizes, strides, dilations

    def __call__(self, x_BxHxWx3: jax.Array, train: bool = False,
                 with_aux: bool = False) -> tuple[jax.Array, ...]:
        feats = self.features(x_BxHxWx3, train)
        if with_aux:
            return feats["layer1"], feats["layer4"], feats[self.aux_feature]
        return feats["layer1"], feats["layer4"]

    @nn.compact
    def features(self, x_BxHxWx3: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        sizes, strides, dilations = self._settings()
        conv = functools.partial(self.conv, dtype=self.dtype)
        norm = functools.partial(batch_norm, train, dtype=self.dtype)
        base = max(1, round(64 * self.width))
        x = x_BxHxWx3.astype(self.dtype)
        if self.variant == "v1":
            x = norm("bn1")(conv(base, 7, 2, name="conv1")(x), relu=True)
        else:  # v1c deep stem: torch indices 0/1 (conv, bn), 3/4, 6/7 (2, 5, 8 are ReLUs)
            for i, (ch, s) in enumerate(((base // 2, 2), (base // 2, 1), (base, 1))):
                x = norm(f"stem_{3 * i + 1}")(conv(ch, 3, s, name=f"stem_{3 * i}")(x), relu=True)
        feats = {"stem": x}
        x = max_pool_3x3_s2(x)
        in_ch = base
        for stage, (n_blocks, stride, dilation) in enumerate(zip(sizes, strides, dilations)):
            planes = base * 2 ** stage
            first_dilation = dilation // 2 if (self.contract_dilation and dilation > 1) else dilation
            for b in range(n_blocks):
                x = Bottleneck(planes, self.conv, stride=stride if b == 0 else 1,
                               dilation=first_dilation if b == 0 else dilation,
                               project=b == 0 and (stride != 1 or in_ch != planes * 4),
                               dtype=self.dtype, name=f"layer{stage + 1}_{b}")(x, train)
                in_ch = planes * 4
            feats[f"layer{stage + 1}"] = x
        return feats
