"""CLIP vision tower in Flax (``transformers.CLIPVisionModelWithProjection``), real-weight loading.

Two views of an image (Sec. 3.2): the global ``image_embeds`` (``CLIPModel.get_image_features``)
and ``dense`` per-patch embeddings (DenseCLIP). docs/design.md, "CLIP towers"; docs/choices.md,
"Pixel embeddings from CLIP's ViT".
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from ms3_jax.models import clip_text as ct
from ms3_jax.models.deeplab import l2_normalize

Array = jax.Array
Params = dict[str, Any]

# Checkpoint keys of the vision tower of a CLIPModel / CLIPVisionModelWithProjection.
_VISION_KEY_PREFIXES = ("vision_model.", "visual_projection.")
_IGNORED_KEYS = ("vision_model.embeddings.position_ids",)  # a non-persistent buffer in old checkpoints
_BICUBIC_A = -0.75  # torch's (and so transformers') cubic convolution coefficient
# CLIPImageProcessor's defaults (OpenAI CLIP's training statistics), used when a checkpoint
# directory has no preprocessor_config.json (the tiny stand-ins; hub snapshots have one).
CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Shape of the CLIP vision tower (defaults: OpenAI ViT-B/32; ViT-B/16 is ``patch_size=16``).
    ``mlp_dim`` is ``intermediate_size``; the native ``image_size`` gives a ``grid_size``² grid."""
    width: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    patch_size: int = 32
    image_size: int = 224
    proj_dim: int = 512
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3

    def __post_init__(self):
        ct.check_block_shape(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, hf_config: Any) -> "CLIPVisionConfig":
        """From a transformers ``CLIPConfig`` / ``CLIPVisionConfig``, a config dict or a config.json path.

        A full ``CLIPModel`` config: ``vision_config`` and the top-level ``projection_dim``. Dicts
        are parsed by transformers' config classes (missing keys: ``from_pretrained``' defaults)."""
        if isinstance(hf_config, (str, os.PathLike)):
            with open(hf_config) as f:
                hf_config = json.load(f)
        if isinstance(hf_config, Mapping):
            model_type = hf_config.get("model_type")
            if model_type not in (None, "clip", "clip_vision_model"):
                raise ValueError(f"not a CLIP vision config: model_type {model_type!r} "
                                 "(expected 'clip' or 'clip_vision_model')")
            is_full = "vision_config" in hf_config or model_type == "clip"
            config_cls = transformers.CLIPConfig if is_full else transformers.CLIPVisionConfig
            hf_config = config_cls.from_dict(dict(hf_config))
        vision = getattr(hf_config, "vision_config", hf_config)  # the vision part of a CLIPConfig
        if not hasattr(vision, "patch_size"):
            raise ValueError(f"not a CLIP vision config: {type(vision).__name__} has no patch_size")
        return cls(width=int(vision.hidden_size), num_layers=int(vision.num_hidden_layers),
                   num_heads=int(vision.num_attention_heads), mlp_dim=int(vision.intermediate_size),
                   patch_size=int(vision.patch_size), image_size=int(vision.image_size),
                   proj_dim=int(hf_config.projection_dim),
                   layer_norm_eps=float(vision.layer_norm_eps), hidden_act=str(vision.hidden_act),
                   num_channels=int(vision.num_channels))


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Weights ``[..., 4]`` of the taps at offsets -1, 0, 1, 2 for fractional positions ``t``."""
    a = _BICUBIC_A
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` float64 matrix of torch's 1-D bicubic resize (``align_corners=False``).

    Source position ``(o + 0.5) * in / out - 0.5``, taps clamped at the borders. At
    ``in == out`` it is exactly the identity (the weights at ``t = 0`` are 0, 1, 0, 0).
    """
    src_O = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
    floor_O = np.floor(src_O)
    weights_Ox4 = _cubic_weights(src_O - floor_O)
    taps_Ox4 = np.clip(floor_O[:, None].astype(np.int64) + np.arange(-1, 3), 0, in_size - 1)
    matrix_OxI = np.zeros((out_size, in_size))
    np.add.at(matrix_OxI, (np.repeat(np.arange(out_size), 4), taps_Ox4.ravel()), weights_Ox4.ravel())
    return matrix_OxI


def interpolate_position_embedding(table_LxD: Array, grid_h: int, grid_w: int) -> Array:
    """Position table ``[1 + g*g, D]`` (class position first) resized to a ``grid_h x grid_w`` grid.

    The class position is kept; the patch part is resized as transformers'
    ``interpolate_pos_encoding`` does (torch bicubic, ``align_corners=False``, no antialiasing).
    Returns ``[1 + grid_h*grid_w, D]``; the table itself at the native grid.
    """
    num_patches, dim = table_LxD.shape[0] - 1, table_LxD.shape[1]
    grid = int(round(num_patches ** 0.5))
    if grid * grid != num_patches:
        raise ValueError(f"position table has {num_patches} patch positions, not a square grid")
    if (grid_h, grid_w) == (grid, grid):
        return table_LxD
    rows_HxG = jnp.asarray(_bicubic_matrix(grid, grid_h), table_LxD.dtype)
    cols_WxG = jnp.asarray(_bicubic_matrix(grid, grid_w), table_LxD.dtype)
    patch_GxGxD = table_LxD[1:].reshape(grid, grid, dim)
    patch_HxWxD = jnp.einsum("hy,wx,yxd->hwd", rows_HxG, cols_WxG, patch_GxGxD,
                             precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([table_LxD[:1], patch_HxWxD.reshape(grid_h * grid_w, dim)], axis=0)


class CLIPVisionTower(nn.Module):
    """CLIP ViT image encoder + projection (``CLIPVisionModelWithProjection``) with dense outputs.

    ``__call__(pixels_BxHxWxC)`` takes pixels normalised as ``CLIPProcessor`` does (NHWC float);
    H and W must be multiples of ``patch_size``. Returns float32
    ``{"image_embeds": [B, proj_dim], "dense": [B, H/p, W/p, proj_dim]}``, neither normalised.
    """
    config: CLIPVisionConfig
    dtype: Any = jnp.float32  # compute dtype; params stay float32

    def setup(self):
        c, dtypes = self.config, {"dtype": self.dtype, "param_dtype": jnp.float32}
        self.patch_embedding = nn.Conv(c.width, (c.patch_size, c.patch_size),
                                       strides=(c.patch_size, c.patch_size), padding="VALID",
                                       use_bias=False, **dtypes)
        self.class_embedding = self.param("class_embedding", nn.initializers.normal(c.width**-0.5),
                                          (c.width,), jnp.float32)
        self.position_embedding = self.param("position_embedding", nn.initializers.normal(0.02),
                                             (c.grid_size**2 + 1, c.width), jnp.float32)
        self.pre_layrnorm = nn.LayerNorm(epsilon=c.layer_norm_eps, **dtypes)  # transformers' spelling
        self.layers = [ct.ResidualBlock(c, self.dtype, causal=False) for _ in range(c.num_layers)]
        self.post_layernorm = nn.LayerNorm(epsilon=c.layer_norm_eps, **dtypes)
        self.visual_projection = nn.Dense(c.proj_dim, use_bias=False, **dtypes)

    def __call__(self, pixels_BxHxWxC: Array) -> dict[str, Array]:
        c = self.config
        if pixels_BxHxWxC.ndim != 4 or pixels_BxHxWxC.shape[-1] != c.num_channels:
            raise ValueError(f"pixels must be [B, H, W, {c.num_channels}] (NHWC), "
                             f"got shape {tuple(pixels_BxHxWxC.shape)}")
        b, height, width, _ = pixels_BxHxWxC.shape
        if height % c.patch_size or width % c.patch_size:
            raise ValueError(f"input size {height}x{width} (HxW) is not a multiple of the patch "
                             f"size {c.patch_size}")
        grid_h, grid_w = height // c.patch_size, width // c.patch_size
        patches_BxGhxGwxD = self.patch_embedding(jnp.asarray(pixels_BxHxWxC, self.dtype))
        patches_BxGxD = patches_BxGhxGwxD.reshape(b, grid_h * grid_w, c.width)  # row-major, as torch
        cls_Bx1xD = jnp.broadcast_to(self.class_embedding.astype(self.dtype), (b, 1, c.width))
        pos_LxD = interpolate_position_embedding(self.position_embedding, grid_h, grid_w)
        h_BxLxD = jnp.concatenate([cls_Bx1xD, patches_BxGxD], axis=1) + pos_LxD.astype(self.dtype)
        h_BxLxD = self.pre_layrnorm(h_BxLxD)
        for layer in self.layers:
            h_BxLxD = layer(h_BxLxD)
        # post_layernorm is per token: on every token it equals transformers' LN of the class token,
        # and it is DenseCLIP's treatment of the patch tokens.
        emb_BxLxC = self.visual_projection(self.post_layernorm(h_BxLxD)).astype(jnp.float32)
        return {"image_embeds": emb_BxLxC[:, 0],
                "dense": emb_BxLxC[:, 1:].reshape(b, grid_h, grid_w, c.proj_dim)}


@dataclasses.dataclass(frozen=True)
class PixelEncoder:
    """A CLIP image tower as a pixel encoder with ``MS3Encoder``'s interface (stage 1's image
    encoder, zero-shot from a stage-1 workdir): uint8 RGB [B, H, W, 3] in (normalised with
    ``mean`` / ``std`` as ``CLIPProcessor`` does), ``{"language": unit dense embeddings [B, h, w,
    C]}`` out. ``tower``: this module's ViT (``output_stride`` = its patch size) or
    ``clip_resnet.CLIPResNetTower`` (stride 32, Tab. 5). ``variables``: ``{"params"}``, plus
    ``"batch_stats"`` for the ResNet (its frozen BatchNorm statistics)."""
    tower: nn.Module
    mean: tuple[float, ...] = CLIP_PIXEL_MEAN
    std: tuple[float, ...] = CLIP_PIXEL_STD

    @property
    def output_stride(self) -> int:
        config = self.tower.config
        return int(getattr(config, "output_stride", None) or config.patch_size)

    def apply(self, variables: Mapping[str, Any], images_BxHxWx3: Array, train: bool = False
              ) -> dict[str, Array]:
        del train  # no dropout; the ResNet's BatchNorm statistics stay frozen
        pixels = normalize_pixels(images_BxHxWx3, self.mean, self.std, self.tower.dtype)
        tower_variables = {k: v for k, v in variables.items()
                           if k == "params" or (k == "batch_stats" and v)}
        dense_BxhxwxC = self.tower.apply(tower_variables, pixels)["dense"]
        return {"language": l2_normalize(dense_BxhxwxC)}


def hf_param_map(config: CLIPVisionConfig) -> dict[str, Any]:
    """Flax param tree whose leaves are ``(hf_key, transpose)``: the explicit name mapping.

    Torch Linear weights ``[out, in]`` become Dense kernels ``[in, out]``; the patch Conv2d
    weight ``[out, in, kh, kw]`` becomes the Flax Conv kernel ``[kh, kw, in, out]``.
    """
    emb = "vision_model.embeddings"
    return {
        "patch_embedding": {"kernel": (f"{emb}.patch_embedding.weight", True)},
        "class_embedding": (f"{emb}.class_embedding", False),
        "position_embedding": (f"{emb}.position_embedding.weight", False),
        "pre_layrnorm": ct.layer_norm_keys("vision_model.pre_layrnorm"),
        "post_layernorm": ct.layer_norm_keys("vision_model.post_layernorm"),
        "visual_projection": {"kernel": ("visual_projection.weight", True)},
        **ct.block_keys("vision_model.encoder.layers", config.num_layers),
    }


def params_from_hf_state(state: Mapping[str, Any], config: CLIPVisionConfig, *,
                         source: str = "checkpoint") -> Params:
    """Flax params (float32 numpy) from a transformers state dict of numpy arrays
    (`clip_text.convert_hf_state`); keys outside the vision tower (text tower, ``logit_scale``)
    are ignored."""
    pixels = jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32)
    reference = jax.eval_shape(lambda: CLIPVisionTower(config).init(jax.random.key(0), pixels)["params"])
    return ct.convert_hf_state(state, hf_param_map(config), reference, _is_vision_key, "vision",
                               source)


def _is_vision_key(key: str) -> bool:
    return key.startswith(_VISION_KEY_PREFIXES) and key not in _IGNORED_KEYS


checkpoint_dir = ct.checkpoint_dir


def load_clip_vision(name_or_path: str | os.PathLike, dtype: Any = jnp.float32, *,
                     cache_dir: str | None = None) -> tuple[CLIPVisionTower, dict[str, Params]]:
    """Load a CLIP vision tower: ``(module, variables)``, ``variables = {"params": float32 params}``.

    ``name_or_path``: a local directory holding a ``CLIPModel`` or ``CLIPVisionModelWithProjection``
    (config.json, model.safetensors or pytorch_model.bin), or a hub id such as
    "openai/clip-vit-base-patch16" (resolved as ``clip_text.load_clip_text`` does).
    ``module.apply(variables, pixels_BxHxWx3)`` returns ``{"image_embeds", "dense"}``.
    """
    ckpt_dir = checkpoint_dir(name_or_path, cache_dir)
    config_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in CLIP checkpoint directory {ckpt_dir}")
    config = CLIPVisionConfig.from_hf(config_path)
    state, weights_path = ct.read_weights(ckpt_dir, _is_vision_key)
    if not state:
        raise ValueError(f"no CLIP vision-tower weights ({'*, '.join(_VISION_KEY_PREFIXES)}*) in "
                         f"{weights_path}: is it a text-only checkpoint?")
    params = jax.tree_util.tree_map(jnp.asarray, params_from_hf_state(state, config, source=weights_path))
    return CLIPVisionTower(config, dtype=dtype), {"params": params}


def pixel_statistics(name_or_path: str | os.PathLike, *, cache_dir: str | None = None
                     ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(image_mean, image_std)`` of a checkpoint's preprocessor_config.json (per channel, for
    pixels in [0, 1]); ``CLIP_PIXEL_MEAN`` / ``CLIP_PIXEL_STD`` when it has none, as
    ``CLIPImageProcessor()`` would use."""
    path = os.path.join(checkpoint_dir(name_or_path, cache_dir), PREPROCESSOR_FILE)
    if not os.path.isfile(path):
        return CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
    with open(path) as f:
        processor = json.load(f)
    stats = []
    for key, default in (("image_mean", CLIP_PIXEL_MEAN), ("image_std", CLIP_PIXEL_STD)):
        value = processor.get(key, default)
        value = [value] * 3 if np.isscalar(value) else value
        if len(value) != 3:
            raise ValueError(f"{path}: {key} must have 3 values (RGB), got {value!r}")
        stats.append(tuple(float(v) for v in value))
    return stats[0], stats[1]


def normalize_pixels(images_BxHxWx3: Array, mean: tuple[float, ...], std: tuple[float, ...],
                     dtype: Any = jnp.float32) -> Array:
    """uint8 (or 0..255 float) RGB -> ``(x / 255 - mean) / std``, as ``CLIPProcessor`` does."""
    mean_C = jnp.asarray(mean, jnp.float32) * 255.0
    scale_C = 1.0 / (jnp.asarray(std, jnp.float32) * 255.0)
    return ((jnp.asarray(images_BxHxWx3, jnp.float32) - mean_C) * scale_C).astype(dtype)
