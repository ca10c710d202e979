"""Stage 1's product, read by stage 2 and zero-shot: the adapted text model (paper Sec. 3.2).

Layout of `W/text_model/`: docs/choices.md, "Stage 1 length and outputs".
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from transformers import CLIPTokenizer

from ms3_jax.models import clip_text, clip_vision
from ms3_jax.models.clip_resnet import CLIPResNetConfig, CLIPResNetTower
from ms3_jax.models.clip_text import CLIPTextTower
from ms3_jax.models.clip_vision import CLIPVisionTower

TEXT_MODEL_DIR = "text_model"
TEXT_MODEL_META = "text_model.json"


def save_adapted_text(directory: str, module: CLIPTextTower, params: Any, tokenizer: Any,
                      ctx_MxD: Any, clip: str,
                      image_encoder: clip_vision.PixelEncoder | None = None,
                      **extra: Any) -> None:
    """``directory/params`` (orbax: ctx + tower params), tokenizer files and a json (Sec. 3.2
    output); with stage 1's CLIP ``image_encoder``, what `load_image_encoder` rebuilds it from."""

    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(directory, "params"), {"ctx": ctx_MxD, "text": params}, force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        tokenizer.save_pretrained(os.path.join(directory, "tokenizer"))
        meta = {"clip": clip, "num_ctx": int(np.shape(ctx_MxD)[0]),
                "tower": dataclasses.asdict(module.config), **extra}
        if image_encoder is not None:
            tower = image_encoder.tower
            arch = "resnet" if isinstance(tower, CLIPResNetTower) else "vit"
            meta["vision"] = {**dataclasses.asdict(tower.config), "arch": arch,
                              "mean": list(image_encoder.mean), "std": list(image_encoder.std),
                              "dtype": jnp.dtype(tower.dtype).name}
        with open(os.path.join(directory, TEXT_MODEL_META), "w") as f:
            json.dump(meta, f, indent=1)


def load_adapted_text(workdir: str, dtype: Any = jnp.float32
                      ) -> tuple[CLIPTextTower, Any, Any, jax.Array]:
    """``(module, params, tokenizer, ctx)`` of a stage-1 workdir; re-embed any class names with
    ``clip_text.encode_classes(module, params, tokenizer, names, ctx=ctx)``."""

    directory = os.path.join(os.path.abspath(workdir), TEXT_MODEL_DIR)
    meta_path = os.path.join(directory, TEXT_MODEL_META)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"no adapted text model in {workdir}: {meta_path} is missing "
                                "(run stage 1, configs/text_adapt.py, into this workdir)")
    with open(meta_path) as f:
        meta = json.load(f)
    config = clip_text.CLIPTextConfig(**meta["tower"])
    module = CLIPTextTower(config, dtype=dtype)
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_params = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    abstract = {"ctx": jax.ShapeDtypeStruct((meta["num_ctx"], config.width), jnp.float32),
                "text": abstract_params}
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
    restored = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"), abstract)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(directory, "tokenizer"),
                                              local_files_only=True)
    return module, restored["text"], tokenizer, restored["ctx"]


def load_image_encoder(workdir: str) -> clip_vision.PixelEncoder | None:
    """The stage-1 image encoder of a workdir trained with ``encoder='clip'`` (its params are the
    checkpoints' ``params['image']``; a ResNet's BatchNorm statistics their ``batch_stats``),
    from ``text_model.json``; None for ``encoder='deeplab'``."""
    path = os.path.join(os.path.abspath(workdir), TEXT_MODEL_DIR, TEXT_MODEL_META)
    with open(path) as f:
        vision = json.load(f).get("vision")
    if vision is None:
        return None
    mean, std, dtype = tuple(vision.pop("mean")), tuple(vision.pop("std")), vision.pop("dtype")
    if vision.pop("arch", "vit") == "resnet":  # CLIP's ResNet (Tab. 5)
        tower = CLIPResNetTower(CLIPResNetConfig(**vision), dtype=jnp.dtype(dtype))
    else:
        tower = CLIPVisionTower(clip_vision.CLIPVisionConfig(**vision), dtype=jnp.dtype(dtype))
    return clip_vision.PixelEncoder(tower, mean, std)
