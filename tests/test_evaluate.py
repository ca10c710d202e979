"""Evaluation metrics against float64 NumPy references, and whole / slide / flip inference."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ms3_jax.evaluation import evaluate
from ms3_jax.models.deeplab import encoder_from_config, resize_bilinear
from ms3_jax.testing.variables import random_variables

K = 5


def reference_metrics(pred, label, k, ignore=255):
    """Independent float64 reference: per-class masks, MMSeg definitions, percent."""
    pred, label = np.ravel(pred), np.ravel(label)
    keep = (label != ignore) & (label >= 0) & (label < k)
    pred, label = pred[keep], label[keep]
    ious, accs = [], []
    for c in range(k):
        inter = np.sum((pred == c) & (label == c), dtype=np.float64)
        union = np.sum((pred == c) | (label == c), dtype=np.float64)
        gt = np.sum(label == c, dtype=np.float64)
        ious.append(inter / union if union else math.nan)
        accs.append(inter / gt if gt else math.nan)
    return {"aAcc": 100 * np.mean(pred == label), "mIoU": 100 * np.nanmean(ious),
            "mAcc": 100 * np.nanmean(accs), "IoU": 100 * np.array(ious), "Acc": 100 * np.array(accs)}


def assert_metrics_close(got, want):
    for key in ("aAcc", "mIoU", "mAcc"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, err_msg=key)
    for key in ("IoU", "Acc"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12, equal_nan=True, err_msg=key)


def random_case(seed, k=8, shape=(3, 17, 23)):
    """Labels with 255 and -1 ignore pixels; class 6 absent everywhere, class 7 only predicted."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 6, shape)
    label[rng.random(shape) < 0.1] = 255
    label[rng.random(shape) < 0.05] = -1
    pred = np.where(rng.random(shape) < 0.6, label, rng.integers(0, 6, shape))
    pred = np.where(pred < 0, 0, pred)
    pred = np.where(pred == 255, 7, pred)  # the ignored pixels predict 7 ...
    pred[0, 0, 0], label[0, 0, 0] = 7, 3  # ... and one labelled pixel does too
    return pred, label, k


def test_metrics_match_float64_reference_on_random_predictions():
    pred, label, k = random_case(0)
    conf = jax.jit(evaluate.confusion_matrix, static_argnums=2)(pred, label, k)
    got = evaluate.segmentation_metrics(np.asarray(conf))
    want = reference_metrics(pred, label, k)
    assert_metrics_close(got, want)
    assert math.isnan(got["IoU"][6]) and got["IoU"][7] == 0.0 and math.isnan(got["Acc"][7])


def test_hand_computed_three_class_example():
    # GT   0 0 0 1 1 2 ignore;  prediction 0 0 1 1 2 2 0.
    # rows = GT: [[2,1,0],[0,1,1],[0,0,1]]; TP 2,1,1; GT 3,2,1; predicted 2,2,2
    # IoU = 2/3, 1/3, 1/2 -> mIoU 50; Acc = 2/3, 1/2, 1 -> mAcc 72.22; aAcc = 4/6 = 66.67.
    label = np.array([0, 0, 0, 1, 1, 2, 255])
    pred = np.array([0, 0, 1, 1, 2, 2, 0])
    conf = np.asarray(evaluate.confusion_matrix(pred, label, 3))
    np.testing.assert_array_equal(conf, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    m = evaluate.segmentation_metrics(conf)
    np.testing.assert_allclose(m["IoU"], [200 / 3, 100 / 3, 50])
    np.testing.assert_allclose(m["Acc"], [200 / 3, 50, 100])
    np.testing.assert_allclose([m["mIoU"], m["mAcc"], m["aAcc"]], [50.0, 650 / 9, 200 / 3])
    # A fourth class that nobody labels or predicts is NaN and leaves the means unchanged.
    m4 = evaluate.segmentation_metrics(np.asarray(evaluate.confusion_matrix(pred, label, 4)))
    assert math.isnan(m4["IoU"][3]) and m4["mIoU"] == pytest.approx(50.0)
    table = evaluate.format_table(m4, ["sky", "grass", "road", "boat"])
    assert "| grass |  33.33 |  50.00 |" in table and "mIoU 50.00" in table and "nan" in table


def test_counts_accumulate_across_batches_and_past_int32():
    pred, label, k = random_case(1)
    whole = np.asarray(evaluate.confusion_matrix(pred, label, k))
    add = jax.jit(lambda c, p, y: evaluate.add_counts(c, evaluate.confusion_matrix(p, y, k)))
    counts = evaluate.empty_counts(k)
    for i in range(pred.shape[0]):
        counts = add(counts, pred[i], label[i])
    np.testing.assert_array_equal(evaluate.counts_to_matrix(counts), whole)
    big = jnp.full((k, k), 2**30 - 1, jnp.int32)
    counts = evaluate.empty_counts(k)
    add_big = jax.jit(evaluate.add_counts)
    for _ in range(5):
        counts = add_big(counts, big)
    np.testing.assert_array_equal(evaluate.counts_to_matrix(counts), np.full((k, k), 5 * (2**30 - 1)))


# --- inference -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_outputs():
    """One compile for all tiny-model inference checks: an image and its mirror image, whole,
    slide with crop == image, flip TTA, and the raw logits."""
    model = encoder_from_config(dict(width=0.125, stage_sizes=(1, 1, 1, 1), kernels="xla"), "cpu",
                                heads=(), num_classes=K)
    variables = random_variables(model, (1, 32, 32, 3))
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)
    both = np.concatenate([image, image[:, :, ::-1]])
    apply_fn = evaluate.logits_fn(model)

    def outputs(v, x):
        return {"whole": evaluate.predict_whole(apply_fn, v, x, K),
                "slide": evaluate.predict_slide(apply_fn, v, x, (32, 48), 16, K),
                "flip": evaluate.predict_whole(apply_fn, v, x, K, flip=True),
                "logits": apply_fn(v, x)}
    return jax.jit(outputs)(variables, both)


def test_slide_with_crop_equal_to_image_is_whole(tiny_outputs):
    whole, slide = tiny_outputs["whole"], tiny_outputs["slide"]
    assert whole.shape == (2, 32, 48, K)
    np.testing.assert_allclose(slide, whole, rtol=1e-6, atol=1e-6)


def test_flip_averages_mirrored_softmax(tiny_outputs):
    probs = tiny_outputs["flip"]
    np.testing.assert_allclose(np.sum(probs, -1), 1.0, rtol=1e-5)
    # Flip TTA is mirror-equivariant: the prediction of the mirrored image is the mirrored prediction.
    np.testing.assert_allclose(probs[1], probs[0, :, ::-1], rtol=1e-5, atol=1e-6)
    plain = jax.nn.softmax(resize_bilinear(tiny_outputs["logits"], (32, 48)), -1)
    np.testing.assert_allclose(probs[0], 0.5 * (plain[0] + plain[1, :, ::-1]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain[0], plain[1, :, ::-1], atol=1e-3)  # the model is not symmetric


def test_slide_merges_overlapping_crops_like_mmseg():
    rng = np.random.default_rng(1)
    const = rng.normal(size=(K,)).astype(np.float32)
    constant = lambda v, x: jnp.broadcast_to(v, (x.shape[0], x.shape[1] // 4, x.shape[2] // 4, K))
    image = rng.integers(0, 256, (1, 40, 56, 3), dtype=np.uint8)
    out = evaluate.predict_slide(constant, jnp.asarray(const), image, 24, 16, K)
    np.testing.assert_allclose(out, np.broadcast_to(const, (1, 40, 56, K)), rtol=1e-6)

    # A content-dependent "model" (stride-4 linear map of the pixels) against evaluate's
    # NumPy crops + count-map merge.
    w = rng.normal(size=(3, K)).astype(np.float32)
    linear = lambda v, x: x[:, ::4, ::4].astype(jnp.float32) @ v
    got = evaluate.predict_slide(linear, jnp.asarray(w), image, (24, 32), (16, 12), K, crop_batch=2)
    crops, pos = evaluate.sliding_window_crops(image[0], (24, 32), (16, 12))
    assert len(pos) == 2 * 3  # overlapping windows in both directions
    per_crop = np.asarray(resize_bilinear(linear(w, crops), (24, 32)))
    want = evaluate.merge_sliding_window(per_crop, pos, 40, 56)
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-4)


def test_evaluate_dataset_matches_reference_and_devices():
    """A per-pixel 'model' whose prediction is the red channel: metrics over images of several
    sizes (255 and -1 ignored) equal the reference; round-robin over 2 devices changes nothing."""
    rng = np.random.default_rng(2)
    oracle = lambda v, x: 10.0 * jax.nn.one_hot(x[..., 0].astype(jnp.int32), K)
    examples, preds, labels = [], [], []
    for h, w in [(8, 12), (12, 8), (8, 12)]:
        pred = rng.integers(0, K, (h, w))
        label = np.where(rng.random((h, w)) < 0.7, pred, rng.integers(0, K, (h, w)))
        label[rng.random((h, w)) < 0.1] = 255
        label[rng.random((h, w)) < 0.1] = -1
        image = np.repeat(pred[..., None], 3, -1).astype(np.uint8)
        examples.append({"image": image, "label": label})
        preds.append(pred.ravel())
        labels.append(label.ravel())
    want = reference_metrics(np.concatenate(preds), np.concatenate(labels), K)
    got = evaluate.evaluate(oracle, {}, examples, K)
    assert got["num_images"] == 3
    assert_metrics_close(got, want)
    two = evaluate.evaluate(oracle, {}, examples, K, devices=jax.local_devices()[:2], max_images=3)
    assert_metrics_close(two, want)
    slide = evaluate.evaluate(oracle, {}, examples, K, mode="slide", crop=6, stride=4)
    assert_metrics_close(slide, want)
