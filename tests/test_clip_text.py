"""CLIP text tower: parity with transformers, prompt learner, loading and its errors (Sec. 3.2)."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file

from ms3_jax.testing.clip_fixtures import TINY_MAX_LEN, TINY_PROJ_DIM, TINY_WIDTH, load_hf_text_model, save_tiny_clip
from ms3_jax.models import clip_text as ct

CLASSES = ["cat", "dog", "traffic light", "potted plant", "person"]


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


# ---------------------------------------------------------------- fixtures (module scope)


@pytest.fixture(scope="module")
def clip_text_dir(tmp_path_factory):
    """A tiny random ``CLIPTextModelWithProjection`` checkpoint (eos_token_id = the EOS id)."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip_text"), full=False)


@pytest.fixture(scope="module")
def clip_full_dir(tmp_path_factory):
    """A tiny random full ``CLIPModel`` with a legacy config (eos_token_id 2: argmax pooling)."""
    return save_tiny_clip(tmp_path_factory.mktemp("clip_full"), full=True, legacy_eos=True, seed=1)


@pytest.fixture(scope="module")
def loaded(clip_text_dir):
    return ct.load_clip_text(clip_text_dir)


@pytest.fixture(scope="module")
def hf_text(clip_text_dir):
    return load_hf_text_model(clip_text_dir)


def _copy_without(src, dst, *names):
    shutil.copytree(src, dst)
    for name in names:
        os.remove(os.path.join(dst, name))
    return dst


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("full", [False, True], ids=["text_with_projection", "full_clip_legacy_eos"])
def test_token_id_parity_with_transformers(full, clip_text_dir, clip_full_dir):
    directory = clip_full_dir if full else clip_text_dir
    module, params, tokenizer = ct.load_clip_text(directory)
    hf = load_hf_text_model(directory, full=full)
    ids_UxL = tokenizer(["a photo of a cat.", "dog", "a traffic light", "sky"], padding=True,
                        return_tensors="np")["input_ids"]
    ours_NxP = module.apply({"params": params}, ids_UxL)
    with torch.no_grad():
        ids_t = torch.from_numpy(ids_UxL.astype(np.int64))
        if full:
            ref_NxP = hf.get_text_features(input_ids=ids_t).pooler_output.numpy()
        else:
            ref_NxP = hf(input_ids=ids_t).text_embeds.numpy()
    assert ours_NxP.shape == (4, TINY_PROJ_DIM) and ours_NxP.dtype == jnp.float32
    assert _rel_err(ours_NxP, ref_NxP) < 1e-5


def test_encode_classes_template_matches_transformers(loaded, hf_text):
    module, params, tokenizer = loaded
    text_NxP = np.asarray(ct.encode_classes(module, params, tokenizer, CLASSES))
    enc = tokenizer([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_NxP = hf_text(input_ids=enc["input_ids"]).text_embeds.numpy()
    ref_NxP /= np.linalg.norm(ref_NxP, axis=-1, keepdims=True)
    assert text_NxP.shape == (len(CLASSES), TINY_PROJ_DIM)
    assert _rel_err(text_NxP, ref_NxP) < 1e-5


def _hf_prompt_embeddings(hf, layout, ctx_MxD):
    """transformers run by hand on our input embeddings: its tables, our context, a causal mask."""
    tm = hf.text_model
    ids_t = torch.from_numpy(layout.ids_UxL.astype(np.int64))
    n, length = ids_t.shape
    m = layout.num_ctx
    with torch.no_grad():
        x = tm.embeddings.token_embedding(ids_t)
        x[:, 1:1 + m] = torch.from_numpy(np.array(ctx_MxD))[None]
        x = x + tm.embeddings.position_embedding(torch.arange(length))[None]
        mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
        h = tm.encoder(inputs_embeds=x, attention_mask=mask[None, None].expand(n, 1, length, length))
        h = tm.final_layer_norm(h.last_hidden_state)
        pooled = h[torch.arange(n), torch.from_numpy(layout.eos_index_U.astype(np.int64))]
        return hf.text_projection(pooled).numpy()


def test_learned_context_matches_transformers_by_hand(loaded, hf_text):
    module, params, tokenizer = loaded
    num_ctx = 5
    ctx_MxD = ct.init_context(jax.random.key(0), params, tokenizer, num_ctx, init_phrase=None)
    ctx_MxD = 0.5 * ctx_MxD / ct._CTX_INIT_STD  # make the context matter at this tiny scale
    layout = ct.build_prompt_layout(tokenizer, CLASSES, num_ctx, module.config.max_len)
    ours_NxP = module.apply({"params": params}, layout.ids_UxL, layout.eos_index_U, ctx_MxD,
                            method=ct.CLIPTextTower.encode_prompts)
    ref_NxP = _hf_prompt_embeddings(hf_text, layout, ctx_MxD)
    assert _rel_err(ours_NxP, ref_NxP) < 1e-5
    # encode_classes with ctx is the same thing, L2-normalised.
    text_NxP = ct.encode_classes(module, params, tokenizer, CLASSES, ctx=ctx_MxD)
    assert _rel_err(text_NxP, ref_NxP / np.linalg.norm(ref_NxP, axis=-1, keepdims=True)) < 1e-5


def test_pytorch_bin_checkpoint_loads_the_same(tmp_path, clip_text_dir, loaded):
    directory = _copy_without(clip_text_dir, tmp_path / "bin", "model.safetensors")
    state = {k: torch.from_numpy(v) for k, v in load_file(clip_text_dir / "model.safetensors").items()}
    torch.save(state, directory / "pytorch_model.bin")
    _, params_bin, _ = ct.load_clip_text(directory)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params_bin, loaded[1])


def test_sharded_bfloat16_safetensors(tmp_path, clip_text_dir, loaded):
    """A sharded checkpoint (model.safetensors.index.json) stored in bfloat16 loads as float32."""
    directory = _copy_without(clip_text_dir, tmp_path / "sharded", "model.safetensors")
    state = {k: torch.from_numpy(v).to(torch.bfloat16)
             for k, v in load_file(clip_text_dir / "model.safetensors").items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, shard_keys in shards.items():
        save_torch_file({k: state[k] for k in shard_keys}, directory / name)
    weight_map = {k: name for name, shard_keys in shards.items() for k in shard_keys}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, params, _ = ct.load_clip_text(directory)
    table = params["token_embedding"]["embedding"]
    assert table.dtype == jnp.float32
    expected = state["text_model.embeddings.token_embedding.weight"].to(torch.float32).numpy()
    np.testing.assert_array_equal(table, expected)
    np.testing.assert_allclose(table, loaded[1]["token_embedding"]["embedding"], rtol=1e-2)


def test_hub_id_resolves_from_local_cache_offline(tmp_path, clip_text_dir):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    repo = tmp_path / "hub" / "models--tiny--clip"
    shutil.copytree(clip_text_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    module, params, _ = ct.load_clip_text("tiny/clip", cache_dir=str(tmp_path / "hub"))
    assert module.config.width == TINY_WIDTH
    with pytest.raises(OSError, match="not/cached"):
        ct.load_clip_text("not/cached", cache_dir=str(tmp_path / "hub"))


# ---------------------------------------------------------------- model properties


def test_causal_mask_and_eos_pooling(loaded):
    """Tokens after EOS cannot change the output (causal); tokens before it do."""
    module, params, tokenizer = loaded
    ids = np.asarray(tokenizer(["a cat"])["input_ids"] * 2, np.int32)  # [SOS] a cat [EOS]
    eos_N = np.array([3, 3], np.int32)
    tail = np.asarray(tokenizer(["dog dog"], add_special_tokens=False)["input_ids"] * 2, np.int32)
    longer = np.concatenate([ids, tail], axis=1)
    fn = lambda i: module.apply({"params": params}, module.apply(  # noqa: E731
        {"params": params}, i, method=ct.CLIPTextTower.embed_tokens), eos_N,
        method=ct.CLIPTextTower.encode_embeddings)
    np.testing.assert_allclose(fn(longer), fn(ids), rtol=1e-6, atol=1e-6)
    changed = ids.copy()
    changed[:, 2] = tokenizer("dog", add_special_tokens=False)["input_ids"][0]
    assert _rel_err(fn(changed), fn(ids)) > 1e-2


def test_prompt_layout(loaded):
    module, _, tokenizer = loaded
    sos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    layout = ct.build_prompt_layout(tokenizer, ["cat", "traffic light"], 13, TINY_MAX_LEN)
    cat = tokenizer("cat.", add_special_tokens=False)["input_ids"]
    assert layout.ids_UxL.dtype == np.int32 and layout.ids_UxL.shape == (2, 1 + 13 + 3 + 1)
    assert list(layout.ids_UxL[0, :1 + 13 + len(cat) + 1]) == [sos] + [sos] * 13 + cat + [eos]
    assert list(layout.eos_index_U) == [1 + 13 + 2, 1 + 13 + 3]  # "cat" "." | "traffic" "light" "."
    assert (layout.ids_UxL[0, layout.eos_index_U[0] + 1:] == tokenizer.pad_token_id).all()
    padded = ct.build_prompt_layout(tokenizer, ["cat"], 13, TINY_MAX_LEN, pad_to_max_len=True)
    assert padded.ids_UxL.shape == (1, TINY_MAX_LEN)


def test_splice_and_init_context(loaded):
    module, params, tokenizer = loaded
    x_NxLxD = jax.random.normal(jax.random.key(1), (3, 10, TINY_WIDTH))
    ctx_MxD = jax.random.normal(jax.random.key(2), (4, TINY_WIDTH))
    out_NxLxD = ct.splice_context(x_NxLxD, ctx_MxD)
    np.testing.assert_array_equal(out_NxLxD[:, 1:5], np.broadcast_to(ctx_MxD, (3, 4, TINY_WIDTH)))
    np.testing.assert_array_equal(out_NxLxD[:, :1], x_NxLxD[:, :1])
    np.testing.assert_array_equal(out_NxLxD[:, 5:], x_NxLxD[:, 5:])

    ctx_MxD = ct.init_context(jax.random.key(3), params, tokenizer, 13, "a photo of a")
    phrase = tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    table_VxD = np.asarray(params["token_embedding"]["embedding"])
    assert ctx_MxD.shape == (13, TINY_WIDTH) and ctx_MxD.dtype == jnp.float32
    np.testing.assert_array_equal(ctx_MxD[13 - len(phrase):], table_VxD[phrase])
    assert 0.01 < float(jnp.std(ctx_MxD[:13 - len(phrase)])) < 0.03  # N(0, 0.02)
    with pytest.raises(ValueError, match="more than num_ctx=2"):
        ct.init_context(jax.random.key(3), params, tokenizer, 2, "a photo of a")


def test_context_gets_gradients(loaded):
    module, params, tokenizer = loaded
    layout = ct.build_prompt_layout(tokenizer, CLASSES, 3, TINY_MAX_LEN)
    ctx_MxD = ct.init_context(jax.random.key(0), params, tokenizer, 3, None)

    def loss(c):
        t_NxP = module.apply({"params": params}, layout.ids_UxL, layout.eos_index_U, c,
                             method=ct.CLIPTextTower.encode_prompts)
        return jnp.sum(t_NxP[:, 0])

    grad_MxD = jax.jit(jax.grad(loss))(ctx_MxD)
    assert np.isfinite(grad_MxD).all() and float(jnp.abs(grad_MxD).min(axis=1).max()) > 0


def test_encode_classes_normalised_and_bfloat16(clip_text_dir, loaded):
    module, params, tokenizer = loaded
    ctx_MxD = ct.init_context(jax.random.key(0), params, tokenizer, 13)
    for ctx in (None, ctx_MxD):
        text_NxP = ct.encode_classes(module, params, tokenizer, CLASSES, ctx=ctx)
        assert text_NxP.shape == (len(CLASSES), TINY_PROJ_DIM) and text_NxP.dtype == jnp.float32
        np.testing.assert_allclose(np.linalg.norm(text_NxP, axis=-1), 1.0, rtol=1e-6)
    module_bf16, params_bf16, _ = ct.load_clip_text(clip_text_dir, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params_bf16))
    text_bf16 = ct.encode_classes(module_bf16, params_bf16, tokenizer, CLASSES, ctx=ctx_MxD)
    text_f32 = ct.encode_classes(module, params, tokenizer, CLASSES, ctx=ctx_MxD)
    assert text_bf16.dtype == jnp.float32
    np.testing.assert_allclose(np.linalg.norm(text_bf16, axis=-1), 1.0, rtol=1e-5)
    assert _rel_err(text_bf16, text_f32) < 0.1


def test_config_from_hf(clip_full_dir):
    config = ct.CLIPTextConfig.from_hf(clip_full_dir / "config.json")
    assert config.proj_dim == TINY_PROJ_DIM and config.eos_token_id == 2 and config.mlp_dim == 64
    with open(clip_full_dir / "config.json") as f:
        assert ct.CLIPTextConfig.from_hf(json.load(f)) == config
    assert ct.CLIPTextConfig() == ct.CLIPTextConfig.from_hf({"model_type": "clip_text_model"})


def test_tokenizer_is_offline_from_checkpoint_files(loaded):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    _, _, tokenizer = loaded
    ids = tokenizer("a photo of a cat.")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", ".</w>", "<|endoftext|>"]


# ---------------------------------------------------------------- errors


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_clip"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ct.load_clip_text(missing)


def test_missing_files(tmp_path, clip_text_dir):
    d = _copy_without(clip_text_dir, tmp_path / "noweights", "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors") as e:
        ct.load_clip_text(d)
    assert str(d) in str(e.value)
    d = _copy_without(clip_text_dir, tmp_path / "notok", "vocab.json", "merges.txt")
    with pytest.raises(FileNotFoundError, match=r"vocab\.json \+ merges\.txt") as e:
        ct.load_clip_text(d)
    assert str(d) in str(e.value)
    d = _copy_without(clip_text_dir, tmp_path / "noconfig", "config.json")
    with pytest.raises(FileNotFoundError, match=r"config\.json") as e:
        ct.load_clip_text(d)
    assert str(d) in str(e.value)


def test_wrong_keys_listed_in_one_error(tmp_path, clip_text_dir):
    d = _copy_without(clip_text_dir, tmp_path / "badkeys", "model.safetensors")
    state = load_file(clip_text_dir / "model.safetensors")
    state["text_model.final_norm.weight"] = state.pop("text_model.final_layer_norm.weight")
    del state["text_projection.weight"]
    state["text_model.encoder.layers.0.mlp.fc1.bias"] = np.zeros(3, np.float32)
    save_file(state, d / "model.safetensors")
    with pytest.raises(ValueError) as e:
        ct.load_clip_text(d)
    msg = str(e.value)
    for key in ("text_model.final_layer_norm.weight", "text_projection.weight",
                "text_model.final_norm.weight", "text_model.encoder.layers.0.mlp.fc1.bias"):
        assert key in msg
    assert "missing keys (2)" in msg and "unexpected keys (1)" in msg and "wrong shapes (1)" in msg


def test_class_name_errors(loaded):
    module, params, tokenizer = loaded
    too_long = "abcdefghij"  # one token per letter in the tiny vocabulary
    with pytest.raises(ValueError, match=f"class name '{too_long}' is too long"):
        ct.build_prompt_layout(tokenizer, ["cat", too_long], 13, TINY_MAX_LEN)
    with pytest.raises(ValueError, match=too_long):
        ct.encode_classes(module, params, tokenizer, ["abcdefghijklmnopqrstuvwxyz"])
    with pytest.raises(ValueError, match=r"empty class names at positions \[1, 2\]"):
        ct.encode_classes(module, params, tokenizer, ["cat", "", "  "])
    with pytest.raises(ValueError, match=r"duplicate class names: 'cat', 'Dog' / 'dog'"):
        ct.encode_classes(module, params, tokenizer, ["cat", "Dog", "cat", "dog"])
    with pytest.raises(ValueError, match=r"ctx must be \[M, 32\]"):
        ct.encode_classes(module, params, tokenizer, ["cat"], ctx=jnp.zeros((4, 8)))
