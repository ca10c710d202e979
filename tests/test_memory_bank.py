"""Memory bank: FIFO rings per class, uniform per-class sampling, Eq. 4 vs a float64 reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ms3_jax.method import memory_bank as mb

_enqueue = jax.jit(mb.enqueue, static_argnames=("per_class", "ignore_label"))
_visual = jax.jit(mb.visual_embeddings)


def _tagged(labels, step):
    """Embeddings that identify their pixel: [label, step, pixel index, 1] (exact in f32)."""
    n = len(labels)
    return np.stack([labels, np.full(n, step), np.arange(n), np.ones(n)], 1).astype(np.float32)


def test_init_bank():
    bank = mb.init_bank(5, 4, 3)
    assert bank.feats.shape == (5, 4, 3) and bank.feats.dtype == jnp.bfloat16
    assert bank.ptr.dtype == jnp.int32 and bank.count.dtype == jnp.int32
    assert (bank.num_classes, bank.slots, bank.dim) == (5, 4, 3)
    assert not bool(bank.slot_valid().any())


def test_fifo_exact_order_one_per_step():
    """One pixel per class per step: ring slot s holds the newest step written there."""
    k, slots = 3, 5
    bank = mb.init_bank(k, slots, 4, jnp.float32)
    for step in range(7):
        labels = np.array([0, 1, 2, 255])
        bank = _enqueue(bank, _tagged(labels, step), labels, jax.random.key(step), per_class=1)
    feats = np.asarray(bank.feats)
    for c in range(k):
        np.testing.assert_array_equal(feats[c, :, 1], [5, 6, 2, 3, 4])  # steps 0, 1 overwritten
        np.testing.assert_array_equal(feats[c, :, 0], c)
    np.testing.assert_array_equal(bank.ptr, 7 % slots)
    np.testing.assert_array_equal(bank.count, slots)


def test_fifo_against_ring_simulation():
    """Random per-class pixel counts (some above P): written slots, untouched slots, ptr, count."""
    k, slots, per_class = 3, 5, 2
    r = np.random.RandomState(0)
    bank = mb.init_bank(k, slots, 4, jnp.float32)
    ptr, count = np.zeros(k, int), np.zeros(k, int)
    for step in range(12):
        n_c = r.randint(0, 4, size=k)
        labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_c)])
        labels = np.pad(labels, (0, 12 - len(labels)), constant_values=255)  # one shape, one trace
        labels = labels[r.permutation(len(labels))]
        emb = _tagged(labels, step)
        old = np.asarray(bank.feats)
        bank = _enqueue(bank, emb, labels, jax.random.key(100 + step), per_class=per_class)
        new = np.asarray(bank.feats)
        for c in range(k):
            n_valid = min(n_c[c], per_class)
            written = [(ptr[c] + j) % slots for j in range(n_valid)]
            untouched = [s for s in range(slots) if s not in written]
            np.testing.assert_array_equal(new[c, untouched], old[c, untouched])
            ids = sorted(new[c, written, 2].astype(int))
            assert len(set(ids)) == n_valid  # without replacement
            assert set(ids) <= set(np.flatnonzero(labels == c))
            np.testing.assert_array_equal(new[c, written, 1], step)
            ptr[c] = (ptr[c] + n_valid) % slots
            count[c] = min(count[c] + n_valid, slots)
            np.testing.assert_array_equal(new[c, count[c]:], 0.0)  # unfilled slots stay zero
        np.testing.assert_array_equal(bank.ptr, ptr)
        np.testing.assert_array_equal(bank.count, count)


def test_never_mixes_classes_and_at_most_p_per_step():
    k, slots, per_class, n = 6, 8, 3, 60
    r = np.random.RandomState(1)
    bank = mb.init_bank(k, slots, 4, jnp.float32)
    total = np.zeros(k, int)
    for step in range(10):
        labels = r.choice(np.array([0, 1, 2, 3, 4, 5, 7, 255]), size=n, p=[.3, .2, .1, .1, .05, .05, .1, .1])
        labels[labels == 5] = 7 if step % 2 else 5  # class 5 only on even steps
        prev = np.asarray(bank.count)
        bank = _enqueue(bank, _tagged(labels, step), labels, jax.random.key(step), per_class=per_class)
        inc = np.asarray(bank.count) - prev
        assert np.all(inc <= per_class)
        total += np.minimum(np.bincount(labels[labels < k], minlength=k), per_class)
    np.testing.assert_array_equal(bank.count, np.minimum(total, slots))
    np.testing.assert_array_equal(bank.ptr, total % slots)
    feats, valid = np.asarray(bank.feats), np.asarray(bank.slot_valid())
    for c in range(k):
        stored = feats[c][valid[c]]
        np.testing.assert_array_equal(stored[:, 0], c)  # every slot came from a pixel labelled c
        _, per_step = np.unique(stored[:, 1], return_counts=True)
        assert np.all(per_step <= per_class)
    assert not np.any(feats[:, :, 0] == 7) and not np.any(feats[:, :, 0] == 255)


def test_uniform_sampling():
    """Over many rngs, each pixel of a class is picked with probability ~ P / n_c."""
    per_class, n_rng = 3, 2000
    labels = np.array([0] * 10 + [1] * 4 + [255] * 3)
    labels = labels[np.random.RandomState(2).permutation(len(labels))]
    emb = _tagged(labels, 0)
    bank0 = mb.init_bank(2, per_class, 4, jnp.float32)
    keys = jax.random.split(jax.random.key(3), n_rng)
    banks = jax.jit(jax.vmap(functools.partial(mb.enqueue, per_class=per_class),
                             in_axes=(None, None, None, 0)))(bank0, emb, labels, keys)
    ids = np.asarray(banks.feats[:, :, :, 2]).astype(int)  # [rng, class, slot]
    for c, n_c in ((0, 10), (1, 4)):
        freq = np.bincount(ids[:, c].reshape(-1), minlength=len(labels)) / n_rng
        members = np.flatnonzero(labels == c)
        np.testing.assert_allclose(freq[members], per_class / n_c, atol=0.05)
        assert freq[np.setdiff1d(np.arange(len(labels)), members)].sum() == 0
        assert all(len(set(row)) == per_class for row in ids[:, c])


def test_per_class_larger_than_slots_raises():
    bank = mb.init_bank(2, 3, 4)
    with pytest.raises(ValueError):
        mb.enqueue(bank, np.zeros((5, 4), np.float32), np.zeros(5, np.int32), jax.random.key(0),
                   per_class=4)


def test_jit_matches_eager_and_bf16():
    r = np.random.RandomState(4)
    labels = r.randint(0, 4, size=(2, 6, 6)).astype(np.int32)
    emb = r.randn(2, 6, 6, 8).astype(np.float32)
    bank = mb.init_bank(4, 6, 8)  # bf16, [..., C] inputs are flattened
    eager = mb.enqueue(bank, emb, labels, jax.random.key(5), per_class=4)
    jitted = _enqueue(bank, emb, labels, jax.random.key(5), per_class=4)
    assert jitted.feats.dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def ref_visual(feats, count, v_old, v_valid):
    """Eq. 4, float64 loops: weighted mean over the filled slots, then unit norm."""
    feats = np.asarray(feats, np.float64)
    v_old = np.asarray(v_old, np.float64)
    out, valid = v_old.copy(), np.zeros(len(count), bool)
    for j in range(len(count)):
        if count[j] == 0:
            continue
        acc = np.zeros(feats.shape[-1])
        for i in range(count[j]):
            m = feats[j, i]
            w = (m @ v_old[j] / np.linalg.norm(m) / np.linalg.norm(v_old[j])) if v_valid[j] else 1.0
            acc += w * m
        acc /= count[j]
        out[j] = acc / np.linalg.norm(acc)
        valid[j] = True
    return out, valid


def test_visual_embeddings_eq4():
    k, slots, dim = 5, 6, 8
    r = np.random.RandomState(6)
    center = r.randn(k, dim)
    count = np.array([0, 3, slots, 1, 0], np.int32)
    filled = np.arange(slots)[None, :, None] < count[:, None, None]  # the bank's invariant
    feats = jnp.asarray(np.where(filled, center[:, None] + 0.5 * r.randn(k, slots, dim), 0.0),
                        jnp.bfloat16)
    bank = mb.MemoryBank(feats=feats, ptr=count % slots, count=jnp.asarray(count))
    v_old = (center + 0.3 * r.randn(k, dim)).astype(np.float32)
    v_valid = np.array([True, False, True, True, False])
    v, valid = (np.asarray(x) for x in _visual(bank, v_old, v_valid))
    ref_v, ref_valid = ref_visual(np.asarray(feats, np.float32), count, v_old, v_valid)
    np.testing.assert_array_equal(valid, ref_valid)
    np.testing.assert_allclose(v, ref_v, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(v[[0, 4]], v_old[[0, 4]])  # empty classes keep V_old
    np.testing.assert_allclose(np.linalg.norm(v[valid], axis=-1), 1.0, rtol=1e-6)
    # First sighting = plain mean, regardless of V_old.
    plain = np.asarray(feats, np.float64)[1, :3].mean(0)
    np.testing.assert_allclose(v[1], plain / np.linalg.norm(plain), rtol=1e-5, atol=1e-6)


def test_bank_then_visual_end_to_end_jit():
    """enqueue -> Eq. 4 inside one jitted step; classes absent from the batch stay invalid."""
    k, slots, dim = 4, 4, 8

    @jax.jit
    def step(bank, v, v_valid, emb, labels, rng):
        bank = mb.enqueue(bank, emb, labels, rng, per_class=2)
        v, v_valid = mb.visual_embeddings(bank, v, v_valid)
        return bank, v, v_valid

    r = np.random.RandomState(7)
    bank, v, v_valid = mb.init_bank(k, slots, dim, jnp.float32), jnp.zeros((k, dim)), jnp.zeros(k, bool)
    for s in range(3):
        labels = r.choice([0, 1, 255], size=20).astype(np.int32)
        emb = r.randn(20, dim).astype(np.float32)
        bank, v, v_valid = step(bank, v, v_valid, emb, labels, jax.random.key(s))
    np.testing.assert_array_equal(v_valid, [True, True, False, False])
    np.testing.assert_array_equal(v[2:], 0.0)


def test_enqueue_into_the_donated_bfloat16_bank():
    """The jitted, donated enqueue of a large bfloat16 bank keeps min(count, P) per class (its
    compiled temporaries: benchmarks/program_budgets.py)."""
    k, slots, dim, n = 256, 64, 128, 1000
    bank = mb.init_bank(k, slots, dim)  # bfloat16, 4 MiB
    labels = np.random.RandomState(8).randint(0, k, size=n).astype(np.int32)
    emb = np.random.RandomState(9).randn(n, dim).astype(np.float32)
    fn = jax.jit(functools.partial(mb.enqueue, per_class=4), donate_argnums=0)
    new = fn(bank, emb, labels, jax.random.key(0))
    assert new.feats.dtype == jnp.bfloat16
    assert int(new.count.sum()) == int(np.minimum(np.bincount(labels, minlength=k), 4).sum())
