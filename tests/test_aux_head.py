"""The auxiliary head of paper Tab. 7 (MMSeg's FCNHead on layer3, loss weight 0.4): its loss
against a float64 NumPy reference; inference and export ignore it; without it nothing changes."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.finetune import voc as voc_config
from ms3_jax.models import torch_format
from ms3_jax.models.deeplab import encoder_from_config
from ms3_jax.stages import finetune
from ms3_jax.testing.variables import random_variables

MODEL_CFG = {"variant": "v1c", "width": 0.125, "stage_sizes": [1, 1, 1, 1], "kernels": "xla"}


def segmentor(aux_head):
    return encoder_from_config(MODEL_CFG, "cpu", heads=(), num_classes=5, aux_head=aux_head)


def reference_ce(logits_BxhxwxK, labels_BxHxW, ignore=255):
    """float64: torch's bilinear (align_corners=False) to the labels, CE summed over labelled
    pixels, divided by all pixels (MMSeg `avg_non_ignore=False`)."""
    import torch
    x = torch.from_numpy(np.asarray(logits_BxhxwxK, np.float64)).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(x, size=labels_BxHxW.shape[1:], mode="bilinear",
                                         align_corners=False).permute(0, 2, 3, 1).numpy()
    logp = up - np.log(np.exp(up).sum(-1, keepdims=True))
    valid = labels_BxHxW != ignore
    nll = -np.take_along_axis(logp, np.where(valid, labels_BxHxW, 0)[..., None], -1)[..., 0]
    return np.sum(nll * valid) / labels_BxHxW.size


def test_the_loss_is_decode_ce_plus_0_4_aux_ce():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
    aux = rng.normal(size=(2, 2, 2, 5)).astype(np.float32)  # layer3 is coarser than the decoder
    labels = rng.integers(0, 5, (2, 16, 16))
    labels[0, :3] = 255
    weight = voc_config.get_config("tab7").loss.aux_weight
    assert weight == 0.4
    loss, terms = finetune.segmentor_loss({"logits": logits, "aux_logits": aux}, labels,
                                          aux_weight=weight)
    want = reference_ce(logits, labels) + 0.4 * reference_ce(aux, labels)
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(float(terms["loss_aux"]), reference_ce(aux, labels), rtol=1e-6)
    alone, none = finetune.segmentor_loss({"logits": logits}, labels)  # no auxiliary head
    np.testing.assert_allclose(float(alone), reference_ce(logits, labels), rtol=1e-6)
    assert none == {}


def test_configs_turn_it_on_for_tab7_only():
    default, tab7 = voc_config.get_config(""), voc_config.get_config("ms3,tab7,r101")
    assert not default.aux_head and default.model.variant == "v1"
    assert tab7.aux_head and tab7.model.variant == "v1c" and tab7.model.depth == 101
    assert tab7.init.kind == "ms3"
    assert not finetune.build_model(tab7, 5, "cpu").aux_head  # inference: without
    assert finetune.build_model(tab7, 5, "cpu", training=True).aux_head
    assert not finetune.build_model(default, 5, "cpu", training=True).aux_head


@functools.lru_cache(maxsize=None)
def _apply(model, train):
    return jax.jit(lambda v, x, r: model.apply(v, x, train=train, rngs={"dropout": r},
                                               mutable=["batch_stats"] if train else False))


def test_inference_ignores_it_and_without_it_nothing_changes():
    with_aux, without = segmentor(True), segmentor(False)
    shapes = lambda m: jax.tree_util.tree_map(
        lambda x: x.shape, jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
    tree_aux, tree = shapes(with_aux), shapes(without)
    assert set(tree_aux["params"]) - set(tree["params"]) == {"auxiliary_head"}
    drop = lambda t: {k: v for k, v in t.items() if k != "auxiliary_head"}
    assert drop(tree_aux["params"]) == tree["params"]
    assert tree_aux["batch_stats"]["backbone"] == tree["batch_stats"]["backbone"]
    assert tree_aux["params"]["auxiliary_head"]["convs_0"]["conv"]["kernel"] == (3, 3, 128, 32)
    variables = random_variables(with_aux, (1, 32, 32, 3), seed=1)
    images = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    rng = jax.random.PRNGKey(3)
    out_aux = _apply(with_aux, False)(variables, images, rng)
    out = _apply(without, False)(variables, images, rng)  # the aux params sit unused
    assert set(out_aux) - set(out) == {"aux_logits"} and out_aux["aux_logits"].shape == (2, 4, 4, 5)
    for k in out:
        np.testing.assert_array_equal(np.asarray(out_aux[k]), np.asarray(out[k]), err_msg=k)


@pytest.mark.slow
def test_training_without_it_is_unchanged_and_frozen_backbones_take_it():
    """The decode logits (dropout mask included) and the backbone's batch statistics are the
    same with and without the head; the frozen-backbone hook (Tab. 3) passes its map through."""
    with_aux, without = segmentor(True), segmentor(False)
    variables = random_variables(with_aux, (1, 32, 32, 3), seed=1)
    images = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    rng = jax.random.PRNGKey(3)
    (train_aux, stats_aux), (train, stats) = (_apply(m, True)(variables, images, rng)
                                              for m in (with_aux, without))
    np.testing.assert_array_equal(np.asarray(train_aux["logits"]), np.asarray(train["logits"]))
    for a, b in zip(*(jax.tree_util.tree_leaves(s["batch_stats"]["backbone"])
                      for s in (stats_aux, stats))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    def frozen(v, x, r):
        with nn.intercept_methods(finetune._eval_mode_backbone):
            return with_aux.apply(v, x, train=True, rngs={"dropout": r}, mutable=["batch_stats"])
    out, _ = jax.jit(frozen)(variables, images, rng)
    assert out["aux_logits"].shape == (2, 4, 4, 5)


def test_its_params_are_not_exported():
    with_aux, without = segmentor(True), segmentor(False)
    variables = random_variables(with_aux, (1, 32, 32, 3), seed=4)
    seg = torch_format.segmentor_state_dict(variables, with_aux)
    assert not [k for k in seg if "aux" in k]
    plain = {c: {k: v for k, v in variables[c].items() if k != "auxiliary_head"}
             for c in variables}
    assert sorted(seg) == sorted(torch_format.segmentor_state_dict(plain, without))
    backbone = torch_format.backbone_state_dict(variables, with_aux.backbone)
    assert all(k.startswith(("stem.", "layer")) for k in backbone)


def test_a_backbone_without_an_aux_map_is_refused():
    class Plain(nn.Module):
        output_stride: int = 8

        @nn.compact
        def __call__(self, x, train=False):
            return x[:, ::4, ::4], x[:, ::8, ::8]

    from ms3_jax.models.deeplab import MS3Encoder
    model = MS3Encoder(Plain(), head_channels=8, c1_channels=4, heads=(), num_classes=3,
                       aux_head=True)
    with pytest.raises(ValueError, match="aux_feature"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
