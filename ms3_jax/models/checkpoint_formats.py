"""Baseline checkpoints as fine-tuning starts (paper Tab. 2): the layouts in which ImageNet and
self-supervised ResNets are released, recognised from the file's structure and keys.

`read_backbone_checkpoint` reads a `.pth` / `.pt` / `.safetensors` file, names its layout (a row
of `FORMATS`) and returns the backbone's weights in the names `torch_format` loads (torchvision's;
the v1c deep stem as MMSeg's `stem.0/1/3/4/6/7`). Keys of other parts (classifier, projection
heads, the momentum encoder, queues) are dropped by each layout's rule; a key that neither the
backbone nor such a rule claims is refused by name. Pickles load with `weights_only=True` only:
a file that needs anything else (a pickled class, numpy arrays) is refused, never unpickled.
docs/choices.md, "Baseline checkpoints: recognised layouts, safe loading only".
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file

# Besides tensors and containers, the one class a checkpoint may hold: argparse options, which
# PixPro (`'opt': args`) and timm's train.py (`'args'`) store beside the weights; restoring one
# sets attributes and runs no code of the file.
SAFE_GLOBALS = (argparse.Namespace,)

_OPENMMLAB_OTHER = r"^(neck|head|decode_head|auxiliary_head|data_preprocessor)\."


class CheckpointFormatError(ValueError):
    """A checkpoint file is unsafe to load, of no known layout, or has keys no rule places."""


@dataclasses.dataclass(frozen=True)
class Format:
    """One checkpoint layout: where its weights sit and which of its keys are the backbone's."""

    name: str  # shown in the log
    source: str  # the code that writes this layout
    containers: tuple[str | None, ...]  # top-level key holding the weights; None: the file itself
    prefix: str  # the backbone's keys start with it
    marker: str  # regex a key must match (the stem: a ResNet's or a ViT's patch embedding, or a
    # part only this layout has)
    dropped: str = r"^fc\."  # regex of the keys of other parts (full key, prefix included)
    author: str | None = None  # the file's 'author' field, if the layout is told apart by it


FORMATS: tuple[Format, ...] = (
    Format("MoCo v1 / v2", "facebookresearch/moco main_moco.py", ("state_dict",),
           "module.encoder_q.", r"^module\.encoder_q\.(conv1|stem|patch_embed)\.",
           r"^module\.(encoder_q\.fc\.|encoder_k\.|queue(_ptr)?$)"),
    Format("DenseCL training checkpoint", "WXinlong/DenseCL, open-mmlab/mmselfsup",
           ("state_dict",), "backbone.", r"^queue2$",
           r"^(encoder_q|encoder_k|neck|head)\.|^queue2?(_ptr)?$"),
    Format("DenseCL release", "WXinlong/DenseCL tools/extract_backbone_weights.py",
           ("state_dict",), "", r"^(conv1|stem|patch_embed)\.", author="DenseCL"),
    Format("MMSeg segmentor", "open-mmlab/mmsegmentation EncoderDecoder", ("state_dict", None),
           "backbone.", r"^decode_head\.", _OPENMMLAB_OTHER),
    Format("MMPretrain classifier", "open-mmlab/mmpretrain ImageClassifier", ("state_dict", None),
           "backbone.", r"^head\.(fc|layers)\.", _OPENMMLAB_OTHER),
    Format("OpenMMLab model with a backbone", "MMSelfSup / MMPretrain / MMSeg",
           ("state_dict", None), "backbone.", r"^backbone\.(conv1|stem|patch_embed)\.",
           _OPENMMLAB_OTHER + r"|^(encoder_k\.|queue(_ptr)?$)"),
    Format("PixPro", "zdaxie/PixPro main_pretrain.py", ("model",), "module.encoder.",
           r"^module\.encoder\.(conv1|stem|patch_embed)\.",
           r"^module\.(encoder_k|projector(_k)?|projector_instance(_k)?|predictor"
           r"|value_transform)\."),
    Format("DistributedDataParallel training checkpoint", "pytorch/examples imagenet main.py",
           ("state_dict",), "module.", r"^module\.(conv1|stem|patch_embed)\.", r"^module\.fc\."),
    Format("DeiT release", "facebookresearch/deit main.py", ("model",), "", r"^patch_embed\.",
           r"^head(_dist)?\."),
    Format("backbone-only state_dict", "open-mmlab model zoo (resnet50_v1c), MMSelfSup / "
           "OpenSelfSup extracts, timm train.py", ("state_dict",), "",
           r"^(conv1|stem|patch_embed)\."),
    Format("torchvision / timm", "pytorch/vision, huggingface/pytorch-image-models, "
           "ms3_jax.export", (None,), "", r"^(conv1|stem|patch_embed)\."),
)

# Deep stems of other libraries -> MMSeg's `stem.N` (0/3/6 convs, 1/4/7 BNs; 2/5/8 are ReLUs).
_TIMM_DEEP_STEM = ((re.compile(r"^conv1\.([0134]|6)\."), r"stem.\1."),
                   (re.compile(r"^bn1\."), "stem.7."))  # timm resnet50c / 101c `stem_type='deep'`
_CONV_MODULE_STEM = re.compile(r"^stem\.([012])\.(conv|bn)\.")  # MMPretrain ConvModule stem
_AVG_DOWN = re.compile(r"^layer\d+\.\d+\.downsample\.2\.")  # ResNet-D: pool, conv, BN


@dataclasses.dataclass(frozen=True)
class BackboneCheckpoint:
    """A checkpoint's backbone weights in `torch_format`'s names, and what was read."""

    state_dict: dict[str, np.ndarray]
    format: Format
    stem: str  # 'torchvision' (7x7 conv), 'MMSeg deep', 'timm deep', 'MMPretrain deep', 'ViT'
    dropped: int  # keys of other parts, left out

    @property
    def variant(self) -> str:
        return "v1" if self.stem == "torchvision" else "v1c"

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        """Blocks per stage, from the keys (`layer3.22.conv1.weight` -> 23 in stage 3)."""
        blocks: dict[int, int] = {}
        for k in self.state_dict:
            if m := re.match(r"^layer(\d+)\.(\d+)\.", k):
                blocks[int(m[1])] = max(blocks.get(int(m[1]), 0), int(m[2]) + 1)
        return tuple(blocks[s] for s in sorted(blocks))

    def describe(self) -> str:
        blocks = (f"{len({k.split('.')[1] for k in self.state_dict if k.startswith('blocks.')})} "
                  "transformer blocks" if self.stem == "ViT" else
                  f"{self.stem} stem, blocks per stage {self.stage_sizes}")
        return (f"{self.format.name} layout ({self.format.source}), {blocks}; {self.dropped} keys "
                "of other parts left out")


def load_checkpoint(path: str) -> Mapping[str, Any]:
    """The object in a `.safetensors` file (a dict of arrays) or a torch pickle, loaded with
    `weights_only=True` (and `SAFE_GLOBALS`); anything that needs more is refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.endswith(".safetensors"):
        return dict(load_file(path))
    try:
        import torch  # optional dependency (the `torch` extra): only for pickled files
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs PyTorch (pip install 'ms3_jax[torch]'), "
                          "or convert it to .safetensors") from e
    import pickle
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"WeightsUnpickler error: *(.*?)(\. Please|\n\n|$)", str(e), re.S)
        why = " ".join(found[1].split()) if found else str(e).splitlines()[0]
        raise CheckpointFormatError(
            f"refused {path}: loading it needs unsafe unpickling ({why}); only tensors, plain "
            "containers and argparse options are read. If you trust the file, re-save its "
            "weights alone: torch.save(torch.load(path, weights_only=False)['state_dict'], out) "
            "(or ['model'], as the layout has it)") from None
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{path} holds a {type(obj).__name__}, not a dict of weights")
    return obj


def _is_array(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _weights(obj: Mapping[str, Any], container: str | None) -> Mapping[str, Any] | None:
    sd = obj if container is None else obj.get(container)
    if not isinstance(sd, Mapping) or not sd or not all(_is_array(v) for v in sd.values()):
        return None
    return sd


def _summary(keys: list[str], limit: int = 8) -> str:
    """'encoder.* (320 keys), proj.weight': keys grouped by their first name."""
    groups: dict[str, list[str]] = {}
    for k in sorted(keys):
        groups.setdefault(k.split(".")[0], []).append(k)
    parts = [g[0] if len(g) == 1 else f"{head}.* ({len(g)} keys)" for head, g in groups.items()]
    more = f", and {len(parts) - limit} more groups" if len(parts) > limit else ""
    return ", ".join(parts[:limit]) + more


def recognise(obj: Mapping[str, Any]) -> tuple[Format, Mapping[str, Any]]:
    """The first row of `FORMATS` that `obj` (a loaded checkpoint) fits, and its weights."""
    for fmt in FORMATS:
        if fmt.author is not None and obj.get("author") != fmt.author:
            continue
        for container in fmt.containers:
            sd = _weights(obj, container)
            if sd is not None and any(re.search(fmt.marker, k) for k in sd):
                return fmt, sd
    sd = next((s for c in ("state_dict", "model", None) if (s := _weights(obj, c)) is not None),
              None)
    what = (f"could not place its keys: {_summary(list(sd))}" if sd is not None else
            f"no dict of weights at its top level (keys: {_summary(list(obj))})")
    raise CheckpointFormatError(
        f"unknown checkpoint layout, {what}. Known layouts: "
        + "; ".join(f"{f.name} ({f.source})" for f in FORMATS))


def _rename_stem(sd: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The stem in torch_format's names, and which stem the file had ('ViT': a patch embedding)."""
    if "patch_embed.proj.weight" in sd:
        return sd, "ViT"
    if "conv1.0.weight" in sd:
        out = {}
        for k, v in sd.items():
            for pattern, repl in _TIMM_DEEP_STEM:
                k = pattern.sub(repl, k)
            out[k] = v
        return out, "timm deep"
    if any(_CONV_MODULE_STEM.match(k) for k in sd):
        rename = lambda m: f"stem.{3 * int(m[1]) + (m[2] == 'bn')}."
        return {_CONV_MODULE_STEM.sub(rename, k): v for k, v in sd.items()}, "MMPretrain deep"
    return sd, "MMSeg deep" if "stem.0.weight" in sd else "torchvision"


def backbone_weights(obj: Mapping[str, Any], where: str = "checkpoint") -> BackboneCheckpoint:
    """The backbone part of a loaded checkpoint, its layout named; unplaced keys refused."""
    fmt, sd = recognise(obj)
    dropped = {k for k in sd if re.search(fmt.dropped, k)}
    unplaced = [k for k in sd if k not in dropped and not k.startswith(fmt.prefix)]
    if unplaced:
        raise CheckpointFormatError(
            f"{where} looks like the {fmt.name} layout ({fmt.source}, backbone under "
            f"{fmt.prefix or 'the top level'!r}), but {len(unplaced)} keys belong to no part it "
            f"has: {_summary(unplaced)}")
    backbone = {k[len(fmt.prefix):]: np.asarray(_to_numpy(v)) for k, v in sd.items()
                if k not in dropped}
    if avg_down := sorted(k for k in backbone if _AVG_DOWN.match(k)):
        raise CheckpointFormatError(
            f"{where} ({fmt.name} layout) is a ResNet-D (average-pool shortcut, e.g. "
            f"{avg_down[0]}; timm resnet50d, MMSeg ResNetV1d): model.variant has v1 and v1c only")
    backbone, stem = _rename_stem(backbone)
    return BackboneCheckpoint(backbone, fmt, stem, len(dropped))


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().float().numpy() if hasattr(x, "detach") else np.asarray(x)


def read_backbone_checkpoint(path: str) -> BackboneCheckpoint:
    """`backbone_weights` of the file at `path` (`load_checkpoint`)."""
    return backbone_weights(load_checkpoint(path), path)
