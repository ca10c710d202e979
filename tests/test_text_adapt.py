"""Stage 1 (paper Sec. 3.2, Fig. 2, Tab. 1): learnable context + Eq. 1 on tiny synthetic data.

One tiny run (module fixture, `configs/text_adapt.py:tiny` on 24 images per dataset with a tiny
random CLIP) is preempted half-way and resumed; the tests check its outputs. Error tests fail
before any compilation.
"""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from ms3_jax import losses, text_adapt, text_embeddings
from ms3_jax.data.label_space import LabelSpace
from ms3_jax.models import clip_text
from ms3_jax.testing import synthetic_data, tiny_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg: str = "tiny"):
    spec = importlib.util.spec_from_file_location(
        "_text_adapt_config", os.path.join(ROOT, "configs", "text_adapt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data.build(tmp_path_factory.getbasetemp(), image_size=64).data_dir


@pytest.fixture(scope="module")
def tiny_config(data_dir, tmp_path_factory):
    c = _config("tiny")
    c.data.data_dir = data_dir
    c.data.synthetic = dict(num_train=24, num_val=4, image_size=64)  # as built: a no-op
    c.text.tiny_clip_dir = str(tmp_path_factory.mktemp("clip") / "tiny_clip")
    return c


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory):
    """Stage 1 preempted at step 50 (checkpoint), then resumed to the end (100 steps)."""
    workdir = str(tmp_path_factory.mktemp("stage1"))
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:  # the resumed run lowers the same programs: compile them once
        first = text_adapt.train_and_evaluate(tiny_config, workdir, stop_at=50)
        second = text_adapt.train_and_evaluate(tiny_config, workdir)
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
    return workdir, first, second


@pytest.mark.slow
def test_resumes_and_loss_falls(run, tiny_config):
    workdir, first, second = run
    assert [h["step"] for h in first] == list(range(1, 51))
    assert [h["step"] for h in second] == list(range(51, 101))
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "0"))
    history = first + second
    loss = np.array([h["loss"] for h in history])
    assert np.isfinite(loss).all()
    assert loss[-5:].mean() < loss[:5].mean() - 0.3, loss
    # The context is frozen for the first 60% (text.frozen_steps), then learns.
    cos = np.array([h["mean_cos"] for h in history])
    np.testing.assert_allclose(cos[:60], cos[0], atol=1e-6)
    assert abs(cos[-1] - cos[0]) > 1e-3


@pytest.mark.slow
def test_tab1_adapted_embeddings_are_less_alike(run):
    workdir, _, _ = run
    with open(os.path.join(workdir, text_adapt.REPORT_FILE)) as f:
        report = json.load(f)
    mean = report["mean"]
    # Tab. 1 direction: below the hand template and below where the context started.
    assert mean["adapted"] < mean["template"] - 0.01, mean
    assert mean["adapted"] < mean["initial"] - 0.01, mean
    assert report["num_names"] == 16
    pairs = {tuple(r["pair"]): r for r in report["pairs"]}
    assert set(pairs) == {("stairs", "stairway"), ("mountain", "hill"), ("ship", "boat"), ("sky", "sand")}
    assert all(-1 <= r["adapted"] <= 1 and -1 <= r["template"] <= 1 for r in pairs.values())


@pytest.mark.slow
def test_npz_schema_and_reembedding(run, tiny_config):
    workdir, _, _ = run
    ls = LabelSpace.from_datasets(list(tiny_config.data.datasets))
    path = os.path.join(workdir, text_embeddings.FILE_NAME)
    with np.load(path) as f:
        assert list(f["names"]) == list(ls.display_names)
        assert list(f["datasets"]) == [ls.dataset_names[d] for d in ls.dataset_of_class]
        assert str(f["source"]) == "adapted"
        emb = f["embeddings"]
    assert emb.shape == (ls.num_classes, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(text_embeddings.load_text_embeddings(path, ls), emb)
    # The same name in two datasets ('sky' x 3) is one prompt, so one embedding.
    sky = [i for i, n in enumerate(ls.names) if n == "sky"]
    assert len(sky) == 3 and np.all(emb[sky] == emb[sky[0]])

    module, params, tokenizer, ctx = text_adapt.load_adapted_text(workdir)
    assert ctx.shape == (tiny_config.text.num_ctx, 32)
    again = clip_text.encode_classes(module, params, tokenizer, list(ls.names[:7]), ctx=ctx)
    np.testing.assert_allclose(again, emb[:7], atol=1e-5)
    # Names outside the union embed too (zero-shot), as unit vectors.
    other = clip_text.encode_classes(module, params, tokenizer, ["cat", "zebra crossing"], ctx=ctx)
    np.testing.assert_allclose(np.linalg.norm(other, axis=1), 1.0, rtol=1e-5)
    with open(os.path.join(workdir, text_adapt.TEXT_MODEL_DIR, text_adapt.TEXT_MODEL_META)) as f:
        meta = json.load(f)
    assert meta["clip"] == tiny_config.text.tiny_clip_dir and meta["num_ctx"] == 13
    assert tiny_clip.is_tiny_random_clip(meta["clip"])


def test_stage1_loss_is_eq1_with_gradients_to_both_sides():
    """Stage 1 trains T through Eq. 1: `losses.pairing_loss` (not stopped) gives T a gradient,
    chunked as unchunked, and its pixel gradient is that of the stage-2 fast path."""
    rng = np.random.default_rng(0)
    emb = jnp.asarray(rng.normal(size=(2, 5, 6, 8)), jnp.float32)
    emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
    text = jnp.asarray(rng.normal(size=(7, 8)), jnp.float32)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    labels = jnp.asarray(rng.integers(-1, 9, size=(2, 5, 6)), jnp.int32)  # -1, 7, 8: ignored
    loss = lambda e, t, chunk: losses.pairing_loss(e, t, labels, tau=0.07, chunk=chunk)
    np.testing.assert_allclose(loss(emb, text, 16), loss(emb, text, None), rtol=1e-6)
    g_emb, g_text = jax.grad(loss, argnums=(0, 1))(emb, text, 16)
    g_emb_full, g_text_full = jax.grad(loss, argnums=(0, 1))(emb, text, None)
    np.testing.assert_allclose(g_emb, g_emb_full, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_text, g_text_full, rtol=1e-5, atol=1e-7)
    g_fast = jax.grad(lambda e: losses.pairing_loss_fast(e, text, labels, tau=0.07))(emb)
    np.testing.assert_allclose(g_emb, g_fast, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_text).sum()) > 0


def test_distinct_names_and_tiny_vocabulary():
    names, index = text_adapt.distinct_names(["sky", "grass", "Sky", "dirt  track", "sky"])
    assert names == ("sky", "grass", "dirt  track") and list(index) == [0, 1, 0, 2, 0]
    vocab, merges = tiny_clip.vocab_and_merges(["dirt track", "stairway"])
    assert {"dirt</w>", "track</w>", "stairway</w>", "z", "z</w>"} <= set(vocab)


def test_tiny_tokenizer_makes_every_word_one_token(tmp_path):
    """Under transformers' CLIPTokenizer (merges by rank). Merges appended word by word, left to
    right, broke this: 'hill' brought 'h i' before 'ship' brought 's h', so 'ship' became
    s / hi / p and 'building' four tokens."""
    words = tiny_clip.DEFAULT_WORDS + ("hill", "ship", "building", "dirt track", "sidewalk")
    tiny_clip.write_tokenizer(tmp_path, words)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    for word in tiny_clip._split_words(words):
        assert tokenizer.tokenize(word) == [word + "</w>"], word


def test_tiny_clip_plants_related_words_near_their_partners(tmp_path):
    import safetensors.numpy
    rows = {}
    for related in (None, {}):
        d = tiny_clip.save_tiny_clip(tmp_path / str(related is None), related=related, width=64)
        vocab = json.loads((d / "vocab.json").read_text())
        table = safetensors.numpy.load_file(d / "model.safetensors")[
            "text_model.embeddings.token_embedding.weight"]
        unit = lambda w: table[vocab[w + "</w>"]] / np.linalg.norm(table[vocab[w + "</w>"]])
        rows[related is None] = {f"{w}/{p}": float(unit(w) @ unit(p))
                                 for w, p in tiny_clip.RELATED_WORDS.items()}
    assert min(rows[True].values()) > 0.75, rows[True]  # drawn at cosine 0.9 (64-d: +- 0.1)
    assert max(abs(c) for c in rows[False].values()) < 0.5, rows[False]  # independent draws


def test_missing_clip_names_the_path(tiny_config, tmp_path):
    c = _config("tiny")
    c.text.tiny_clip_dir = ""
    c.text.clip = str(tmp_path / "no_such_clip")
    with pytest.raises(FileNotFoundError, match="no_such_clip") as e:
        text_adapt.train_and_evaluate(c, str(tmp_path / "w"))
    assert "text.clip" in str(e.value)
    (tmp_path / "empty_clip").mkdir()
    c.text.clip = str(tmp_path / "empty_clip")
    with pytest.raises(FileNotFoundError, match=r"config\.json.*empty_clip|empty_clip.*config\.json"):
        text_adapt.train_and_evaluate(c, str(tmp_path / "w"))
    c.text.clip = ""
    with pytest.raises(ValueError, match="text.clip"):
        text_adapt.train_and_evaluate(c, str(tmp_path / "w"))


@pytest.mark.slow
def test_emb_dim_mismatch(tiny_config, run, tmp_path):
    c = _config("tiny")
    c.text.tiny_clip_dir = tiny_config.text.tiny_clip_dir  # 32-d projection
    c.model.emb_dim = 16
    with pytest.raises(ValueError, match=r"model\.emb_dim=16 .*projection dim 32"):
        text_adapt.train_and_evaluate(c, str(tmp_path / "w"))
