"""MS3 pretraining: the sharded step (8 devices == 1 device), ablation switches, resume, config errors."""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from ms3_jax.data.label_space import LabelSpace
from ms3_jax.engine import optim
from ms3_jax.method import labels, text_embeddings
from ms3_jax.stages import pretrain
from ms3_jax.testing.configs import tiny_pretrain_config
from ms3_jax.testing.pretrain_inputs import DATASETS, label_space, random_batch, random_text

flags.FLAGS.mark_as_parsed()

tiny_config = tiny_pretrain_config


def run_steps(config, devices, batches, text):
    trainer = pretrain.Trainer(config, label_space(), text, num_steps=10, devices=devices)
    state = trainer.init_state(jax.random.PRNGKey(0))  # float64 leaves with model.dtype float64
    metrics = []
    for b in batches:
        state, m = trainer.step(state, trainer.global_batch(b))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


def assert_trees_close(a, b, rtol=1e-5, atol=1e-5):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_eight_devices_equal_one_device_and_bfloat16_tracks_them():
    """Three steps (bank, V, S, multi-label mask and both losses all active from step 2) give the
    same state on 8 devices as on 1. Run in float64: in float32 the two layouts' different
    reduction orders differ by ~1e-6 per layer and this tiny random BN net amplifies that (a
    1e-7 relative perturbation on ONE device grows to 1e-3 in two steps), which would test
    float reassociation rather than sharding.

    Then the accelerator setting -- bfloat16 compute and bank, the batch sharded over 8 devices
    -- compiles and runs (on these CPU devices `model.kernels='auto'` is the CPU plug-in: every
    convolution / GEMM takes the bfloat16 x bfloat16 -> float32 path of `models/cpu_kernels.py`,
    forward and backward), and its first loss is the float64 one up to bfloat16 rounding."""
    assert jax.device_count() == 8
    warm = {"relations.warmup_steps": 1, "optim.warmup_steps": 1}
    config = tiny_config(**warm, **{"model.dtype": "float64", "bank.dtype": "float64"})
    rng = np.random.default_rng(0)
    batches = [random_batch(rng) for _ in range(3)]
    text = random_text(config.model.emb_dim)
    with jax.enable_x64(True):
        s8, m8 = run_steps(config, jax.devices(), batches, text)
        s1, m1 = run_steps(config, jax.devices()[:1], batches, text)
    for a, b in zip(m8, m1):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for field in ("params", "batch_stats", "ema_params", "visual_emb", "sim"):
        assert_trees_close(getattr(s8, field), getattr(s1, field))
    np.testing.assert_array_equal(s8.bank.count, s1.bank.count)
    np.testing.assert_array_equal(s8.visual_valid, s1.visual_valid)
    assert_trees_close(s8.bank.feats, s1.bank.feats)
    # The step did real work: the bank filled, S rows were seen, losses are finite.
    assert s8.bank.count.sum() > 0 and s8.sim_seen.sum() > 0
    assert jax.tree_util.tree_leaves(s8.params)[0].dtype == np.float64
    assert m8[2]["lr"] > 0 and m8[2]["loss_visual"] > 0 and m8[2]["relations"] > 0
    assert all(np.isfinite(m["loss"]) for m in m8)

    config = tiny_config(**warm, **{"model.dtype": "bfloat16", "bank.dtype": "bfloat16"})
    s16, m16 = run_steps(config, jax.devices(), batches[:2], text)
    assert m16[0]["loss"] > 1.0 and all(np.isfinite(m["loss"]) and m["finite"] for m in m16)
    np.testing.assert_allclose(m16[0]["loss"], m8[0]["loss"], rtol=3e-2)
    assert s16.bank.feats.dtype == jnp.bfloat16 and s16.bank.count.sum() > 0
    assert jax.tree_util.tree_leaves(s16.params)[0].dtype == np.float32  # params stay float32


ABLATIONS = [
    ({"loss.use_visual": False}, {"loss_language"}),
    ({"loss.use_language": False, "relations.pixel_head": "visual"}, {"loss_visual"}),
    ({"loss.multilabel": False}, {"loss_language", "loss_visual"}),
    ({"loss.kind": "ce_single_head"}, {"loss_ce"}),
    ({"loss.kind": "ce_multi_head"}, {"loss_ce"}),
]


@pytest.mark.parametrize("overrides,expected_terms", ABLATIONS)
def test_ablation_switches_select_the_loss_terms(overrides, expected_terms):
    """The Tab. 4 / 6 switches choose the step's loss terms: read from the traced step (not
    compiled; `test_a_ce_baseline_trains` and the MS3 steps elsewhere run)."""
    config = tiny_config(**overrides)
    trainer = pretrain.Trainer(config, label_space(), random_text(config.model.emb_dim),
                               num_steps=10, devices=jax.devices())
    state = jax.eval_shape(trainer.init_state, jax.random.PRNGKey(0))
    _, metrics = jax.eval_shape(trainer.step, state, random_batch(np.random.default_rng(1)))
    assert {k for k in metrics if k.startswith("loss_")} == expected_terms


@pytest.mark.slow
def test_a_ce_baseline_trains():
    """The multi-head CE baseline (Tab. 2, 4) compiled and run: its one term is the loss."""
    config = tiny_config(**ABLATIONS[-1][0])
    rng = np.random.default_rng(1)
    text = random_text(config.model.emb_dim)
    state, metrics = run_steps(config, jax.devices()[:1], [random_batch(rng), random_batch(rng)], text)
    np.testing.assert_allclose(metrics[-1]["loss"], metrics[-1]["loss_ce"], rtol=1e-6)
    assert np.isfinite(metrics[-1]["loss"]) and metrics[-1]["loss"] > 0 and int(state.step) == 2


@pytest.mark.parametrize("overrides,match", [
    ({"loss.kind": "focal"}, "loss.kind"),
    ({"model.output_stride": 4}, "output_stride"),
    ({"batch_size": 12}, "divide over 8 devices"),
    ({"bank.per_class": 128}, r"bank.per_class \(P=128\) must be <= bank.slots \(S=64\)"),
    ({"loss.use_language": False}, "pixel_head='language' needs loss.use_language"),
    ({"loss.use_visual": False, "relations.pixel_head": "visual"},
     "pixel_head='visual' needs loss.use_visual"),
])
def test_bad_config_is_rejected_before_work(overrides, match):
    with pytest.raises(ValueError, match=match):
        pretrain.check_config(tiny_config(**overrides), 8)


def test_pretraining_without_text_embeddings_points_to_stage_1(tmp_path):
    """No silent fallback to CLIP's hand template (Tab. 4 ablation): it must be asked for."""
    config = tiny_config(**{"text.embeddings": ""})
    with pytest.raises(ValueError, match=r"text.embeddings is unset.*configs/text_adapt.py.*"
                                         r"text.embeddings=template"):
        pretrain.check_text_source(config)
    config.text.embeddings = text_embeddings.TEMPLATE
    with pytest.raises(ValueError, match="text.embeddings='template' needs text.clip"):
        pretrain.check_text_source(config)
    config.loss.kind = "ce_single_head"  # no T needed
    pretrain.check_text_source(config)
    assert pretrain.resolve_text_embeddings(config, label_space()) is None


def test_text_embeddings_file_must_match_the_label_space(tmp_path):
    ls = label_space()
    path = str(tmp_path / "T.npz")
    text_embeddings.save_text_embeddings(path, ls, random_text(8), "template")
    np.testing.assert_allclose(text_embeddings.load_text_embeddings(path, ls), random_text(8))
    other = LabelSpace.from_datasets(["synth_a", "synth_b"])
    with pytest.raises(ValueError, match=r"do not match the configured datasets.*not configured: \['synth_c/"):
        text_embeddings.load_text_embeddings(path, other)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        text_embeddings.load_text_embeddings(str(tmp_path / "nope.npz"), ls)


def test_downsample_labels_is_torch_nearest():
    import torch
    y = np.random.default_rng(0).integers(0, 9, (2, 30, 22)).astype(np.int32)
    for hw in ((8, 6), (15, 11), (30, 22)):
        want = torch.nn.functional.interpolate(torch.from_numpy(y)[:, None].float(), size=hw,
                                               mode="nearest")[:, 0].numpy()
        np.testing.assert_array_equal(labels.downsample_labels(jnp.asarray(y), hw), want)


def test_weight_decay_only_on_kernels():
    params = {"conv": {"kernel": jnp.ones((1, 1, 2, 2))}, "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    mask = optim.weight_decay_mask(params)
    assert mask == {"conv": {"kernel": True}, "bn": {"scale": False, "bias": False}}


def test_missing_dataset_is_named_before_training(tmp_path):
    config = tiny_config(**{"data.datasets": ("voc", "ade20k"), "data.data_dir": str(tmp_path),
                            "text.embeddings": str(tmp_path / "never_read.npz")})
    config.data.synthetic = None
    with pytest.raises(FileNotFoundError, match=r"(?s)dataset 'voc' \(tfds 'ms3_voc_aug'.*not prepared.*"
                                                r"ms3_jax.data.prepare --dataset voc"):
        pretrain.train_and_evaluate(config, str(tmp_path / "wd"))


def loop_config(synthetic_dir, tmp_path):
    config = tiny_config(**{"num_steps": 6, "checkpoint_every": 3, "log_every": 2,
                            "data.data_dir": synthetic_dir, "relations.warmup_steps": 2,
                            "eval_every": 3, "eval.max_images": 1})
    config.data.synthetic = None
    path = str(tmp_path / "T.npz")
    text_embeddings.save_text_embeddings(path, label_space(), random_text(config.model.emb_dim), "template")
    config.text.embeddings = path
    return config


@pytest.mark.slow
def test_resume_continues_exactly(synthetic_dir, tmp_path, caplog):
    """N steps, stop, resume, continue to 2N == an uninterrupted 2N run (losses and params)."""
    from ms3_jax.engine import checkpointing
    config = loop_config(synthetic_dir, tmp_path)
    full = pretrain.train_and_evaluate(config, str(tmp_path / "full"))
    first = pretrain.train_and_evaluate(config, str(tmp_path / "split"), stop_at=3)
    assert [h["step"] for h in first] == [1, 2, 3]
    second = pretrain.train_and_evaluate(config, str(tmp_path / "split"))
    assert [h["step"] for h in second] == [4, 5, 6]
    for a, b in zip(full[3:], second):
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=f"step {a['step']} {k}")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, s_full = checkpointing.restore_state(str(tmp_path / "full"))
        _, s_split = checkpointing.restore_state(str(tmp_path / "split"))
    assert_trees_close(s_full, s_split, rtol=1e-6, atol=1e-7)
    assert not caplog.records, caplog.text  # the state item alone, quietly (no iterator warning)
    # The run wrote what a user looks at: TensorBoard events, the config and the relations report.
    assert (tmp_path / "full" / "config.json").exists()
    assert list((tmp_path / "full" / "tensorboard").iterdir())
    report = (tmp_path / "full" / "relations.txt").read_text()
    assert report.startswith("multi-label mapping:")
    events = b"".join(f.read_bytes() for f in (tmp_path / "full" / "tensorboard").iterdir())
    for tag in (b"eval/synth_a/language/mIoU", b"eval_IoU/synth_b/visual/", b"examples/synth_c/visual",
                b"multi-label mapping", b"crop_size: 32"):
        assert tag in events, tag  # scalars, images, the relations table and the config as text
    # Evaluation at steps 3 and 6, kept across the resume (pretrain_eval.py).
    for run in ("full", "split"):
        results = json.loads((tmp_path / run / "results.json").read_text())
        assert [e["step"] for e in results["eval"]] == [3, 6]
        assert set(results["eval"][-1]) == {"step"} | {f"{d}/{h}" for d in DATASETS
                                                      for h in ("language", "visual")}
        assert set(results["per_class_IoU"]["synth_b/visual"]) == set(LabelSpace.from_datasets(
            ["synth_b"]).class_names[0])


def test_init_from_torchvision_file_sets_online_and_momentum_backbones(tmp_path):
    import torch
    from ms3_jax.testing.torch_reference import TorchResNet, randomize_
    config = tiny_config()
    ref = randomize_(TorchResNet(base=8, stage_sizes=(1, 1, 1, 1)), seed=3)
    path = str(tmp_path / "resnet.pth")
    torch.save(ref.state_dict(), path)
    trainer = pretrain.Trainer(config, label_space(), random_text(config.model.emb_dim), num_steps=4)
    state = pretrain.init_backbone_from(trainer.init_state(jax.random.PRNGKey(0)), path, trainer)
    want = np.transpose(ref.layer3[0].conv2.weight.detach().numpy(), (2, 3, 1, 0))
    for tree in (state.params, state.ema_params):
        np.testing.assert_array_equal(tree["backbone"]["layer3_0"]["conv2"]["kernel"], want)
    np.testing.assert_array_equal(state.ema_batch_stats["backbone"]["bn1"]["var"], ref.bn1.running_var.numpy())
    assert state.ema_params["backbone"]["conv1"]["kernel"] is not state.params["backbone"]["conv1"]["kernel"]


@pytest.mark.slow
def test_evaluation_during_pretraining_matches_a_numpy_reference(synthetic_dir):
    """Per dataset, nearest-T among its own classes, cosines upsampled to the image (bilinear,
    align_corners=False), against the same pipeline in float64 NumPy, for the first 2 images."""
    from ms3_jax.data import eval_data
    from ms3_jax.evaluation import pretrain_eval
    from ms3_jax.models.resize import bilinear_matrix as _interp_matrix
    config = tiny_config()
    model = pretrain.build_model(config, label_space().num_classes, "cpu")
    variables = jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3), jnp.uint8))
    language = jax.jit(lambda v, x: model.apply(v, x)["language"])
    text = random_text(config.model.emb_dim, seed=4)
    got = pretrain_eval.evaluate_pretraining(model, variables, {"language": text}, label_space(),
                                             synthetic_dir, max_images=2)
    assert sorted(got) == [f"{d}/language" for d in DATASETS]
    ls = label_space()
    for d, name in enumerate(DATASETS):
        rows = text[ls.offsets[d]:ls.offsets[d + 1]].astype(np.float64)
        k = len(rows)
        conf = np.zeros((k, k), np.int64)
        local = LabelSpace.from_datasets([name])
        images = eval_data.make_eval_dataset(name, label_space=local, data_dir=synthetic_dir)
        for i in range(2):
            image, label = images[i]["image"], images[i]["label"]
            emb = np.asarray(language(variables, image[None])[0], np.float64)
            cos = emb @ rows.T  # [h, w, k]
            h, w = image.shape[:2]
            up = np.einsum("Hh,hwk,Ww->HWk", _interp_matrix(cos.shape[0], h), cos,
                           _interp_matrix(cos.shape[1], w))
            pred, ok = up.argmax(-1), label >= 0
            np.add.at(conf, (label[ok], pred[ok]), 1)
        m = got[f"{name}/language"]
        tp, union = np.diag(conf), conf.sum(0) + conf.sum(1) - np.diag(conf)
        iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
        assert m["num_images"] == 2 and m["class_names"] == list(local.class_names[0])
        np.testing.assert_allclose(m["mIoU"], 100 * np.nanmean(iou), atol=0.2)
        np.testing.assert_allclose(m["aAcc"], 100 * tp.sum() / conf.sum(), atol=0.2)


def test_held_out_datasets_are_embedded_by_stage_1s_text_model(tmp_path):
    """eval.held_out: T of a dataset outside pretraining, by its own class names through the
    stage-1 text model next to text.embeddings (context included); misuse is named."""
    from ms3_jax.demo import tiny_clip
    from ms3_jax.models import clip_text
    from ms3_jax.method import adapted_text
    held = LabelSpace.from_datasets(["synth_d"])
    clip_dir = tiny_clip.save_tiny_clip(tmp_path / "clip", tiny_clip.DEFAULT_WORDS)
    module, params, tokenizer = clip_text.load_clip_text(str(clip_dir))
    ctx = 0.1 * jax.random.normal(jax.random.key(0), (13, module.config.width))
    adapted_text.save_adapted_text(str(tmp_path / "w1" / adapted_text.TEXT_MODEL_DIR), module, params,
                                 tokenizer, ctx, str(clip_dir))
    config = tiny_config()
    config.update_from_flattened_dict({"eval_every": 5, "eval.held_out": ("synth_d",),
                                       "text.embeddings": str(tmp_path / "w1" / "text_embeddings.npz")})
    got = pretrain.held_out_text_embeddings(config)
    expected = clip_text.encode_classes(module, params, tokenizer, list(held.names), ctx=ctx)
    assert list(got) == ["synth_d"] and got["synth_d"].shape == (held.num_classes, 32)
    np.testing.assert_allclose(got["synth_d"], expected, atol=1e-6)

    config.eval.held_out = ("synth_a",)
    with pytest.raises(ValueError, match=r"\['synth_a'\] are pretraining datasets"):
        pretrain.held_out_text_embeddings(config)
    config.eval.held_out = ("synth_d",)
    config.text.embeddings = str(tmp_path / "elsewhere" / "text_embeddings.npz")
    with pytest.raises(FileNotFoundError, match=r"eval.held_out=\('synth_d',\) .*elsewhere"):
        pretrain.held_out_text_embeddings(config)
    config.loss.kind = "ce_single_head"
    with pytest.raises(ValueError, match="eval.held_out segments by nearest T"):
        pretrain.held_out_text_embeddings(config)
    config.eval_every = 0  # no evaluation: nothing to embed
    assert pretrain.held_out_text_embeddings(config) == {}
