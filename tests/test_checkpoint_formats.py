"""Baseline checkpoints as fine-tuning starts (Tab. 2): each released layout, rebuilt on a tiny
ResNet as the public code writes it, saved to a real file, recognised by name and loaded to the
same values; unknown layouts, unplaced keys and unsafe pickles refused."""
import argparse
import logging
import pickle

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ms3_jax.models import checkpoint_formats, torch_format
from ms3_jax.models.deeplab import encoder_from_config
from ms3_jax.testing.torch_reference import TorchResNet, randomize_

SIZES = (1, 2, 1, 1)


def encoder(variant):
    return encoder_from_config({"variant": variant, "width": 0.125, "stage_sizes": list(SIZES),
                                "emb_dim": 8}, "cpu")


def reference(variant):
    """torchvision / MMSeg names (`conv1` or `stem.N`), random weights and BN statistics."""
    return dict(randomize_(TorchResNet(variant=variant, base=8, stage_sizes=SIZES),
                           seed=3).state_dict())


def prefixed(prefix, sd):
    return {prefix + k: v for k, v in sd.items()}


def no_fc(sd):
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def timm_deep_stem(sd):
    """timm `stem_type='deep'` (resnet50c): conv1.0/1/3/4/6 and the last BN as bn1."""
    names = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.",
             "stem.4.": "conv1.4.", "stem.6.": "conv1.6.", "stem.7.": "bn1."}
    return {next((new + k[len(old):] for old, new in names.items() if k.startswith(old)), k): v
            for k, v in sd.items()}


def mmpretrain_stem(sd):
    """MMPretrain's deep stem: three ConvModules, stem.{0,1,2}.{conv,bn}."""
    def rename(k):
        if not k.startswith("stem."):
            return k
        i, rest = k.split(".", 2)[1:]
        return f"stem.{int(i) // 3}.{'conv' if int(i) % 3 == 0 else 'bn'}.{rest}"
    return {rename(k): v for k, v in sd.items()}


def moco(sd):
    """facebookresearch/moco main_moco.py: DDP names, the MLP head as fc.0 / fc.2, encoder_k,
    the queue; epoch, arch, optimizer beside."""
    body = no_fc(sd)
    weights = {**prefixed("module.encoder_q.", body), **prefixed("module.encoder_k.", body),
               "module.encoder_q.fc.0.weight": torch.zeros(4, 4),
               "module.encoder_q.fc.0.bias": torch.zeros(4),
               "module.encoder_q.fc.2.weight": torch.zeros(2, 4),
               "module.encoder_q.fc.2.bias": torch.zeros(2),
               "module.queue": torch.randn(2, 16),
               "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    return {"epoch": 200, "arch": "resnet50", "state_dict": weights,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}}


def densecl_training(sd):
    """WXinlong/DenseCL (OpenSelfSup): encoder_q = (backbone, neck), `backbone` the same module,
    encoder_k, two queues; mmcv's meta."""
    body = no_fc(sd)
    weights = {**prefixed("encoder_q.0.", body), **prefixed("encoder_k.0.", body),
               **prefixed("backbone.", body), "encoder_q.1.mlp.0.weight": torch.zeros(4, 4),
               "encoder_k.1.mlp.0.weight": torch.zeros(4, 4), "queue": torch.zeros(2, 8),
               "queue_ptr": torch.zeros(1), "queue2": torch.zeros(2, 8),
               "queue2_ptr": torch.zeros(1)}
    return {"meta": {"epoch": 200, "iter": 5, "mmcv_version": "0.4.3"}, "state_dict": weights}


def pixpro(sd):
    """zdaxie/PixPro: `model` with DDP names (encoder, encoder_k, projectors, value transform,
    predictor) and the argparse options as `opt`."""
    body = no_fc(sd)
    heads = {f"module.{m}.linear1.weight": torch.zeros(4, 4, 1, 1) for m in
             ("projector", "projector_k", "projector_instance", "projector_instance_k",
              "predictor", "value_transform")}
    weights = {**prefixed("module.encoder.", body), **prefixed("module.encoder_k.", body), **heads}
    return {"opt": argparse.Namespace(arch="resnet50", pixpro_p=2.0, output_dir="./out"),
            "model": weights, "optimizer": {"state": {}, "param_groups": []}, "epoch": 400}


def mmpretrain(sd):
    return {"meta": {"mmpretrain_version": "1.0.0", "dataset_meta": {"classes": ("a", "b")}},
            "state_dict": {**prefixed("backbone.", no_fc(mmpretrain_stem(sd))),
                           "head.fc.weight": torch.zeros(2, 4), "head.fc.bias": torch.zeros(2)}}


def mmseg(sd):
    return {"meta": {"CLASSES": ("a", "b"), "PALETTE": [[0, 0, 0], [1, 1, 1]]},
            "state_dict": {**prefixed("backbone.", no_fc(sd)),
                           "decode_head.conv_seg.weight": torch.zeros(2, 4, 1, 1),
                           "auxiliary_head.convs.0.conv.weight": torch.zeros(4, 4, 3, 3)}}


# (layout name, variant, file name, file content from the reference state dict)
LAYOUTS = [
    ("torchvision / timm", "v1", "resnet50-0676ba61.pth", lambda sd: sd),
    ("torchvision / timm", "v1", "model.safetensors", lambda sd: sd),  # timm on the HF hub
    ("torchvision / timm", "v1c", "resnet50c.safetensors", timm_deep_stem),
    ("MoCo v1 / v2", "v1", "moco_v2_800ep_pretrain.pth.tar", moco),
    ("DenseCL training checkpoint", "v1", "epoch_200.pth", densecl_training),
    ("DenseCL release", "v1", "densecl_r50_imagenet_200ep.pth",
     lambda sd: {"state_dict": no_fc(sd), "author": "DenseCL"}),
    ("PixPro", "v1", "pixpro_base_r50_400ep.pth", pixpro),
    ("MMPretrain classifier", "v1c", "resnet50_v1c_mmpretrain.pth", mmpretrain),
    ("MMPretrain classifier", "v1", "resnet50_8xb32_in1k.pth", mmpretrain),
    ("MMSeg segmentor", "v1c", "deeplabv3plus_r50-d8_voc.pth", mmseg),
    ("backbone-only state_dict", "v1c", "resnet50_v1c-2cccc1ad.pth",
     lambda sd: {"state_dict": sd}),  # open-mmlab://resnet50_v1c
]
STEMS = {"resnet50c.safetensors": "timm deep", "resnet50_v1c_mmpretrain.pth": "MMPretrain deep"}


def save(obj, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, str(path))
    return str(path)


@pytest.mark.parametrize("name,variant,filename,build", LAYOUTS,
                         ids=[f"{row[2]}" for row in LAYOUTS])
def test_each_released_layout_is_named_and_loads_the_same_values(name, variant, filename, build,
                                                                  tmp_path, caplog):
    sd = reference(variant)
    path = save(build(sd), tmp_path / filename)
    ckpt = checkpoint_formats.read_backbone_checkpoint(path)
    assert ckpt.format.name == name and ckpt.variant == variant and ckpt.stage_sizes == SIZES
    want_stem = STEMS.get(filename, "MMSeg deep" if variant == "v1c" else "torchvision")
    assert ckpt.stem == want_stem
    enc = encoder(variant)
    with caplog.at_level(logging.INFO):
        got = torch_format.load_backbone_file(path, enc)
    assert f"{name} layout" in caplog.text and want_stem in caplog.text
    want = torch_format.load_backbone_state_dict(sd, enc.backbone)
    flat_want = jax.tree_util.tree_leaves_with_path(want)
    flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
    assert len(flat_got) == len(flat_want)
    for p, x in flat_want:
        np.testing.assert_array_equal(np.asarray(flat_got[p]), np.asarray(x),
                                      err_msg=jax.tree_util.keystr(p))


def test_an_unknown_layout_is_refused_naming_its_keys(tmp_path):
    sd = prefixed("encoder.", reference("v1"))
    sd["proj.weight"] = torch.zeros(2, 2)
    path = save(sd, tmp_path / "mystery.pth")
    with pytest.raises(checkpoint_formats.CheckpointFormatError) as e:
        torch_format.load_backbone_file(path, encoder("v1"))
    msg = str(e.value)
    assert "unknown checkpoint layout" in msg and "proj.weight" in msg
    assert f"encoder.* ({len(sd) - 1} keys)" in msg and "MoCo v1 / v2" in msg  # the known ones
    path = save({"weights": {"a": 1}, "step": 3}, tmp_path / "nested.pth")
    with pytest.raises(checkpoint_formats.CheckpointFormatError, match="no dict of weights"):
        checkpoint_formats.read_backbone_checkpoint(path)


def test_keys_no_part_of_the_layout_claims_are_refused(tmp_path):
    obj = moco(reference("v1"))
    obj["state_dict"]["module.extra_head.weight"] = torch.zeros(3)
    obj["state_dict"]["module.extra_head.bias"] = torch.zeros(3)
    path = save(obj, tmp_path / "moco_plus.pth.tar")
    with pytest.raises(checkpoint_formats.CheckpointFormatError) as e:
        checkpoint_formats.read_backbone_checkpoint(path)
    assert "MoCo v1 / v2 layout" in str(e.value)
    assert "2 keys belong to no part" in str(e.value) and "module.* (2 keys)" in str(e.value)


class Unsafe:
    """A pickled class instance: loading it would run the file's choice of code."""


def test_files_that_need_unsafe_unpickling_are_refused(tmp_path):
    obj = {"state_dict": reference("v1"), "hook": Unsafe()}
    path = save(obj, tmp_path / "with_object.pth")
    with pytest.raises(checkpoint_formats.CheckpointFormatError) as e:
        torch_format.load_backbone_file(path, encoder("v1"))
    assert "refused" in str(e.value) and "unsafe unpickling" in str(e.value)
    assert "Unsafe" in str(e.value)
    pkl = tmp_path / "model_final.pkl"  # detectron2's converted weights: numpy in a pickle
    pkl.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": np.zeros(3)}}, protocol=2))
    with pytest.raises(checkpoint_formats.CheckpointFormatError, match="unsafe unpickling"):
        checkpoint_formats.read_backbone_checkpoint(str(pkl))
    with pytest.raises(checkpoint_formats.CheckpointFormatError, match="unsafe unpickling"):
        torch_format.read_state_dict(str(path))


def test_resnet_d_and_a_variant_mismatch_are_refused_with_the_fix(tmp_path):
    sd = timm_deep_stem(reference("v1c"))  # timm resnet50d: avg-pool, conv, BN shortcuts
    sd = {k.replace("downsample.1.", "downsample.2.").replace("downsample.0.", "downsample.1."): v
          for k, v in sd.items()}
    with pytest.raises(checkpoint_formats.CheckpointFormatError, match="ResNet-D"):
        checkpoint_formats.read_backbone_checkpoint(save(sd, tmp_path / "resnet50d.safetensors"))
    path = save(reference("v1c"), tmp_path / "v1c.pth")
    with pytest.raises(torch_format.StateDictError, match="model.variant='v1c'"):
        torch_format.load_backbone_file(path, encoder("v1"))
    r101 = TorchResNet(base=8, stage_sizes=(3, 4, 23, 3)).state_dict()
    path = save(dict(r101), tmp_path / "resnet101-63fe2227.pth")
    with pytest.raises(torch_format.StateDictError, match=r"\(3, 4, 23, 3\).*model.depth=101"):
        torch_format.load_backbone_file(path, encoder("v1"))
