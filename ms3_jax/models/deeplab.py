"""DeepLab-v3+ head (MMSeg `DepthwiseSeparableASPPHead`) and the MS3 image encoder.

Paper 4.1: DeepLab-v3+ on a ResNet-50, with "two 3-layer projection heads after the ASPP layer"
giving two 512-d dense embedding maps, one paired with the language embeddings T (Eq. 1/7) and one
with the visual embeddings V (Eq. 2/8). Submodule names mirror MMSegmentation's
(`aspp_modules_1/depthwise_conv/conv` <-> `aspp_modules.1.depthwise_conv.conv`) for export.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ms3_jax.models.cpu_kernels import CpuConv
from ms3_jax.models.deit import DeiT
from ms3_jax.models.resize import resize_bilinear
from ms3_jax.models.resnet import Conv, ModuleDef, ResNet, batch_norm

# RGB, 0..255 scale: what torchvision / MMSegmentation feed an exported backbone.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)

# ASPP dilations (the 1 is the 1x1 branch) per output stride, as MMSeg's DeepLab-v3+ configs.
ASPP_DILATIONS = {8: (1, 12, 24, 36), 16: (1, 6, 12, 18), 32: (1, 3, 6, 9)}


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Unit-norm along `axis`, computed in float32 or wider (pixel embeddings of Eq. 1-8 are
    cosines; float64 inputs stay float64 for the numerical tests)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


class ConvModule(nn.Module):
    """MMCV `ConvModule`: conv (no bias) -> BN -> ReLU; names `conv`, `bn`. `groups=-1`: depthwise."""

    features: int
    conv: ModuleDef
    kernel: int = 1
    dilation: int = 1
    groups: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool,
                 uniform_Bx1x1xX: jax.Array | None = None) -> jax.Array:
        """`uniform_Bx1x1xX`: channels constant over the map, before x's (see `resnet.Conv`)."""
        groups = x.shape[-1] if self.groups == -1 else self.groups
        x = self.conv(self.features, self.kernel, 1, self.dilation, groups, dtype=self.dtype,
                      name="conv")(x, uniform_Bx1x1xX)
        return batch_norm(train, "bn", self.dtype)(x, relu=True)


class SeparableConvModule(nn.Module):
    """MMCV `DepthwiseSeparableConvModule`: depthwise 3x3 ConvModule -> pointwise 1x1 ConvModule."""

    features: int
    conv: ModuleDef
    dilation: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvModule(x.shape[-1], self.conv, 3, self.dilation, groups=-1, dtype=self.dtype,
                       name="depthwise_conv")(x, train)
        return ConvModule(self.features, self.conv, dtype=self.dtype, name="pointwise_conv")(
            x, train)


class DeepLabV3PlusHead(nn.Module):
    """MMSeg `DepthwiseSeparableASPPHead` without `conv_seg`: returns `(aspp, decoder)`, the
    ASPP output (after `bottleneck`, at the output stride) and the stride-4 decoder map.

    Image pooling + 1x1 + depthwise-separable atrous branches, a 3x3 `bottleneck` (a plain
    ConvModule in MMSeg), a 48-channel projection of layer1 (`c1_bottleneck`) and two separable
    3x3 convs (`sep_bottleneck`).
    """

    channels: int = 512
    c1_channels: int = 48
    dilations: Sequence[int] = (1, 12, 24, 36)
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv

    @nn.compact
    def __call__(self, layer1: jax.Array, layer4: jax.Array, train: bool,
                 decoder: bool = True) -> tuple[jax.Array, jax.Array | None]:
        ch = self.channels
        conv_module = functools.partial(ConvModule, conv=self.conv, dtype=self.dtype)
        separable = functools.partial(SeparableConvModule, conv=self.conv, dtype=self.dtype)
        pooled = jnp.mean(layer4.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        pooled = conv_module(ch, name="image_pool_1")(pooled, train)
        outs = [conv_module(ch, name=f"aspp_modules_{i}")(layer4, train) if rate == 1
                else separable(ch, dilation=rate, name=f"aspp_modules_{i}")(layer4, train)
                for i, rate in enumerate(self.dilations)]
        # [image pool, branches]: docs/choices.md, "The ASPP image-pool channels are passed apart"
        aspp = conv_module(ch, kernel=3, name="bottleneck")(jnp.concatenate(outs, -1), train,
                                                            uniform_Bx1x1xX=pooled)
        if not decoder:
            return aspp, None
        c1 = conv_module(self.c1_channels, name="c1_bottleneck")(layer1, train)
        x = jnp.concatenate([resize_bilinear(aspp, c1.shape[1:3]), c1], axis=-1)
        x = separable(ch, name="sep_bottleneck_0")(x, train)
        return aspp, separable(ch, name="sep_bottleneck_1")(x, train)


class ProjectionHead(nn.Module):
    """Paper 4.1: 3-layer projection head (1x1 conv-BN-ReLU, 1x1 conv-BN-ReLU, 1x1 conv)."""

    hidden: int
    features: int = 512
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for i in range(2):
            x = self.conv(self.hidden, 1, dtype=self.dtype, name=f"conv_{i}")(x)
            x = batch_norm(train, f"bn_{i}", self.dtype)(x, relu=True)
        x = self.conv(self.features, 1, use_bias=True, dtype=self.dtype, name="conv_2")(x)
        return l2_normalize(x)


class FCNHead(nn.Module):
    """MMSeg `FCNHead` with `num_convs=1, concat_input=False`, the auxiliary head of paper Tab. 7:
    3x3 ConvModule (`convs_0`), dropout, 1x1 classifier (`conv_seg`); logits in float32."""

    num_classes: int
    channels: int = 256
    dropout_rate: float = 0.1
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = ConvModule(self.channels, self.conv, kernel=3, dtype=self.dtype,
                       name="convs_0")(x, train)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return self.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                         kernel_init=nn.initializers.lecun_normal(),
                         name="conv_seg")(x).astype(jnp.float32)


class Backbone(Protocol):
    """What `MS3Encoder` asks of its backbone, a flax module (:class:`ResNet`; another architecture
    is a new module and entries in `BACKBONES`, `torch_format.BACKBONES`). `__call__(x, train)`:
    normalised RGB [B, H, W, 3] -> `(low, deep)`, the maps the v3+ decoder fuses (stride 4) and the
    ASPP reads (stride `output_stride`); optional `torch_format`: its PyTorch naming (else none);
    optional `aux_feature`: the name of the map an auxiliary head reads (Tab. 7), returned third
    by `__call__(x, train, with_aux=True)`."""

    output_stride: int

    def __call__(self, x_BxHxWx3: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]: ...


class MS3Encoder(nn.Module):
    """Backbone + DeepLab-v3+ head + the language / visual projection heads (paper Fig. 1).

    Input: RGB images [B, H, W, 3] on the 0..255 scale (uint8 or float); normalised here.
    Returns a dict: `language` and `visual` [B, h, w, emb_dim] (unit norm per pixel, float32),
    `decoder` [B, H/4, W/4, channels], and `logits` [B, H/4, W/4, num_classes] when `num_classes`
    is set (CE baselines and fine-tuning); with `aux_head` also `aux_logits` from an
    :class:`FCNHead` (`auxiliary_head`, `aux_channels`) on the backbone's `aux_feature` map (Tab. 7;
    fine-tuning builds it for training only). `heads_at`: the heads read the decoder map ('decoder',
    h = H/4) or the ASPP output ('aspp', h = H/output_stride, Sec. 4.1; docs/choices.md,
    "Projection heads after the ASPP"). `backbone`: a :class:`Backbone` (variables under
    `backbone`); `dtype`: the head's compute dtype (params float32); `conv`: :func:`conv_for`.
    Called with `decoder=False` (heads at the ASPP, no classes: nothing reads the stride-4 map) it
    skips the decoder (`DECODER_MODULES`), whose variables keep their values, and returns no
    `decoder`.
    """

    backbone: Backbone
    head_channels: int = 512
    c1_channels: int = 48
    emb_dim: int = 512
    heads: Sequence[str] = ("language", "visual")
    heads_at: str = "decoder"
    num_classes: int | None = None
    dropout_rate: float = 0.1
    aux_head: bool = False
    aux_channels: int = 256
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv

    @property
    def output_stride(self) -> int:
        """Input pixels per feature pixel of the ASPP map (the backbone's output stride)."""
        return self.backbone.output_stride

    @nn.compact
    def __call__(self, images_BxHxWx3: jax.Array, train: bool = False,
                 decoder: bool = True) -> dict[str, jax.Array]:
        if not decoder and (self.heads_at != "aspp" or self.num_classes is not None):
            raise ValueError("decoder=False needs heads_at='aspp' and no num_classes (the heads or "
                             "the classifier read the decoder map)")
        f32 = jnp.float32
        x = (images_BxHxWx3.astype(f32) - jnp.asarray(IMAGENET_MEAN, f32)) / jnp.asarray(IMAGENET_STD, f32)
        if self.aux_head:
            if getattr(self.backbone, "aux_feature", None) is None or self.num_classes is None:
                raise ValueError(f"aux_head needs num_classes and a backbone with an `aux_feature` "
                                 f"map ({type(self.backbone).__name__} has none or no classes)")
            low, deep, aux = self.backbone(x, train, with_aux=True)
        else:
            low, deep = self.backbone(x, train)
        if self.heads_at not in HEADS_AT:
            raise ValueError(f"model.heads_at must be one of {HEADS_AT}, got {self.heads_at!r}")
        aspp, dec = DeepLabV3PlusHead(self.head_channels, self.c1_channels,
                                      ASPP_DILATIONS[self.backbone.output_stride], self.dtype,
                                      self.conv, name="decode_head")(low, deep, train, decoder)
        out = {} if dec is None else {"decoder": dec}
        head_in = dec if self.heads_at == "decoder" else aspp
        for head in self.heads:
            out[head] = ProjectionHead(self.head_channels, self.emb_dim, self.dtype, self.conv,
                                       name=f"proj_{head}")(head_in, train)
        if self.num_classes is not None:
            y = nn.Dropout(self.dropout_rate, deterministic=not train)(dec)
            out["logits"] = self.conv(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                                      kernel_init=nn.initializers.lecun_normal(),
                                      name="conv_seg")(y).astype(jnp.float32)
        if self.aux_head:
            out["aux_logits"] = FCNHead(self.num_classes, self.aux_channels, self.dropout_rate,
                                        self.dtype, self.conv, name="auxiliary_head")(aux, train)
        return out


MODEL_FIELDS = ("head_channels", "c1_channels", "emb_dim", "heads_at")
HEADS_AT = ("decoder", "aspp")
KERNELS = ("auto", "xla", "cpu")

# The modules of `decode_head` after the ASPP: the v3+ decoder proper (layer1 projection + fusion).
DECODER_MODULES = ("c1_bottleneck", "sep_bottleneck_0", "sep_bottleneck_1")


def untrained_subtrees(workdir_config: Mapping[str, Any]) -> tuple[tuple[str, ...], ...]:
    """Paths (in `params` / `batch_stats`) of the encoder modules a workdir's run never trained,
    from its `config.json`. An MS3 pretraining (`loss.kind='ms3'`) with `model.heads_at='aspp'`
    feeds its projection heads from the ASPP: the decoder (`DECODER_MODULES`) gets exactly zero
    gradient (weight decay only shrinks it). Fine-tuning, the CE baselines and `heads_at='decoder'`
    train the whole decode head: (). `heads_at` missing: the encoder's default, as it was built."""
    if workdir_config.get("mode") == "finetune":
        return ()
    kind = (workdir_config.get("loss") or {}).get("kind", "ms3")
    heads_at = (workdir_config.get("model") or {}).get("heads_at") or MS3Encoder.heads_at
    if kind != "ms3" or heads_at != "aspp":
        return ()
    return tuple(("decode_head", m) for m in DECODER_MODULES)


def conv_for(kernels: str, platform: str) -> ModuleDef:
    """The convolution module for `model.kernels` on `platform` (`sharding.platform_of` of the mesh,
    never the host's): 'xla' native, 'cpu' `cpu_kernels.CpuConv`, 'auto' the latter exactly on
    CPUs. docs/choices.md, "Kernels: one switch, decided from the compile target"."""
    if kernels not in KERNELS:
        raise ValueError(f"model.kernels must be one of {KERNELS}, got {kernels!r}")
    return CpuConv if kernels == "cpu" or (kernels == "auto" and platform == "cpu") else Conv


# Backbone modules by `model.backbone`, built with `dtype`, `conv` and these `model` fields.
BACKBONES = {
    "resnet": (ResNet, ("depth", "variant", "output_stride", "width", "stage_sizes")),
    "deit": (DeiT, ("output_stride", "img_size", "patch_size", "embed_dim", "num_layers",
                    "num_heads", "mlp_dim", "out_indices", "neck_channels")),  # DeiT-B/16: Tab. 7
}


def encoder_from_config(model_cfg: Any, platform: str, **overrides: Any) -> MS3Encoder:
    """Build the encoder from a config's `model` fields (`backbone`: a key of `BACKBONES`,
    'resnet' when absent; `dtype`: 'float32' or 'bfloat16'; `kernels`: see :func:`conv_for`;
    `width` scales the head's channel counts, and the ResNet's) for devices of `platform`."""
    get = model_cfg.get if hasattr(model_cfg, "get") else lambda k, d=None: getattr(model_cfg, k, d)
    kwargs = {k: get(k) for k in MODEL_FIELDS if get(k) is not None}
    for k in ("head_channels", "c1_channels", "aux_channels"):
        kwargs[k] = max(1, round(kwargs.get(k, getattr(MS3Encoder, k)) * (get("width") or 1.0)))
    dtype = get("dtype", "float32")
    if dtype not in ("float32", "bfloat16", "float64"):  # float64: numerical tests under x64
        raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    kwargs["dtype"], kwargs["conv"] = jnp.dtype(dtype), conv_for(get("kernels", "auto"), platform)
    name = get("backbone") or "resnet"
    if name not in BACKBONES:
        raise ValueError(f"model.backbone must be one of {sorted(BACKBONES)}, got {name!r}")
    module, fields = BACKBONES[name]
    backbone = module(**{k: tuple(v) if isinstance(v, list) else v for k in fields
                         if (v := get(k)) is not None}, dtype=kwargs["dtype"], conv=kwargs["conv"])
    return MS3Encoder(backbone, **{**kwargs, **overrides})
