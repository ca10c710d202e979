"""`python -m ms3_jax.export --workdir W --out backbone.pth` (or `.safetensors`, no torch): a
workdir's backbone (`--what segmentor`: MMSeg segmentor) for PyTorch (`models.torch_format`), with
an MMSegmentation config snippet. `--what segmentor` refuses an MS3 pretraining with
`model.heads_at='aspp'`: it never trained the decoder.

Errors the user can fix (paths, that refusal, a backbone without a PyTorch format): one line on
stderr, `error: ...`, exit code 2 (`exit_codes.usage_errors`; `--verbose`: the traceback). Checked
BEFORE any checkpoint is restored: the destination (`check_destination`: a supported extension,
an existing directory this user can write in) and the workdir (`check_workdir`: a pretraining or
fine-tuning workdir with a checkpoint step; a demo or stage-1 workdir is refused with the path
to use instead). The file is written atomically (`torch_format.write_state_dict`): a full disk leaves the
destination as it was and no temporary file behind."""
from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from ms3_jax.engine import checkpointing, exit_codes
from ms3_jax.files import safe
from ms3_jax.models.deeplab import ASPP_DILATIONS, encoder_from_config, untrained_subtrees
from ms3_jax.models.resnet import OUTPUT_STRIDE_SETTINGS, STAGE_SIZES
from ms3_jax.models.torch_format import backbone_state_dict, segmentor_state_dict, write_state_dict

SUFFIXES = (".pth", ".pt", ".safetensors")


def mmseg_config_snippet(checkpoint: str, model_cfg: Mapping[str, Any], what: str = "backbone",
                         num_classes: int | None = None) -> str:
    """An MMSegmentation config fragment for the exported network (`model_cfg`: the workdir's
    `config.json` `model` fields): backbone type / depth / strides / dilations and, for the
    segmentor, the decode head's channels, ASPP rates and classes. A network MMSeg's ResNet
    cannot build (width != 1 or a non-standard block layout) gets an explanation instead."""
    get = lambda k, d: model_cfg.get(k) if model_cfg.get(k) is not None else d
    if get("backbone", "resnet") == "deit":
        return _mmseg_deit_snippet(checkpoint, get, what, num_classes)
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


def _mmseg_deit_snippet(checkpoint: str, get: Any, what: str, num_classes: int | None) -> str:
    """MMSeg's `VisionTransformer` + `MultiLevelNeck` computing what `models/deit.py` does
    (docs/choices.md, "DeiT-B: a multi-level neck for DeepLab-v3+")."""
    dim, os_ = int(get("embed_dim", 768)), int(get("output_stride", 8))
    patch, size = int(get("patch_size", 16)), int(get("img_size", 224))
    low, deep = tuple(get("out_indices", (2, 11)))
    backbone = (f"    backbone=dict(type='VisionTransformer', img_size={size}, "
                f"patch_size={patch}, embed_dims={dim},\n"
                f"                  num_layers={int(get('num_layers', 12))}, "
                f"num_heads={int(get('num_heads', 12))}, "
                f"mlp_ratio={int(get('mlp_dim', 3072)) / dim:g}, out_indices=({low}, {deep}), "
                "qkv_bias=True,\n"
                "                  with_cls_token=True, final_norm=True, "
                "norm_cfg=dict(type='LN', eps=1e-6), interpolate_mode='bicubic'")
    if what == "backbone":
        init = f"init_cfg=dict(type='Pretrained', checkpoint={checkpoint!r})"
        return ("# timm names: convert first with MMSeg's tools/model_converters/vit2mmseg.py\n"
                "model = dict(\n    pretrained=None,\n" + backbone + ",\n"
                f"                  {init}))\n")
    neck_ch = int(get("neck_channels", None) or dim)
    classes = num_classes if num_classes is not None else "NUM_CLASSES  # of your dataset"
    return ("model = dict(\n    pretrained=None,\n" + backbone + "),\n"
            f"    neck=dict(type='MultiLevelNeck', in_channels=[{dim}, {dim}], "
            f"out_channels={neck_ch}, scales=[{patch // 4}, {patch // os_}]),\n"
            f"    decode_head=dict(type='DepthwiseSeparableASPPHead', in_channels={neck_ch}, "
            "in_index=1,\n"
            f"                     channels={int(get('head_channels', 512))}, "
            f"dilations={tuple(ASPP_DILATIONS[os_])}, c1_in_channels={neck_ch}, "
            f"c1_channels={int(get('c1_channels', 48))},\n"
            "                     dropout_ratio=0.1, align_corners=False,\n"
            "                     norm_cfg=dict(type='SyncBN', requires_grad=True),\n"
            f"                     num_classes={classes}),\n"
            "    auxiliary_head=None)\n"
            f"load_from = {checkpoint!r}  # backbone.* + neck.* + decode_head.*\n")


def check_destination(out: str) -> None:
    """One-line errors unless `out` ends in a supported extension and its directory exists and
    this user can write in it (a real write probe: read-only mounts too)."""
    if not out.endswith(SUFFIXES):
        raise ValueError(f"output {out!r} must end in .pth, .pt or .safetensors")
    if os.path.isdir(out):
        raise IsADirectoryError(f"output {out} is a directory; give a file name ending in "
                                ".pth, .pt or .safetensors")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {out}: the directory {directory} does not exist "
                                "(create it first)")
    safe.check_output_dir(directory, f"output {out}")


def check_workdir(workdir: str) -> dict[str, Any]:
    """The config of a workdir whose checkpoint the exporter can read (pretraining or fine-tuning,
    with at least one step); one-line errors otherwise, naming the workdir to use instead."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir not found: {workdir}")
    config_file = os.path.join(workdir, checkpointing.CONFIG_FILE)
    demo_pretrain = os.path.join(workdir, "pretrain")
    if (not os.path.isfile(config_file)
            and os.path.isfile(os.path.join(demo_pretrain, checkpointing.CONFIG_FILE))):
        raise ValueError(f"{workdir} is a demo workdir (its runs are in subdirectories): export "
                         f"its pretrained encoder with --workdir {demo_pretrain}")
    ckpt_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
    if not os.path.isdir(ckpt_dir) or not any(d.isdigit() for d in os.listdir(ckpt_dir)):
        raise FileNotFoundError(f"no checkpoints in {workdir}: {ckpt_dir} is missing or has no "
                                "step; export a pretraining or fine-tuning workdir that has saved one")
    config = checkpointing.read_config(workdir)  # FileNotFoundError naming config.json
    if config.get("mode") == "text_adapt":
        raise ValueError(f"{workdir} is a stage-1 (text_adapt) workdir: its checkpoint holds CLIP's "
                         "image tower and the learned context, not a DeepLab encoder; export the "
                         "pretraining workdir trained with it")
    return config


def export_workdir(workdir: str, out: str, what: str = "backbone", step: int | None = None,
                   ema: bool = False) -> dict[str, np.ndarray]:
    """Write the backbone (or segmentor) of a workdir's latest checkpoint to `out` (.pth/.safetensors).
    The segmentor of a run that never trained its decoder (`untrained_subtrees`: an MS3 pretraining
    with `model.heads_at='aspp'`) is refused: its decoder is a decayed random initialisation.
    The destination and the workdir are checked before anything is restored."""
    if what not in ("backbone", "segmentor"):
        raise ValueError(f"--what must be 'backbone' or 'segmentor', got {what!r}")
    check_destination(out)
    config = check_workdir(workdir)
    if what == "segmentor" and (untrained := untrained_subtrees(config)):
        raise ValueError(
            f"cannot export the segmentor of {workdir}: its decoder "
            f"({', '.join(p[-1] for p in untrained)}) was never trained, the pretraining had "
            "model.heads_at='aspp' (projection heads after the ASPP, zero gradient to the decoder); "
            "use --what backbone, or pretrain with model.heads_at='decoder'")
    step, state = checkpointing.restore_state(workdir, step)
    if ema and "ema_params" not in state:
        raise ValueError(f"the checkpoint of {workdir} (step {step}) has no momentum encoder "
                         "(ema_params): export it without --ema")
    variables = checkpointing.encoder_variables(state, ema=ema)
    if "backbone" not in variables["params"]:
        raise ValueError(f"the checkpoint of {workdir} (step {step}) holds no DeepLab encoder "
                         f"(params: {sorted(variables['params'])}); export a pretraining or "
                         "fine-tuning workdir")
    model = encoder_from_config(config.get("model", {}), "cpu")
    sd = (backbone_state_dict(variables, model.backbone) if what == "backbone"
          else segmentor_state_dict(variables, model))
    write_state_dict(sd, out)
    return sd


def main(argv: list[str] | None = None) -> None:
    parser = exit_codes.ArgumentParser(prog="python -m ms3_jax.export",
                                       description="Export an ms3_jax checkpoint to PyTorch.")
    parser.add_argument("--workdir", required=True, help="pretraining / fine-tuning workdir")
    parser.add_argument("--out", required=True, help="output file: .pth (torch.save) or .safetensors")
    parser.add_argument("--what", default="backbone", choices=["backbone", "segmentor"])
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--ema", action="store_true", help="export the momentum encoder instead")
    parser.add_argument("--verbose", action="store_true", help="full tracebacks for usage errors too")
    args = parser.parse_args(argv)
    with exit_codes.usage_errors(args.verbose):  # what the user can fix: one line, exit code 2
        sd = export_workdir(args.workdir, args.out, args.what, args.step, args.ema)
        model_cfg = checkpointing.read_config(args.workdir).get("model", {})
    num_classes = (sd["decode_head.conv_seg.weight"].shape[0]
                   if "decode_head.conv_seg.weight" in sd else None)
    print(f"wrote {len(sd)} tensors ({sum(v.size for v in sd.values()) / 1e6:.1f}M values) to {args.out}")
    print("MMSegmentation config:\n" + mmseg_config_snippet(os.path.abspath(args.out), model_cfg,
                                                            args.what, num_classes))


if __name__ == "__main__":
    main()
