"""Image encoder: ResNet parity with a PyTorch reference, DeepLab-v3+ head, MS3Encoder outputs."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ms3_jax.models import torch_format
from ms3_jax.models.deeplab import MS3Encoder, encoder_from_config, resize_bilinear
from ms3_jax.models.cpu_kernels import CpuConv
from ms3_jax.stages.finetune import _eval_mode_backbone
from ms3_jax.models.resnet import OUTPUT_STRIDE_SETTINGS, Conv, ResNet
from ms3_jax.testing.torch_reference import TorchResNet, randomize_

torch.set_num_threads(2)


@functools.lru_cache(maxsize=None)
def _features_fn(model):
    return jax.jit(functools.partial(model.apply, train=False, method="features"))


@pytest.mark.slow
@pytest.mark.parametrize("output_stride,variant,conv", [  # every pair of the three settings once
    (8, "v1", CpuConv), (8, "v1c", Conv), (32, "v1", Conv), (32, "v1c", CpuConv)],
    ids=["8-v1-cpu", "8-v1c-xla", "32-v1-xla", "32-v1c-cpu"])  # conv: model.kernels
def test_resnet50_matches_torch_reference(variant, output_stride, conv):
    strides, dilations = OUTPUT_STRIDE_SETTINGS[output_stride]
    ref = randomize_(TorchResNet(variant=variant, strides=strides, dilations=dilations), seed=1)
    variables = torch_format.load_backbone_state_dict(ref.state_dict(), ResNet(variant=variant))
    model = ResNet(variant=variant, output_stride=output_stride, conv=conv)
    apply = _features_fn(model)
    rng = np.random.default_rng(0)
    for size in (64, 65):
        x = rng.standard_normal((1, size, size, 3)).astype(np.float32)
        with torch.no_grad():
            want = {k: v.permute(0, 2, 3, 1).numpy() for k, v in ref(torch.from_numpy(x).permute(0, 3, 1, 2)).items()}
        got = apply(variables, x)
        assert set(got) == {"stem", "layer1", "layer2", "layer3", "layer4"}
        for k in want:
            assert got[k].shape == want[k].shape, (k, size)
            err = np.max(np.abs(np.asarray(got[k]) - want[k])) / np.max(np.abs(want[k]))
            assert err < 1e-5, (k, size, err)
        assert got["layer4"].shape[1] == -(-size // output_stride)
        low, deep = jax.jit(functools.partial(model.apply, train=False))(variables, x)  # `Backbone`
        np.testing.assert_array_equal(low, got["layer1"])
        np.testing.assert_array_equal(deep, got["layer4"])


@pytest.mark.parametrize("variant", ["v1", "v1c"])
def test_backbone_round_trip_is_bit_exact_and_strict_loads(variant):
    model = ResNet(variant=variant, width=0.25)
    variables = jax.jit(model.init)(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3)))
    # Non-trivial batch statistics so that every leaf is checked.
    variables = jax.tree_util.tree_map(
        lambda x: x + jax.random.normal(jax.random.PRNGKey(4), x.shape), variables)
    sd = torch_format.backbone_state_dict(variables, model)
    back = torch_format.load_backbone_state_dict(sd, model)
    flat_a = jax.tree_util.tree_leaves_with_path(variables)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(back))
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]))
    ref = TorchResNet(variant=variant, base=16)
    missing, unexpected = ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    if variant == "v1":
        assert "layer1.0.downsample.0.weight" in sd and "bn1.running_mean" in sd
    else:
        assert {"stem.0.weight", "stem.1.running_var", "stem.7.weight"} <= set(sd)


def test_load_backbone_state_dict_lists_every_bad_key():
    ref = TorchResNet(base=8)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    del sd["layer2.0.conv1.weight"], sd["bn1.bias"]
    sd["layer9.0.conv1.weight"] = np.zeros((1,))
    sd["layer1.0.conv2.weight"] = np.zeros((3, 3, 3, 3), np.float32)
    with pytest.raises(torch_format.StateDictError) as e:
        torch_format.load_backbone_state_dict(sd, ResNet(width=0.125))
    msg = str(e.value)
    for key in ("layer2.0.conv1.weight", "bn1.bias", "layer9.0.conv1.weight", "layer1.0.conv2.weight"):
        assert key in msg
    assert "2 missing" in msg and "1 unexpected" in msg and "1 mis-shaped" in msg


def test_resize_bilinear_matches_torch():
    x = np.random.default_rng(0).standard_normal((2, 9, 7, 3)).astype(np.float32)
    for size in ((17, 13), (9, 7), (4, 3), (1, 1)):
        want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                               mode="bilinear", align_corners=False)
        np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), size),
                                   want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


TINY = dict(width=0.125, stage_sizes=(1, 1, 1, 1), emb_dim=16, kernels="xla")


def _tiny(num_classes=None, **cfg):
    return encoder_from_config(dict(TINY, **cfg), "cpu", num_classes=num_classes)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_ms3_encoder_shapes_and_unit_norm(output_stride):
    model = _tiny(5, output_stride=output_stride)
    images = jax.random.randint(jax.random.PRNGKey(0), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), images)
    out, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, images, rngs={"dropout": jax.random.PRNGKey(2)})
    assert out["language"].shape == out["visual"].shape == (2, 16, 16, 16)
    assert out["decoder"].shape == (2, 16, 16, 64)
    assert out["logits"].shape == (2, 16, 16, 5)
    for head in ("language", "visual"):
        np.testing.assert_allclose(jnp.linalg.norm(out[head], axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(out["language"], out["visual"])
    assert set(updates["batch_stats"]) == set(variables["batch_stats"])


def test_projection_heads_after_the_aspp_or_the_decoder():
    """`heads_at='aspp'` (paper 4.1: "after the ASPP layer"): embeddings at the output stride,
    from the same parameters; the decoder map and the logits are unchanged."""
    images = jax.random.randint(jax.random.PRNGKey(0), (1, 64, 64, 3), 0, 256).astype(jnp.uint8)
    at_decoder = _tiny(5, output_stride=8)
    variables = jax.jit(at_decoder.init)(jax.random.PRNGKey(1), images)
    a = jax.jit(at_decoder.apply)(variables, images)
    b = jax.jit(at_decoder.clone(heads_at="aspp").apply)(variables, images)  # same parameter tree
    assert a["language"].shape == (1, 16, 16, 16) and b["language"].shape == (1, 8, 8, 16)
    np.testing.assert_array_equal(a["decoder"], b["decoder"])
    np.testing.assert_array_equal(a["logits"], b["logits"])
    np.testing.assert_allclose(jnp.linalg.norm(b["visual"], axis=-1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="heads_at"):
        at_decoder.clone(heads_at="backbone").apply(variables, images)


def test_decoder_is_skipped_when_nothing_reads_it():
    """MS3 with the heads at the ASPP and no classes (the pretraining step): `decoder=False` gives
    the same embeddings and batch statistics, leaves the decoder's statistics as they were and
    returns no decoder map; a model whose heads or classifier read the map refuses it."""
    images = jax.random.randint(jax.random.PRNGKey(0), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    model = _tiny(None, output_stride=8, heads_at="aspp")
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), images)
    run = lambda decoder: jax.jit(functools.partial(  # noqa: E731
        model.apply, train=True, decoder=decoder, mutable=["batch_stats"]))(variables, images)
    (full, full_stats), (skipped, stats) = run(True), run(False)
    assert "decoder" in full and "decoder" not in skipped
    for head in ("language", "visual"):
        np.testing.assert_array_equal(full[head], skipped[head])
    decoder = {"c1_bottleneck", "sep_bottleneck_0", "sep_bottleneck_1"}
    for name, before in variables["batch_stats"]["decode_head"].items():
        after = stats["batch_stats"]["decode_head"][name]
        same = jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, before, after))
        assert same == (name in decoder), name
        jax.tree_util.tree_map(np.testing.assert_array_equal, after,
                               full_stats["batch_stats"]["decode_head"][name]) if name not in decoder else None
    for bad in (_tiny(5, output_stride=8, heads_at="aspp"), _tiny(None, output_stride=8)):
        with pytest.raises(ValueError, match="decoder=False"):
            bad.apply(variables, images, decoder=False)


@pytest.mark.slow
def test_ms3_encoder_bfloat16_compute_keeps_float32_params():
    model = _tiny(dtype="bfloat16")
    images = jnp.zeros((1, 32, 32, 3), jnp.uint8)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    out = jax.jit(functools.partial(model.apply, train=False))(variables, images + 100)
    assert out["decoder"].dtype == jnp.bfloat16
    assert out["language"].dtype == jnp.float32
    assert np.all(np.isfinite(out["language"]))
    np.testing.assert_allclose(jnp.linalg.norm(out["language"], axis=-1), 1.0, rtol=1e-4)


def test_segmentor_state_dict_uses_mmseg_names_and_round_trips():
    model = _tiny(7)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    sd = torch_format.segmentor_state_dict(variables, model)
    c = 64  # decoder channels at width 1/8
    expected_shapes = {
        "backbone.conv1.weight": (8, 3, 7, 7),
        "decode_head.image_pool.1.conv.weight": (c, 256, 1, 1),
        "decode_head.aspp_modules.0.conv.weight": (c, 256, 1, 1),
        "decode_head.aspp_modules.1.depthwise_conv.conv.weight": (256, 1, 3, 3),
        "decode_head.aspp_modules.3.pointwise_conv.bn.running_var": (c,),
        "decode_head.bottleneck.conv.weight": (c, 5 * c, 3, 3),
        "decode_head.c1_bottleneck.conv.weight": (6, 32, 1, 1),
        "decode_head.sep_bottleneck.0.depthwise_conv.conv.weight": (c + 6, 1, 3, 3),
        "decode_head.sep_bottleneck.1.pointwise_conv.conv.weight": (c, c, 1, 1),
        "decode_head.conv_seg.weight": (7, c, 1, 1),
        "decode_head.conv_seg.bias": (7,),
    }
    for k, shape in expected_shapes.items():
        assert sd[k].shape == shape, k
    assert not any(k.startswith("proj_") or ".proj_" in k for k in sd)
    back = torch_format.load_segmentor_state_dict(sd, model)
    np.testing.assert_array_equal(back["params"]["decode_head"]["bottleneck"]["conv"]["kernel"],
                                  variables["params"]["decode_head"]["bottleneck"]["conv"]["kernel"])
    np.testing.assert_array_equal(back["params"]["conv_seg"]["bias"], variables["params"]["conv_seg"]["bias"])


class ToyBackbone(nn.Module):
    """A `deeplab.Backbone` that is no ResNet (and has no PyTorch format): two strided convs + BN."""

    output_stride: int = 16

    @nn.compact
    def __call__(self, x, train):
        low = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(
            nn.Conv(8, (3, 3), strides=4, name="low")(x)))
        return low, nn.Conv(16, (3, 3), strides=self.output_stride // 4, name="deep")(low)


def test_any_backbone_module_plugs_into_the_encoder():
    """The encoder asks its backbone for `(low, deep)` and `output_stride` only: a toy backbone gives
    the expected shapes (decoder at the low map's stride 4, ASPP at its output stride), its
    variables sit under `backbone`, and the frozen fine-tuning hook freezes it as it does a ResNet."""
    model = MS3Encoder(ToyBackbone(), head_channels=12, c1_channels=4, emb_dim=8, num_classes=3)
    images = jax.random.randint(jax.random.PRNGKey(0), (2, 64, 64, 3), 0, 256).astype(jnp.uint8)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), images)
    assert set(variables["params"]["backbone"]) == {"low", "deep", "bn"}
    out = jax.jit(model.apply)(variables, images)
    assert out["decoder"].shape == (2, 16, 16, 12) and out["logits"].shape == (2, 16, 16, 3)
    assert out["language"].shape == out["visual"].shape == (2, 16, 16, 8)
    at_aspp = jax.jit(model.clone(heads_at="aspp").apply)(variables, images)
    assert at_aspp["language"].shape == (2, 4, 4, 8)
    with nn.intercept_methods(_eval_mode_backbone):
        _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
            variables, images, rngs={"dropout": jax.random.PRNGKey(2)})
    np.testing.assert_array_equal(updates["batch_stats"]["backbone"]["bn"]["mean"],
                                  variables["batch_stats"]["backbone"]["bn"]["mean"])


def test_export_refuses_a_backbone_without_a_torch_format():
    model = MS3Encoder(ToyBackbone(), head_channels=12, c1_channels=4, emb_dim=8)
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)))
    refused = (r"backbone ToyBackbone has no PyTorch format \(torch_format=None, "
               r"known: \['resnet', 'timm_vit'\]\)")
    with pytest.raises(ValueError, match=refused):
        torch_format.backbone_state_dict(variables, model.backbone)
    with pytest.raises(ValueError, match=refused):
        torch_format.segmentor_state_dict(variables, model)
    with pytest.raises(ValueError, match=refused):
        torch_format.load_backbone_state_dict({}, model.backbone)


@pytest.mark.slow
def test_resnet101_v1c_matches_torch_reference():
    """Depth 101 with the deep stem (Tab. 7's Res101-v1c) at width 1/8, output stride 8."""
    ref = randomize_(TorchResNet(variant="v1c", base=8, stage_sizes=(3, 4, 23, 3)), seed=2)
    model = ResNet(depth=101, variant="v1c", width=0.125, conv=Conv)
    variables = torch_format.load_backbone_state_dict(ref.state_dict(), model)
    x = np.random.default_rng(1).standard_normal((1, 48, 48, 3)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2))["layer4"].permute(0, 2, 3, 1).numpy()
    got = np.asarray(_features_fn(model)(variables, x)["layer4"])
    assert got.shape == want.shape == (1, 6, 6, 256)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-5
