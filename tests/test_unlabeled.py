"""Unlabeled images with multimodal pseudo-labels (paper App. D, Tab. 10): the agreement rule vs a
float64 NumPy reference, the unlabeled data source and mixing, the bank switch, a tiny run."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from PIL import Image

from configs import pretrain as pretrain_config
from ms3_jax.data import augment, pipeline, sources
from ms3_jax.data.label_space import UNION_IGNORE, UNLABELED_PIXEL, LabelSpace
from ms3_jax.method import labels as label_rules
from ms3_jax.method import pseudo_labels, text_embeddings
from ms3_jax.method.labels import distinct_names
from ms3_jax.stages import pretrain
from ms3_jax.testing import synthetic_data
from ms3_jax.testing import pretrain_inputs
from ms3_jax.testing.configs import with_overrides

flags.FLAGS.mark_as_parsed()

LABELED = ("synth_a", "synth_b")
UNL = UNLABELED_PIXEL


# --- the rule vs float64 NumPy ----------------------------------------------------------------------

def _unit64(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_rule(lang, vis, text, visual, valid, names, threshold, tau):
    """App. D in float64, per class NAME: the name of the cosine argmax over T must be the name of
    the cosine argmax over the valid V rows; the label is the V argmax's class; each side's
    softmax probability (at tau) summed over the (valid) classes of that name >= threshold.
    Names are compared like prompts, ignoring case and whitespace. -> (labels with -1, agree)."""
    names = np.asarray([" ".join(n.lower().split()) for n in names])
    cos_l = _unit64(lang) @ _unit64(text).T
    cos_v = np.where(valid[None, :], _unit64(vis) @ _unit64(visual).T, -np.inf)
    labels, agree = np.full(len(lang), -1), np.zeros(len(lang), bool)
    for i in range(len(lang)):
        if not valid.any():
            continue
        best_l, best_v = cos_l[i].argmax(), cos_v[i].argmax()
        agree[i] = names[best_l] == names[best_v]
        p_l = np.exp((cos_l[i] - cos_l[i].max()) / tau)
        p_l = p_l[names == names[best_l]].sum() / p_l.sum()
        p_v = np.where(valid, np.exp((cos_v[i] - cos_v[i].max()) / tau), 0.0)
        p_v = p_v[names == names[best_v]].sum() / p_v.sum()
        if agree[i] and p_l >= threshold and p_v >= threshold:
            labels[i] = best_v
    return labels, agree


def distinct(k):
    return tuple(f"class{i}" for i in range(k))


def random_problem(seed, n=400, k=9, c=6):
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((k, c))
    visual = text + 0.6 * rng.standard_normal((k, c))
    lang = rng.standard_normal((n, c))
    vis = lang + 0.8 * rng.standard_normal((n, c))  # correlated heads: many (not all) agree
    valid = rng.random(k) < 0.7
    valid[0] = True
    # Invalid V rows hold the exact direction of some visual embeddings: they would win the
    # visual argmax for those pixels if they were not masked out.
    bad = np.flatnonzero(~valid)
    visual[bad] = vis[:len(bad)] * 3.0
    return lang, vis, text, visual, valid


def f32(x):
    return jnp.asarray(x, jnp.float32)


@pytest.mark.parametrize("threshold,tau", [(0.0, 0.07), (0.35, 0.07), (0.2, 0.5)])
def test_agreement_rule_matches_float64_reference(threshold, tau):
    lang, vis, text, visual, valid = random_problem(0)
    want, want_agree = reference_rule(lang, vis, text, visual, valid, distinct(9), threshold, tau)
    got, got_agree = pseudo_labels.agreement_labels(
        f32(lang), f32(vis), f32(text), f32(visual), jnp.asarray(valid),
        distinct_names(distinct(9))[1], threshold=threshold, tau=tau)
    np.testing.assert_array_equal(np.asarray(got_agree), want_agree)
    np.testing.assert_array_equal(np.asarray(got), want)
    # The case is not degenerate: some pixels agree, some do not, and the threshold bites.
    assert 0.1 < want_agree.mean() < 0.9
    kept = (want >= 0).sum()
    assert kept > 0 and (kept < want_agree.sum()) == (threshold > 0)
    assert set(np.unique(want[want >= 0])) <= set(np.flatnonzero(valid))


# Two datasets sharing 'person' (0 / 4) and 'tree' (2 / 6, case and spaces differ: one prompt).
SHARED = LabelSpace({"a": ["person", "car", "tree"], "b": ["road", "person", "sky", " Tree"]})
PERSON_A, CAR, TREE_A, ROAD, PERSON_B, SKY, TREE_B = range(7)


def shared_problem(seed=0, n=600, c=6):
    """Random embeddings on SHARED (T rows equal for a shared name, V one row per class, b/tree's
    V row invalid and pointing at some pixels) + hand-made pixels:
      0: lang = T['person'], vis = V[b/person]  -> b/person (language argmax is a/person: a tie);
      1: lang = T['car'],    vis = V[road]      -> -1 (disagree);
      2: lang = T['tree'],   vis = 3 V[b/tree] (invalid: never wins, but a/tree may).
    """
    rng = np.random.default_rng(seed)
    k = SHARED.num_classes
    ids = distinct_names(SHARED.names)[1]
    text = rng.standard_normal((ids.max() + 1, c))[ids]  # one prompt per name
    visual = text + 0.5 * rng.standard_normal((k, c))
    lang = rng.standard_normal((n, c))
    vis = lang + 0.8 * rng.standard_normal((n, c))
    valid = np.ones(k, bool)
    valid[TREE_B] = False
    visual[TREE_B] = vis[3:10].mean(0)
    lang[:3] = text[[PERSON_A, CAR, TREE_A]]
    vis[:3] = visual[[PERSON_B, ROAD, TREE_B]] * [[1.0], [1.0], [3.0]]
    return lang, vis, text, visual, valid


@pytest.mark.parametrize("threshold,tau", [(0.0, 0.07), (0.6, 0.07), (0.3, 0.5)])
def test_agreement_is_per_name_with_the_visual_copy(threshold, tau):
    lang, vis, text, visual, valid = shared_problem()
    want, want_agree = reference_rule(lang, vis, text, visual, valid, SHARED.names, threshold, tau)
    got, got_agree = pseudo_labels.agreement_labels(
        f32(lang), f32(vis), f32(text), f32(visual), jnp.asarray(valid),
        jnp.asarray(distinct_names(SHARED.names)[1]), threshold=threshold, tau=tau)
    got, got_agree = np.asarray(got), np.asarray(got_agree)
    np.testing.assert_array_equal(got_agree, want_agree)
    np.testing.assert_array_equal(got, want)
    # (a) the second dataset's copy of the shared name is the visual argmax: labelled with it;
    # (b) different names: ignored.
    assert want_agree[0] and want[0] == PERSON_B
    assert not want_agree[1] and want[1] == -1
    # (d) an invalid V row never wins, even at cosine 1.
    assert TREE_B not in set(want) and (want[2] == TREE_A) == want_agree[2]
    # The random pixels exercise it too: the language argmax is never a second copy (equal T
    # rows tie, the first wins) but second copies are labelled.
    best_l = (_unit64(lang) @ _unit64(text).T).argmax(-1)
    assert not np.isin(best_l, [PERSON_B, TREE_B]).any()
    assert (want[3:] == PERSON_B).sum() > 0 and (want[3:] == PERSON_A).sum() > 0
    assert 0.1 < want_agree.mean() < 0.9
    kept = (want >= 0).sum()
    assert kept > 0 and (kept < want_agree.sum()) == (threshold > 0)


def test_threshold_uses_the_summed_probability_of_a_shared_name():
    """(c) lang = T['person'] exactly: each copy has softmax probability ~1/2 (an exact tie), the
    name ~1. A threshold of 0.6 keeps the pixel (0.5 per copy would drop it); 0.99 and a tau at
    which the name itself is unsure do drop it, in both implementations."""
    lang, vis, text, visual, valid = shared_problem()
    lang, vis = lang[:1], vis[:1]
    ids = jnp.asarray(distinct_names(SHARED.names)[1])
    cos = _unit64(lang) @ _unit64(text).T
    for threshold, tau, kept in [(0.6, 0.02, True), (0.999, 0.02, True), (0.6, 1.0, False)]:
        p = np.exp(cos / tau) / np.exp(cos / tau).sum()
        assert np.isclose(p[0, PERSON_A], p[0, PERSON_B])
        want, _ = reference_rule(lang, vis, text, visual, valid, SHARED.names, threshold, tau)
        got, agree = pseudo_labels.agreement_labels(f32(lang), f32(vis), f32(text), f32(visual),
                                                    jnp.asarray(valid), ids, threshold=threshold,
                                                    tau=tau)
        assert bool(agree[0])
        assert int(got[0]) == want[0] == (PERSON_B if kept else -1), (threshold, tau)
        if kept:
            assert p[0, PERSON_A] < threshold <= p[0, PERSON_A] + p[0, PERSON_B]


def test_no_valid_visual_row_labels_nothing():
    lang, vis, text, visual, valid = shared_problem()
    got, agree = pseudo_labels.agreement_labels(
        f32(lang), f32(vis), f32(text), f32(visual), jnp.zeros(len(valid), bool),
        jnp.asarray(distinct_names(SHARED.names)[1]))
    assert (np.asarray(got) == -1).all() and not np.asarray(agree).any()


def test_label_unlabeled_pixels_only_touches_unlabeled_and_reports_rates():
    """Chunked, [B, H, W] layout, a shared name: -2 pixels get the rule's label, GT and -1 pixels
    are unchanged; the metrics are the reference rates over the -2 pixels."""
    lang, vis, text, visual, valid = shared_problem(1, n=2 * 10 * 12)
    ids = jnp.asarray(distinct_names(SHARED.names)[1])
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 7, (2, 10, 12)).astype(np.int32)
    labels[1] = UNL
    labels[1, :3] = -1  # crop padding of the unlabeled image: never labelled
    labels[0, 0] = -1
    want_rule, want_agree = reference_rule(lang, vis, text, visual, valid, SHARED.names, 0.7, 0.07)
    want_rule, want_agree = want_rule.reshape(labels.shape), want_agree.reshape(labels.shape)
    unl = labels == UNL
    want = np.where(unl, want_rule, labels)
    img = lambda x: jnp.asarray(x, jnp.float32).reshape(2, 10, 12, -1)
    got, metrics = pseudo_labels.label_unlabeled_pixels(
        jnp.asarray(labels), img(lang), img(vis), f32(text), f32(visual), jnp.asarray(valid), ids,
        threshold=0.7, tau=0.07, chunk=37)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert (want_rule[unl] == PERSON_B).any()
    np.testing.assert_allclose(metrics["pseudo_fraction"], (want_rule[unl] >= 0).mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["pseudo_agreement"], want_agree[unl].mean(), rtol=1e-6)
    assert 0 < metrics["pseudo_fraction"] < metrics["pseudo_agreement"] < 1
    # No valid V row (bank empty, step 1): nothing is labelled; no unlabeled pixel: rates are 0.
    got, metrics = pseudo_labels.label_unlabeled_pixels(
        jnp.asarray(labels), img(lang), img(vis), f32(text), f32(visual), jnp.zeros(7, bool), ids)
    np.testing.assert_array_equal(np.asarray(got), np.where(unl, -1, labels))
    assert metrics["pseudo_fraction"] == 0 and metrics["pseudo_agreement"] == 0
    _, metrics = pseudo_labels.label_unlabeled_pixels(
        jnp.asarray(labels[:1]), img(lang)[:1], img(vis)[:1], f32(text), f32(visual),
        jnp.asarray(valid), ids)
    assert metrics["pseudo_fraction"] == 0 and metrics["pseudo_agreement"] == 0


# --- data: image folders and mixing -------------------------------------------------------------

def _write_folder(root):
    rng = np.random.default_rng(0)
    paths = ["b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.png"]
    for p in paths:
        os.makedirs(os.path.dirname(os.path.join(root, p)) or root, exist_ok=True)
        h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, p))
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image")
    return sorted(paths)


def test_image_folder_source(tmp_path):
    root = str(tmp_path / "imgs")
    paths = _write_folder(root)
    src = sources.ImageFolderSource(root)
    assert src.files == tuple(paths) and len(src) == 4  # recursive, sorted, any case, no .txt
    rec = src[1]
    assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3 and rec["image"].shape[2] == 3
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        sources.ImageFolderSource(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty" / "sub")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'empty'} holds no \.jpg/\.jpeg/\.png"):
        sources.ImageFolderSource(str(tmp_path / "empty"))
    (tmp_path / "imgs" / "zz_broken.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match="cannot read unlabeled image .*zz_broken.png"):
        sources.ImageFolderSource(root)[4]
    with pytest.raises(FileNotFoundError, match=rf"no image folder {tmp_path / 'nope'}"):
        sources.open_unlabeled_source(str(tmp_path / "nope"), "train", str(tmp_path))


def _labeled_sources():
    rng = np.random.default_rng(0)
    sources = []
    for n_cls in (3, 2):
        sources.append([{"image": rng.integers(0, 256, (40, 48, 3), dtype=np.uint8),
                         "label": rng.integers(0, n_cls, (40, 48, 1)).astype(np.uint8)}
                        for _ in range(5)])
    return sources, LabelSpace({"fix_a": ["a0", "a1", "a2"], "fix_b": ["b0", "b1"]})


def test_pipeline_mixes_unlabeled_images(tmp_path):
    root = str(tmp_path / "imgs")
    _write_folder(root)
    labeled, ls = _labeled_sources()

    def make(**kw):
        return pipeline.TrainPipeline(
            ls.dataset_names, global_batch_size=8, label_space=ls, sources=labeled,
            augment=augment.AugmentConfig(crop_size=32, base_size=32), shard_index=0,
            shard_count=1, weights=[1, 1], **kw)

    p = make(unlabeled=pipeline.Unlabeled(root, 0.5))
    assert p.dataset_sizes == (5, 5) and len(p.unlabeled_source) == 4
    it = p.make_iterator()
    batches = [next(it) for _ in range(4)]
    ids = np.concatenate([b["dataset_id"] for b in batches])
    np.testing.assert_array_equal(np.bincount(ids + 1), [16, 8, 8])  # half unlabeled, rest 1:1
    for b in batches:
        assert set(b) == set(p.element_spec())
        for y, d in zip(b["label"], b["dataset_id"]):
            if d < 0:  # -2 inside the image, -1 only in the padding; always some -2
                assert set(np.unique(y)) <= {UNL, UNION_IGNORE} and (y == UNL).any()
            else:
                assert set(np.unique(y)) <= set(range(ls.num_classes)) | {UNION_IGNORE}
    # Resume: a fresh iterator restored from the state continues the same stream; the state is
    # tied to the unlabeled source and ratio.
    state = it.get_state()
    assert state["unlabeled"] == [root, "train", 0.5]
    it2 = make(unlabeled=pipeline.Unlabeled(root, 0.5)).make_iterator()
    it2.set_state(state)
    nxt, nxt2 = next(it), next(it2)
    for k in nxt:
        np.testing.assert_array_equal(nxt[k], nxt2[k])
    with pytest.raises(ValueError, match="different pipeline"):
        make(unlabeled=pipeline.Unlabeled(root, 0.25)).make_iterator().set_state(state)
    with pytest.raises(ValueError, match="different pipeline"):
        make().make_iterator().set_state(state)
    with pytest.raises(ValueError, match=r"Unlabeled.ratio must be in \(0, 1\)"):
        make(unlabeled=pipeline.Unlabeled(root, 1.0))
    # Without unlabeled data the labeled stream is what it was (no -2, no dataset -1).
    plain = next(make().make_iterator())
    assert (plain["dataset_id"] >= 0).all() and not (plain["label"] == UNL).any()


# --- the train step ---------------------------------------------------------------------------------

def tiny_config(**overrides):
    """The tiny pretraining with synth_c as unlabeled images; warm-up 2 so that the step test and
    the tiny run share compiled programs."""
    return with_overrides(pretrain_config.get_config("tiny"), **{
        "data.datasets": LABELED, "data.crop_size": 32, "data.unlabeled.source": "synth_c",
        "data.unlabeled.ratio": 0.5, "relations.warmup_steps": 2, **overrides})


def label_space():
    return pretrain_inputs.label_space(LABELED)


@pytest.mark.parametrize("overrides,match", [
    ({"loss.kind": "ce_multi_head"}, "data.unlabeled.source='synth_c' needs loss.kind='ms3'"),
    ({"loss.use_visual": False}, "use_visual=False"),
    ({"data.unlabeled.ratio": 0.0}, r"data.unlabeled.ratio must be in \(0, 1\)"),
    ({"pseudo.threshold": 1.5}, r"pseudo.threshold .* must be in \[0, 1\]"),
])
def test_bad_unlabeled_config_is_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        pretrain.check_config(tiny_config(**overrides), 8)


def _step_batch():
    """4 labeled images (no pixel of class 0) + 4 unlabeled ones (-2, with a padded strip)."""
    rng = np.random.default_rng(0)
    k = label_space().num_classes
    labels = np.kron(rng.integers(1, k, (8, 4, 4)), np.ones((1, 8, 8), np.int64)).astype(np.int32)
    labels[4:] = UNL
    labels[6, 24:] = -1
    images = rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    return {"image": images, "label": labels,
            "dataset_id": np.array([0, 1, 0, 1, -1, -1, -1, -1], np.int32)}


def _pairing_loss64(emb, text, y, tau):
    logits = _unit64(emb) @ _unit64(text).T / tau
    ok = y >= 0
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    per = lse - logits[np.arange(len(y)), np.where(ok, y, 0)]
    return per[ok].mean()


@pytest.mark.slow
def test_pseudo_labels_enter_the_losses_and_the_bank_only_with_the_switch():
    """One step, V valid only for class 0 (so the visual argmax is 0 everywhere) and T[0] the mean
    language embedding of the unlabeled pixels (so many pick 0): the -2 pixels whose language
    argmax has class 0's name ('sky', shared with class 7) are pseudo-labelled 0 and enter the
    language loss (float64 reference). With pseudo.enter_bank off the bank of class 0 stays empty
    (the labeled images have no class 0); on, it gets P of them. Other classes' counts are the
    same in both, and S never sees class 0."""
    batch = _step_batch()
    k = label_space().num_classes
    # Heads on the stride-4 decoder map: 8x8 pixels per image (after the ASPP, 4x4 is too few
    # for the mean embedding to win some unlabeled pixels and not all).
    trainers = {eb: pretrain.Trainer(tiny_config(**{"pseudo.enter_bank": eb,
                                                    "model.heads_at": "decoder"}), label_space(),
                                     np.zeros((k, 32), np.float32), num_steps=4)
                for eb in (False, True)}
    model, replicated = trainers[False].model, trainers[False].replicated
    state0 = trainers[False].init_state(jax.random.PRNGKey(0))
    # The step's own forward pass (train-mode BN, no dropout in the MS3 encoder).
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    out, _ = apply({"params": state0.params, "batch_stats": state0.batch_stats}, batch["image"])
    lang = np.asarray(out["language"], np.float64).reshape(-1, 32)
    y = np.asarray(label_rules.downsample_labels(jnp.asarray(batch["label"]), out["language"].shape[1:3]))
    y = y.reshape(-1)
    unl = y == UNL
    rng = np.random.default_rng(1)
    # One prompt per name, as in a real T: synth_a/sky (0) and synth_b/sky (7) share T[0].
    ids = distinct_names(label_space().names)[1]
    assert ids[7] == ids[0]
    text = _unit64(rng.standard_normal((k, 32)))
    text[0] = _unit64(lang[unl].mean(0))
    text = text[np.unique(ids, return_index=True)[1]][ids]
    picks0 = unl & (ids[(_unit64(lang) @ text.T).argmax(-1)] == ids[0])
    assert 0 < picks0.sum() < unl.sum()
    y_fit = np.where(picks0, 0, np.where(unl, -1, y))
    state0 = state0.replace(
        visual_emb=jax.device_put(jnp.asarray(_unit64(rng.standard_normal((k, 32))), jnp.float32), replicated),
        visual_valid=jax.device_put(jnp.arange(k) == 0, replicated))
    results = {}
    for enter_bank, trainer in trainers.items():
        trainer.consts = dict(trainer.consts, text=jax.device_put(jnp.asarray(text, jnp.float32), replicated))
        state = jax.tree_util.tree_map(jnp.copy, state0)  # the step donates its input state
        new, metrics = trainer.step(state, trainer.global_batch(batch))
        results[enter_bank] = jax.device_get((new, metrics))
        np.testing.assert_allclose(metrics["pseudo_fraction"], picks0.sum() / unl.sum(), rtol=1e-6)
        np.testing.assert_allclose(metrics["pseudo_agreement"], picks0.sum() / unl.sum(), rtol=1e-6)
        np.testing.assert_allclose(metrics["loss_language"], _pairing_loss64(lang, text, y_fit, 0.07),
                                   rtol=1e-4)
        without = _pairing_loss64(lang, text, np.where(unl, -1, y), 0.07)
        assert not np.isclose(metrics["loss_language"], without, rtol=1e-3)

    (off, _), (on, _) = results[False], results[True]
    per_class = tiny_config().bank.per_class
    gt_counts = np.bincount(y[y >= 0], minlength=k)
    np.testing.assert_array_equal(off.bank.count, np.minimum(gt_counts, per_class))
    assert off.bank.count[0] == 0 and not np.asarray(off.bank.feats[0]).any()
    assert on.bank.count[0] == min(picks0.sum(), per_class) and np.asarray(on.bank.feats[0]).any()
    np.testing.assert_array_equal(on.bank.count[1:], off.bank.count[1:])
    for s in (off, on):  # S (Eq. 5) from ground truth only
        np.testing.assert_array_equal(s.sim_seen, gt_counts > 0)


# --- a tiny run ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_pretraining_with_unlabeled_images(tmp_path):
    data_dir = synthetic_data.build(tmp_path, num_train=12, num_val=2).data_dir
    config = tiny_config(**{"num_steps": 4, "log_every": 2, "checkpoint_every": 4,
                            "data.data_dir": data_dir})
    config.data.synthetic = None
    path = str(tmp_path / "T.npz")
    t = np.random.default_rng(0).standard_normal((label_space().num_classes, config.model.emb_dim))
    text_embeddings.save_text_embeddings(path, label_space(), t / np.linalg.norm(t, axis=1, keepdims=True),
                                         "template")
    config.text.embeddings = path
    history = pretrain.train_and_evaluate(config, str(tmp_path / "wd"))
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for h in history:
        for k in ("loss", "pseudo_fraction", "pseudo_agreement"):
            assert np.isfinite(h[k]), (h["step"], k)
        assert 0.0 <= h["pseudo_fraction"] <= h["pseudo_agreement"] <= 1.0
    # Step 1: the bank is empty, so no V row is valid and nothing is pseudo-labelled.
    assert history[0]["pseudo_fraction"] == 0 and history[0]["pseudo_agreement"] == 0
    assert max(h["pseudo_agreement"] for h in history[1:]) > 0
