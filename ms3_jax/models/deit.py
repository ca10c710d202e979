"""DeiT-B/16 backbone with a multi-level neck for DeepLab-v3+ (paper Tab. 7, footnote 2).

The transformer is timm's `VisionTransformer` as `deit_base_patch16_224` builds it (patch 16,
width 768, depth 12, 12 heads, MLP 3072, LayerNorm eps 1e-6, class token, qkv bias, exact GELU,
no distillation token); submodule and parameter names are timm's (`blocks_3/attn/qkv` <->
`blocks.3.attn.qkv`), so `torch_format` maps weights by rule. The neck is MMSeg's
`MultiLevelNeck` on two blocks' patch tokens: a 1x1 lateral conv, a bilinear resize to stride 4
(the decoder's low-level map) and to the output stride (the ASPP's map), a 3x3 conv.
docs/choices.md, "DeiT-B: a multi-level neck for DeepLab-v3+".
"""
from __future__ import annotations

import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ms3_jax.models.resize import resize_position_table, upsample_bilinear
from ms3_jax.models.resnet import Conv, ModuleDef

LN_EPS = 1e-6  # timm's ViT / MMSeg's `norm_cfg=dict(type='LN', eps=1e-6)`
OUTPUT_STRIDES = (8, 16)
_dense_init = nn.initializers.truncated_normal(0.02)  # timm's `trunc_normal_(std=.02)`


class HeadsProj(nn.Module):
    """Linear(width) over the (head, channel) dims of [B, A, L, E]: torch `Linear` params
    (`kernel` [A*E, width], `bias`), computed without a transpose (docs/choices.md, "Attention
    written for GPUs")."""

    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxAxLxE: jax.Array) -> jax.Array:
        _, heads, _, head_dim = x_BxAxLxE.shape
        kernel = self.param("kernel", _dense_init, (heads * head_dim, self.width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.width,), jnp.float32)
        kernel_AxExD = kernel.astype(self.dtype).reshape(heads, head_dim, self.width)
        y_BxLxD = jnp.einsum("bhqe,hed->bqd", x_BxAxLxE.astype(self.dtype), kernel_AxExD)
        return y_BxLxD + bias.astype(self.dtype)


class QKV(nn.Module):
    """timm's fused `qkv` Linear as three stacked ones: `kernel` [3, D, D] (q, k, v; torch's
    [3D, D] weight), `bias` [3, D]; outputs head-major [B, A, L, E], accumulated in float32 and
    rounded once. As one fused product (or in `dtype` out) the step did not compile for H100
    (XLA's Triton GEMM, "Couldn't find output tile sizes" on the input gradient, jaxlib 0.10.2;
    docs/choices.md, "DeiT-B: a multi-level neck for DeepLab-v3+")."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        dim = x_BxLxD.shape[-1]
        heads, head_dim = self.num_heads, dim // self.num_heads
        kernel = self.param("kernel", _dense_init, (3, dim, dim), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (3, dim), jnp.float32)
        x_BxLxD = x_BxLxD.astype(self.dtype)
        kernel_3xDxAxE = kernel.astype(self.dtype).reshape(3, dim, heads, head_dim)
        bias_3xAx1xE = bias.reshape(3, heads, 1, head_dim)
        return tuple((jnp.einsum("bld,dhe->bhle", x_BxLxD, kernel_3xDxAxE[t],
                                 preferred_element_type=jnp.float32)
                      + bias_3xAx1xE[t]).astype(self.dtype) for t in range(3))


class Attention(nn.Module):
    """timm `Attention`: `qkv`, softmax in float32, `proj`."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        head_dim = x_BxLxD.shape[-1] // self.num_heads
        q_BxAxLxE, k_BxAxLxE, v_BxAxLxE = QKV(self.num_heads, self.dtype, name="qkv")(x_BxLxD)
        logits_BxAxLxL = jnp.einsum("bhqe,bhse->bhqs", q_BxAxLxE, k_BxAxLxE,
                                    preferred_element_type=jnp.float32) * head_dim ** -0.5
        weights_BxAxLxL = jax.nn.softmax(logits_BxAxLxL, axis=-1).astype(self.dtype)
        out_BxAxLxE = jnp.einsum("bhqs,bhse->bhqe", weights_BxAxLxL, v_BxAxLxE)
        return HeadsProj(x_BxLxD.shape[-1], self.dtype, name="proj")(out_BxAxLxE)


class Mlp(nn.Module):
    """timm `Mlp`: fc1 -> exact GELU -> fc2."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                                  kernel_init=_dense_init)
        h_BxLxF = jax.nn.gelu(dense(self.hidden, name="fc1")(x_BxLxD), approximate=False)
        return dense(x_BxLxD.shape[-1], name="fc2")(h_BxLxF)


class Block(nn.Module):
    """timm `Block` (pre-norm): x + attn(norm1(x)); x + mlp(norm2(x))."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        ln = functools.partial(nn.LayerNorm, epsilon=LN_EPS, dtype=self.dtype,
                               param_dtype=jnp.float32)
        x_BxLxD = x_BxLxD + Attention(self.num_heads, self.dtype, name="attn")(
            ln(name="norm1")(x_BxLxD))
        return x_BxLxD + Mlp(self.mlp_dim, self.dtype, name="mlp")(ln(name="norm2")(x_BxLxD))


class PatchEmbed(nn.Module):
    """timm `PatchEmbed`: a `proj` conv with kernel = stride = patch (XLA's native conv)."""

    dim: int
    patch: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWx3: jax.Array) -> jax.Array:
        p = self.patch
        return nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                       param_dtype=jnp.float32, name="proj")(x_BxHxWx3)


class PlainConvModule(nn.Module):
    """MMCV `ConvModule` without norm and activation (`MultiLevelNeck`'s default): a conv with
    bias, named `conv`; xavier-uniform init as the neck's `init_weights`."""

    features: int
    kernel: int
    conv: ModuleDef = Conv
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(self.features, self.kernel, use_bias=True, dtype=self.dtype,
                         kernel_init=nn.initializers.xavier_uniform(), name="conv")(x)


class MultiLevelNeck(nn.Module):
    """MMSeg `MultiLevelNeck(in_channels=[D] * n, out_channels=channels, scales)`: per input a
    1x1 lateral conv, a bilinear resize by its scale (torch's, `align_corners=False`), a 3x3
    conv. `sizes`: the output maps' (h, w), at most `scale` x the input (larger ones are cropped:
    the bottom / right rows of a padded image)."""

    channels: int
    conv: ModuleDef = Conv
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, maps: Sequence[jax.Array], scales: Sequence[int],
                 sizes: Sequence[tuple[int, int]]) -> list[jax.Array]:
        module = functools.partial(PlainConvModule, self.channels, conv=self.conv,
                                   dtype=self.dtype)
        outs = []
        for i, (x_BxGhxGwxD, scale, (h, w)) in enumerate(zip(maps, scales, sizes)):
            x = module(1, name=f"lateral_convs_{i}")(x_BxGhxGwxD)
            x = upsample_bilinear(x, scale)
            outs.append(module(3, name=f"convs_{i}")(x)[:, :h, :w])
        return outs


class DeiT(nn.Module):
    """DeiT / ViT backbone (`deeplab.Backbone`): `__call__` gives `(low, deep)` at strides 4 and
    `output_stride` (8 or 16) from the patch tokens of blocks `out_indices` through the neck;
    `features` also gives `tokens`, the final normed tokens [B, 1 + Gh*Gw, D] (timm's
    `forward_features`).

    Input: a normalised float image [B, H, W, 3] (ImageNet mean / std, as DeiT was trained).
    H, W not multiples of `patch_size` are zero-padded at the bottom / right (timm's
    `dynamic_img_pad`, MMSeg's `padding='corner'`) and the maps cropped to ceil(H / stride).
    Position embeddings are stored for the `img_size` grid and resized to other grids as timm's
    `dynamic_img_size` does (`resize.resize_position_table`). The deep map takes the final
    `norm` (MMSeg `final_norm=True`). Params float32; `dtype` is the compute dtype.
    """

    torch_format: ClassVar[str] = "timm_vit"  # timm names (`torch_format.BACKBONES`)

    output_stride: int = 8
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    num_layers: int = 12  # MMSeg's name (timm: depth; `model.depth` is the ResNet's)
    num_heads: int = 12
    mlp_dim: int = 3072
    out_indices: Sequence[int] = (2, 11)  # (low, deep); docs/choices.md
    neck_channels: int | None = None  # None: embed_dim (MMSeg's `out_channels=768`)
    dtype: Any = jnp.float32
    conv: ModuleDef = Conv

    def _check(self) -> tuple[int, int]:
        if self.output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"DeiT output_stride must be one of {OUTPUT_STRIDES}, "
                             f"got {self.output_stride}")
        if self.patch_size % self.output_stride or self.img_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must be a multiple of the output "
                             f"stride {self.output_stride} and divide img_size {self.img_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads "
                             f"{self.num_heads}")
        low, deep = tuple(self.out_indices)
        if not 0 <= low <= deep < self.num_layers:
            raise ValueError(f"out_indices {tuple(self.out_indices)} must be two block indices "
                             f"(low <= deep) below num_layers {self.num_layers}")
        return low, deep

    def __call__(self, x_BxHxWx3: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        feats = self.features(x_BxHxWx3, train)
        return feats["low"], feats["deep"]

    @nn.compact
    def features(self, x_BxHxWx3: jax.Array, train: bool = False) -> dict[str, jax.Array]:
        del train  # no dropout, no drop path, no batch statistics (docs/choices.md)
        low_index, deep_index = self._check()
        p, dim, b, height, width = self.patch_size, self.embed_dim, *x_BxHxWx3.shape[:3]
        grid_h, grid_w = -(-height // p), -(-width // p)
        x = jnp.pad(x_BxHxWx3.astype(self.dtype),
                    ((0, 0), (0, grid_h * p - height), (0, grid_w * p - width), (0, 0)))
        patches_BxGxD = PatchEmbed(dim, p, self.dtype, name="patch_embed")(x).reshape(b, -1, dim)
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, dim),
                               jnp.float32)
        native = self.img_size // p
        pos_embed = self.param("pos_embed", _dense_init, (1, 1 + native * native, dim),
                               jnp.float32)
        pos_1xLxD = resize_position_table(pos_embed, (native, native), (grid_h, grid_w))
        h_BxLxD = jnp.concatenate(
            [jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, dim)), patches_BxGxD], axis=1)
        h_BxLxD = h_BxLxD + pos_1xLxD.astype(self.dtype)
        taken = {}
        for i in range(self.num_layers):
            h_BxLxD = Block(self.num_heads, self.mlp_dim, self.dtype, name=f"blocks_{i}")(h_BxLxD)
            taken[i] = h_BxLxD
        # timm's final `norm`; on the last block's tokens only, as MMSeg's `final_norm=True`
        taken[self.num_layers - 1] = tokens = nn.LayerNorm(
            epsilon=LN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="norm")(h_BxLxD)
        grid = lambda t: t[:, 1:].reshape(b, grid_h, grid_w, dim)  # patch tokens on the grid
        strides = (4, self.output_stride)
        low, deep = MultiLevelNeck(self.neck_channels or dim, self.conv, self.dtype, name="neck")(
            [grid(taken[low_index]), grid(taken[deep_index])], [p // s for s in strides],
            [(-(-height // s), -(-width // s)) for s in strides])
        return {"tokens": tokens, "low": low, "deep": deep}
