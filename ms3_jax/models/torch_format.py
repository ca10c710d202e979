"""PyTorch `state_dict`s (and files) <-> Flax variables of the image encoder. A backbone names
its format by `torch_format` (a key of `BACKBONES`; none: refused): 'resnet' is torchvision's
(`layer3.5.conv2.weight`, v1c `stem.0/1/3/4/6/7.*`; MMSeg's `ResNet` / `ResNetV1c` load it);
'timm_vit' is timm's `VisionTransformer` (DeiT: `blocks.3.attn.qkv.weight`; `timm_vit_to_mmseg`
gives MMSeg's names). The segmentor has MMSeg's `EncoderDecoder` names (`backbone.*`, `neck.*`,
`decode_head.*`). Keys follow from the Flax module names by rule (`layer1_0` <-> `layer1.0`),
shapes from the model (`jax.eval_shape`)."""
from __future__ import annotations

import functools
import logging
import operator
import os
import re
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save

from ms3_jax.files import safe
from ms3_jax.models import checkpoint_formats
from ms3_jax.models.resnet import STAGE_SIZES

# Keys that torchvision / timm / MMSeg files carry and we deliberately do not map (classifiers).
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$|^(fc|head)\.(weight|bias)$")


class StateDictError(ValueError):
    """A state_dict does not fit the model: lists every missing / unexpected / mis-shaped key."""


# Flax -> torch axis order of a `kernel` by its rank: conv [J, J, C, F] -> [F, C, J, J]; dense
# [in, out] -> Linear [out, in]; T stacked dense [T, in, out] -> [T, out, in], then one Linear of
# T x out outputs (timm's fused `qkv`, kept apart in Flax: deit.QKV). A [T, out] `bias` is that
# Linear's [T x out].
_KERNEL_PERM = {4: (3, 2, 0, 1), 2: (1, 0), 3: (0, 2, 1)}


class _Entry(NamedTuple):
    path: tuple[str, ...]  # (collection, *path inside it)
    torch_shape: tuple[int, ...]
    perm: tuple[int, ...] | None  # Flax -> torch axis order (None: same layout)
    shape: tuple[int, ...]  # Flax shape


def _torch_layout(leaf_name: str, shape: tuple[int, ...]
                  ) -> tuple[tuple[int, ...] | None, tuple[int, ...]]:
    """(axis order, torch shape) of a Flax leaf (see `_KERNEL_PERM`)."""
    perm = _KERNEL_PERM.get(len(shape)) if leaf_name == "kernel" else None
    moved = tuple(shape[i] for i in perm) if perm else shape
    stacked = len(shape) == {"kernel": 3, "bias": 2}.get(leaf_name)
    return perm, (moved[0] * moved[1], *moved[2:]) if stacked else moved


_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
         ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _module_to_torch(name: str) -> str:
    """`layer1_0` -> `layer1.0`, `downsample_1` -> `downsample.1`, `conv1` -> `conv1`."""
    return re.sub(r"_(\d+)$", r".\1", name)


# A backbone's child module of this name is MMSeg's neck (the DeiT's `MultiLevelNeck`): exported
# with the segmentor as `neck.*`, never in the backbone's own state dict (timm has no neck).
NECK = "neck"


def _timm_vit(name: str) -> str | None:
    """timm `VisionTransformer` names (`blocks_3` -> `blocks.3`; `cls_token`, `pos_embed`,
    `patch_embed.proj`, `norm`); the neck is not part of it (None)."""
    return None if name == NECK else _module_to_torch(name)


Naming = Callable[[str], "str | None"]  # Flax module name -> torch module name (None: not mapped)
BACKBONES: dict[str, Naming] = {"resnet": _module_to_torch,  # by a backbone's `torch_format`
                                "timm_vit": _timm_vit}


def backbone_naming(backbone: nn.Module) -> Naming:
    """The torch naming of `backbone`'s variables, from its `torch_format`; a clear error if none."""
    fmt = getattr(backbone, "torch_format", None)
    if fmt not in BACKBONES:
        raise ValueError(f"backbone {type(backbone).__name__} has no PyTorch format (torch_format="
                         f"{fmt!r}, known: {sorted(BACKBONES)}): no state_dict to export or load")
    return BACKBONES[fmt]


# timm `VisionTransformer` -> MMSeg `VisionTransformer` key prefixes, as MMSeg's
# tools/model_converters/vit2mmseg.py renames them ({i}: a block index); other keys (`cls_token`,
# `pos_embed`) are the same in both, timm's `head.*` has no MMSeg counterpart.
_TIMM_VIT_TO_MMSEG = (
    ("norm.", "ln1."),
    ("patch_embed.proj.", "patch_embed.projection."),
    ("blocks.{i}.norm1.", "layers.{i}.ln1."),
    ("blocks.{i}.norm2.", "layers.{i}.ln2."),
    ("blocks.{i}.attn.qkv.", "layers.{i}.attn.attn.in_proj_"),
    ("blocks.{i}.attn.proj.", "layers.{i}.attn.attn.out_proj."),
    ("blocks.{i}.mlp.fc1.", "layers.{i}.ffn.layers.0.0."),
    ("blocks.{i}.mlp.fc2.", "layers.{i}.ffn.layers.1."),
)


def _prefix_pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def _rename(state_dict: Mapping[str, Any], pairs: Any) -> dict[str, Any]:
    out = {}
    for k, v in state_dict.items():
        for src, dst in pairs:
            if m := _prefix_pattern(src).match(k):
                k = dst.format(i=m.groupdict().get("i")) + k[m.end():]
                break
        out[k] = v
    return out


def timm_vit_to_mmseg(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """timm `VisionTransformer` (DeiT) keys -> MMSeg `VisionTransformer` keys, the mapping of
    MMSeg's `vit2mmseg.py` (`blocks.3.attn.qkv.weight` -> `layers.3.attn.attn.in_proj_weight`,
    `norm.*` -> `ln1.*`, `head.*` dropped); the values are the same arrays."""
    return _rename({k: v for k, v in state_dict.items() if not k.startswith("head")},
                   _TIMM_VIT_TO_MMSEG)


def mmseg_vit_to_timm(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`timm_vit_to_mmseg` (MMSeg `VisionTransformer` -> timm keys)."""
    return _rename(state_dict, [(dst, src) for src, dst in _TIMM_VIT_TO_MMSEG])


# Backbone key renames between our torch format and MMSeg's backbone of the same architecture
# (to MMSeg, from MMSeg), applied to `backbone.*` of a segmentor; none: the names are MMSeg's.
_MMSEG_BACKBONE_KEYS = {"timm_vit": (timm_vit_to_mmseg, mmseg_vit_to_timm)}


def _backbone_keys(state_dict: Mapping[str, Any], backbone: nn.Module, direction: int
                   ) -> dict[str, Any]:
    """`backbone.*` keys of a segmentor state dict renamed to (0) / from (1) MMSeg's names."""
    rename = _MMSEG_BACKBONE_KEYS.get(getattr(backbone, "torch_format", None))
    if rename is None:
        return dict(state_dict)
    inner = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    rest = {k: v for k, v in state_dict.items() if not k.startswith("backbone.")}
    return {**{"backbone." + k: v for k, v in rename[direction](inner).items()}, **rest}


Subtrees = Mapping[str, tuple[tuple[str, ...], Naming]]  # torch prefix -> (Flax path, naming)


def _entries(variables: Mapping[str, Any], subtrees: Subtrees) -> dict[str, _Entry]:
    """torch key -> entry, for the Flax subtrees mapped to torch prefixes (`{'backbone.': (('backbone',), naming)}`)."""
    table: dict[str, _Entry] = {}
    for torch_prefix, (flax_path, naming) in subtrees.items():
        for collection in ("params", "batch_stats"):
            sub = variables.get(collection, {})
            for p in flax_path:
                sub = sub.get(p, {}) if isinstance(sub, Mapping) else {}
            for path, leaf in traverse_util.flatten_dict(sub).items():
                modules = [naming(m) for m in path[:-1]]
                if None in modules:
                    continue
                # Params outside the table (a ViT's `cls_token`, `pos_embed`) keep their names.
                parts = modules + [_LEAF.get((collection, path[-1]), path[-1])]
                perm, torch_shape = _torch_layout(path[-1], tuple(leaf.shape))
                table[torch_prefix + ".".join(parts)] = _Entry(
                    (collection, *flax_path, *path), torch_shape, perm, tuple(leaf.shape))
    return table


def _export(variables: Mapping[str, Any], subtrees: Subtrees) -> dict[str, np.ndarray]:
    out = {}
    for k, e in _entries(variables, subtrees).items():
        x = np.asarray(functools.reduce(operator.getitem, e.path, variables), np.float32)
        x = np.transpose(x, e.perm) if e.perm else x
        out[k] = np.ascontiguousarray(x.reshape(e.torch_shape))
    return out


def _import(state_dict: Mapping[str, Any], template: Mapping[str, Any], subtrees: Subtrees,
            what: str) -> dict[str, Any]:
    table = _entries(template, subtrees)
    arrays = {k: _to_numpy(v) for k, v in state_dict.items() if not _IGNORED.search(k)}
    missing = sorted(set(table) - set(arrays))
    unexpected = sorted(set(arrays) - set(table))
    misshaped = sorted(f"{k}: file {tuple(arrays[k].shape)} vs model {table[k].torch_shape}"
                       for k in set(table) & set(arrays) if tuple(arrays[k].shape) != table[k].torch_shape)
    problems = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
    if lines := [f"  {len(keys)} {title}: " + ", ".join(keys) for title, keys in problems if keys]:
        raise StateDictError("\n".join([f"state_dict does not fit the {what}:", *lines]))
    def to_flax(x: np.ndarray, e: _Entry) -> np.ndarray:
        if e.perm is None:
            return x.reshape(e.shape)
        return np.transpose(x.reshape([e.shape[i] for i in e.perm]), np.argsort(e.perm))
    return traverse_util.unflatten_dict({e.path: jnp.asarray(
        to_flax(arrays[k].astype(np.float32), e)) for k, e in table.items()})


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x)  # torch.Tensor


def _template(model: nn.Module) -> Any:
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, False), jnp.zeros((1, 32, 32, 3)))


def backbone_state_dict(variables: Mapping[str, Any], backbone: nn.Module) -> dict[str, np.ndarray]:
    """Backbone weights in `backbone`'s PyTorch naming, from its variables or an encoder's (for
    ResNet the naming of v1 vs v1c follows from the model's own modules: `conv1` vs `stem.*`)."""
    subtree = ("backbone",) if "backbone" in variables.get("params", {}) else ()
    return _export(variables, {"": (subtree, backbone_naming(backbone))})


def load_backbone_state_dict(state_dict: Mapping[str, Any], backbone: nn.Module) -> dict[str, Any]:
    """Inverse of `backbone_state_dict`: PyTorch weights (e.g. torchvision / MMSeg ResNet) -> Flax
    variables of `backbone`. `fc.*` and `num_batches_tracked` are ignored; every other mismatch is
    listed in one error."""
    naming = {"": ((), backbone_naming(backbone))}
    return _import(_strip_prefix(state_dict, "backbone."), _template(backbone), naming,
                   f"{type(backbone).__name__} backbone")


def load_backbone_file(path: str, encoder: nn.Module) -> dict[str, Any]:
    """Backbone variables for `encoder` (an `MS3Encoder`) from a PyTorch checkpoint (.pth / .pt /
    .safetensors) of any layout `checkpoint_formats.FORMATS` recognises (named in the log)."""
    ckpt = checkpoint_formats.read_backbone_checkpoint(path)
    logging.info("%s: %s", path, ckpt.describe())
    backbone = encoder.backbone
    variant = getattr(backbone, "variant", None)
    if variant is not None and variant != ckpt.variant:
        raise StateDictError(f"{path} holds a {ckpt.variant} ResNet ({ckpt.stem} stem) but "
                             f"model.variant={variant!r}: set model.variant={ckpt.variant!r}")
    sizes = getattr(backbone, "stage_sizes", None) or STAGE_SIZES.get(getattr(backbone, "depth", 0))
    if sizes is not None and tuple(sizes) != ckpt.stage_sizes:
        depth = {v: k for k, v in STAGE_SIZES.items()}.get(ckpt.stage_sizes)
        fix = f"model.depth={depth}" if depth else f"model.stage_sizes={ckpt.stage_sizes}"
        raise StateDictError(f"{path} has blocks per stage {ckpt.stage_sizes}, the model "
                             f"{tuple(sizes)}: set {fix}")
    return load_backbone_state_dict(ckpt.state_dict, encoder.backbone)


def _segmentor_subtrees(variables: Mapping[str, Any], backbone: nn.Module) -> Subtrees:
    sub = {"backbone.": (("backbone",), backbone_naming(backbone)),
           "decode_head.": (("decode_head",), _module_to_torch)}
    if NECK in variables.get("params", {}).get("backbone", {}):
        sub["neck."] = (("backbone", NECK), _module_to_torch)
    if "conv_seg" in variables.get("params", {}):
        sub["decode_head.conv_seg."] = (("conv_seg",), _module_to_torch)
    return sub


def segmentor_state_dict(variables: Mapping[str, Any], model: nn.Module) -> dict[str, np.ndarray]:
    """`MS3Encoder` variables in MMSeg `EncoderDecoder` names (`backbone.*`, `neck.*` for a
    DeiT's `MultiLevelNeck`, `decode_head.*`; a DeiT's backbone keys as MMSeg's
    `VisionTransformer`). The MS3 projection heads are not part of an MMSeg segmentor and are
    not exported."""
    sd = _export(variables, _segmentor_subtrees(variables, model.backbone))
    return _backbone_keys(sd, model.backbone, 0)


def load_segmentor_state_dict(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Any]:
    """MMSeg segmentor weights -> `MS3Encoder` variables (backbone, decode head, `conv_seg`).
    Returns only the mapped collections; projection heads (not in MMSeg files) are left out."""
    template = _template(model)
    state_dict = _backbone_keys(state_dict, model.backbone, 1)
    return _import(state_dict, template, _segmentor_subtrees(template, model.backbone),
                   f"MS3Encoder segmentor ({type(model.backbone).__name__} backbone)")


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    keys = [k for k in state_dict if not _IGNORED.search(k)]
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a `.pth` / `.pt` (torch, `weights_only`; unwraps `{'state_dict': ...}`) or
    `.safetensors` file as it is (`checkpoint_formats.read_backbone_checkpoint` reads layouts)."""
    obj = checkpoint_formats.load_checkpoint(path)
    if isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    return {k: _to_numpy(v) for k, v in obj.items()}


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Write `.safetensors` (no torch needed) or a torch `.pth` / `.pt` (float32 tensors)
    atomically (`safe.atomic_output`): whole or not at all. The free space is checked first; a
    write error (a full disk) names the file and keeps its errno."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    safe.check_free_space(directory, sum(int(np.asarray(v).size) * 4 for v in state_dict.values()),
                          path)
    try:
        with safe.atomic_output(path, "wb") as f:
            if path.endswith(".safetensors"):
                f.write(save({k: np.ascontiguousarray(v) for k, v in state_dict.items()}))
            else:
                import torch  # optional dependency (the `torch` extra): only for .pth files
                torch.save({k: torch.from_numpy(np.array(v, dtype=np.float32))
                            for k, v in state_dict.items()}, f)
    except OSError as e:
        if e.filename or path in str(e):
            raise
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}; nothing was written (a "
                               "file already there is unchanged)") from e
