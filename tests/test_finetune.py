"""Fine-tuning end to end on synthetic data: the three initialisations of Tab. 2, the frozen
backbone of Tab. 3, resume, results.json. Runs share one tiny config so steps compile once."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from absl import flags

from configs.finetune import voc as voc_config
from ms3_jax.engine import checkpointing
from ms3_jax.models.deeplab import encoder_from_config
from ms3_jax.stages import finetune
from ms3_jax.testing.configs import tiny_finetune_config
from ms3_jax.testing.torch_reference import TorchResNet, randomize_
from ms3_jax.testing.variables import random_variables

flags.FLAGS.mark_as_parsed()

MODEL_CFG = {"width": 0.125, "stage_sizes": [1, 1, 1, 1], "emb_dim": 8}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The synthetic data the tiny fine-tuning config asks for (built by `demo.prepare_builtin`,
    as `python -m ms3_jax.main` does before a stage runs)."""
    from configs.finetune import voc
    from ms3_jax.demo import job
    path = str(tmp_path_factory.mktemp("synthetic"))
    config = voc.get_config("tiny")
    config.data.data_dir = path
    job.prepare_builtin(config)
    return path


tiny_config = tiny_finetune_config


def final_state(workdir):
    step, state = checkpointing.restore_state(workdir)
    return step, jax.tree_util.tree_map(np.asarray, state)


def read_results(workdir):
    with open(os.path.join(workdir, finetune.RESULTS_FILE)) as f:
        return json.load(f)


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def ms3_workdir(tmp_path_factory):
    """A tiny MS3 pretraining workdir: config + a TrainState-like checkpoint."""
    wd = str(tmp_path_factory.mktemp("pretrain"))
    model = encoder_from_config(MODEL_CFG, "cpu")
    variables = random_variables(model, seed=7, scale=0.2)
    ema = jax.tree_util.tree_map(lambda x: x + 1.0, variables)
    state = {"step": jnp.int32(3), "params": variables["params"], "batch_stats": variables["batch_stats"],
             "ema_params": ema["params"], "ema_batch_stats": ema["batch_stats"]}
    checkpointing.write_config(wd, {"model": MODEL_CFG})
    mngr = checkpointing.checkpoint_manager(wd, item_names=("state",))
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    mngr.wait_until_finished()
    return wd, jax.tree_util.tree_map(np.asarray, variables)


def test_init_what_transfers_the_backbone_or_the_segmentor(data_dir, ms3_workdir):
    """`init.what`: 'backbone' (default) leaves the decode head random, 'segmentor' loads it too."""
    pretrained_wd, pretrained = ms3_workdir
    leaves = jax.tree_util.tree_leaves
    for what, head_loaded in (("backbone", False), ("segmentor", True)):
        config = tiny_config(data_dir, **{"init.kind": "ms3", "init.path": pretrained_wd,
                                          "init.what": what})
        trainer = finetune.Trainer(config, 7)
        variables = finetune.initial_variables(config, trainer, jax.random.key(0))
        for c in ("params", "batch_stats"):
            assert_trees_equal(variables[c]["backbone"], pretrained[c]["backbone"])
        same = [np.array_equal(a, b) for a, b in zip(leaves(variables["params"]["decode_head"]),
                                                     leaves(pretrained["params"]["decode_head"]))]
        assert all(same) if head_loaded else not any(same), what
    with pytest.raises(ValueError, match="init.what='segmentor'.*init.kind='torchvision'"):
        finetune.check_config(tiny_config(data_dir, **{"init.kind": "torchvision", "init.path": "x",
                                                       "init.what": "segmentor"}), 1)


def aspp_copy(workdir, dest):
    """`workdir` (checkpoint and all) with its config saying an MS3 pretraining with heads_at='aspp'."""
    import shutil
    shutil.copytree(workdir, dest)
    config = checkpointing.read_config(dest)
    checkpointing.write_config(dest, {**config, "mode": "pretrain", "loss": {"kind": "ms3"},
                                      "model": {**config["model"], "heads_at": "aspp"}})
    return str(dest)


def test_init_segmentor_from_aspp_pretraining_leaves_the_decoder_fresh(data_dir, ms3_workdir,
                                                                        tmp_path, caplog):
    """heads_at='aspp' trains no decoder: 'segmentor' transfers the backbone and the ASPP and leaves
    c1_bottleneck / sep_bottleneck_* at the fresh initialisation, saying so; heads_at='decoder'
    (the fixture's config: no heads_at, the encoder's default) transfers them too."""
    from ms3_jax.models.deeplab import DECODER_MODULES
    pretrained_wd, pretrained = ms3_workdir
    for wd, decoder_pretrained in ((aspp_copy(pretrained_wd, tmp_path / "aspp"), False),
                                   (pretrained_wd, True)):
        config = tiny_config(data_dir, **{"init.kind": "ms3", "init.path": wd, "init.what": "segmentor"})
        trainer = finetune.Trainer(config, 7)
        fresh = jax.tree_util.tree_map(np.asarray, trainer.init_variables(jax.random.key(0)))
        caplog.clear()
        with caplog.at_level("INFO"):
            variables = finetune.initial_variables(config, trainer, jax.random.key(0))
        for c in ("params", "batch_stats"):
            assert_trees_equal(variables[c]["backbone"], pretrained[c]["backbone"])
            head, head0, head_fresh = (v[c]["decode_head"] for v in (variables, pretrained, fresh))
            for m in head:
                assert_trees_equal(head[m], (head0 if m not in DECODER_MODULES or decoder_pretrained
                                             else head_fresh)[m])
            for m in DECODER_MODULES:  # the two inits differ: the test can tell them apart
                assert not np.array_equal(jax.tree_util.tree_leaves(head0[m])[0],
                                          jax.tree_util.tree_leaves(head_fresh[m])[0])
        messages = [r.getMessage() for r in caplog.records if "initialised from" in r.getMessage()]
        assert len(messages) == 1, messages
        if decoder_pretrained:
            assert messages[0].startswith("backbone and decode_head initialised from")
        else:
            assert "ASPP" in messages[0] and "heads_at='aspp'" in messages[0]
            assert all(m in messages[0] for m in DECODER_MODULES) and "\n" not in messages[0]


@pytest.mark.slow
def test_frozen_backbone_from_ms3_workdir(data_dir, ms3_workdir, tmp_path):
    """Tab. 3: backbone params and BN statistics bit-identical to the MS3 checkpoint after two
    steps; the decode head (also from the checkpoint) and the classifier train."""
    pretrained_wd, pretrained = ms3_workdir
    wd = str(tmp_path / "ft")
    config = tiny_config(data_dir, **{"init.kind": "ms3", "init.path": pretrained_wd,
                                      "init.what": "segmentor", "frozen_backbone": True})
    results = finetune.train_and_evaluate(config, wd)
    step, state = final_state(wd)
    assert step == 2
    assert_trees_equal(state["params"]["backbone"], pretrained["params"]["backbone"])
    assert_trees_equal(state["batch_stats"]["backbone"], pretrained["batch_stats"]["backbone"])
    head, head0 = state["params"]["decode_head"], pretrained["params"]["decode_head"]
    assert jax.tree_util.tree_structure(head) == jax.tree_util.tree_structure(head0)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree_util.tree_leaves(head), jax.tree_util.tree_leaves(head0)))
    assert "conv_seg" in state["params"] and "proj_language" not in state["params"]
    on_disk = read_results(wd)
    assert on_disk == results
    assert 0.0 <= on_disk["mIoU"] <= 100.0 and on_disk["frozen_backbone"] and on_disk["num_images"] == 2
    assert set(on_disk["per_class"]) == {"sky", "grass", "stairway", "mountain", "path", "building", "water"}


@pytest.mark.slow
def test_torchvision_pth_initialises_the_backbone(data_dir, tmp_path):
    """Tab. 2 'Supervised' row: an ImageNet ResNet file in torchvision naming (with `fc.*`)."""
    ref = randomize_(TorchResNet(base=8, stage_sizes=(1, 1, 1, 1)), seed=3)
    path = str(tmp_path / "resnet50_imagenet.pth")
    torch.save(ref.state_dict(), path)
    wd = str(tmp_path / "ft")
    config = tiny_config(data_dir, **{"init.kind": "torchvision", "init.path": path,
                                      "frozen_backbone": True})
    finetune.train_and_evaluate(config, wd)
    _, state = final_state(wd)
    backbone, stats = state["params"]["backbone"], state["batch_stats"]["backbone"]
    np.testing.assert_array_equal(backbone["conv1"]["kernel"],
                                  ref.conv1.weight.detach().numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(stats["layer3_0"]["bn2"]["var"], ref.layer3[0].bn2.running_var.numpy())
    assert read_results(wd)["init"]["kind"] == "torchvision"


@pytest.mark.slow
def test_scratch_finetune_trains_everything_and_resumes(data_dir, tmp_path):
    """Tab. 2 'Scratch' row, interrupted after step 1 and resumed == uninterrupted."""
    config = tiny_config(data_dir, **{"init.kind": "scratch"})
    straight = str(tmp_path / "straight")
    finetune.train_and_evaluate(config, straight)
    resumed = str(tmp_path / "resumed")
    assert finetune.train_and_evaluate(config, resumed, stop_at=1) is None
    assert not os.path.exists(os.path.join(resumed, finetune.RESULTS_FILE))
    results = finetune.train_and_evaluate(config, resumed)
    _, a = final_state(straight)
    _, b = final_state(resumed)
    assert_trees_equal(a["params"], b["params"])
    assert_trees_equal(a["batch_stats"], b["batch_stats"])
    assert results["mIoU"] == read_results(straight)["mIoU"]
    # The backbone trained (its BN statistics moved from their initial 0 / 1).
    assert not np.allclose(a["batch_stats"]["backbone"]["bn1"]["mean"], 0.0)


def test_config_errors_and_strings(data_dir):
    with pytest.raises(ValueError, match="init.path"):
        finetune.check_config(tiny_config(data_dir, **{"init.kind": "ms3"}), 1)
    with pytest.raises(ValueError, match="unknown config string"):
        voc_config.get_config("tinyy")
    from configs.finetune import ade20k, cityscapes, coco_stuff, mapillary
    c = cityscapes.get_config("torchvision,frozen")
    assert c.frozen_backbone and c.init.kind == "torchvision" and tuple(c.data.crop_size) == (512, 1024)
    assert (voc_config.get_config().num_steps, ade20k.get_config().num_steps,
            coco_stuff.get_config().num_steps, mapillary.get_config().data.crop_size) == (40_000, 80_000, 80_000, 768)
    c.init.path = "resnet50.pth"
    finetune.check_config(c, 1)  # (512, 1024) crops are supported
    c = voc_config.get_config("deit,torchvision,frozen")
    c.init.path = "deit_base_patch16_224.pth"
    with pytest.raises(ValueError, match="the file has no neck"):
        finetune.check_config(c, 1)
    with pytest.raises(ValueError, match="'deit' is the DeiT-B row"):
        voc_config.get_config("deit,tab7")


def test_non_square_crops_keep_image_and_label_aligned():
    from ms3_jax.data import augment
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, (30, 50)).astype(np.uint8)
    image = np.repeat(label[..., None] * 40, 3, axis=-1).astype(np.uint8)
    cfg = augment.AugmentConfig.geometric_only(crop_size=(16, 32), base_size="original",
                                               scale_range=(1.0, 1.0))
    img, lab = augment.augment(image, label, rng, cfg)
    assert img.shape == (16, 32, 3) and lab.shape == (16, 32)
    np.testing.assert_array_equal(img[..., 0], lab.astype(np.uint8) * 40)


@pytest.mark.slow
def test_predict_cli_segments_a_folder_like_the_model(data_dir, tmp_path, capsys):
    """`python -m ms3_jax.predict`: a folder in, palette PNG + names + overlay out; the labels are
    the argmax of the model's logits resized to the image (float64 NumPy reference)."""
    from PIL import Image
    from ms3_jax import predict
    from ms3_jax.models.resize import bilinear_matrix as _interp_matrix
    wd = str(tmp_path / "ft")
    finetune.train_and_evaluate(tiny_config(data_dir, **{"init.kind": "scratch"}), wd)
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(40, 56), (48, 48)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    written = predict.main(["--workdir", wd, "--image", str(folder), "--out", str(tmp_path / "out"),
                            "--short_side", "0"])
    assert len(written) == 2 and "im0.png" in capsys.readouterr().out
    seg = predict.Segmentor(wd)
    names = json.loads((tmp_path / "out" / "im1_labels.json").read_text())
    assert list(names.values()) == list(seg.class_names)
    for i, (labels_png, overlay_png) in enumerate(written):
        image = np.asarray(Image.open(folder / f"im{i}.png"))
        with Image.open(labels_png) as im:
            assert im.mode == "P" and im.size == image.shape[1::-1]
            labels = np.asarray(im)
        logits = np.asarray(seg.model.apply(seg.variables, image[None])["logits"][0], np.float64)
        h, w = image.shape[:2]
        ref = np.einsum("Hh,hwk,Ww->HWk", _interp_matrix(logits.shape[0], h), logits,
                        _interp_matrix(logits.shape[1], w)).argmax(-1)
        assert np.mean(labels == ref) > 0.999
    with pytest.raises(FileNotFoundError, match="no_such"):
        predict.main(["--workdir", wd, "--image", str(tmp_path / "no_such"), "--out", "x", "--verbose"])
    with pytest.raises(ValueError, match="not a fine-tuned segmentor"):
        checkpointing.write_config(str(tmp_path / "pre"), {"mode": "pretrain"})
        predict.Segmentor(str(tmp_path / "pre"))
    from ms3_jax import zero_shot
    with pytest.raises(ValueError, match=r"fine-tuning workdir.*ms3_jax\.predict"):
        zero_shot.resolve_workdirs(wd)


@pytest.mark.slow
def test_tab7_aux_head_trains_and_stays_out_of_inference_and_export(data_dir, tmp_path):
    """Tab. 7: the auxiliary head trains (its BN statistics move, its loss is logged apart) and
    predict / export build the segmentor without it."""
    from ms3_jax import export, predict
    config = tiny_config(data_dir, **{"init.kind": "scratch", "aux_head": True,
                                      "model.variant": "v1c"})
    wd = str(tmp_path / "aux")
    results = finetune.train_and_evaluate(config, wd)
    assert results["mIoU"] is not None
    _, state = final_state(wd)
    assert not np.allclose(state["batch_stats"]["auxiliary_head"]["convs_0"]["bn"]["mean"], 0.0)
    seg = predict.Segmentor(wd)
    assert not seg.model.aux_head and "auxiliary_head" in seg.variables["params"]
    sd = export.export_workdir(wd, str(tmp_path / "seg.safetensors"), "segmentor")
    assert "decode_head.conv_seg.weight" in sd and not [k for k in sd if "aux" in k]
