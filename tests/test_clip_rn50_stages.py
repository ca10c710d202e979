"""Tab. 5's best row end to end on the tiny versions: stage 1 on a tiny random CLIP ResNet in
open_clip's format (configs/text_adapt.py:rn50,tiny), its 1024-d T into stage 2
(configs/pretrain.py:rn50,tiny), and zero-shot from the stage-1 workdir."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs import pretrain as pretrain_config
from ms3_jax import zero_shot
from ms3_jax.data.label_space import LabelSpace
from ms3_jax.demo import job as demo, tiny_clip
from ms3_jax.method import adapted_text, text_embeddings
from ms3_jax.models import open_clip_format
from ms3_jax.stages import pretrain, text_adapt
from ms3_jax.testing.configs import text_adapt_config, with_overrides


def test_rn50_configs():
    """The Tab. 5 configs: CLIP RN50 from open_clip, 1024-d embeddings in both stages; the
    existing config strings are unchanged."""
    c1, c2 = text_adapt_config("rn50"), pretrain_config.get_config("rn50")
    assert (c1.model.emb_dim, c2.model.emb_dim) == (1024, 1024)
    assert open_clip_format.looks_like_open_clip(c1.text.clip) and c1.encoder == "clip"
    assert c1.image_tower.dense == "value" and c1.text.tiny_clip_arch == "rn50"
    tiny = text_adapt_config("rn50,tiny")
    assert tiny.text.tiny_clip_dir and tiny.model.emb_dim == 1024 and tiny.data.crop_size == 64
    assert text_adapt_config("tiny").model.emb_dim == 32
    assert pretrain_config.get_config("tiny").model.emb_dim == 32
    with pytest.raises(ValueError, match=r"unknown config string\(s\) \['rn101'\]"):
        pretrain_config.get_config("rn101")


def test_rn50_tower_errors_name_the_field(tmp_path):
    """Stage 1's checks of CLIP's ResNet: the crop a multiple of its stride 32, its projection
    = model.emb_dim; an open_clip file is read as such (both towers)."""
    directory = tiny_clip.save_tiny_open_clip_rn(tmp_path / "rn", ("sky", "sand"),
                                                 proj_dim=16, image_size=64)
    weights = str(directory / open_clip_format.WEIGHT_FILES[0])
    c = text_adapt_config("rn50,tiny")
    c.update_from_flattened_dict({"text.tiny_clip_dir": "", "text.clip": weights,
                                  "model.emb_dim": 16, "data.crop_size": 48})
    with pytest.raises(ValueError, match=r"data.crop_size=48 is not a multiple of the output "
                                         r"stride 32 of .*open_clip_model.safetensors"):
        text_adapt.load_image_tower(c, weights)
    c.data.crop_size, c.model.emb_dim = 64, 1024
    with pytest.raises(ValueError, match=r"projects to 16, not model.emb_dim=1024"):
        text_adapt.load_image_tower(c, weights)
    text_module, _, _ = text_adapt.load_clip(weights)
    assert text_module.config.proj_dim == 16


@pytest.mark.slow
def test_stage1_rn50_then_stage2_1024d(tmp_path):
    data_dir = str(tmp_path / "data")
    c1 = text_adapt_config("rn50,tiny")
    c1.update_from_flattened_dict({
        "data.data_dir": data_dir, "num_steps": 4, "log_every": 1, "checkpoint_every": 4,
        "batch_size": 8, "text.tiny_clip_dir": str(tmp_path / "tiny_rn50")})
    c1.data.synthetic = dict(num_train=16, num_val=4, image_size=64)
    demo.prepare_builtin(c1)  # the synthetic data and the tiny random CLIP ResNet
    tiny_dir = c1.text.tiny_clip_dir
    assert os.path.isfile(os.path.join(tiny_dir, open_clip_format.WEIGHT_FILES[0]))
    assert open_clip_format.is_random_standin(tiny_dir)

    w1 = str(tmp_path / "stage1")
    history = text_adapt.train_and_evaluate(c1, w1)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert np.isfinite([h["loss"] for h in history]).all()
    ls = LabelSpace.from_datasets(list(c1.data.datasets))
    npz = os.path.join(w1, text_embeddings.FILE_NAME)
    with np.load(npz) as f:
        assert f["embeddings"].shape == (ls.num_classes, 1024)
    with open(os.path.join(w1, adapted_text.TEXT_MODEL_DIR, adapted_text.TEXT_MODEL_META)) as f:
        vision = json.load(f)["vision"]
    assert vision["arch"] == "resnet" and vision["proj_dim"] == 1024

    # A stage-1 workdir segments alone: the adapted ResNet's stride-32 map vs any names' T.
    segmenter = zero_shot.ZeroShotSegmenter.from_workdir(w1, short_side=None)
    assert segmenter.multiple == 32
    image = zero_shot.synthetic_sample(str(tmp_path), "synth_a")
    labels, scores = segmenter.segment(image, ["sky", "grass", "zebra"])
    assert labels.shape == image.shape[:2] and scores.shape == image.shape[:2] + (3,)

    c2 = with_overrides(pretrain_config.get_config("rn50,tiny"), **{
        "batch_size": 8, "data.crop_size": 32, "data.data_dir": data_dir, "num_steps": 2,
        "log_every": 1, "checkpoint_every": 2, "relations.warmup_steps": 1,
        "text.embeddings": npz})
    c2.data.synthetic = None
    history = pretrain.train_and_evaluate(c2, str(tmp_path / "stage2"))
    assert [h["step"] for h in history] == [1, 2]
    assert np.isfinite([h["loss"] for h in history]).all()
