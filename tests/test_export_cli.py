"""`python -m ms3_jax.export`: a workdir checkpoint -> .pth / .safetensors that PyTorch loads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import orbax.checkpoint as ocp
import torch

from ms3_jax import export
from ms3_jax.engine import checkpointing
from ms3_jax.models import torch_format
from ms3_jax.models.deeplab import encoder_from_config
from ms3_jax.testing.torch_reference import TorchResNet

MODEL_CFG = {"variant": "v1c", "width": 0.125, "stage_sizes": [1, 1, 1, 1], "emb_dim": 8}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("wd"))
    model = encoder_from_config(MODEL_CFG, "cpu")
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    ema = jax.tree_util.tree_map(lambda x: x + 1.0, variables)
    state = {"step": jnp.int32(5), "params": variables["params"], "batch_stats": variables["batch_stats"],
             "ema_params": ema["params"], "ema_batch_stats": ema["batch_stats"]}
    checkpointing.write_config(wd, {"model": MODEL_CFG})
    mngr = checkpointing.checkpoint_manager(wd, item_names=("state",))
    mngr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    return wd, variables, ema


def test_cli_writes_pth_that_strict_loads_into_reference(workdir, tmp_path, capsys):
    wd, variables, _ = workdir
    out = str(tmp_path / "backbone.pth")
    export.main(["--workdir", wd, "--out", out])
    sd = torch.load(out, weights_only=True)
    ref = TorchResNet(variant="v1c", base=8, stage_sizes=(1, 1, 1, 1))
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    np.testing.assert_array_equal(
        sd["stem.0.weight"].numpy(),
        np.transpose(variables["params"]["backbone"]["stem_0"]["kernel"], (3, 2, 0, 1)))
    printed = capsys.readouterr().out  # a tiny network: no config that calls it a ResNet-50
    assert "No MMSegmentation config" in printed and "width 0.125" in printed
    assert "(1, 1, 1, 1)" in printed and "depth=" not in printed


def _run_snippet(text):
    scope = {}
    exec(text, {}, scope)  # the snippet is Python an MMSeg config file can hold
    return scope


def test_mmseg_snippet_matches_the_exported_network():
    """Against MMSeg's `_base_/models/deeplabv3plus_r50-d8.py` numbers (OS 8) and OS 16."""
    paper = {"depth": 50, "variant": "v1c", "output_stride": 8, "width": 1.0,
             "head_channels": 512, "c1_channels": 48}
    backbone = _run_snippet(export.mmseg_config_snippet("/x/b.pth", paper))["model"]["backbone"]
    assert backbone["type"] == "ResNetV1c" and backbone["depth"] == 50
    assert backbone["strides"] == (1, 2, 1, 1) and backbone["dilations"] == (1, 1, 2, 4)
    assert backbone["contract_dilation"] and backbone["init_cfg"]["checkpoint"] == "/x/b.pth"
    seg = _run_snippet(export.mmseg_config_snippet(
        "/x/s.pth", {**paper, "variant": "v1", "output_stride": 16, "depth": 101}, "segmentor", 19))
    head = seg["model"]["decode_head"]
    assert seg["load_from"] == "/x/s.pth" and seg["model"]["backbone"]["type"] == "ResNet"
    assert seg["model"]["backbone"]["depth"] == 101
    assert seg["model"]["backbone"]["strides"] == (1, 2, 2, 1)
    assert head["dilations"] == (1, 6, 12, 18) and head["num_classes"] == 19
    assert (head["channels"], head["c1_in_channels"], head["c1_channels"]) == (512, 256, 48)
    for bad in ({"width": 0.5}, {"stage_sizes": [3, 4, 6, 2]}):
        text = export.mmseg_config_snippet("/x/b.pth", {**paper, **bad})
        assert text.startswith("# No MMSegmentation config") and "model" not in _run_snippet(text)


def test_cli_safetensors_segmentor_and_ema(workdir, tmp_path):
    from safetensors.numpy import load_file
    wd, _, ema = workdir
    out = str(tmp_path / "seg.safetensors")
    export.main(["--workdir", wd, "--out", out, "--what", "segmentor", "--ema"])
    sd = load_file(out)
    assert "decode_head.sep_bottleneck.1.pointwise_conv.bn.running_mean" in sd
    np.testing.assert_array_equal(sd["backbone.stem.1.weight"], ema["params"]["backbone"]["stem_1"]["scale"])


def test_torchvision_file_initialises_the_encoder_backbone(workdir, tmp_path):
    """The reverse direction: a torchvision-named .pth (with `fc.*`) -> Flax backbone variables."""
    ref = TorchResNet(base=8, stage_sizes=(1, 1, 1, 1))
    path = str(tmp_path / "imagenet.pth")
    torch.save(ref.state_dict(), path)
    from ms3_jax.models.resnet import ResNet
    got = torch_format.load_backbone_state_dict(torch_format.read_state_dict(path),
                                                ResNet(width=0.125, stage_sizes=(1, 1, 1, 1)))
    np.testing.assert_array_equal(got["batch_stats"]["layer2_0"]["downsample_1"]["var"],
                                  ref.layer2[0].downsample[1].running_var.numpy())


def test_bad_workdir_and_output_names(tmp_path, workdir):
    with pytest.raises(FileNotFoundError, match="checkpoints"):
        export.export_workdir(str(tmp_path), str(tmp_path / "x.pth"))
    with pytest.raises(ValueError, match=r"\.pth, \.pt or \.safetensors"):
        export.export_workdir(workdir[0], str(tmp_path / "x.bin"))
    with pytest.raises(FileNotFoundError, match="step 7"):
        export.export_workdir(workdir[0], str(tmp_path / "x.pth"), step=7)


def test_segmentor_of_an_aspp_pretraining_is_refused(workdir, tmp_path, capsys):
    """heads_at='aspp' trains no decoder: --what segmentor is a one-line error, exit code 2, and
    nothing is written; --what backbone still works, and fine-tuning workdirs export their whole
    segmentor whatever `model.heads_at` says."""
    import shutil
    from ms3_jax.engine import exit_codes
    wd = str(tmp_path / "aspp")
    shutil.copytree(workdir[0], wd)
    pretrain_cfg = {"mode": "pretrain", "loss": {"kind": "ms3"}, "model": {**MODEL_CFG, "heads_at": "aspp"}}
    checkpointing.write_config(wd, pretrain_cfg)
    out = str(tmp_path / "seg.safetensors")
    with pytest.raises(ValueError) as e:
        export.export_workdir(wd, out, "segmentor")
    message = str(e.value)
    assert "\n" not in message and "heads_at='aspp'" in message and "never trained" in message
    assert "--what backbone" in message and "model.heads_at='decoder'" in message
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        export.main(["--workdir", wd, "--out", out, "--what", "segmentor"])
    assert exit_.value.code == exit_codes.USAGE == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"error: {message}"
    assert not (tmp_path / "seg.safetensors").exists()
    export.main(["--workdir", wd, "--out", str(tmp_path / "backbone.safetensors")])
    checkpointing.write_config(wd, {**pretrain_cfg, "mode": "finetune"})
    assert "decode_head.c1_bottleneck.conv.weight" in export.export_workdir(wd, out, "segmentor")


@pytest.mark.parametrize("variant", ["v1", "v1c"])
def test_resnet101_exports_strict_load_into_torchvision_and_mmseg_names(variant, tmp_path):
    """Depth 101 (Tab. 7) at width 1/8: the backbone file loads into torchvision's resnet101
    layout (v1; 626 keys as torchvision's, `fc.*` aside) and the segmentor file's `backbone.*`
    into MMSeg's ResNetV1c names (`stem.0/1/3/4/6/7`), both with no key left over."""
    from ms3_jax.testing.variables import random_variables
    cfg = {"depth": 101, "variant": variant, "width": 0.125, "emb_dim": 8}
    model = encoder_from_config(cfg, "cpu")
    variables = random_variables(model, seed=5)
    wd = str(tmp_path / "wd")
    state = {"step": jnp.int32(1), "params": variables["params"],
             "batch_stats": variables["batch_stats"]}
    checkpointing.write_config(wd, {"model": cfg})
    mngr = checkpointing.checkpoint_manager(wd, item_names=("state",))
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    ref = TorchResNet(variant=variant, base=8, stage_sizes=(3, 4, 23, 3))
    if variant == "v1":
        assert len(ref.state_dict()) == 626  # torchvision resnet101: 33 blocks, 4 projections
        export.export_workdir(wd, str(tmp_path / "r101.pth"))
        sd = torch.load(str(tmp_path / "r101.pth"), weights_only=True)
    else:
        seg = export.export_workdir(wd, str(tmp_path / "seg.pth"), "segmentor")
        assert {"backbone.stem.0.weight", "backbone.stem.7.running_var",
                "backbone.layer3.22.conv3.weight"} <= set(seg)
        sd = {k[len("backbone."):]: torch.from_numpy(np.array(v)) for k, v in seg.items()
              if k.startswith("backbone.")}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    got = ref.layer3[22].conv2.weight.detach().numpy()
    np.testing.assert_array_equal(got, np.transpose(
        variables["params"]["backbone"]["layer3_22"]["conv2"]["kernel"], (3, 2, 0, 1)))
