"""CLIP vision tower: parity with transformers, dense outputs, position interpolation, loading, errors."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

from ms3_jax.demo import tiny_clip
from ms3_jax.models import clip_vision as cv
from ms3_jax.testing.clip_fixtures import TINY_PROJ_DIM, TINY_WORDS

TOL = 1e-5
# ViT-B/32 layout at a tiny width: 32 px patches on a 128 px image (a 4 x 4 grid), 2 layers.
P32_OVERRIDES = {"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 2,
                 "num_attention_heads": 3, "image_size": 128, "patch_size": 32}


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _pixels(seed: int, b: int, h: int, w: int) -> np.ndarray:
    """Random NHWC pixels at the scale of CLIPProcessor's normalised values."""
    return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


def _nchw(pixels_BxHxWx3: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels_BxHxWx3.transpose(0, 3, 1, 2)))


def _hf_vision(directory, cls=transformers.CLIPVisionModelWithProjection):
    """The transformers reference (eager attention, eval mode); no vision key may be missing."""
    model, info = cls.from_pretrained(directory, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    return model.eval()


def _hf_run(hf, pixels_BxHxWx3: np.ndarray, interpolate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(image_embeds [B, P], last_hidden_state [B, 1 + N, D]) of a CLIPVisionModelWithProjection."""
    with torch.no_grad():
        out = hf(pixel_values=_nchw(pixels_BxHxWx3), interpolate_pos_encoding=interpolate)
    return out.image_embeds.numpy(), out.last_hidden_state.numpy()


def _dense_reference(hf, last_hidden_BxNxD: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """DenseCLIP pixel embeddings in float64: post_layernorm + visual_projection on the patch tokens."""
    ln = hf.vision_model.post_layernorm
    x_BxGxD = last_hidden_BxNxD[:, 1:].astype(np.float64)
    mean_BxGx1 = x_BxGxD.mean(-1, keepdims=True)
    var_BxGx1 = ((x_BxGxD - mean_BxGx1) ** 2).mean(-1, keepdims=True)
    y_BxGxD = (x_BxGxD - mean_BxGx1) / np.sqrt(var_BxGx1 + ln.eps)
    y_BxGxD = y_BxGxD * ln.weight.detach().double().numpy() + ln.bias.detach().double().numpy()
    emb_BxGxP = y_BxGxD @ hf.visual_projection.weight.detach().double().numpy().T
    return emb_BxGxP.reshape(emb_BxGxP.shape[0], grid_h, grid_w, -1)


def _torch_bicubic_reference(table_PxD: np.ndarray, grid_h: int, grid_w: int) -> np.ndarray:
    """Class position kept, patch grid resized by torch bicubic (align_corners=False) in float64."""
    grid = int(round((table_PxD.shape[0] - 1) ** 0.5))
    patch_1xDxGxG = torch.from_numpy(table_PxD[1:].astype(np.float64)).reshape(grid, grid, -1).permute(2, 0, 1)[None]
    resized_1xDxHxW = torch.nn.functional.interpolate(patch_1xDxGxG, size=(grid_h, grid_w), mode="bicubic",
                                                      align_corners=False)
    patch_NxD = resized_1xDxHxW[0].permute(1, 2, 0).reshape(grid_h * grid_w, -1).numpy()
    return np.concatenate([table_PxD[:1].astype(np.float64), patch_NxD], axis=0)


def _copy_without(src, dst, *names):
    shutil.copytree(src, dst)
    for name in names:
        os.remove(os.path.join(dst, name))
    return dst


# ---------------------------------------------------------------- fixtures (module scope)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random full ``CLIPModel``: vision width 16, 1 layer, 32 px images, 16 px patches."""
    return tiny_clip.save_tiny_clip(tmp_path_factory.mktemp("clip_vision"), TINY_WORDS, full=True,
                                    proj_dim=TINY_PROJ_DIM)


@pytest.fixture(scope="module")
def clip_p32_dir(tmp_path_factory):
    return tiny_clip.save_tiny_clip(tmp_path_factory.mktemp("clip_vision_p32"), TINY_WORDS, full=True,
                                    proj_dim=TINY_PROJ_DIM, seed=1, vision_overrides=P32_OVERRIDES)


@pytest.fixture(scope="module")
def loaded(clip_dir):
    return cv.load_clip_vision(clip_dir)


@pytest.fixture(scope="module")
def hf_vision(clip_dir):
    return _hf_vision(clip_dir)


# ---------------------------------------------------------------- parity with transformers


def test_image_embeds_match_transformers(clip_dir, loaded, hf_vision):
    module, variables = loaded
    pixels = _pixels(0, 3, 32, 32)
    out = module.apply(variables, pixels)
    ref_BxP, _ = _hf_run(hf_vision, pixels)
    with torch.no_grad():
        features_BxP = _hf_vision(clip_dir, transformers.CLIPModel).get_image_features(
            pixel_values=_nchw(pixels)).pooler_output.numpy()
    assert out["image_embeds"].shape == (3, TINY_PROJ_DIM) and out["image_embeds"].dtype == jnp.float32
    assert _max_diff(out["image_embeds"], ref_BxP) <= TOL
    assert _max_diff(out["image_embeds"], features_BxP) <= TOL
    assert float(np.abs(ref_BxP).max()) > 0.1  # a non-trivial comparison


def test_dense_matches_last_hidden_state_reference(loaded, hf_vision):
    module, variables = loaded
    pixels = _pixels(1, 2, 32, 32)
    out = module.apply(variables, pixels)
    _, hidden_BxNxD = _hf_run(hf_vision, pixels)
    assert out["dense"].shape == (2, 2, 2, TINY_PROJ_DIM) and out["dense"].dtype == jnp.float32
    assert _max_diff(out["dense"], _dense_reference(hf_vision, hidden_BxNxD, 2, 2)) <= TOL
    # Patch (i, j) of the grid is token 1 + i * W/p + j: changing only pixels of patch (1, 0) moves
    # that patch's embedding most (every token still sees it through attention).
    changed = pixels.copy()
    changed[:, 16:, :16] += 1.0
    moved_BxHxW = np.abs(module.apply(variables, changed)["dense"] - out["dense"]).max(-1)
    assert (moved_BxHxW.reshape(2, 4).argmax(-1) == 2).all()


@pytest.mark.parametrize("size", [(48, 64), (16, 64), (64, 32)], ids=["48x64", "16x64", "64x32"])
def test_other_input_sizes_match_transformers_interpolation(size, loaded, hf_vision):
    """H != W, also 1 x 4 patches (as many as the native 2 x 2, which transformers interpolates too)."""
    module, variables = loaded
    h, w = size
    pixels = _pixels(2, 2, h, w)
    out = jax.jit(module.apply)(variables, pixels)
    ref_BxP, hidden_BxNxD = _hf_run(hf_vision, pixels, interpolate=True)
    assert out["image_embeds"].shape == (2, TINY_PROJ_DIM)
    assert out["dense"].shape == (2, h // 16, w // 16, TINY_PROJ_DIM)
    assert _max_diff(out["image_embeds"], ref_BxP) <= TOL
    assert _max_diff(out["dense"], _dense_reference(hf_vision, hidden_BxNxD, h // 16, w // 16)) <= TOL


def test_patch32_layout_matches_transformers(clip_p32_dir):
    module, variables = cv.load_clip_vision(clip_p32_dir)
    c = module.config
    assert (c.patch_size, c.image_size, c.grid_size, c.width, c.num_layers, c.num_heads, c.mlp_dim) == (
        32, 128, 4, 24, 2, 3, 48)
    hf = _hf_vision(clip_p32_dir)
    for (h, w), interpolate in (((128, 128), False), ((96, 64), True)):
        pixels = _pixels(3, 2, h, w)
        out = module.apply(variables, pixels)
        ref_BxP, hidden_BxNxD = _hf_run(hf, pixels, interpolate=interpolate)
        assert out["dense"].shape == (2, h // 32, w // 32, TINY_PROJ_DIM)
        assert _max_diff(out["image_embeds"], ref_BxP) <= TOL
        assert _max_diff(out["dense"], _dense_reference(hf, hidden_BxNxD, h // 32, w // 32)) <= TOL


# ---------------------------------------------------------------- position interpolation


@pytest.mark.parametrize("p32", [False, True], ids=["grid2", "grid4"])
def test_position_interpolation_matches_torch_bicubic(p32, loaded, clip_p32_dir):
    variables = cv.load_clip_vision(clip_p32_dir)[1] if p32 else loaded[1]
    table_PxD = np.asarray(variables["params"]["position_embedding"])
    for grid_h, grid_w in ((3, 4), (5, 3), (1, 4), (2, 7), (3, 2), (6, 6)):
        ours = cv.interpolate_position_embedding(jnp.asarray(table_PxD), grid_h, grid_w)
        ref = _torch_bicubic_reference(table_PxD, grid_h, grid_w)
        assert ours.shape == (1 + grid_h * grid_w, table_PxD.shape[1])
        np.testing.assert_array_equal(ours[0], table_PxD[0])  # the class position is kept
        assert _max_diff(ours, ref) <= TOL, (grid_h, grid_w)


def test_native_size_interpolation_is_identity(loaded):
    variables = loaded[1]
    table_PxD = variables["params"]["position_embedding"]
    np.testing.assert_array_equal(cv.interpolate_position_embedding(table_PxD, 2, 2), table_PxD)
    # The general resize path is exactly the identity too (no shortcut needed for bit-exactness).
    for grid in (1, 2, 4, 7, 14):  # 7 and 14: ViT-B/32 and ViT-B/16 at 224 px
        np.testing.assert_array_equal(cv._bicubic_matrix(grid, grid), np.eye(grid))
    eye_GxG = cv._bicubic_matrix(2, 2)
    patch_GxGxD = table_PxD[1:].reshape(2, 2, -1)
    resized_GxGxD = jnp.einsum("hy,wx,yxd->hwd", jnp.asarray(eye_GxG, jnp.float32),
                               jnp.asarray(eye_GxG, jnp.float32), patch_GxGxD,
                               precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_array_equal(resized_GxGxD, patch_GxGxD)


# ---------------------------------------------------------------- config and loading


def test_config_from_hf(clip_dir):
    config = cv.CLIPVisionConfig.from_hf(clip_dir / "config.json")
    assert (config.width, config.num_layers, config.num_heads, config.mlp_dim) == (16, 1, 2, 32)
    assert (config.patch_size, config.image_size, config.proj_dim, config.hidden_act) == (
        16, 32, TINY_PROJ_DIM, "quick_gelu")
    with open(clip_dir / "config.json") as f:
        assert cv.CLIPVisionConfig.from_hf(json.load(f)) == config
    assert cv.CLIPVisionConfig.from_hf(transformers.CLIPConfig.from_pretrained(clip_dir)) == config
    # ViT-B/16 and ViT-B/32 are just configs; transformers' defaults are ViT-B/32's.
    b16 = cv.CLIPVisionConfig.from_hf(transformers.CLIPVisionConfig(patch_size=16))
    assert (b16.width, b16.num_layers, b16.patch_size, b16.grid_size, b16.proj_dim) == (768, 12, 16, 14, 512)
    assert cv.CLIPVisionConfig() == cv.CLIPVisionConfig.from_hf({"model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="clip_text_model"):
        cv.CLIPVisionConfig.from_hf({"model_type": "clip_text_model"})
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        cv.CLIPVisionConfig(image_size=100, patch_size=16)


def test_pytorch_bin_and_sharded_bfloat16_load(tmp_path, clip_dir, loaded):
    state = load_file(clip_dir / "model.safetensors")
    directory = _copy_without(clip_dir, tmp_path / "bin", "model.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, directory / "pytorch_model.bin")
    jax.tree_util.tree_map(np.testing.assert_array_equal, cv.load_clip_vision(directory)[1], loaded[1])

    directory = _copy_without(clip_dir, tmp_path / "sharded", "model.safetensors")
    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}
    keys = sorted(bf16)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_torch_file({k: bf16[k] for k in shard_keys}, directory / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    params = cv.load_clip_vision(directory)[1]["params"]
    kernel = params["patch_embedding"]["kernel"]
    assert kernel.dtype == jnp.float32
    expected = bf16["vision_model.embeddings.patch_embedding.weight"].to(torch.float32).numpy()
    np.testing.assert_array_equal(kernel, expected.transpose(2, 3, 1, 0))
    np.testing.assert_allclose(kernel, loaded[1]["params"]["patch_embedding"]["kernel"], rtol=1e-2)


def test_bfloat16_compute_keeps_float32_params(clip_dir, loaded):
    module_bf16, variables_bf16 = cv.load_clip_vision(clip_dir, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables_bf16))
    pixels = _pixels(4, 2, 32, 32)
    out_bf16 = module_bf16.apply(variables_bf16, pixels)
    out_f32 = loaded[0].apply(loaded[1], pixels)
    for key in ("image_embeds", "dense"):
        assert out_bf16[key].dtype == jnp.float32
        rel = np.linalg.norm(out_bf16[key] - out_f32[key]) / np.linalg.norm(out_f32[key])
        assert rel < 0.1, key


def test_hub_id_resolves_from_local_cache_offline(tmp_path, clip_dir):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    repo = tmp_path / "hub" / "models--tiny--clip"
    shutil.copytree(clip_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    module, _ = cv.load_clip_vision("tiny/clip", cache_dir=str(tmp_path / "hub"))
    assert module.config.width == 16
    with pytest.raises(OSError, match="not/cached"):
        cv.load_clip_vision("not/cached", cache_dir=str(tmp_path / "hub"))


# ---------------------------------------------------------------- errors


def test_missing_directory_and_files(tmp_path, clip_dir):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        cv.load_clip_vision(missing)
    d = _copy_without(clip_dir, tmp_path / "noweights", "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors") as e:
        cv.load_clip_vision(d)
    assert str(d) in str(e.value)
    d = _copy_without(clip_dir, tmp_path / "noconfig", "config.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json") as e:
        cv.load_clip_vision(d)
    assert str(d) in str(e.value)


def test_text_only_checkpoint_is_refused(tmp_path):
    d = tiny_clip.save_tiny_clip(tmp_path / "text_only", TINY_WORDS, full=False, proj_dim=TINY_PROJ_DIM)
    with pytest.raises(ValueError, match="clip_text_model"):
        cv.load_clip_vision(d)


def test_wrong_keys_listed_in_one_error(tmp_path, clip_dir):
    d = _copy_without(clip_dir, tmp_path / "badkeys", "model.safetensors")
    state = load_file(clip_dir / "model.safetensors")
    state["vision_model.pre_layernorm.weight"] = state.pop("vision_model.pre_layrnorm.weight")
    del state["visual_projection.weight"]
    state["vision_model.encoder.layers.0.mlp.fc1.bias"] = np.zeros(3, np.float32)
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError) as e:
        cv.load_clip_vision(d)
    msg = str(e.value)
    for key in ("vision_model.pre_layrnorm.weight", "visual_projection.weight",
                "vision_model.pre_layernorm.weight", "vision_model.encoder.layers.0.mlp.fc1.bias"):
        assert key in msg
    assert "missing keys (2)" in msg and "unexpected keys (1)" in msg and "wrong shapes (1)" in msg


def test_bad_input_shapes(loaded):
    module, variables = loaded
    with pytest.raises(ValueError, match=r"input size 40x48 \(HxW\) is not a multiple of the patch size 16"):
        module.apply(variables, _pixels(0, 1, 40, 48))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\] \(NHWC\), got shape \(1, 3, 32, 32\)"):
        module.apply(variables, _pixels(0, 1, 32, 32).transpose(0, 3, 1, 2))


def test_normalize_pixels_matches_clip_image_processor():
    """uint8 RGB -> CLIP's input, as CLIPImageProcessor gives it (rescale, normalise; no resize)."""
    images = np.random.default_rng(0).integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)
    processor = transformers.CLIPImageProcessor(do_resize=False, do_center_crop=False,
                                                do_convert_rgb=False)
    expected = processor(images=list(images), return_tensors="np")["pixel_values"]  # NCHW
    got = cv.normalize_pixels(images, cv.CLIP_PIXEL_MEAN, cv.CLIP_PIXEL_STD)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=2e-6)
    assert cv.normalize_pixels(images, cv.CLIP_PIXEL_MEAN, cv.CLIP_PIXEL_STD,
                               jnp.bfloat16).dtype == jnp.bfloat16


def test_pixel_statistics_from_preprocessor_config(tmp_path, clip_dir):
    # No preprocessor_config.json (the tiny stand-ins): CLIPImageProcessor's defaults.
    assert cv.pixel_statistics(clip_dir) == (cv.CLIP_PIXEL_MEAN, cv.CLIP_PIXEL_STD)
    defaults = transformers.CLIPImageProcessor()
    assert (tuple(defaults.image_mean), tuple(defaults.image_std)) == (cv.CLIP_PIXEL_MEAN, cv.CLIP_PIXEL_STD)
    transformers.CLIPImageProcessor(image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]
                                    ).save_pretrained(tmp_path)
    assert cv.pixel_statistics(tmp_path) == ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    (tmp_path / cv.PREPROCESSOR_FILE).write_text(json.dumps({"image_mean": [0.5, 0.5]}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: image_mean must have 3 values"):
        cv.pixel_statistics(tmp_path)
