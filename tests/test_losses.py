"""Pairing loss (Eq. 1/2, 7/8) and CE baselines against float64 NumPy references; the plain
pairing loss (autodiff) against its custom-VJP fast path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ms3_jax.method import chunking, labels as labels_lib, losses

K, C = 10, 8
SHAPE = (2, 5, 7)  # N = 70 pixels
TAU = 0.07

_per_pixel = jax.jit(losses.pairing_loss_per_pixel, static_argnames=("tau", "chunk", "ignore_label"))
_STATIC = ("tau", "chunk", "ignore_label", "product_dtype")
_loss = jax.jit(losses.pairing_loss, static_argnames=_STATIC)
_grad = jax.jit(jax.grad(losses.pairing_loss, argnums=(0, 1)), static_argnames=("tau", "chunk"))
_acc = jax.jit(losses.pixel_accuracy, static_argnames=("chunk",))
_fast = jax.jit(losses.pairing_loss_fast, static_argnames=_STATIC)
_fast_grad = jax.jit(jax.grad(losses.pairing_loss_fast), static_argnames=_STATIC)
_plain_grad = jax.jit(jax.grad(losses.pairing_loss), static_argnames=_STATIC)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(seed, shape=SHAPE, k=K, c=C, ignore_frac=0.2):
    r = np.random.RandomState(seed)
    emb = _unit(r.randn(*shape, c)).astype(np.float32)
    cls = _unit(r.randn(k, c)).astype(np.float32)
    labels = r.randint(0, k, size=shape)
    labels[r.rand(*shape) < ignore_frac] = 255
    return emb, cls, labels.astype(np.int32)


def _random_positives(seed, k=K, p=0.3):
    r = np.random.RandomState(seed)
    return r.rand(k, k) < p


def ref_per_pixel(emb, cls, labels, positives=None, valid=None, tau=TAU):
    """Literal Eq. 7 (Eq. 1 if no positives), float64, one pixel at a time."""
    emb = np.asarray(emb, np.float64).reshape(-1, cls.shape[1])
    cls = np.asarray(cls, np.float64)
    labels = np.asarray(labels).reshape(-1)
    k = cls.shape[0]
    valid = np.ones(k, bool) if valid is None else np.asarray(valid)
    loss, weight = np.zeros(len(labels)), np.zeros(len(labels))
    for i, y in enumerate(labels):
        if y == 255 or y >= k or not valid[y]:
            continue
        logit = np.array([emb[i] @ cls[j] / tau for j in range(k)])
        den = sum(np.exp(logit[j]) for j in range(k) if valid[j])
        num = np.exp(logit[y])
        if positives is not None:
            num += sum(np.exp(logit[j]) for j in range(k)
                       if j != y and positives[y, j] and valid[j])
        loss[i] = -np.log(num / den)
        weight[i] = 1.0
    return loss, weight


def ref_mean(*args, **kw):
    loss, w = ref_per_pixel(*args, **kw)
    return loss.sum() / max(w.sum(), 1.0)


@pytest.mark.parametrize("use_positives", [False, True])
@pytest.mark.parametrize("use_valid", [False, True])
def test_pairing_matches_reference(use_positives, use_valid):
    emb, cls, labels = _inputs(0)
    pos = _random_positives(1) if use_positives else None
    valid = (np.random.RandomState(2).rand(K) < 0.7) if use_valid else None
    loss, w = _per_pixel(emb, cls, labels, pos, valid, TAU, chunk=None)
    ref_l, ref_w = ref_per_pixel(emb, cls, labels, pos, valid)
    assert loss.shape == SHAPE and loss.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(w).reshape(-1), ref_w)
    np.testing.assert_allclose(np.asarray(loss).reshape(-1), ref_l, rtol=2e-5, atol=2e-5)
    mean = _loss(emb, cls, labels, pos, valid, TAU, chunk=None)
    np.testing.assert_allclose(float(mean), ref_mean(emb, cls, labels, pos, valid), rtol=2e-5)


def test_chunked_equals_unchunked():
    emb, cls, labels = _inputs(3)
    pos = _random_positives(4)
    valid = np.random.RandomState(5).rand(K) < 0.8
    full = _per_pixel(emb, cls, labels, pos, valid, TAU, chunk=None)
    for chunk in (16, 69):  # neither divides N = 70 (chunk_layout shrinks them to 14, 35)
        part = _per_pixel(emb, cls, labels, pos, valid, TAU, chunk=chunk)
        np.testing.assert_allclose(part[0], full[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(part[1], full[1])
    g_full = _grad(emb, cls, labels, pos, valid, TAU, chunk=None)
    g_part = _grad(emb, cls, labels, pos, valid, TAU, chunk=16)
    for a, b in zip(g_part, g_full):  # d/d emb and d/d class_emb
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # N = 97 (prime): chunks of 16 need padding with ignored pixels.
    emb, cls, labels = _inputs(23, shape=(97,))
    assert chunking.chunk_layout(97, 16) == (7, 16)
    full = _per_pixel(emb, cls, labels, pos, valid, TAU, chunk=None)
    part = _per_pixel(emb, cls, labels, pos, valid, TAU, chunk=16)
    np.testing.assert_allclose(part[0], full[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(part[1], full[1])
    g_full = _grad(emb, cls, labels, pos, valid, TAU, chunk=None)
    g_part = _grad(emb, cls, labels, pos, valid, TAU, chunk=16)
    for a, b in zip(g_part, g_full):  # d/d emb and d/d class_emb
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_finite_differences():
    """d Eq. 7 / d emb and d class_emb (plain form, float32) vs central differences of the float64
    reference; the fast path's d / d emb is the same."""
    emb, cls, labels = _inputs(6, shape=(4,), k=5, c=4, ignore_frac=0.0)
    labels[1] = 255
    pos = np.zeros((5, 5), bool)
    pos[labels[0], (labels[0] + 1) % 5] = True
    pos[labels[2], (labels[2] + 2) % 5] = True
    valid = np.array([True, True, True, True, False])
    labels[3] = 0  # class 0 valid
    g_emb, g_cls = _grad(emb, cls, labels, pos, valid, TAU, chunk=None)
    eps = 1e-6
    for which, g in ((0, g_emb), (1, g_cls)):
        x64 = (emb, cls)[which].astype(np.float64)
        fd = np.zeros_like(x64)
        for idx in np.ndindex(x64.shape):
            ep, em = x64.copy(), x64.copy()
            ep[idx] += eps
            em[idx] -= eps
            args = lambda x: (x, cls) if which == 0 else (emb, x)  # noqa: E731
            fd[idx] = (ref_mean(*args(ep), labels, pos, valid)
                       - ref_mean(*args(em), labels, pos, valid)) / (2 * eps)
        assert np.abs(fd).max() > 0.1
        np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())
    np.testing.assert_array_equal(g_emb[1], 0.0)  # ignored pixel
    np.testing.assert_array_equal(g_cls[4], 0.0)  # invalid class
    g_fast = _fast_grad(emb, cls, labels, pos, valid, TAU, chunk=None)
    np.testing.assert_allclose(g_fast, g_emb, rtol=1e-5, atol=1e-5 * np.abs(g_emb).max())


def test_eq7_with_empty_positives_is_eq1():
    emb, cls, labels = _inputs(7)
    a = _per_pixel(emb, cls, labels, None, None, TAU, chunk=None)[0]
    b = _per_pixel(emb, cls, labels, np.zeros((K, K), bool), None, TAU, chunk=None)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_adding_a_positive_never_raises_loss():
    emb, cls, labels = _inputs(8)
    r = np.random.RandomState(9)
    pos = _random_positives(10, p=0.2)
    prev = np.asarray(_per_pixel(emb, cls, labels, pos, None, TAU, chunk=None)[0])
    for _ in range(5):
        pos = pos.copy()
        pos[r.randint(K), r.randint(K)] = True
        cur = np.asarray(_per_pixel(emb, cls, labels, pos, None, TAU, chunk=None)[0])
        assert np.all(cur <= prev + 1e-6)
        prev = cur


def test_identical_embedding_gives_lower_loss():
    cls = np.eye(K, C + 4, dtype=np.float32)  # orthonormal targets
    labels = np.random.RandomState(11).randint(0, K, size=(30,)).astype(np.int32)
    perfect = cls[labels]
    rand = _unit(np.random.RandomState(12).randn(30, C + 4)).astype(np.float32)
    lp = float(_loss(perfect, cls, labels, None, None, TAU, chunk=None))
    lr = float(_loss(rand, cls, labels, None, None, TAU, chunk=None))
    np.testing.assert_allclose(lp, np.log1p((K - 1) * np.exp(-1 / TAU)), atol=1e-6)  # f32 lse − lse
    assert lp < 1e-4 < lr


def test_all_ignored_is_zero_with_finite_grad():
    emb, cls, labels = _inputs(13)
    labels = np.full_like(labels, 255)
    assert float(_loss(emb, cls, labels, None, None, TAU, chunk=16)) == 0.0
    g = _grad(emb, cls, labels, None, None, TAU, chunk=16)
    np.testing.assert_array_equal(g[0], 0.0)
    np.testing.assert_array_equal(g[1], 0.0)
    assert float(_fast(emb, cls, labels, None, None, TAU, chunk=16)) == 0.0
    np.testing.assert_array_equal(_fast_grad(emb, cls, labels, None, None, TAU, chunk=16), 0.0)
    # Every pixel of an invalid class also counts nothing.
    emb, cls, labels = _inputs(14, ignore_frac=0.0)
    labels[:] = 3
    valid = np.ones(K, bool)
    valid[3] = False
    assert float(_loss(emb, cls, labels, None, valid, TAU, chunk=None)) == 0.0


def test_bf16_embeddings_use_f32_logits():
    emb, cls, labels = _inputs(15)
    pos = _random_positives(16)
    emb_bf = jnp.asarray(emb, jnp.bfloat16)
    loss = _loss(emb_bf, cls, labels, pos, None, TAU, chunk=16)
    assert loss.dtype == jnp.float32
    ref = ref_mean(np.asarray(emb_bf.astype(jnp.float32)), cls, labels, pos)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    g = _grad(emb_bf, cls, labels, pos, None, TAU, chunk=16)[0]
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))


def test_pixel_accuracy():
    emb, cls, labels = _inputs(17)
    labels[0, 0, :3] = np.arange(3)
    emb[0, 0, :3] = cls[:3]  # some guaranteed hits
    valid = np.random.RandomState(18).rand(K) < 0.7
    for v in (None, valid):
        acc = float(_acc(emb, cls, labels, v, chunk=16))
        logits = emb.reshape(-1, C).astype(np.float64) @ cls.T.astype(np.float64)
        if v is not None:
            logits[:, ~v] = -np.inf
        lab = labels.reshape(-1)
        ok = lab != 255
        ref = np.mean(logits[ok].argmax(-1) == lab[ok])
        np.testing.assert_allclose(acc, ref, rtol=1e-6)
    assert float(_acc(emb, cls, np.full_like(labels, 255), None, chunk=16)) == 0.0


_loss_pred = jax.jit(losses.pairing_loss_and_prediction, static_argnames=("tau", "chunk"))


@pytest.mark.parametrize("chunk", [None, 16])
def test_prediction_from_the_loss_logits(chunk):
    """pairing_loss_and_prediction: the same loss as pairing_loss, and per-pixel argmax over the
    valid classes (float64 NumPy) whose accuracy equals pixel_accuracy's."""
    emb, cls, labels = _inputs(19)
    pos, valid = _random_positives(20), np.random.RandomState(21).rand(K) < 0.7
    loss, pred = _loss_pred(emb, cls, labels, pos, valid, TAU, chunk=chunk)
    assert pred.shape == SHAPE and pred.dtype == jnp.int32
    np.testing.assert_allclose(float(loss), ref_mean(emb, cls, labels, pos, valid), rtol=2e-5)
    logits = emb.reshape(-1, C).astype(np.float64) @ cls.T.astype(np.float64)
    logits[:, ~valid] = -np.inf
    np.testing.assert_array_equal(np.asarray(pred).reshape(-1), logits.argmax(-1))
    acc = float(losses.prediction_accuracy(pred, labels, K))
    lab = labels.reshape(-1)
    ok = lab != 255
    np.testing.assert_allclose(acc, np.mean(logits[ok].argmax(-1) == lab[ok]), rtol=1e-6)
    np.testing.assert_allclose(acc, float(_acc(emb, cls, labels, valid, chunk=chunk)), rtol=1e-6)
    assert float(losses.prediction_accuracy(pred, np.full_like(labels, 255), K)) == 0.0


def test_first_argmax_is_argmax_with_ties():
    """first_argmax = NumPy's argmax (first maximum), with exact ties (duplicate class embeddings
    give them) and rows of equal masked logits."""
    r = np.random.RandomState(30)
    x = r.randint(-3, 4, size=(64, 9)).astype(np.float32)  # many ties
    x[5] = labels_lib.MASKED_LOGIT
    x[6, 4] = np.inf
    got = np.asarray(jax.jit(losses.first_argmax)(x))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, x.argmax(-1))


def test_per_pixel_gradient_weights_each_pixel():
    """The custom VJP scales each pixel's d loss_i / d I_i by its own cotangent: the gradient of
    sum_i w_i loss_i (chunked, with padding) vs central differences of the float64 reference."""
    emb, cls, labels = _inputs(22, shape=(7,), k=5, c=4, ignore_frac=0.0)
    pos = _random_positives(23, k=5)
    w = np.random.RandomState(24).randn(7)
    grad = jax.jit(jax.grad(lambda e: jnp.sum(jnp.asarray(w, jnp.float32) * losses._fast_per_pixel(
        e, cls, labels, pos, None, TAU, 3, -1, None, False)[0])))
    g = np.asarray(grad(emb))
    e64, fd, eps = emb.astype(np.float64), np.zeros((7, 4)), 1e-6

    def f(e):
        return float(w @ ref_per_pixel(e, cls, labels, pos)[0])

    for idx in np.ndindex(e64.shape):
        ep, em = e64.copy(), e64.copy()
        ep[idx] += eps
        em[idx] -= eps
        fd[idx] = (f(ep) - f(em)) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())


def _ref_ce(logits, labels, allowed=None):
    """allowed: bool [B, K] classes in each image's softmax (None = all)."""
    logits = np.asarray(logits, np.float64)
    b = logits.shape[0]
    total, n = 0.0, 0
    for bi in range(b):
        for idx in np.ndindex(labels.shape[1:]):
            y = labels[(bi,) + idx]
            if y == 255:
                continue
            cl = [k for k in range(logits.shape[-1]) if allowed is None or allowed[bi, k]]
            if y not in cl:
                continue
            z = logits[(bi,) + idx]
            total += -(z[y] - np.log(sum(np.exp(z[k]) for k in cl)))
            n += 1
    return total / max(n, 1)


def test_ce_single_head():
    r = np.random.RandomState(19)
    logits = r.randn(2, 3, 4, K).astype(np.float32) * 3
    labels = r.randint(0, K, size=(2, 3, 4)).astype(np.int32)
    labels[0, 1] = 255
    out = jax.jit(losses.ce_single_head_loss)(logits, labels)
    np.testing.assert_allclose(float(out), _ref_ce(logits, labels), rtol=1e-5)
    out_bf = jax.jit(losses.ce_single_head_loss)(jnp.asarray(logits, jnp.bfloat16), labels)
    assert out_bf.dtype == jnp.float32
    assert float(losses.ce_single_head_loss(logits, np.full_like(labels, 255))) == 0.0


def test_ce_multi_head():
    r = np.random.RandomState(20)
    dataset_of_class = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    dataset_id = np.array([0, 2, 1])
    logits = r.randn(3, 3, 4, K).astype(np.float32) * 3
    labels = np.zeros((3, 3, 4), np.int32)
    for b, d in enumerate(dataset_id):  # labels from the image's own dataset
        labels[b] = r.choice(np.flatnonzero(dataset_of_class == d), size=(3, 4))
    labels[1, 0, :2] = 255
    out = jax.jit(losses.ce_multi_head_loss)(logits, labels, dataset_id, dataset_of_class)
    allowed = dataset_of_class[None, :] == dataset_id[:, None]
    np.testing.assert_allclose(float(out), _ref_ce(logits, labels, allowed), rtol=1e-5)
    # Differs from the single head (the softmax really is restricted).
    assert abs(float(out) - float(losses.ce_single_head_loss(logits, labels))) > 1e-3


def test_chunk_layout_prefers_no_padding():
    assert chunking.chunk_layout(25088, 4096) == (7, 3584)  # B=8 at 56x56: exact split
    assert chunking.chunk_layout(70, 16) == (5, 14)
    assert chunking.chunk_layout(97, 16) == (7, 16)  # prime N: padded
    assert chunking.chunk_layout(401408, 16384) == (28, 14336)  # B=128 at 56x56


def test_sharded_over_data_axis_matches():
    """Pixels sharded over 8 devices: the fast path gives the plain form's loss/grad (that it
    needs no gathers: benchmarks/program_budgets.py)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",))
    emb, cls, labels = _inputs(21, shape=(8, 4, 8))
    pos = _random_positives(22)
    data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    fn = jax.jit(jax.value_and_grad(lambda e, c, y, p: losses.pairing_loss_fast(e, c, y, p, chunk=64)),
                 in_shardings=(data, rep, data, rep), out_shardings=(rep, data))
    val, g = fn(emb, cls, labels, pos)
    val0, g0 = _grad_and_val(emb, cls, labels, pos)
    np.testing.assert_allclose(val, val0, rtol=1e-6)
    np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-7)


_grad_and_val = jax.jit(jax.value_and_grad(lambda e, c, y, p: losses.pairing_loss(e, c, y, p, chunk=None)))


def test_union_class_255_is_a_class_not_ignore():
    """|Y| = 342 > 255: union id 255 is a real class; only -1 (and ids outside [0, K)) are ignored."""
    k, c = 300, 8
    r = np.random.RandomState(0)
    cls = r.randn(k, c).astype(np.float32)
    emb = r.randn(4, c).astype(np.float32)
    labels = np.array([255, 255, -1, 299], np.int32)
    loss, weight = losses.pairing_loss_per_pixel(emb, cls, labels, chunk=None)
    np.testing.assert_array_equal(np.asarray(weight), [1, 1, 0, 1])
    assert float(loss[0]) > 0


def test_bfloat16_products_round_only_the_operands():
    """product_dtype=bfloat16: the loss is the float64 Eq. 7 of the bfloat16-rounded I and E (the
    products and softmaxes accumulate in float32); the gradient stays within bfloat16 rounding of
    the float32-product one, and the argmax prediction is that of the rounded operands."""
    emb, cls, labels = _inputs(25, shape=(3, 40), k=30, c=64)
    pos = _random_positives(26, k=30)
    rnd = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))
    fn = jax.jit(losses.pairing_loss_and_prediction, static_argnames=("tau", "chunk", "product_dtype"))
    loss, pred = fn(emb, cls, labels, pos, None, TAU, chunk=32, product_dtype=jnp.bfloat16)
    np.testing.assert_allclose(float(loss), ref_mean(rnd(emb), rnd(cls), labels, pos), rtol=1e-5)
    logits = rnd(emb).reshape(-1, 64).astype(np.float64) @ rnd(cls).T.astype(np.float64)
    np.testing.assert_array_equal(np.asarray(pred).reshape(-1), logits.argmax(-1))
    grad = _fast_grad
    g16 = grad(emb, cls, labels, pos, None, TAU, chunk=32, product_dtype=jnp.bfloat16)
    g32 = grad(emb, cls, labels, pos, None, TAU, chunk=32)
    assert g16.dtype == jnp.float32  # the embeddings' dtype
    np.testing.assert_allclose(g16, g32, rtol=0.05, atol=0.02 * np.abs(g32).max())
    assert not np.array_equal(g16, g32)


@pytest.mark.parametrize("chunk", [None, 16])
@pytest.mark.parametrize("product_dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("emb_dtype", [jnp.float32, jnp.bfloat16])
def test_plain_form_equals_fast_path(chunk, product_dtype, emb_dtype):
    """pairing_loss (the equation, autodiff) == pairing_loss_fast (custom VJP): loss and d / d emb,
    with positives, invalid classes, ignored and out-of-range labels, N = 97 (padded chunks)."""
    emb, cls, labels = _inputs(40, shape=(97,), k=K, c=C)
    labels[:5] = [-1, K, K + 3, 255, 0]
    emb = jnp.asarray(emb, emb_dtype)
    pos, valid = _random_positives(41), np.random.RandomState(42).rand(K) < 0.7
    kw = dict(chunk=chunk, product_dtype=product_dtype)
    plain = _loss(emb, cls, labels, pos, valid, TAU, **kw)
    fast = _fast(emb, cls, labels, pos, valid, TAU, **kw)
    np.testing.assert_allclose(float(fast), float(plain), rtol=1e-6)
    g_plain = _plain_grad(emb, cls, labels, pos, valid, TAU, **kw)
    g_fast = _fast_grad(emb, cls, labels, pos, valid, TAU, **kw)
    assert g_plain.dtype == g_fast.dtype == emb_dtype
    g_plain, g_fast = (np.asarray(g, np.float32) for g in (g_plain, g_fast))
    # bfloat16 products or gradients: 8-bit mantissa, the two forms round at different places
    tol = 1e-5 if emb_dtype == jnp.float32 and product_dtype is None else 2e-2
    np.testing.assert_allclose(g_fast, g_plain, rtol=tol, atol=tol * np.abs(g_plain).max())
    ref = ref_mean(np.asarray(jnp.asarray(emb, product_dtype or jnp.float32).astype(jnp.float32)),
                   np.asarray(jnp.asarray(cls, product_dtype or jnp.float32).astype(jnp.float32)),
                   labels, pos, valid)
    np.testing.assert_allclose(float(plain), ref, rtol=2e-5)


def test_fast_path_differentiates_pixel_embeddings_only():
    """Differentiating class_emb through the fast path raises; stopped at the call site it is a
    constant and d / d emb is the plain form's."""
    emb, cls, labels = _inputs(43)
    with pytest.raises(TypeError, match="stop_gradient"):
        jax.grad(losses.pairing_loss_fast, argnums=1)(emb, cls, labels)
    with pytest.raises(TypeError, match="stop_gradient"):
        jax.grad(lambda e, c: losses.pairing_loss_and_prediction(e, c, labels)[0], argnums=(0, 1))(emb, cls)
    g_fast, g_cls = jax.grad(lambda e, c: losses.pairing_loss_fast(
        e, jax.lax.stop_gradient(c), labels, chunk=16), argnums=(0, 1))(emb, cls)
    np.testing.assert_array_equal(g_cls, 0.0)
    g_plain = jax.grad(losses.pairing_loss)(emb, cls, labels, chunk=16)
    np.testing.assert_allclose(g_fast, g_plain, rtol=1e-5, atol=1e-5 * np.abs(g_plain).max())


def test_default_chunk_is_the_configs():
    """One pixel-chunk default: the losses' and the pretraining config's."""
    from configs import pretrain as pretrain_config
    assert losses.DEFAULT_CHUNK == pretrain_config.get_config().loss.chunk
