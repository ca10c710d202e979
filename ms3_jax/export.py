"""PyTorch interop: Flax variables <-> torchvision / MMSegmentation `state_dict`s.

The backbone exports in torchvision's ResNet naming (`conv1.weight`, `layer3.5.conv2.weight`,
`layer1.0.downsample.0.weight`; `stem.0/1/3/4/6/7.*` for v1c), which MMSegmentation's `ResNet` /
`ResNetV1c` load as `init_cfg=dict(type='Pretrained', checkpoint=...)`; the whole segmentor in
MMSeg's `EncoderDecoder` + `DepthwiseSeparableASPPHead` naming (`backbone.*`, `decode_head.*`).
Names follow from the Flax module names by one rule (`layer1_0` <-> `layer1.0`), so the table of
keys, shapes and transposes is derived from the model itself (via `jax.eval_shape`), never typed.

CLI: `python -m ms3_jax.export --workdir W --out backbone.pth` (or `.safetensors`, no torch).
`--what segmentor` refuses an MS3 pretraining with `model.heads_at='aspp'`: it never trained the
decoder. Errors the user can fix (paths, that refusal): one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from ms3_jax.engine import checkpointing, exit_codes
from ms3_jax.models.deeplab import ASPP_DILATIONS, MS3Encoder, untrained_subtrees
from ms3_jax.models.resnet import OUTPUT_STRIDE_SETTINGS, STAGE_SIZES, ResNet

# Keys that torchvision / MMSeg files carry and we deliberately do not map.
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$|^fc\.(weight|bias)$")


class StateDictError(ValueError):
    """A state_dict does not fit the model: lists every missing / unexpected / mis-shaped key."""


_HWIO_TO_OIHW, _OIHW_TO_HWIO = (3, 2, 0, 1), (2, 3, 1, 0)  # conv kernels: Flax vs torch layout


@dataclass(frozen=True)
class _Entry:
    collection: str  # 'params' or 'batch_stats'
    path: tuple[str, ...]  # path inside the collection
    torch_shape: tuple[int, ...]
    conv: bool  # a 4-D conv kernel, transposed between the two layouts

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        return np.transpose(x, _HWIO_TO_OIHW) if self.conv else x

    def from_torch(self, x: np.ndarray) -> np.ndarray:
        return np.transpose(x, _OIHW_TO_HWIO) if self.conv else x


_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def _module_to_torch(name: str) -> str:
    """`layer1_0` -> `layer1.0`, `downsample_1` -> `downsample.1`, `conv1` -> `conv1`."""
    return re.sub(r"_(\d+)$", r".\1", name)


def _walk(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _walk(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _entries(variables: Mapping[str, Any], subtrees: Mapping[str, tuple[str, ...]]) -> dict[str, _Entry]:
    """torch key -> entry, for the Flax subtrees mapped to torch prefixes (`{'backbone.': ('backbone',)}`)."""
    table: dict[str, _Entry] = {}
    for torch_prefix, flax_path in subtrees.items():
        for collection in ("params", "batch_stats"):
            sub = variables.get(collection, {})
            for p in flax_path:
                sub = sub.get(p, {}) if isinstance(sub, Mapping) else {}
            for path, leaf in _walk(sub):
                parts = [_module_to_torch(m) for m in path[:-1]] + [_LEAF[(collection, path[-1])]]
                shape, conv = tuple(leaf.shape), len(leaf.shape) == 4
                torch_shape = tuple(shape[i] for i in _HWIO_TO_OIHW) if conv else shape
                key = torch_prefix + ".".join(parts)
                table[key] = _Entry(collection, flax_path + path, torch_shape, conv)
    return table


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _export(variables: Mapping[str, Any], subtrees: Mapping[str, tuple[str, ...]]) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(e.to_torch(np.asarray(_get(variables[e.collection], e.path), np.float32)))
            for k, e in _entries(variables, subtrees).items()}


def _import(state_dict: Mapping[str, Any], template: Mapping[str, Any],
            subtrees: Mapping[str, tuple[str, ...]], what: str) -> dict[str, Any]:
    table = _entries(template, subtrees)
    arrays = {k: _to_numpy(v) for k, v in state_dict.items() if not _IGNORED.search(k)}
    missing = sorted(set(table) - set(arrays))
    unexpected = sorted(set(arrays) - set(table))
    misshaped = sorted(f"{k}: file {tuple(arrays[k].shape)} vs model {table[k].torch_shape}"
                       for k in set(table) & set(arrays) if tuple(arrays[k].shape) != table[k].torch_shape)
    problems = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
    if lines := [f"  {len(keys)} {title}: " + ", ".join(keys) for title, keys in problems if keys]:
        raise StateDictError("\n".join([f"state_dict does not fit the {what}:", *lines]))
    out: dict[str, Any] = {}
    for k, e in table.items():
        _set(out.setdefault(e.collection, {}), e.path,
             jnp.asarray(e.from_torch(arrays[k].astype(np.float32))))
    return out


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        return x.detach().cpu().float().numpy()
    return np.asarray(x)


def backbone_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Backbone weights in torchvision / MMSeg ResNet names (from a `ResNet` or `MS3Encoder`); the
    naming of v1 vs v1c follows from the model's own modules (`conv1` vs `stem.*`)."""
    subtree = ("backbone",) if "backbone" in variables.get("params", {}) else ()
    return _export(variables, {"": subtree})


def load_backbone_state_dict(state_dict: Mapping[str, Any], model: ResNet | None = None,
                             variant: str = "v1") -> dict[str, Any]:
    """Inverse of `backbone_state_dict`: torchvision / MMSeg ResNet weights -> Flax variables.
    `fc.*` and `num_batches_tracked` are ignored; every other mismatch is listed in one error."""
    model = model or ResNet(variant=variant)
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    return _import(_strip_prefix(state_dict, "backbone."), template, {"": ()},
                   f"ResNet (variant={model.variant!r})")


def load_backbone_file(path: str, encoder: MS3Encoder) -> dict[str, Any]:
    """Backbone variables for `encoder` from a torchvision / MMSeg ResNet file (.pth/.safetensors)."""
    resnet = ResNet(depth=encoder.depth, variant=encoder.variant, output_stride=encoder.output_stride,
                    width=encoder.width, stage_sizes=encoder.stage_sizes)
    return load_backbone_state_dict(read_state_dict(path), resnet)


def _segmentor_subtrees(variables: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    sub = {"backbone.": ("backbone",), "decode_head.": ("decode_head",)}
    if "conv_seg" in variables.get("params", {}):
        sub["decode_head.conv_seg."] = ("conv_seg",)
    return sub


def segmentor_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """`MS3Encoder` variables in MMSeg `EncoderDecoder` names (`backbone.*`, `decode_head.*`).
    The MS3 projection heads are not part of an MMSeg segmentor and are not exported."""
    return _export(variables, _segmentor_subtrees(variables))


def load_segmentor_state_dict(state_dict: Mapping[str, Any], model: MS3Encoder) -> dict[str, Any]:
    """MMSeg segmentor weights -> `MS3Encoder` variables (backbone, decode head, `conv_seg`).
    Returns only the mapped collections; projection heads (not in MMSeg files) are left out."""
    template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    return _import(state_dict, template, _segmentor_subtrees(template),
                   f"MS3Encoder segmentor (variant={model.variant!r})")


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    keys = [k for k in state_dict if not _IGNORED.search(k)]
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """Read a `.pth` / `.pt` (torch; unwraps MMSeg's `{'state_dict': ...}`) or `.safetensors` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no state_dict file at {path}")
    if path.endswith(".safetensors"):
        return dict(load_file(path))
    try:
        import torch  # optional dependency (the `torch` extra): only for .pth files
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading {path} needs PyTorch (pip install 'ms3_jax[torch]'), "
                          "or convert it to .safetensors") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    return {k: _to_numpy(v) for k, v in obj.items()}


def write_state_dict(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    """Write `.safetensors` (no torch needed) or a torch `.pth`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
        return
    import torch  # optional dependency (the `torch` extra): only for .pth files
    torch.save({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state_dict.items()}, path)


def mmseg_config_snippet(checkpoint: str, model_cfg: Mapping[str, Any], what: str = "backbone",
                         num_classes: int | None = None) -> str:
    """An MMSegmentation config fragment for the exported network (`model_cfg`: the workdir's
    `config.json` `model` fields): backbone type / depth / strides / dilations and, for the
    segmentor, the decode head's channels, ASPP rates and classes. A network MMSeg's ResNet
    cannot build (width != 1 or a non-standard block layout) gets an explanation instead."""
    get = lambda k, d: model_cfg.get(k) if model_cfg.get(k) is not None else d
    depth, width, sizes = int(get("depth", 50)), float(get("width", 1.0)), get("stage_sizes", None)
    standard = STAGE_SIZES.get(depth)
    if width != 1.0 or (sizes is not None and tuple(sizes) != standard):
        return (f"# No MMSegmentation config: this network is not a standard ResNet-{depth} "
                f"(width {width:g}, blocks per stage {tuple(sizes) if sizes else standard}; MMSeg's "
                f"ResNet has width 1 and {standard}).\n# The file loads into a model of this "
                "exact shape only, e.g. ms3_jax with the same config.model.\n")
    os_ = int(get("output_stride", 8))
    strides, dilations = OUTPUT_STRIDE_SETTINGS[os_]
    backbone_type = "ResNetV1c" if get("variant", "v1") == "v1c" else "ResNet"
    backbone = (f"    backbone=dict(type={backbone_type!r}, depth={depth}, num_stages=4, "
                f"out_indices=(0, 1, 2, 3),\n"
                f"                  strides={tuple(strides)}, dilations={tuple(dilations)}, "
                "contract_dilation=True,\n"
                "                  norm_cfg=dict(type='SyncBN', requires_grad=True), style='pytorch'")
    if what == "backbone":
        return ("model = dict(\n    pretrained=None,\n" + backbone + ",\n"
                f"                  init_cfg=dict(type='Pretrained', checkpoint={checkpoint!r})))\n")
    head_ch, c1_ch = int(get("head_channels", 512)), int(get("c1_channels", 48))
    classes = num_classes if num_classes is not None else "NUM_CLASSES  # of your dataset"
    return ("model = dict(\n    pretrained=None,\n" + backbone + "),\n"
            "    decode_head=dict(type='DepthwiseSeparableASPPHead', in_channels=2048, in_index=3,\n"
            f"                     channels={head_ch}, dilations={tuple(ASPP_DILATIONS[os_])}, "
            f"c1_in_channels=256, c1_channels={c1_ch},\n"
            "                     dropout_ratio=0.1, align_corners=False,\n"
            "                     norm_cfg=dict(type='SyncBN', requires_grad=True),\n"
            f"                     num_classes={classes}),\n"
            "    auxiliary_head=None)\n"
            f"load_from = {checkpoint!r}  # backbone.* + decode_head.* (conv_seg when fine-tuned)\n")


def export_workdir(workdir: str, out: str, what: str = "backbone", step: int | None = None,
                   ema: bool = False) -> dict[str, np.ndarray]:
    """Write the backbone (or segmentor) of a workdir's latest checkpoint to `out` (.pth/.safetensors).
    The segmentor of a run that never trained its decoder (`untrained_subtrees`: an MS3 pretraining
    with `model.heads_at='aspp'`) is refused: its decoder is a decayed random initialisation."""
    if what not in ("backbone", "segmentor"):
        raise ValueError(f"--what must be 'backbone' or 'segmentor', got {what!r}")
    if not out.endswith((".pth", ".pt", ".safetensors")):
        raise ValueError(f"output {out!r} must end in .pth, .pt or .safetensors")
    if what == "segmentor" and (untrained := untrained_subtrees(checkpointing.read_config(workdir))):
        raise ValueError(
            f"cannot export the segmentor of {workdir}: its decoder "
            f"({', '.join(p[-1] for p in untrained)}) was never trained, the pretraining had "
            "model.heads_at='aspp' (projection heads after the ASPP, zero gradient to the decoder); "
            "use --what backbone, or pretrain with model.heads_at='decoder'")
    step, state = checkpointing.restore_state(workdir, step)
    variables = checkpointing.encoder_variables(state, ema=ema)
    sd = backbone_state_dict(variables) if what == "backbone" else segmentor_state_dict(variables)
    write_state_dict(sd, out)
    return sd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export an ms3_jax checkpoint to PyTorch.")
    parser.add_argument("--workdir", required=True, help="pretraining / fine-tuning workdir")
    parser.add_argument("--out", required=True, help="output file: .pth (torch.save) or .safetensors")
    parser.add_argument("--what", default="backbone", choices=["backbone", "segmentor"])
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--ema", action="store_true", help="export the momentum encoder instead")
    parser.add_argument("--verbose", action="store_true", help="full tracebacks for usage errors too")
    args = parser.parse_args(argv)
    try:
        sd = export_workdir(args.workdir, args.out, args.what, args.step, args.ema)
        model_cfg = checkpointing.read_config(args.workdir).get("model", {})
    except (ValueError, FileNotFoundError) as e:  # what the user can fix: as `ms3_jax.main` does
        if args.verbose:
            raise
        print(f"error: {e}\n(exit code {exit_codes.USAGE}; --verbose shows the traceback)",
              file=sys.stderr)
        sys.exit(exit_codes.USAGE)
    num_classes = (sd["decode_head.conv_seg.weight"].shape[0]
                   if "decode_head.conv_seg.weight" in sd else None)
    print(f"wrote {len(sd)} tensors ({sum(v.size for v in sd.values()) / 1e6:.1f}M values) to {args.out}")
    print("MMSegmentation config:\n" + mmseg_config_snippet(os.path.abspath(args.out), model_cfg,
                                                            args.what, num_classes))


if __name__ == "__main__":
    main()
