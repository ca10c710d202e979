"""CLIP's ResNet tower (Tab. 5): parity with an open_clip-named PyTorch reference, open_clip
state dicts in and out, file formats, the pixel encoder."""
from __future__ import annotations

import dataclasses
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from ms3_jax.demo import tiny_clip
from ms3_jax.models import clip_resnet, clip_text, clip_vision, open_clip_format as ocf
from ms3_jax.testing import clip_resnet_reference as ref

TOL = 1e-5
# A tiny RN50 layout: 64 px native size (a 2 x 2 grid at stride 32), width 8 (layer4: 256
# channels, 4 heads of 64), 2-layer text tower of width 32.
TINY = dict(embed_dim=24, layers=(2, 1, 2, 1), width=8, image_size=64, vision_heads=4,
            vocab_size=50, context_length=12, text_width=32, text_heads=4, text_layers=2)


@pytest.fixture(scope="module")
def torch_clip():
    torch.manual_seed(0)
    return ref.randomize_(ref.CLIP(**TINY), seed=1)


@pytest.fixture(scope="module")
def state(torch_clip):
    return {k: v.detach().numpy() for k, v in torch_clip.state_dict().items()}


def _configs(state, dense="value"):
    return ocf.configs_from_state(state, {"quick_gelu": True, "text_cfg": {"heads": 4}},
                                  eos_token_id=TINY["vocab_size"] - 1, dense=dense)


def _pixels(seed, b, h, w):
    return np.random.default_rng(seed).normal(size=(b, h, w, 3)).astype(np.float32)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_configs_from_the_tensors(state):
    vision, text = _configs(state)
    assert vision == clip_resnet.CLIPResNetConfig(layers=(2, 1, 2, 1), width=8, proj_dim=24,
                                                  num_heads=4, image_size=64)
    assert (text.width, text.num_layers, text.num_heads, text.max_len, text.proj_dim,
            text.mlp_dim, text.hidden_act) == (32, 2, 4, 12, 24, 128, "quick_gelu")
    # QuickGELU (every published CLIP ResNet's) unless the config turns it off.
    acts = [ocf.configs_from_state(state, cfg, 49)[1].hidden_act
            for cfg in (None, {}, {"quick_gelu": True}, {"quick_gelu": False})]
    assert acts == ["quick_gelu"] * 3 + ["gelu"]
    # RN50's defaults: 32 heads of 64 channels on layer4's 2048, 1024-d output.
    rn50 = clip_resnet.CLIPResNetConfig()
    assert (rn50.embed_dim, rn50.num_heads, rn50.proj_dim, rn50.grid_size) == (2048, 32, 1024, 7)


@pytest.mark.parametrize("dense", ["value", "attention"])
@pytest.mark.parametrize("size", [(64, 64), (96, 96), (64, 128)])
def test_image_parity_with_the_reference(torch_clip, state, dense, size):
    """Pooled embedding and dense map <= 1e-5 (float32), at the native size and with the
    position table resized (bilinear, as DenseCLIP)."""
    vision, text = _configs(state, dense)
    _, variables = ocf.variables_from_state(state, vision, text)
    pixels = _pixels(0, 2, *size)
    out = jax.jit(clip_resnet.CLIPResNetTower(vision).apply)(variables, pixels)
    with torch.no_grad():
        pooled, value, attention = torch_clip.visual(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    expected = (value if dense == "value" else attention).numpy().transpose(0, 2, 3, 1)
    assert out["dense"].shape == (2, size[0] // 32, size[1] // 32, 24)
    assert _max_diff(out["image_embeds"], pooled) <= TOL
    assert _max_diff(out["dense"], expected) <= TOL
    assert _max_diff(out["dense"], np.zeros_like(expected)) > 0.1  # not trivially equal


def test_text_parity_with_the_reference(torch_clip, state):
    """open_clip's text tower (fused in_proj, x @ text_projection, argmax pooling) through
    `clip_text.CLIPTextTower`."""
    vision, text = _configs(state)
    text_params, _ = ocf.variables_from_state(state, vision, text)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, TINY["vocab_size"] - 1, (3, 9))
    ids[:, -1] = 0
    ids[np.arange(3), [4, 6, 7]] = TINY["vocab_size"] - 1  # EOS, the largest id
    ours = clip_text.CLIPTextTower(text).apply({"params": text_params}, jnp.asarray(ids))
    with torch.no_grad():
        expected = torch_clip.encode_text(torch.from_numpy(ids)).numpy()
    assert ours.shape == (3, 24) and _max_diff(ours, expected) <= TOL


def test_state_round_trip(state):
    """Written back, every key of the state dict comes out equal (batch counters aside;
    logit_scale, which no tower reads, is open_clip's init)."""
    vision, text = _configs(state)
    text_params, variables = ocf.variables_from_state(state, vision, text)
    again = ocf.state_from_variables(text_params, variables, vision, text)
    kept = {k for k in state if not k.endswith("num_batches_tracked")}
    assert set(again) == kept
    for k in kept - {"logit_scale"}:
        np.testing.assert_array_equal(again[k], state[k], err_msg=k)


def test_problems_are_named(state):
    vision, text = _configs(state)
    bad = dict(state)
    del bad["visual.layer3.1.bn2.running_var"]
    bad["visual.extra.weight"] = np.zeros(3, np.float32)
    bad["visual.attnpool.c_proj.bias"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError) as e:
        ocf.variables_from_state(bad, vision, text, source="x.pt")
    message = str(e.value)
    for part in ("x.pt", "missing visual.layer3.1.bn2.running_var", "unexpected visual.extra",
                 "visual.attnpool.c_proj.bias: (5,) != expected (24,)"):
        assert part in message, message


def test_files_in_and_unsafe_pickles_refused(state, tmp_path):
    """safetensors, a torch state dict (also under 'state_dict' with DDP's 'module.'), and a
    directory in open_clip's hub layout load alike; a pickle needing arbitrary code is refused."""
    save_file(state, str(tmp_path / "rn.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "rn.pt")
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state.items()},
                "epoch": 3}, tmp_path / "train.pt")
    for name in ("rn.safetensors", "rn.pt", "train.pt"):
        loaded = ocf.read_state(str(tmp_path / name))
        assert set(loaded) == set(state)
        np.testing.assert_array_equal(loaded["visual.conv1.weight"], state["visual.conv1.weight"])

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"visual.conv1.weight": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pt.*weights_only=True"):
        ocf.read_state(str(tmp_path / "evil.pt"))
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "RN50.pt"))
    with pytest.raises(ValueError, match=r"refusing to load .*RN50\.pt.*with TorchScript arch"):
        ocf.read_state(str(tmp_path / "RN50.pt"))  # what OpenAI's own RN50.pt is


def test_tiny_open_clip_rn_reads_back(tmp_path):
    """The stand-in writer: open_clip's hub layout, read by `load_open_clip` with the text tower
    of `save_tiny_clip` (same words and seed) and the random-stand-in marker."""
    words = ("sky", "sand", "stairs")
    directory = tiny_clip.save_tiny_open_clip_rn(tmp_path / "rn", words, proj_dim=16,
                                                 image_size=64)
    loaded = ocf.load_open_clip(str(directory))
    text_module, text_params, _ = clip_text.load_clip_text(
        tiny_clip.save_tiny_clip(tmp_path / "hf", words, proj_dim=16))
    assert loaded.text_module.config == text_module.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.text_params, text_params)
    assert loaded.tower.config == clip_resnet.CLIPResNetConfig(
        layers=(1, 1, 1, 1), width=8, proj_dim=16, image_size=64)
    assert ocf.is_random_standin(str(directory))
    assert ocf.is_random_standin(str(directory / ocf.WEIGHT_FILES[0]))
    names = ["sky", "sand"]
    np.testing.assert_allclose(
        clip_text.encode_classes(loaded.text_module, loaded.text_params, loaded.tokenizer, names),
        clip_text.encode_classes(text_module, text_params, loaded.tokenizer, names), atol=1e-6)


def test_pixel_encoder_output_stride_and_bfloat16(state):
    """`clip_vision.PixelEncoder` serves the ResNet tower (stride 32, unit embeddings, BN
    statistics passed in); bfloat16 compute stays near float32."""
    vision, text = _configs(state)
    _, variables = ocf.variables_from_state(state, vision, text)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    encoders = {dt: clip_vision.PixelEncoder(clip_resnet.CLIPResNetTower(vision, dtype=dt))
                for dt in (jnp.float32, jnp.bfloat16)}
    assert encoders[jnp.float32].output_stride == 32
    out = {dt: np.asarray(jax.jit(e.apply)(variables, images)["language"])
           for dt, e in encoders.items()}
    assert out[jnp.float32].shape == (2, 2, 3, 24)
    np.testing.assert_allclose(np.linalg.norm(out[jnp.float32], axis=-1), 1.0, rtol=1e-5)
    assert float(np.mean(np.sum(out[jnp.float32] * out[jnp.bfloat16], -1))) > 0.98
    params = jax.tree_util.tree_leaves(variables["params"])
    assert all(p.dtype == np.float32 for p in params)
    assert dataclasses.asdict(vision)["layers"] == (2, 1, 2, 1)


@pytest.mark.slow
def test_full_size_rn50_loads_strictly_and_matches():
    """open_clip's RN50 layout at full size (random weights): the configs read from the tensors
    are RN50's (32 heads, 2048 -> 1024, 224 px), every key is placed, and the 224 px forward
    matches the reference (relative to the output's scale, float32)."""
    torch.manual_seed(0)
    rn50 = ref.randomize_(ref.CLIP(embed_dim=1024, layers=(3, 4, 6, 3), width=64, image_size=224,
                                   vision_heads=32, vocab_size=49408, context_length=77,
                                   text_width=512, text_heads=8, text_layers=12), seed=2)
    full = {k: v.detach().numpy() for k, v in rn50.state_dict().items()}
    vision, text = ocf.configs_from_state(full, None, eos_token_id=49407)
    assert vision == clip_resnet.CLIPResNetConfig()
    assert (text.width, text.num_layers, text.num_heads, text.proj_dim, text.hidden_act) == (
        512, 12, 8, 1024, "quick_gelu")
    _, variables = ocf.variables_from_state(full, vision, text)
    pixels = _pixels(0, 1, 224, 224)
    out = jax.jit(clip_resnet.CLIPResNetTower(vision).apply)(variables, pixels)
    with torch.no_grad():
        pooled, value, _ = rn50.visual(torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    for ours, theirs in ((out["image_embeds"], pooled), (out["dense"], value.permute(0, 2, 3, 1))):
        scale = float(np.abs(theirs.numpy()).max())
        diff = _max_diff(ours, theirs.numpy())  # measured: ~1e-5 at a scale of ~6.5
        assert diff <= 1e-5 * max(scale, 1.0), (diff, scale)
