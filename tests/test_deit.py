"""DeiT backbone (paper Tab. 7): shapes through the neck, the position-embedding resample against a
float64 NumPy reference, timm-named export strictly loaded into a PyTorch ViT with timm's names
and forward parity, MMSeg's names, the neck against MMSeg's `MultiLevelNeck`."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from ms3_jax.models import torch_format
from ms3_jax.models.deeplab import encoder_from_config
from ms3_jax.models.deit import DeiT
from ms3_jax.models.resize import resize_position_table
from ms3_jax.testing.torch_reference import TorchMultiLevelNeck, TorchViT, randomize_vit_
from ms3_jax.testing.variables import random_variables

torch.set_num_threads(2)

# A tiny DeiT: 32 px native grid of 16 px patches, 2 blocks of width 32.
TINY_VIT = dict(img_size=32, patch_size=16, embed_dim=32, num_layers=2, num_heads=2, mlp_dim=64,
                out_indices=(0, 1))
TINY_TORCH = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)


def _tiny_encoder(num_classes=None, **cfg):
    return encoder_from_config(dict(backbone="deit", width=0.125, emb_dim=16, kernels="xla",
                                    **TINY_VIT, **cfg), "cpu", num_classes=num_classes)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_deit_encoder_maps_at_strides_4_and_the_output_stride(output_stride):
    model = _tiny_encoder(5, output_stride=output_stride, heads_at="aspp")
    assert isinstance(model.backbone, DeiT) and model.output_stride == output_stride
    images = jax.ShapeDtypeStruct((2, 64, 48, 3), jnp.uint8)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(1), images)
    assert set(variables["params"]["backbone"]) == {
        "cls_token", "pos_embed", "patch_embed", "blocks_0", "blocks_1", "norm", "neck"}
    assert variables["params"]["backbone"]["pos_embed"].shape == (1, 1 + 2 * 2, 32)  # 32 px native
    out = jax.eval_shape(model.apply, variables, images)
    s = output_stride
    assert out["decoder"].shape == (2, 16, 12, 64) and out["logits"].shape == (2, 16, 12, 5)
    assert out["language"].shape == (2, 64 // s, 48 // s, 16)
    # Sizes that are no multiple of the patch: padded, maps of ceil(H / stride).
    low, deep = jax.eval_shape(model.backbone.apply, {"params": variables["params"]["backbone"]},
                               jax.ShapeDtypeStruct((1, 50, 70, 3), jnp.float32))
    assert low.shape == (1, 13, 18, 32) and deep.shape == (1, -(-50 // s), -(-70 // s), 32)


def test_deit_bfloat16_compute_keeps_float32_params():
    model = _tiny_encoder(dtype="bfloat16")
    images = jnp.full((1, 32, 32, 3), 100, jnp.uint8)
    variables = random_variables(model, images.shape, scale=0.1)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
        jax.eval_shape(model.init, jax.random.PRNGKey(0), images)))
    out = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    assert out["decoder"].dtype == jnp.bfloat16 and np.all(np.isfinite(out["language"]))


def test_unknown_backbone_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"model.backbone must be one of \['deit', 'resnet'\], "
                                         r"got 'vit'"):
        encoder_from_config(dict(backbone="vit"), "cpu")
    with pytest.raises(ValueError, match="output_stride"):
        jax.eval_shape(_tiny_encoder(output_stride=32).init, jax.random.PRNGKey(0),
                       jnp.zeros((1, 32, 32, 3)))


def _reference_resample(table_GxGxD: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Antialiased bicubic (PIL's a = -0.5 kernel, stretched by the scale when shrinking, taps
    renormalised), written per output pixel in float64."""
    def kernel(t):
        t = abs(t)
        return (1.5 * t - 2.5) * t * t + 1 if t < 1 else (
            ((t - 5) * t + 8) * t - 4) * -0.5 if t < 2 else 0.0

    def weights(n_in, n_out):
        scale = n_in / n_out
        stretch = max(scale, 1.0)
        rows = []
        for o in range(n_out):
            center = (o + 0.5) * scale
            taps = [j for j in range(n_in) if abs(j + 0.5 - center) < 2 * stretch]
            w = {j: kernel((j + 0.5 - center) / stretch) for j in taps}
            total = sum(w.values())
            rows.append({j: v / total for j, v in w.items()})
        return rows

    g, _, d = table_GxGxD.shape
    out = np.zeros((out_h, out_w, d))
    for i, wi in enumerate(weights(g, out_h)):
        for j, wj in enumerate(weights(g, out_w)):
            for a, va in wi.items():
                for b, vb in wj.items():
                    out[i, j] += va * vb * table_GxGxD[a, b]
    return out


@pytest.mark.parametrize("new_grid", [(7, 5), (2, 3), (4, 4)])
def test_position_table_resample_matches_a_float64_reference(new_grid):
    """timm's `resample_abs_pos_embed` (bicubic, antialias): the class row kept, the patch rows
    resized; up (7 x 5), down (2 x 3) and unchanged (the table itself)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((1, 1 + 4 * 4, 6))
    got = np.asarray(resize_position_table(jnp.asarray(table, jnp.float32), (4, 4), new_grid))
    want = _reference_resample(table[0, 1:].reshape(4, 4, 6), *new_grid)
    assert got.shape == (1, 1 + new_grid[0] * new_grid[1], 6)
    np.testing.assert_array_equal(got[0, 0], table[0, 0].astype(np.float32))
    np.testing.assert_allclose(got[0, 1:].reshape(*new_grid, 6), want, rtol=0, atol=1e-5)
    with torch.no_grad():  # and torch itself, as timm calls it
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(table[:, 1:].reshape(1, 4, 4, 6)).permute(0, 3, 1, 2),
            size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    np.testing.assert_allclose(got[0, 1:], ref.flatten(2).transpose(1, 2)[0].numpy(), atol=1e-5)


def _random_torch_vit(seed=1):
    return randomize_vit_(TorchViT(**TINY_TORCH), seed=seed)


def test_timm_state_dict_loads_and_export_strictly_loads_into_timm_names():
    ref = _random_torch_vit()
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    backbone = DeiT(**TINY_VIT)
    variables = torch_format.load_backbone_state_dict(dict(sd, **{
        "head.weight": np.zeros((10, 32)), "head.bias": np.zeros(10)}), backbone)  # ignored
    assert set(variables) == {"params"} and "neck" not in variables["params"]
    assert variables["params"]["blocks_1"]["attn"]["qkv"]["kernel"].shape == (3, 32, 32)
    back = torch_format.backbone_state_dict(variables, backbone)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    fresh = TorchViT(**TINY_TORCH)
    fresh.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in back.items()},
                          strict=True)


@pytest.mark.parametrize("layout,filename", [("torchvision / timm", "deit.safetensors"),
                                             ("DeiT release", "deit_base_patch16_224-b5f2ef4d.pth")])
def test_deit_files_are_recognised_and_load_the_same_values(layout, filename, tmp_path, caplog):
    """A timm file and facebookresearch/deit's release ({'model': timm names + head, 'epoch'})
    as starts (`init.path`, `model.init_from`): the layout named, the head left out."""
    import logging

    from safetensors.numpy import save_file
    sd = {k: v.numpy() for k, v in _random_torch_vit(seed=6).state_dict().items()}
    with_head = dict(sd, **{"head.weight": np.ones((10, 32), np.float32),
                            "head.bias": np.ones(10, np.float32)})
    path = str(tmp_path / filename)
    if filename.endswith(".safetensors"):
        save_file(with_head, path)
    else:
        torch.save({"model": {k: torch.from_numpy(v) for k, v in with_head.items()},
                    "epoch": 299}, path)
    encoder = _tiny_encoder()
    with caplog.at_level(logging.INFO):
        got = torch_format.load_backbone_file(path, encoder)
    left_out = 2 if layout == "DeiT release" else 0  # timm files: torch_format ignores head.*
    assert f"{layout} layout" in caplog.text
    assert f"2 transformer blocks; {left_out} keys of other parts left out" in caplog.text
    want = torch_format.load_backbone_state_dict(sd, encoder.backbone)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_export_of_an_encoder_leaves_the_neck_out():
    model = _tiny_encoder()
    sd = torch_format.backbone_state_dict(random_variables(model), model.backbone)
    assert not any("neck" in k or "lateral" in k for k in sd)
    assert set(sd) == set(TorchViT(**TINY_TORCH).state_dict())


@pytest.mark.parametrize("size", [(32, 32), (48, 64)])
def test_forward_parity_with_the_torch_vit(size):
    """Final normed tokens (timm's `forward_features`) within 1e-5 in float32, at the native
    grid and at a resampled one (48 x 64 px: 3 x 4 patches from the 2 x 2 table)."""
    ref = _random_torch_vit(seed=2)
    backbone = DeiT(**TINY_VIT)
    loaded = torch_format.load_backbone_state_dict(ref.state_dict(), backbone)
    params = {**random_variables(backbone)["params"], **loaded["params"]}  # + a random neck
    x = np.random.default_rng(0).standard_normal((2, *size, 3)).astype(np.float32)
    got = jax.jit(functools.partial(backbone.apply, method="features"))({"params": params}, x)
    with torch.no_grad():
        want, blocks = ref.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2),
                                            return_blocks=True)
    scale = np.max(np.abs(want.numpy()))
    assert np.max(np.abs(np.asarray(got["tokens"]) - want.numpy())) / scale < 1e-5
    # The neck reads the first out index's tokens and the normed last ones, as MMSeg's.
    neck = TorchMultiLevelNeck([32, 32], 32, [4, 2]).eval()
    neck.load_state_dict({k[len("neck."):]: torch.from_numpy(v) for k, v in
                          torch_format.segmentor_state_dict(
                              {"params": {"backbone": params, "decode_head": {}}},
                              _tiny_encoder()).items() if k.startswith("neck.")}, strict=True)
    gh, gw = size[0] // 16, size[1] // 16
    on_grid = lambda t: t[:, 1:].transpose(1, 2).reshape(2, 32, gh, gw)
    with torch.no_grad():
        want_low, want_deep = neck([on_grid(blocks[0]), on_grid(want)])
    for g, w in zip((got["low"], got["deep"]), (want_low, want_deep)):
        w = w.permute(0, 2, 3, 1).numpy()
        assert g.shape == w.shape
        assert np.max(np.abs(np.asarray(g) - w)) / np.max(np.abs(w)) < 1e-5


def test_segmentor_export_has_mmseg_vit_names_and_round_trips():
    model = _tiny_encoder(4)
    variables = random_variables(model)
    sd = torch_format.segmentor_state_dict(variables, model)
    for key in ("cls_token", "pos_embed", "patch_embed.projection.weight", "layers.1.ln1.weight",
                "layers.1.attn.attn.in_proj_weight", "layers.1.attn.attn.in_proj_bias",
                "layers.0.ffn.layers.0.0.bias", "layers.0.attn.attn.out_proj.weight",
                "layers.0.ffn.layers.1.weight", "ln1.weight"):
        assert "backbone." + key in sd, key
    for key in ("neck.lateral_convs.0.conv.weight", "neck.convs.1.conv.bias",
                "decode_head.bottleneck.conv.weight", "decode_head.conv_seg.weight"):
        assert key in sd, key
    assert not any(".blocks." in k or "norm" in k for k in sd)
    back = torch_format.load_segmentor_state_dict(sd, model)
    for path in (("backbone", "blocks_1", "attn", "proj", "kernel"), ("backbone", "neck", "convs_0",
                 "conv", "kernel"), ("backbone", "pos_embed"), ("conv_seg", "bias")):
        a, b = variables["params"], back["params"]
        for p in path:
            a, b = a[p], b[p]
        np.testing.assert_array_equal(a, b)


def test_timm_to_mmseg_keys_as_mmsegs_converter():
    """The renames of MMSeg's tools/model_converters/vit2mmseg.py, on DeiT-B's keys."""
    timm_keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                 "blocks.11.norm1.weight", "blocks.11.attn.qkv.weight", "blocks.11.attn.qkv.bias",
                 "blocks.11.attn.proj.weight", "blocks.11.norm2.bias", "blocks.11.mlp.fc1.weight",
                 "blocks.11.mlp.fc2.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"]
    mmseg_keys = ["cls_token", "pos_embed", "patch_embed.projection.weight",
                  "patch_embed.projection.bias", "layers.11.ln1.weight",
                  "layers.11.attn.attn.in_proj_weight", "layers.11.attn.attn.in_proj_bias",
                  "layers.11.attn.attn.out_proj.weight", "layers.11.ln2.bias",
                  "layers.11.ffn.layers.0.0.weight", "layers.11.ffn.layers.1.bias", "ln1.weight",
                  "ln1.bias"]
    converted = torch_format.timm_vit_to_mmseg({k: i for i, k in enumerate(timm_keys)})
    assert list(converted) == mmseg_keys
    assert list(converted.values()) == list(range(len(mmseg_keys)))
    assert list(torch_format.mmseg_vit_to_timm(converted)) == timm_keys[:-2]


def _tiny_deit_pretrain_config(**overrides):
    from configs import pretrain as pretrain_config
    from ms3_jax.testing.configs import with_overrides
    return with_overrides(pretrain_config.get_config("deit,tiny"), **{
        "batch_size": 8, "data.crop_size": 32, "model.img_size": 32, **overrides})


def test_pretrain_config_deit_is_deit_b16_with_adamw_3e4():
    from configs import pretrain as pretrain_config
    c = pretrain_config.get_config("deit")
    assert (c.model.backbone, c.model.embed_dim, c.model.num_layers, c.model.num_heads,
            c.model.patch_size, c.model.mlp_dim) == ("deit", 768, 12, 12, 16, 3072)
    assert (c.optim.optimizer, c.optim.base_lr, c.optim.lr_batch) == ("adamw", 3e-4, 128)
    assert pretrain_config.get_config("").model.backbone == "resnet"
    with pytest.raises(ValueError, match="valid: 'deit', 'rn50', 'tiny'"):
        pretrain_config.get_config("vit")


@pytest.mark.slow
def test_tiny_deit_ms3_steps_with_adamw_and_a_timm_start(tmp_path):
    """`:deit,tiny`: two MS3 steps on 8 devices from a timm-named file (`model.init_from`): the
    ViT is the file's in the online and momentum encoders, the neck stays fresh, AdamW moves
    the params, losses are finite."""
    from safetensors.numpy import save_file
    from ms3_jax.stages import pretrain
    from ms3_jax.testing.pretrain_inputs import label_space, random_batch, random_text
    config = _tiny_deit_pretrain_config(**{"optim.warmup_steps": 1, "relations.warmup_steps": 1})
    ref = randomize_vit_(TorchViT(**TINY_TORCH), seed=4)
    path = str(tmp_path / "deit.safetensors")
    save_file({k: v.numpy() for k, v in ref.state_dict().items()}, path)
    trainer = pretrain.Trainer(config, label_space(), random_text(config.model.emb_dim),
                               num_steps=4)
    fresh = trainer.init_state(jax.random.PRNGKey(0))
    state = pretrain.init_backbone_from(fresh, path, trainer)
    want = ref.blocks[1].attn.qkv.weight.detach().numpy().reshape(3, 32, 32).transpose(0, 2, 1)
    for tree in (state.params, state.ema_params):
        np.testing.assert_array_equal(tree["backbone"]["blocks_1"]["attn"]["qkv"]["kernel"], want)
    np.testing.assert_array_equal(state.params["backbone"]["neck"]["convs_0"]["conv"]["kernel"],
                                  fresh.params["backbone"]["neck"]["convs_0"]["conv"]["kernel"])
    before = jax.device_get(state.params["backbone"]["pos_embed"])
    rng = np.random.default_rng(0)
    for _ in range(2):
        state, metrics = trainer.step(state, trainer.global_batch(random_batch(rng)))
        assert np.isfinite(jax.device_get(metrics["loss"]))
    assert not np.allclose(jax.device_get(state.params["backbone"]["pos_embed"]), before)
    adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    assert any(adam(x) for x in jax.tree_util.tree_leaves(state.opt_state, is_leaf=adam))


@pytest.mark.slow
def test_tiny_deit_finetunes_from_a_timm_file(tmp_path):
    """`configs/finetune/voc.py:deit,tiny,torchvision`: AdamW fine-tuning from a timm-named file,
    evaluated on whole images of 48 px (3 x 3 patches: the position table resampled)."""
    from configs.finetune import voc
    from ms3_jax.demo import job
    from ms3_jax.engine import checkpointing
    from ms3_jax.stages import finetune
    from ms3_jax.testing.configs import with_overrides
    ref = randomize_vit_(TorchViT(**TINY_TORCH), seed=5)
    path = str(tmp_path / "deit.pth")
    torch.save(ref.state_dict(), path)
    config = with_overrides(voc.get_config("deit,tiny,torchvision"), **{
        "data.data_dir": str(tmp_path / "data"), "init.path": path, "num_steps": 2,
        "eval_every": 2, "checkpoint_every": 2, "log_every": 1, "eval.max_images": 2})
    assert config.optim.optimizer == "adamw" and config.model.backbone == "deit"
    job.prepare_builtin(config)
    workdir = str(tmp_path / "ft")
    finetune.train_and_evaluate(config, workdir)
    _, state = checkpointing.restore_state(workdir)
    qkv = np.asarray(state["params"]["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"])
    start = ref.blocks[0].attn.qkv.weight.detach().numpy().reshape(3, 32, 32).transpose(0, 2, 1)
    assert qkv.shape == start.shape and 0 < np.max(np.abs(qkv - start)) < 1e-2  # two AdamW steps


def test_mmseg_config_snippet_of_a_deit_workdir():
    from configs import pretrain as pretrain_config
    from ms3_jax import export
    model = pretrain_config.get_config("deit").model.to_dict()
    seg = export.mmseg_config_snippet("seg.pth", model, "segmentor", num_classes=21)
    for part in ("type='VisionTransformer'", "embed_dims=768", "num_layers=12", "mlp_ratio=4",
                 "out_indices=(2, 11)", "final_norm=True", "eps=1e-6",
                 "neck=dict(type='MultiLevelNeck', in_channels=[768, 768], out_channels=768, "
                 "scales=[4, 2])", "in_channels=768, in_index=1", "c1_in_channels=768",
                 "dilations=(1, 12, 24, 36)", "num_classes=21"):
        assert part in seg, part
    assert "vit2mmseg.py" in export.mmseg_config_snippet("b.pth", model, "backbone")
