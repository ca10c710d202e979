"""CLIP's ResNet image tower (``ModifiedResNet``) in Flax, with dense outputs (paper Tab. 5).

Tab. 5's best stage-1 row adapts CLIP's ResNet-50 (1024-d embeddings). Two views of an image, as
`clip_vision.CLIPVisionTower` gives them for the ViT: the pooled ``image_embeds`` (the mean token
through the attention pool) and the ``dense`` map at stride 32. Weights: `open_clip_format`;
docs/choices.md, "CLIP's ResNet-50 tower (Tab. 5)".
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ms3_jax.models.deeplab import resize_bilinear

Array = jax.Array

STRIDE = 32  # stem 4 (strided conv + 2x2 average pool) x 2 x 2 x 2 in layers 2-4
HEAD_WIDTH = 64  # open_clip: attention-pool heads = width * 32 // 64
DENSE_MODES = ("value", "attention")


@dataclasses.dataclass(frozen=True)
class CLIPResNetConfig:
    """Shape of CLIP's ModifiedResNet (defaults: RN50, 224 px, 1024-d output).

    ``dense``: 'value' = the attention pool's v_proj then c_proj at every location (MaskCLIP's
    form, no attention, no position embedding); 'attention' = every location's output of the
    attention pool as a query (DenseCLIP's ``AttentionPool2d``). ``num_heads`` 0: width * 32 // 64.
    """
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    proj_dim: int = 1024
    num_heads: int = 0
    image_size: int = 224
    dense: str = "value"
    bn_eps: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if not self.num_heads:
            object.__setattr__(self, "num_heads", max(1, self.embed_dim // HEAD_WIDTH))
        if len(self.layers) != 4 or min(self.layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {self.layers}")
        if self.width % 2 or self.embed_dim % self.num_heads:
            raise ValueError(f"width {self.width} must be even and width * 32 = {self.embed_dim} "
                             f"divisible by num_heads {self.num_heads}")
        if self.image_size % STRIDE:
            raise ValueError(f"image_size {self.image_size} is not a multiple of {STRIDE}")
        if self.dense not in DENSE_MODES:
            raise ValueError(f"dense must be one of {DENSE_MODES}, got {self.dense!r}")

    @property
    def embed_dim(self) -> int:
        """Channels of layer4 (the attention pool's width)."""
        return self.width * 32

    @property
    def grid_size(self) -> int:
        """Side of the native grid of the position embedding."""
        return self.image_size // STRIDE

    @property
    def output_stride(self) -> int:
        return STRIDE


def _bn(config: CLIPResNetConfig, dtype: Any, name: str) -> nn.BatchNorm:
    """torch's BatchNorm2d with its running statistics (stage 1 keeps them frozen)."""
    return nn.BatchNorm(use_running_average=True, epsilon=config.bn_eps, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


def _conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                   param_dtype=jnp.float32, name=name)


def avg_pool(x_BxHxWxC: Array, size: int) -> Array:
    """torch ``AvgPool2d(size)``: non-overlapping windows, the remainder dropped."""
    return nn.avg_pool(x_BxHxWxC, (size, size), strides=(size, size), padding="VALID")


class Bottleneck(nn.Module):
    """CLIP's anti-aliased bottleneck: stride by a 2x2 average pool after the 3x3 conv (and
    before the 1x1 conv of the shortcut), never by a strided convolution."""
    config: CLIPResNetConfig
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: Array) -> Array:
        c, dt, out = self.config, self.dtype, self.planes * 4
        h = nn.relu(_bn(c, dt, "bn1")(_conv(self.planes, 1, dt, "conv1")(x_BxHxWxC)))
        h = nn.relu(_bn(c, dt, "bn2")(_conv(self.planes, 3, dt, "conv2")(h)))
        if self.stride > 1:
            h = avg_pool(h, self.stride)
        h = _bn(c, dt, "bn3")(_conv(out, 1, dt, "conv3")(h))
        shortcut = x_BxHxWxC
        if self.stride > 1 or x_BxHxWxC.shape[-1] != out:
            if self.stride > 1:
                shortcut = avg_pool(shortcut, self.stride)
            shortcut = _bn(c, dt, "downsample_1")(_conv(out, 1, dt, "downsample_0")(shortcut))
        return nn.relu(h + shortcut)


def position_table(table_LxC: Array, grid_h: int, grid_w: int) -> Array:
    """The attention pool's position table ``[1 + g*g, C]`` (mean-token position first) at a
    ``grid_h x grid_w`` grid: the spatial part resized bilinearly (torch ``align_corners=False``,
    as DenseCLIP); the table itself at the native grid."""
    grid = int(round((table_LxC.shape[0] - 1) ** 0.5))
    if grid * grid != table_LxC.shape[0] - 1:
        raise ValueError(f"position table has {table_LxC.shape[0] - 1} positions, not a square")
    if (grid_h, grid_w) == (grid, grid):
        return table_LxC
    dim = table_LxC.shape[1]
    spatial_1xGxGxC = table_LxC[1:].reshape(1, grid, grid, dim)
    spatial_1xhxwxC = resize_bilinear(spatial_1xGxGxC, (grid_h, grid_w))
    return jnp.concatenate([table_LxC[:1], spatial_1xhxwxC.reshape(grid_h * grid_w, dim)], axis=0)


class AttentionPool(nn.Module):
    """CLIP's ``AttentionPool2d``: the mean token and the locations (+ position table) through
    one multi-head attention; c_proj maps to ``proj_dim``. Returns ``(pooled [B, proj_dim],
    dense [B, h, w, proj_dim])`` (``config.dense``), float32."""
    config: CLIPResNetConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxhxwxC: Array) -> tuple[Array, Array]:
        c, dt = self.config, self.dtype
        b, grid_h, grid_w, dim = x_BxhxwxC.shape
        heads, head_dim = c.num_heads, dim // c.num_heads
        table = self.param("positional_embedding", nn.initializers.normal(dim**-0.5),
                           (c.grid_size**2 + 1, dim), jnp.float32)
        dense = lambda n, f: nn.Dense(f, dtype=dt, param_dtype=jnp.float32, name=n)  # noqa: E731
        q_proj, k_proj, v_proj = (dense(n, dim) for n in ("q_proj", "k_proj", "v_proj"))
        c_proj = dense("c_proj", c.proj_dim)
        tokens_BxQxC = x_BxhxwxC.reshape(b, grid_h * grid_w, dim).astype(dt)
        mean_Bx1xC = jnp.mean(tokens_BxQxC.astype(jnp.float32), axis=1, keepdims=True).astype(dt)
        pos_LxC = position_table(table, grid_h, grid_w).astype(dt)
        seq_BxLxC = jnp.concatenate([mean_Bx1xC, tokens_BxQxC], axis=1) + pos_LxC
        split = lambda t: t.reshape(b, -1, heads, head_dim)  # noqa: E731
        # Only the mean token's query is needed unless every location attends ('attention').
        queries_BxLxC = seq_BxLxC if c.dense == "attention" else seq_BxLxC[:, :1]
        q_BxLxAxE = split(q_proj(queries_BxLxC))
        k_BxLxAxE, v_BxLxAxE = split(k_proj(seq_BxLxC)), split(v_proj(seq_BxLxC))
        logits_BxAxLxL = jnp.einsum("bqhe,bshe->bhqs", q_BxLxAxE, k_BxLxAxE,
                                    preferred_element_type=jnp.float32) * head_dim**-0.5
        weights_BxAxLxL = jax.nn.softmax(logits_BxAxLxL, axis=-1).astype(dt)
        out_BxLxAxE = jnp.einsum("bhqs,bshe->bqhe", weights_BxAxLxL, v_BxLxAxE)
        out_BxLxP = c_proj(out_BxLxAxE.reshape(b, -1, dim)).astype(jnp.float32)
        if c.dense == "attention":
            dense_BxQxP = out_BxLxP[:, 1:]
        else:  # v_proj then c_proj per location, on layer4's features without positions
            dense_BxQxP = c_proj(v_proj(tokens_BxQxC)).astype(jnp.float32)
        return out_BxLxP[:, 0], dense_BxQxP.reshape(b, grid_h, grid_w, c.proj_dim)


class CLIPResNetTower(nn.Module):
    """CLIP's ModifiedResNet: 3-conv stem + 2x2 average pool, four stages of anti-aliased
    bottlenecks, the attention pool (Tab. 5's ResNet50 image encoder).

    ``__call__(pixels_BxHxWxC)``: pixels normalised as CLIP's processor does (NHWC float), H and W
    multiples of 32. Returns float32 ``{"image_embeds": [B, proj_dim], "dense": [B, H/32, W/32,
    proj_dim]}``, neither normalised. BatchNorm uses the running statistics (``batch_stats``).
    """
    config: CLIPResNetConfig
    dtype: Any = jnp.float32  # compute dtype; params stay float32

    @nn.compact
    def __call__(self, pixels_BxHxWxC: Array) -> dict[str, Array]:
        c, dt = self.config, self.dtype
        if pixels_BxHxWxC.ndim != 4 or pixels_BxHxWxC.shape[-1] != 3:
            raise ValueError(f"pixels must be [B, H, W, 3] (NHWC), got {pixels_BxHxWxC.shape}")
        height, width = pixels_BxHxWxC.shape[1:3]
        if height % STRIDE or width % STRIDE:
            raise ValueError(f"input size {height}x{width} (HxW) is not a multiple of {STRIDE}")
        x = jnp.asarray(pixels_BxHxWxC, dt)
        for i, (features, stride) in enumerate(((c.width // 2, 2), (c.width // 2, 1),
                                                (c.width, 1)), start=1):
            x = nn.relu(_bn(c, dt, f"bn{i}")(_conv(features, 3, dt, f"conv{i}", stride)(x)))
        x = avg_pool(x, 2)
        for stage, blocks in enumerate(c.layers):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = Bottleneck(c, c.width * 2**stage, stride, dt,
                               name=f"layer{stage + 1}_{block}")(x)
        pooled_BxP, dense_BxhxwxP = AttentionPool(c, dt, name="attnpool")(x)
        return {"image_embeds": pooled_BxP, "dense": dense_BxhxwxP}
