"""Stage 1 (paper Sec. 3.2, Fig. 2, Tab. 1): learnable context + Eq. 1 on tiny synthetic data.

One tiny run (module fixture, `configs/text_adapt.py:tiny` on 24 images per dataset with a tiny
random CLIP, its vision tower as the image encoder) is preempted half-way and resumed; the tests
check its outputs. A short run checks the DeepLab variant. Error tests fail before any
compilation.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from ms3_jax.data.label_space import LabelSpace
from ms3_jax.demo import job as demo, tiny_clip
from ms3_jax.method import adapted_text, labels, losses, text_embeddings
from ms3_jax.models import clip_text, clip_vision
from ms3_jax.stages import text_adapt
from ms3_jax.testing import synthetic_data
from ms3_jax.testing.configs import text_adapt_config

_config = text_adapt_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data.build(tmp_path_factory.getbasetemp(), image_size=64).data_dir


@pytest.fixture(scope="module")
def tiny_config(data_dir, tmp_path_factory):
    c = _config("tiny")
    c.data.data_dir = data_dir
    c.data.synthetic = dict(num_train=24, num_val=4, image_size=64)  # as built: a no-op
    c.text.tiny_clip_dir = str(tmp_path_factory.mktemp("clip") / "tiny_clip")
    demo.prepare_builtin(c)  # writes the tiny CLIP, as `python -m ms3_jax.main` does
    return c


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory):
    """Stage 1 preempted at step 50 (checkpoint), then resumed to the end (100 steps)."""
    workdir = str(tmp_path_factory.mktemp("stage1"))
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:  # the resumed run lowers the same programs: compile them once
        first = text_adapt.train_and_evaluate(tiny_config, workdir, stop_at=50)
        second = text_adapt.train_and_evaluate(tiny_config, workdir)
    finally:  # the session's cache again (None disabled it for the rest of this worker's tests)
        jax.config.update("jax_compilation_cache_dir", before[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
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
    # With CLIP's image tower the context learns from the first step (no frozen phase) and
    # spreads T from there.
    cos = np.array([h["mean_cos"] for h in history])
    assert text_adapt.frozen_fraction(tiny_config) == 0.0
    assert abs(cos[2] - cos[0]) > 1e-4 and cos[-1] < cos[0] - 0.05, cos
    assert np.mean([h["acc_language"] for h in history[-10:]]) > 0.2


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

    module, params, tokenizer, ctx = adapted_text.load_adapted_text(workdir)
    assert ctx.shape == (tiny_config.text.num_ctx, 32)
    again = clip_text.encode_classes(module, params, tokenizer, list(ls.names[:7]), ctx=ctx)
    np.testing.assert_allclose(again, emb[:7], atol=1e-5)
    # Names outside the union embed too (zero-shot), as unit vectors.
    other = clip_text.encode_classes(module, params, tokenizer, ["cat", "zebra crossing"], ctx=ctx)
    np.testing.assert_allclose(np.linalg.norm(other, axis=1), 1.0, rtol=1e-5)
    with open(os.path.join(workdir, adapted_text.TEXT_MODEL_DIR, adapted_text.TEXT_MODEL_META)) as f:
        meta = json.load(f)
    assert meta["clip"] == tiny_config.text.tiny_clip_dir and meta["num_ctx"] == 13
    assert clip_text.is_random_standin(meta["clip"])


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
    names, index = labels.distinct_names(["sky", "grass", "Sky", "dirt  track", "sky"])
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


def test_tiny_clip_plants_its_word_prior(tmp_path):
    """Each word of WORD_PRIOR sits at about its cosine to each anchor; without a prior the
    words are independent draws."""
    import safetensors.numpy
    rows = {}
    for prior in (None, {}):
        d = tiny_clip.save_tiny_clip(tmp_path / str(prior is None), prior=prior, width=64)
        vocab = json.loads((d / "vocab.json").read_text())
        table = safetensors.numpy.load_file(d / "model.safetensors")[
            "text_model.embeddings.token_embedding.weight"]
        unit = lambda w: table[vocab[w + "</w>"]] / np.linalg.norm(table[vocab[w + "</w>"]])
        rows[prior is None] = {(w, a, c): float(unit(w) @ unit(a))
                               for w, anchors in tiny_clip.WORD_PRIOR.items() for a, c in anchors.items()}
    for (w, a, c), cos in rows[True].items():  # exact for one anchor; terrain has two
        assert abs(cos - c) < (0.15 if len(tiny_clip.WORD_PRIOR[w]) > 1 else 1e-5), (w, a, c, cos)
    assert max(abs(c) for c in rows[False].values()) < 0.5, rows[False]  # independent draws
    with pytest.raises(ValueError, match="both redrawn and anchors"):
        tiny_clip.save_tiny_clip(tmp_path / "bad", prior={"boat": {"ship": 0.5}, "ship": {"sea": 0.5}})


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


# --- encoder='clip': CLIP's own vision tower (paper Fig. 2, Tab. 5) ---------------------------

@pytest.fixture(scope="module")
def two_tower_clip(tmp_path_factory):
    """A tiny random CLIP with both towers (32 px images in 8 px patches: a 4x4 grid), 32-d."""
    directory = tmp_path_factory.mktemp("clip2") / "tiny_clip"
    ls = LabelSpace.from_datasets(["synth_a", "synth_b", "synth_c"])
    tiny_clip.save_tiny_clip(directory, tiny_clip.DEFAULT_WORDS + tuple(ls.names), full=True,
                             vision_overrides=tiny_clip.tiny_vision(32, 8))
    return str(directory)


def _eq1_reference(emb_BxhxwxC, text_KxC, labels_BxHxW, tau):
    """Eq. 1 in float64 NumPy: labels resized to the embeddings' grid by nearest indexing."""
    emb = np.asarray(emb_BxhxwxC, np.float64)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    text = np.asarray(text_KxC, np.float64)
    text /= np.linalg.norm(text, axis=-1, keepdims=True)
    h, w = emb.shape[1:3]
    big_h, big_w = labels_BxHxW.shape[1:]
    y = labels_BxHxW[:, (np.arange(h) * big_h) // h][:, :, (np.arange(w) * big_w) // w]
    logits = emb @ text.T / tau
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    valid = (y >= 0) & (y < text.shape[0])
    return -np.take_along_axis(log_p, np.where(valid, y, 0)[..., None], -1)[..., 0][valid].mean()


def test_clip_encoder_starts_from_clip_and_trains_it_with_eq1(two_tower_clip):
    """The state starts from the checkpoint's vision weights (no batch statistics); the step's
    loss is Eq. 1 between CLIP's dense patch embeddings and T at the patch grid (float64
    reference); the image tower and the context learn, the frozen text tower does not."""
    c = _config("tiny")
    c.update_from_flattened_dict({"batch_size": 8, "data.crop_size": 32,
                                  "text.tiny_clip_dir": two_tower_clip})
    ls = LabelSpace.from_datasets(list(c.data.datasets))
    text_module, text_params, tokenizer = text_adapt.load_clip(two_tower_clip)
    tower = text_adapt.load_image_tower(c, two_tower_clip)
    trainer = text_adapt.Trainer(c, ls, text_module, text_params, tokenizer, num_steps=10,
                                 image_tower=tower)
    state = trainer.init_state(jax.random.key(0))
    assert state.batch_stats == {}
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params["image"],
                           tower.variables["params"])
    initial = jax.device_get(state.params)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    label_map = rng.integers(-1, ls.num_classes, (8, 32, 32)).astype(np.int32)
    label_map[label_map < 0] = 255  # ignored pixels
    pixels = clip_vision.normalize_pixels(images, tower.encoder.mean, tower.encoder.std)
    dense = tower.module.apply({"params": initial["image"]}, pixels)["dense"]
    t_UxC = text_module.apply({"params": text_params}, trainer.consts["ids"], trainer.consts["eos"],
                              jnp.asarray(initial["ctx"]), method=clip_text.CLIPTextTower.encode_prompts)
    expected = _eq1_reference(dense, np.asarray(t_UxC)[trainer.gather], label_map, c.loss.tau)

    state, metrics = trainer.step(state, trainer.global_batch({"image": images, "label": label_map}))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)
    state, _ = trainer.step(state, trainer.global_batch({"image": images, "label": label_map}))
    after = jax.device_get(state.params)
    moved = lambda a, b: max(float(np.abs(x - y).max()) for x, y in zip(  # noqa: E731
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    assert moved(after["image"], initial["image"]) > 1e-6
    assert moved(after["ctx"], initial["ctx"]) > 1e-6
    assert "text" not in after and trainer.consts["text"] is not None


def test_clip_encoder_errors_name_the_field(two_tower_clip, tiny_config, tmp_path):
    c = _config("tiny")
    c.text.tiny_clip_dir = two_tower_clip
    c.encoder = "vit"
    with pytest.raises(ValueError, match=r"encoder must be one of \('clip', 'deeplab'\), got 'vit'"):
        text_adapt.train_and_evaluate(c, str(tmp_path / "w"))
    c.encoder = "clip"
    c.model.init_from = str(tmp_path / "resnet50.pth")
    with pytest.raises(ValueError, match=r"model.init_from .*encoder='clip'.*--config.encoder=deeplab"):
        text_adapt.train_and_evaluate(c, str(tmp_path / "w"))
    c.model.init_from = ""
    c.data.crop_size = 36  # not a multiple of the 8 px patches
    with pytest.raises(ValueError, match=r"data.crop_size=36 is not a multiple of the patch size 8"):
        text_adapt.train_and_evaluate(c, str(tmp_path / "w"))
    # A text-only checkpoint: named, with the way out.
    text_only = tmp_path / "text_only"
    tiny_clip.save_tiny_clip(text_only, ("sky", "sand"))
    c.data.crop_size = 32
    c.text.tiny_clip_dir = ""
    c.text.clip = str(text_only)
    with pytest.raises(ValueError, match=r"encoder='clip' needs CLIP's vision tower.*text_only.*"
                                         r"text-only checkpoint.*--config.encoder=deeplab"):
        text_adapt.train_and_evaluate(c, str(tmp_path / "w"))
    # The same as a tiny stand-in directory (written before stage 1 used the vision tower).
    c.text.clip, c.text.tiny_clip_dir = "", str(text_only)
    with pytest.raises(ValueError, match=r"tiny_clip_dir=.*text_only holds a text-only CLIP.*remove"):
        demo.prepare_builtin(c)  # what `python -m ms3_jax.main` runs before the stage


@pytest.mark.slow
def test_deeplab_encoder_variant(tiny_config, tmp_path):
    """encoder='deeplab': the MS3 encoder's language head, its context frozen for the first
    text.frozen_steps; the outputs are the same files."""
    c = tiny_config.copy_and_resolve_references()
    c.update_from_flattened_dict({"encoder": "deeplab", "num_steps": 10, "checkpoint_every": 10,
                                  "text.frozen_steps": 0.5})
    history = text_adapt.train_and_evaluate(c, str(tmp_path))
    cos = np.array([h["mean_cos"] for h in history])
    np.testing.assert_allclose(cos[:5], cos[0], atol=1e-6)
    assert abs(cos[-1] - cos[0]) > 1e-4 and np.isfinite([h["loss"] for h in history]).all()
    for name in (text_embeddings.FILE_NAME, text_adapt.REPORT_FILE):
        assert (tmp_path / name).is_file()


def test_prompts_are_encoded_sharded_over_the_devices(two_tower_clip):
    """On 8 devices each device encodes its share of the U prompts through the text tower and T is
    gathered (`make_train_step`'s prompt_sharding, on in the Trainer): the step computes what the
    step with every device encoding all prompts computes, with fewer FLOPs per device."""
    from ms3_jax.engine import nonfinite

    c = _config("tiny")
    c.update_from_flattened_dict({"batch_size": 8, "data.crop_size": 32,
                                  "text.tiny_clip_dir": two_tower_clip})
    c.data.datasets = ["synth_a", "synth_b"]  # 13 distinct names: uneven shares of 8
    ls = LabelSpace.from_datasets(list(c.data.datasets))
    text_module, text_params, tokenizer = text_adapt.load_clip(two_tower_clip)
    tower = text_adapt.load_image_tower(c, two_tower_clip)
    trainer = text_adapt.Trainer(c, ls, text_module, text_params, tokenizer, num_steps=10,
                                 image_tower=tower, devices=jax.devices()[:8])
    assert len(trainer.names) == 13
    unsharded = jax.jit(nonfinite.guard(text_adapt.make_train_step(
        c, text_adapt.clip_embed(tower.encoder), text_module, trainer.tx,
        text_adapt.image_lr_schedule(c, 10), text_adapt.text_lr_schedule(c, c.text.lr, 10), False),
        nonfinite.mode_of(c)), in_shardings=(trainer.replicated, trainer.data_sharding,
                                             trainer.replicated))
    rng = np.random.default_rng(1)
    batch = trainer.global_batch({
        "image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, ls.num_classes, (8, 32, 32)).astype(np.int32)})
    results, flops = [], []
    for step in (trainer._step, unsharded):  # compiled once each, then run
        state = trainer.init_state(jax.random.key(0))
        compiled = step.lower(state, batch, trainer.consts).compile()
        flops.append(compiled.cost_analysis()["flops"])  # per device
        state, metrics = compiled(state, batch, trainer.consts)
        results.append(jax.device_get((state.params, metrics)))
    for a, b in zip(*map(jax.tree_util.tree_leaves, results)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
    assert float(results[0][1]["loss"]) > 0
    assert flops[0] < 0.8 * flops[1], flops
