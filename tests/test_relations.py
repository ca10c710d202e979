"""Eq. 5 (segment-mean cross-modal similarity), its EMA, Eq. 6 (multi-label mask), report."""
import jax
import jax.numpy as jnp
import numpy as np

from ms3_jax.method import relations as rel

_seg = jax.jit(rel.segment_similarity, static_argnames=("num_classes", "chunk", "ignore_label"))
_update = jax.jit(rel.update_similarity)
_mask = jax.jit(rel.multilabel_mask)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ref_segment_similarity(emb, labels, text):
    """Eq. 5 literally, float64: for each present class y, mean over its pixels of F_k · T_y'."""
    emb, text = np.asarray(emb, np.float64), np.asarray(text, np.float64)
    k = text.shape[0]
    mean, count = np.zeros((k, k)), np.zeros(k, int)
    for y in range(k):
        pix = [i for i in range(len(labels)) if labels[i] == y]
        count[y] = len(pix)
        for y2 in range(k):
            if pix:
                mean[y, y2] = sum(emb[i] @ text[y2] for i in pix) / len(pix)
    return mean, count


def test_segment_similarity_eq5():
    k, c, n = 7, 6, 47  # prime: chunked path pads
    r = np.random.RandomState(0)
    emb = _unit(r.randn(n, c)).astype(np.float32)
    text = _unit(r.randn(k, c)).astype(np.float32)
    labels = r.choice([0, 1, 2, 4, 6, 255, 9], size=n).astype(np.int32)  # 3, 5 absent; 9 >= K
    ref_mean, ref_count = ref_segment_similarity(emb, labels, text)
    for chunk in (None, 8, 16):
        mean, count = _seg(emb, labels, text, num_classes=k, chunk=chunk)
        np.testing.assert_array_equal(count, ref_count)
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(mean)[[3, 5]] == 0)
    # [B, H, W, C] inputs and bf16 embeddings.
    mean_b, _ = _seg(jnp.asarray(emb.reshape(1, 47, c), jnp.bfloat16), labels.reshape(1, 47), text,
                     num_classes=k, chunk=None)
    assert mean_b.dtype == jnp.float32
    np.testing.assert_allclose(mean_b, ref_mean, atol=1e-2)


def test_update_similarity_ema():
    k, m = 5, 0.9
    r = np.random.RandomState(1)
    s = r.randn(k, k).astype(np.float32)
    batch = r.randn(k, k).astype(np.float32)
    count = np.array([3, 0, 1, 0, 7])
    seen = np.array([True, True, False, False, True])
    out = np.asarray(_update(s, batch, count, m, seen))
    for y in range(k):
        if count[y] == 0:
            np.testing.assert_array_equal(out[y], s[y])  # absent: unchanged
        elif not seen[y]:
            np.testing.assert_array_equal(out[y], batch[y])  # first sighting: batch mean
        else:
            np.testing.assert_allclose(out[y], m * s[y] + (1 - m) * batch[y], rtol=1e-6)
    plain = np.asarray(_update(s, batch, count, m, None))
    np.testing.assert_allclose(plain[2], m * s[2] + (1 - m) * batch[2], rtol=1e-6)
    np.testing.assert_array_equal(rel.update_seen(seen, count), [True, True, True, False, True])


def ref_mask(s, dataset_of_class, seen=None):
    k = s.shape[0]
    out = np.zeros((k, k), bool)
    for y in range(k):
        if seen is not None and not seen[y]:
            continue
        for y2 in range(k):
            out[y, y2] = (s[y, y2] >= s[y, y]) and dataset_of_class[y2] != dataset_of_class[y]
    return out


def test_multilabel_mask_eq6():
    k = 12
    r = np.random.RandomState(2)
    ds = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    other = np.asarray(rel.other_dataset_matrix(ds))
    np.testing.assert_array_equal(other, ds[:, None] != ds[None, :])
    s = np.round(r.rand(k, k), 1).astype(np.float32)  # many ties, exercise ">="
    np.fill_diagonal(s, r.rand(k) * 0.8)
    seen = r.rand(k) < 0.8
    for sn in (None, seen):
        m = np.asarray(_mask(s, other, sn))
        np.testing.assert_array_equal(m, ref_mask(s, ds, sn))
        assert not m.diagonal().any()
        assert not m[ds[:, None] == ds[None, :]].any()
    assert m.any() and not m[~seen].any()
    # Even an all-equal S never maps a class onto itself or its own dataset.
    m = np.asarray(_mask(np.ones((k, k), np.float32), other))
    np.testing.assert_array_equal(m, other)


def test_multilabel_mask_top_k_keeps_the_k_most_similar_pairs():
    """The opt-in `relations.top_k` (not the paper's rule): per row, Eq. 6's pairs with the k
    largest S, ties with the k-th kept; against a plain NumPy reference."""
    k = 12
    r = np.random.RandomState(5)
    ds = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])
    other = np.asarray(rel.other_dataset_matrix(ds))
    s = np.round(r.rand(k, k), 1).astype(np.float32)
    np.fill_diagonal(s, r.rand(k) * 0.5)
    full = ref_mask(s, ds, None)
    for top in (1, 2, 3):
        want = np.zeros_like(full)
        for y in range(k):
            passing = sorted(s[y, full[y]], reverse=True)
            if passing:
                kth = passing[min(top, len(passing)) - 1]
                want[y] = full[y] & (s[y] >= kth)
        got = np.asarray(jax.jit(rel.multilabel_mask, static_argnums=3)(s, other, None, top))
        np.testing.assert_array_equal(got, want)
        assert (got.sum(1) <= np.maximum(full.sum(1), 0)).all() and got.sum() < full.sum()
    np.testing.assert_array_equal(np.asarray(rel.multilabel_mask(s, other, None, 0)), full)


def test_unidirectional_subset_relation():
    """'dirt track' (ADE) ⊂ 'path' (COCO): dirt-track pixels look like 'path', not conversely."""
    names = ["dirt track", "car", "path", "bus"]
    ds_names = ["ade20k", "ade20k", "coco_stuff", "coco_stuff"]
    ds = np.array([0, 0, 1, 1])
    s = np.array([[0.40, 0.10, 0.45, 0.05],   # dirt track pixels: closer to 'path' than itself
                  [0.05, 0.50, 0.10, 0.30],
                  [0.30, 0.05, 0.60, 0.05],   # path pixels: own text wins
                  [0.00, 0.48, 0.10, 0.45]], np.float32)  # bus pixels -> 'car'
    m = np.asarray(_mask(s, rel.other_dataset_matrix(ds)))
    assert m[0, 2] and not m[2, 0]
    assert m[3, 1] and not m[1, 3]
    assert m.sum() == 2
    rows = rel.relations_table(m, s, names, ds_names)
    assert [r.name for r in rows] == ["dirt track", "bus"]
    assert rows[0].targets == (("path", "coco_stuff", float(np.float32(0.45))),)
    report = rel.relations_report(m, s, names, ds_names)
    lines = report.splitlines()
    assert lines[0] == "multi-label mapping: 2 directed pairs from 2 classes"
    assert "dirt track [ade20k] (self 0.400) -> path [coco_stuff] 0.450" in lines
    assert "bus [coco_stuff] (self 0.450) -> car [ade20k] 0.480" in lines
    assert not any(line.startswith("path") for line in lines)


def test_report_sorts_targets_by_similarity():
    names = ["hill", "mountain", "rock", "land", "earth"]
    ds_names = ["coco", "ade", "ade", "coco", "ade"]
    s = np.full((5, 5), 0.1, np.float32)
    s[0, 0], s[0, 1], s[0, 2] = 0.3, 0.5, 0.35
    m = np.zeros((5, 5), bool)
    m[0, 1] = m[0, 2] = True
    report = rel.relations_report(m, s, names, ds_names)
    assert "hill [coco] (self 0.300) -> mountain [ade] 0.500, rock [ade] 0.350" in report.splitlines()


def test_end_to_end_step_jit():
    """Eq. 5 -> EMA -> Eq. 6 in one jitted function, with a class absent from the batch."""
    k, c = 6, 8
    ds = np.array([0, 0, 0, 1, 1, 1])
    r = np.random.RandomState(3)
    text = _unit(r.randn(k, c)).astype(np.float32)

    @jax.jit
    def step(s, seen, emb, labels):
        mean, count = rel.segment_similarity(emb, labels, text, k, chunk=16)
        s = rel.update_similarity(s, mean, count, 0.9, seen)
        seen = rel.update_seen(seen, count)
        return s, seen, rel.multilabel_mask(s, rel.other_dataset_matrix(ds), seen)

    s, seen = jnp.zeros((k, k)), jnp.zeros(k, bool)
    labels = r.choice([0, 1, 2, 3, 4, 255], size=40).astype(np.int32)  # class 5 never appears
    emb = _unit(r.randn(40, c)).astype(np.float32)
    s, seen, m = step(s, seen, emb, labels)
    ref_mean, _ = ref_segment_similarity(emb, labels, text)
    np.testing.assert_allclose(s, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(seen, [True] * 5 + [False])
    np.testing.assert_array_equal(m, ref_mask(ref_mean, ds, np.asarray(seen)))
