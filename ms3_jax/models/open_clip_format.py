"""open_clip checkpoints of CLIP ResNets (RN50, paper Tab. 5): both towers in and out.

Hugging Face transformers has no CLIP ResNet, so ``text.clip`` may name an open_clip state dict:
a file (.safetensors, or .pt / .pth / .bin read with ``torch.load(weights_only=True)``), a
directory in open_clip's hub layout (``open_clip_config.json``, ``open_clip_model.safetensors``
or ``open_clip_pytorch_model.bin``, optionally CLIP's tokenizer files) or ``hf-hub:<repo>``.
Shapes come from the tensors (as open_clip's ``build_model_from_openai_state_dict``); heads,
the activation and the pixel statistics from ``open_clip_config.json`` when there is one.
docs/choices.md, "CLIP's ResNet-50 tower (Tab. 5)".
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import CLIPTokenizer

from ms3_jax.models import clip_text, clip_vision
from ms3_jax.models.clip_resnet import CLIPResNetConfig, CLIPResNetTower
from ms3_jax.models.clip_text import CLIPTextConfig, CLIPTextTower

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HUB_PREFIX = "hf-hub:"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# CLIP's BPE vocabulary is the same for every OpenAI CLIP (open_clip's SimpleTokenizer too);
# used when a checkpoint has no tokenizer files beside it.
DEFAULT_TOKENIZER = "openai/clip-vit-base-patch32"
# Every published CLIP ResNet (OpenAI's; open_clip's yfcc15m / cc12m) was trained with
# QuickGELU (open_clip's pretrained table sets quick_gelu=True for them, outside the hub config):
# the text tower uses it unless open_clip_config.json says "quick_gelu": false.
_IGNORED = re.compile(r"^(logit_scale|logit_bias|attn_mask|input_resolution|context_length|"
                      r"vocab_size)$|\.num_batches_tracked$")


@dataclasses.dataclass(frozen=True)
class Src:
    """Where a Flax leaf comes from: the open_clip ``key``; ``layout`` 'plain', 'linear' (torch
    [out, in] -> [in, out]) or 'conv' (OIHW -> HWIO); ``part`` (i, n): the i-th of n equal row
    blocks (the q / k / v rows of ``in_proj_weight``)."""
    key: str
    layout: str = "plain"
    part: tuple[int, int] | None = None


def _linear(prefix: str) -> dict[str, Src]:
    return {"kernel": Src(f"{prefix}.weight", "linear"), "bias": Src(f"{prefix}.bias")}


def _norm(prefix: str) -> dict[str, Src]:
    return {"scale": Src(f"{prefix}.weight"), "bias": Src(f"{prefix}.bias")}


def _bn(prefix: str) -> tuple[dict[str, Src], dict[str, Src]]:
    """(params, batch_stats) of a BatchNorm2d."""
    return _norm(prefix), {"mean": Src(f"{prefix}.running_mean"),
                           "var": Src(f"{prefix}.running_var")}


def vision_map(config: CLIPResNetConfig) -> dict[str, dict[str, Any]]:
    """``{"params", "batch_stats"}`` trees of `CLIPResNetTower` whose leaves are `Src`."""
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    def conv_bn(tree_p, tree_s, conv: str, bn: str, torch_conv: str, torch_bn: str):
        tree_p[conv] = {"kernel": Src(f"{torch_conv}.weight", "conv")}
        tree_p[bn], tree_s[bn] = _bn(torch_bn)

    for i in (1, 2, 3):
        conv_bn(params, stats, f"conv{i}", f"bn{i}", f"visual.conv{i}", f"visual.bn{i}")
    for stage, blocks in enumerate(config.layers, start=1):
        for block in range(blocks):
            name, prefix = f"layer{stage}_{block}", f"visual.layer{stage}.{block}"
            p, s = params.setdefault(name, {}), stats.setdefault(name, {})
            for i in (1, 2, 3):
                conv_bn(p, s, f"conv{i}", f"bn{i}", f"{prefix}.conv{i}", f"{prefix}.bn{i}")
            if block == 0:  # the first block of every stage changes the width
                conv_bn(p, s, "downsample_0", "downsample_1", f"{prefix}.downsample.0",
                        f"{prefix}.downsample.1")
    pool = "visual.attnpool"
    params["attnpool"] = {"positional_embedding": Src(f"{pool}.positional_embedding"),
                          **{p: _linear(f"{pool}.{p}") for p in
                             ("q_proj", "k_proj", "v_proj", "c_proj")}}
    return {"params": params, "batch_stats": stats}


def text_map(config: CLIPTextConfig) -> dict[str, Any]:
    """`clip_text.CLIPTextTower` params with `Src` leaves (open_clip's text-tower names)."""
    tree: dict[str, Any] = {
        "token_embedding": {"embedding": Src("token_embedding.weight")},
        "position_embedding": Src("positional_embedding"),
        "final_layer_norm": _norm("ln_final"),
        "text_projection": {"kernel": Src("text_projection")},  # used as x @ P: [width, proj]
    }
    for i in range(config.num_layers):
        block = f"transformer.resblocks.{i}"
        attn = {p: {"kernel": Src(f"{block}.attn.in_proj_weight", "linear", (j, 3)),
                    "bias": Src(f"{block}.attn.in_proj_bias", "plain", (j, 3))}
                for j, p in enumerate(("q_proj", "k_proj", "v_proj"))}
        attn["out_proj"] = _linear(f"{block}.attn.out_proj")
        tree[f"layers_{i}"] = {"layer_norm1": _norm(f"{block}.ln_1"), "self_attn": attn,
                               "layer_norm2": _norm(f"{block}.ln_2"),
                               "mlp": {"fc1": _linear(f"{block}.mlp.c_fc"),
                                       "fc2": _linear(f"{block}.mlp.c_proj")}}
    return tree


def _is_src(x: Any) -> bool:
    return isinstance(x, Src)


def _from_torch(value: np.ndarray, src: Src) -> np.ndarray:
    if src.part is not None:
        i, n = src.part
        rows = value.shape[0] // n
        value = value[i * rows:(i + 1) * rows]
    if src.layout == "linear":
        return value.T
    if src.layout == "conv":
        return value.transpose(2, 3, 1, 0)
    return value


def _to_torch(value: np.ndarray, src: Src) -> np.ndarray:
    if src.layout == "linear":
        return value.T
    if src.layout == "conv":
        return value.transpose(3, 2, 0, 1)
    return value


def expected_keys(*maps: Any) -> set[str]:
    """The open_clip keys that the given maps read."""
    return {s.key for m in maps for s in jax.tree_util.tree_leaves(m, is_leaf=_is_src)}


def convert_state(state: Mapping[str, np.ndarray], tree: Any, reference: Any,
                  problems: list[str]) -> Any:
    """The Flax tree of ``tree`` (`Src` leaves) read from ``state``; shape mismatches against
    ``reference`` (a tree of ShapeDtypeStruct) and missing keys are appended to ``problems``."""

    def leaf(src: Src, ref: jax.ShapeDtypeStruct) -> np.ndarray | None:
        if src.key not in state:
            problems.append(f"missing {src.key}")
            return None
        value = _from_torch(np.asarray(state[src.key], np.float32), src)
        if value.shape != ref.shape:
            problems.append(f"{src.key}{'' if src.part is None else f' part {src.part}'}: "
                            f"{tuple(value.shape)} != expected {tuple(ref.shape)}")
        return value

    return jax.tree_util.tree_map(leaf, tree, reference, is_leaf=_is_src)


def state_from_trees(pairs: list[tuple[Any, Any]]) -> dict[str, np.ndarray]:
    """open_clip state dict (float32 numpy) from ``(Src tree, Flax tree)`` pairs; row blocks
    (``part``) are concatenated back in order."""
    out: dict[str, np.ndarray] = {}
    parts: dict[str, dict[int, np.ndarray]] = {}
    for tree, values in pairs:
        srcs = jax.tree_util.tree_leaves(tree, is_leaf=_is_src)
        arrays = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda _, v: v, tree, values, is_leaf=_is_src))
        for src, value in zip(srcs, arrays):
            # contiguous: safetensors writes a strided view's buffer as it lies in memory
            value = np.ascontiguousarray(_to_torch(np.asarray(value, np.float32), src))
            if src.part is None:
                out[src.key] = value
            else:
                parts.setdefault(src.key, {})[src.part[0]] = value
    for key, blocks in parts.items():
        out[key] = np.concatenate([blocks[i] for i in sorted(blocks)], axis=0)
    return out


def _count(state: Mapping[str, Any], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def configs_from_state(state: Mapping[str, np.ndarray], model_cfg: Mapping[str, Any] | None,
                       eos_token_id: int, dense: str = "value"
                       ) -> tuple[CLIPResNetConfig, CLIPTextConfig]:
    """Both towers' configs from the tensors' shapes; heads and the activation from open_clip's
    ``model_cfg`` when given (else head width 64; QuickGELU unless it says quick_gelu false)."""
    if "visual.attnpool.c_proj.weight" not in state:
        raise ValueError("not an open_clip CLIP ResNet: no visual.attnpool.c_proj.weight "
                         f"(keys start {sorted(state)[:5]})")
    cfg = dict(model_cfg or {})
    vision_cfg, text_cfg = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    width = int(state["visual.conv1.weight"].shape[0]) * 2
    grid = int(round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5))
    vision = CLIPResNetConfig(
        layers=tuple(_count(state, rf"visual\.layer{s}\.(\d+)\.") for s in (1, 2, 3, 4)),
        width=width, proj_dim=int(state["visual.attnpool.c_proj.weight"].shape[0]),
        num_heads=width * 32 // int(vision_cfg.get("head_width", 64)),
        image_size=grid * 32, dense=dense)
    text_width = int(state["ln_final.weight"].shape[0])
    act = "quick_gelu" if cfg.get("quick_gelu", True) else "gelu"
    text = CLIPTextConfig(
        vocab_size=int(state["token_embedding.weight"].shape[0]), width=text_width,
        num_layers=_count(state, r"transformer\.resblocks\.(\d+)\."),
        num_heads=int(text_cfg.get("heads", max(1, text_width // 64))),
        max_len=int(state["positional_embedding"].shape[0]),
        proj_dim=int(state["text_projection"].shape[1]), eos_token_id=int(eos_token_id),
        hidden_act=act, mlp_dim=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]))
    return vision, text


def abstract_variables(config: CLIPResNetConfig) -> Any:
    """Shapes of `CLIPResNetTower`'s variables at its native size."""
    pixels = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: CLIPResNetTower(config).init(jax.random.key(0), pixels))


def abstract_text_params(config: CLIPTextConfig) -> Any:
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: CLIPTextTower(config).init(jax.random.key(0), ids)["params"])


def variables_from_state(state: Mapping[str, np.ndarray], vision: CLIPResNetConfig,
                         text: CLIPTextConfig, *, source: str = "checkpoint"
                         ) -> tuple[Any, Any]:
    """(text params, image-tower variables {'params', 'batch_stats'}) as float32 numpy; every
    missing, unexpected or mis-shaped key reported in one ValueError."""
    vmap, tmap = vision_map(vision), text_map(text)
    problems: list[str] = []
    variables = convert_state(state, vmap, abstract_variables(vision), problems)
    text_params = convert_state(state, tmap, abstract_text_params(text), problems)
    known = expected_keys(vmap, tmap)
    problems += [f"unexpected {k}" for k in sorted(state)
                 if k not in known and not _IGNORED.search(k)]
    if problems:
        raise ValueError(f"open_clip weights in {source} do not match a CLIP ResNet "
                         f"({len(problems)} problems): {problems[:20]}")
    return text_params, variables


def state_from_variables(text_params: Any, variables: Any, vision: CLIPResNetConfig,
                         text: CLIPTextConfig) -> dict[str, np.ndarray]:
    """The open_clip state dict of both towers (``logit_scale`` = log(1 / 0.07), open_clip's
    init), what `variables_from_state` reads back."""
    vmap = vision_map(vision)
    state = state_from_trees([(vmap["params"], variables["params"]),
                              (vmap["batch_stats"], variables["batch_stats"]),
                              (text_map(text), text_params)])
    state["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
    return state


def read_state(path: str) -> dict[str, np.ndarray]:
    """float32 numpy tensors of a state-dict file. Pickles are read with
    ``torch.load(weights_only=True)`` only: anything needing arbitrary unpickling is refused."""
    if path.endswith(".safetensors"):
        with safe_open(path, framework="flax") as f:  # the flax reader handles bfloat16
            return {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}
    try:
        import torch  # optional dependency (the `torch` extra): only for pickled checkpoints
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch: install torch, or convert it to "
                          ".safetensors") from e
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, TorchScript archives, corrupt files
        raise ValueError(
            f"refusing to load {path}: torch.load(weights_only=True) failed ({type(e).__name__}: "
            f"{str(e)[:300]}). Only plain state dicts are read (no arbitrary unpickling); "
            "OpenAI's TorchScript RN50.pt must be converted to an open_clip state dict first"
        ) from e
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # open_clip training checkpoints
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    strip = lambda k: k[len("module."):] if k.startswith("module.") else k  # noqa: E731
    return {strip(k): v.detach().to(torch.float32).numpy() for k, v in loaded.items()
            if hasattr(v, "detach")}


def looks_like_open_clip(name: str) -> bool:
    """Whether ``text.clip`` names an open_clip checkpoint (not a Hugging Face CLIP)."""
    if name.startswith(HUB_PREFIX):
        return True
    if os.path.isfile(name):
        return True
    return os.path.isdir(name) and any(os.path.isfile(os.path.join(name, f))
                                       for f in (CONFIG_FILE,) + WEIGHT_FILES)


def _resolve(name: str, cache_dir: str | None) -> tuple[str, str]:
    """(weights file, its directory) of a file, an open_clip directory or an hf-hub repo."""
    if name.startswith(HUB_PREFIX):
        repo = name[len(HUB_PREFIX):]
        try:
            name = snapshot_download(repo, cache_dir=cache_dir, allow_patterns=[
                CONFIG_FILE, *WEIGHT_FILES, *TOKENIZER_FILES, "tokenizer.json"])
        except Exception as e:
            raise OSError(f"could not get open_clip checkpoint {repo!r} from the Hugging Face hub "
                          f"or its cache: {type(e).__name__}: {e}") from e
    if os.path.isfile(name):
        return name, os.path.dirname(os.path.abspath(name))
    for file in WEIGHT_FILES:
        if os.path.isfile(os.path.join(name, file)):
            return os.path.join(name, file), name
    raise FileNotFoundError(f"no open_clip weights in {name}: expected one of {WEIGHT_FILES}")


def load_tokenizer(directory: str) -> Any:
    """CLIP's tokenizer from files beside the checkpoint, else `DEFAULT_TOKENIZER`'s."""
    if all(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES) or \
            os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return CLIPTokenizer.from_pretrained(directory, local_files_only=True)
    return CLIPTokenizer.from_pretrained(DEFAULT_TOKENIZER)


@dataclasses.dataclass(frozen=True)
class OpenCLIP:
    """Both towers of an open_clip CLIP ResNet, loaded."""
    text_module: CLIPTextTower
    text_params: Any
    tokenizer: Any
    tower: CLIPResNetTower
    variables: Any  # {"params", "batch_stats"}
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_open_clip(name: str, dtype: Any = jnp.float32, *, text_dtype: Any = None,
                   dense: str = "value", cache_dir: str | None = None) -> OpenCLIP:
    """An open_clip CLIP ResNet (RN50 for Tab. 5) from a file, an open_clip directory or
    ``hf-hub:<repo>``. ``dtype``: the image tower's compute dtype, ``text_dtype`` the text
    tower's (default ``dtype``); params float32."""
    path, directory = _resolve(os.fspath(name), cache_dir)
    config_path = os.path.join(directory, CONFIG_FILE)
    meta: dict[str, Any] = {}
    if os.path.isfile(config_path):
        with open(config_path) as f:
            meta = json.load(f)
    tokenizer = load_tokenizer(directory)
    state = read_state(path)
    vision, text = configs_from_state(state, meta.get("model_cfg"), tokenizer.eos_token_id,
                                      dense)
    text_params, variables = variables_from_state(state, vision, text, source=path)
    preprocess = meta.get("preprocess_cfg") or {}
    mean = tuple(float(v) for v in preprocess.get("mean", clip_vision.CLIP_PIXEL_MEAN))
    std = tuple(float(v) for v in preprocess.get("std", clip_vision.CLIP_PIXEL_STD))
    to_jax = lambda tree: jax.tree_util.tree_map(jnp.asarray, tree)  # noqa: E731
    text_dtype = dtype if text_dtype is None else text_dtype
    return OpenCLIP(CLIPTextTower(text, dtype=text_dtype), to_jax(text_params), tokenizer,
                    CLIPResNetTower(vision, dtype=dtype), to_jax(variables), mean, std)


def model_cfg(vision: CLIPResNetConfig, text: CLIPTextConfig) -> dict[str, Any]:
    """open_clip's ``model_cfg`` of the two configs (``open_clip_config.json``)."""
    return {"embed_dim": vision.proj_dim, "quick_gelu": text.hidden_act == "quick_gelu",
            "vision_cfg": {"image_size": vision.image_size, "layers": list(vision.layers),
                           "width": vision.width,
                           "head_width": vision.embed_dim // vision.num_heads,
                           "patch_size": None},
            "text_cfg": {"context_length": text.max_len, "vocab_size": text.vocab_size,
                         "width": text.width, "heads": text.num_heads,
                         "layers": text.num_layers, "mlp_ratio": text.mlp_dim / text.width}}


def is_random_standin(name: str) -> bool:
    """`clip_text.is_random_standin` of the checkpoint's directory."""
    if name.startswith(HUB_PREFIX):
        return False
    directory = name if os.path.isdir(name) else os.path.dirname(os.path.abspath(name))
    return clip_text.is_random_standin(directory)
