"""Segmentation evaluation: confusion matrix, mIoU / aAcc / mAcc, whole and slide inference.

Paper 4.1 "Evaluation": mIoU as MMSegmentation computes it (in percent); inference as MMSeg's
`EncoderDecoder` ('whole' / 'slide', optional flip). Labels outside [0, num_classes) or equal
to `ignore_index` are ignored (255 and -1 both work). docs/choices.md, "Metrics: MMSeg's
IoUMetric", "Inference: MMSeg's EncoderDecoder".
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from ms3_jax.models.deeplab import resize_bilinear

IGNORE_INDEX = 255
# Device-side counts are kept as (low 30 bits, multiples of 2^30) in int32 (JAX runs without
# int64): exact up to 2^61 pixels per cell, while one image adds < 2^30 per cell.
_LOW_BITS = 30
_LOW_MASK = (1 << _LOW_BITS) - 1

ApplyFn = Callable[[Any, jax.Array], jax.Array]  # (variables, images [B,H,W,3]) -> logits [B,h,w,K]


def confusion_matrix(pred: jax.Array, label: jax.Array, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """int32 [K, K] pixel counts, rows = ground truth, columns = prediction (jit-friendly).
    Pixels whose label equals `ignore_index` or lies outside [0, K) are skipped. Matrices of
    several batches / devices / hosts add up to the matrix of their union."""
    k = num_classes
    pred = jnp.asarray(pred).reshape(-1).astype(jnp.int32)
    label = jnp.asarray(label).reshape(-1).astype(jnp.int32)
    if pred.shape != label.shape:
        raise ValueError(f"prediction and label sizes differ: {pred.shape} vs {label.shape}")
    valid = (label != ignore_index) & (label >= 0) & (label < k) & (pred >= 0) & (pred < k)
    index = jnp.where(valid, label * k + pred, 0)
    return jnp.bincount(index, weights=valid.astype(jnp.int32), length=k * k).reshape(k, k)


def empty_counts(num_classes: int) -> jax.Array:
    """A device-side running confusion matrix: int32 [2, K, K] (low bits, high part)."""
    return jnp.zeros((2, num_classes, num_classes), jnp.int32)


def add_counts(counts: jax.Array, conf: jax.Array) -> jax.Array:
    """`counts` (from `empty_counts`) plus one int32 confusion matrix, without int32 overflow."""
    low = counts[0] + conf  # < 2^30 + 2^30 <= int32 max
    return jnp.stack([low & _LOW_MASK, counts[1] + (low >> _LOW_BITS)])


def counts_to_matrix(counts: Any) -> np.ndarray:
    """int64 [K, K] from `empty_counts`-style counts [..., 2, K, K] (leading axes are summed)."""
    c = np.asarray(counts).astype(np.int64).reshape((-1,) + np.shape(counts)[-3:])
    return np.sum((c[:, 1] << _LOW_BITS) + c[:, 0], axis=0)


def segmentation_metrics(conf: Any) -> dict[str, Any]:
    """MMSeg `IoUMetric` from a confusion matrix [K, K] (rows = ground truth), in percent:
    `aAcc`, `mIoU`, `mAcc` (floats) and `IoU`, `Acc` (float64 [K]; NaN for a class whose union,
    resp. ground truth, is empty -- such classes are left out of the means)."""
    conf = np.asarray(conf, np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square [K, K], got {conf.shape}")
    tp = np.diag(conf)
    gt, pred = conf.sum(axis=1), conf.sum(axis=0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
        a_acc = tp.sum() / gt.sum() if gt.sum() > 0 else np.nan

    def nanmean(x: np.ndarray) -> float:
        return float(np.mean(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else float("nan")

    return {"aAcc": 100.0 * float(a_acc), "mIoU": 100.0 * nanmean(iou), "mAcc": 100.0 * nanmean(acc),
            "IoU": 100.0 * iou, "Acc": 100.0 * acc}


def format_table(metrics: Mapping[str, Any], class_names: Sequence[str] | None = None) -> str:
    """Per-class IoU / Acc table (MMSeg's log layout) followed by the summary line."""
    iou, acc = np.asarray(metrics["IoU"]), np.asarray(metrics["Acc"])
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    if len(names) != len(iou):
        raise ValueError(f"{len(names)} class names for {len(iou)} classes")
    fmt = lambda v: "  nan" if np.isnan(v) else f"{v:6.2f}"
    width = max([5] + [len(n) for n in names])
    rule = "+-" + "-" * width + "-+--------+--------+"
    lines = [rule, f"| {'Class':<{width}} |    IoU |    Acc |", rule]
    lines += [f"| {n:<{width}} | {fmt(i):>6} | {fmt(a):>6} |" for n, i, a in zip(names, iou, acc)]
    lines += [rule, f"aAcc {metrics['aAcc']:.2f} | mIoU {metrics['mIoU']:.2f} | mAcc {metrics['mAcc']:.2f}"]
    return "\n".join(lines)


@functools.lru_cache(maxsize=None)
def logits_fn(model: nn.Module) -> ApplyFn:
    """`apply_fn` of an `MS3Encoder` with a classifier: eval-mode logits [B, H/4, W/4, K].
    Cached per model, so jitted evaluation functions built on it are shared between calls."""
    def apply_fn(variables, images):
        return model.apply(variables, images, train=False)["logits"]
    return apply_fn


def _check_logits(logits: jax.Array, num_classes: int) -> jax.Array:
    if logits.shape[-1] != num_classes:
        raise ValueError(f"model gives {logits.shape[-1]} classes, expected {num_classes}")
    return logits.astype(jnp.float32)


def _flip_average(predict: Callable[[jax.Array], jax.Array], image: jax.Array) -> jax.Array:
    """Mean softmax of the image and of its horizontal mirror (mapped back): MMSeg flip TTA."""
    probs = jax.nn.softmax(predict(image), axis=-1)
    flipped = jax.nn.softmax(predict(image[:, :, ::-1]), axis=-1)[:, :, ::-1]
    return 0.5 * (probs + flipped)


def predict_whole(apply_fn: ApplyFn, variables: Any, image: jax.Array, num_classes: int,
                  flip: bool = False) -> jax.Array:
    """Whole-image inference: [B, H, W, 3] -> scores [B, H, W, K]: logits resized to the image
    (bilinear, align_corners=False), or with `flip` the averaged softmax probabilities; either way
    their argmax is the prediction."""
    def predict(x):
        return resize_bilinear(_check_logits(apply_fn(variables, x), num_classes), x.shape[1:3])
    return _flip_average(predict, image) if flip else predict(image)


def _pair(x: int | Sequence[int]) -> tuple[int, int]:
    return (int(x), int(x)) if np.isscalar(x) else (int(x[0]), int(x[1]))


def sliding_window_positions(height: int, width: int, crop: int | Sequence[int],
                             stride: int | Sequence[int]) -> np.ndarray:
    """MMSegmentation slide-inference windows: int32 [n, 4] rows (y1, x1, y2, x2).
    h_grids = max(H - crop_h + stride_h - 1, 0) // stride_h + 1 (same for w); windows start at
    i * stride and are shifted back inside the image at the border (clamped at 0 when the image
    is smaller than the crop)."""
    ch, cw = _pair(crop)
    sh, sw = _pair(stride)
    h_grids = max(height - ch + sh - 1, 0) // sh + 1
    w_grids = max(width - cw + sw - 1, 0) // sw + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y2, x2 = min(hi * sh + ch, height), min(wi * sw + cw, width)
            out.append((max(y2 - ch, 0), max(x2 - cw, 0), y2, x2))
    return np.asarray(out, np.int32).reshape(-1, 4)


def sliding_window_crops(image: np.ndarray, crop: int | Sequence[int],
                         stride: int | Sequence[int], pad_value: Any = 0
                         ) -> tuple[np.ndarray, np.ndarray]:
    """`image` [H, W, ...] cut into MMSeg slide-inference crops (the NumPy form of `predict_slide`):
    (crops [n, crop_h, crop_w, ...], positions int32 [n, 4] = (y1, x1, y2, x2)). Crops have a
    fixed shape: an image smaller than the crop is padded bottom/right with `pad_value`; the valid
    part of crop k is [:y2-y1, :x2-x1]."""
    ch, cw = _pair(crop)
    h, w = image.shape[:2]
    pos = sliding_window_positions(h, w, (ch, cw), stride)
    crops = np.full((len(pos), ch, cw) + image.shape[2:], np.asarray(pad_value, image.dtype), image.dtype)
    for k, (y1, x1, y2, x2) in enumerate(pos):
        crops[k, :y2 - y1, :x2 - x1] = image[y1:y2, x1:x2]
    return crops, pos


def merge_sliding_window(crop_outputs: np.ndarray, positions: np.ndarray, height: int,
                         width: int) -> np.ndarray:
    """Averages per-crop outputs [n, crop_h, crop_w, C] back to [H, W, C] (MMSeg `count_mat`)."""
    out = np.zeros((height, width) + crop_outputs.shape[3:], np.float32)
    count = np.zeros((height, width) + (1,) * (crop_outputs.ndim - 3), np.float32)
    for k, (y1, x1, y2, x2) in enumerate(positions):
        out[y1:y2, x1:x2] += crop_outputs[k, :y2 - y1, :x2 - x1]
        count[y1:y2, x1:x2] += 1
    if np.any(count == 0):
        raise ValueError("Sliding windows do not cover the image.")
    return out / count


def predict_slide(apply_fn: ApplyFn, variables: Any, image: jax.Array, crop: int | Sequence[int],
                  stride: int | Sequence[int], num_classes: int, flip: bool = False,
                  crop_batch: int | None = None) -> jax.Array:
    """MMSeg slide inference on `sliding_window_positions`' windows: [B, H, W, 3] -> scores
    [B, H, W, K] (docs/choices.md, "Inference: MMSeg's EncoderDecoder"). `crop_batch` windows go
    through the model at a time (default: all of them)."""
    h, w = image.shape[1:3]
    ch, cw = _pair(crop)
    ch, cw = min(ch, h), min(cw, w)
    positions = sliding_window_positions(h, w, (ch, cw), stride)
    count_HxW = np.zeros((h, w), np.float32)
    for y1, x1, y2, x2 in positions:
        count_HxW[y1:y2, x1:x2] += 1

    def predict(x_BxHxWx3):
        b = x_BxHxWx3.shape[0]
        crops = jnp.stack([x_BxHxWx3[:, y1:y2, x1:x2] for y1, x1, y2, x2 in positions])  # [n,B,ch,cw,3]

        def run(c_BxCHxCWx3):
            logits = _check_logits(apply_fn(variables, c_BxCHxCWx3), num_classes)
            return resize_bilinear(logits, (ch, cw))

        if crop_batch:
            out = jax.lax.map(run, crops, batch_size=crop_batch)
        else:
            out = run(crops.reshape((-1, ch, cw, 3))).reshape((len(positions), b, ch, cw, num_classes))
        total = jnp.zeros((b, h, w, num_classes), jnp.float32)
        for k, (y1, x1, y2, x2) in enumerate(positions):
            total = total.at[:, y1:y2, x1:x2].add(out[k])
        return total / jnp.asarray(count_HxW)[None, :, :, None]

    return _flip_average(predict, image) if flip else predict(image)


def predict_labels(apply_fn: ApplyFn, variables: Any, image: jax.Array, num_classes: int,
                   size: Sequence[int], mode: str = "whole", crop: Any = None, stride: Any = None,
                   flip: bool = False, crop_batch: int | None = None) -> jax.Array:
    """Class indices [B, *size] of `predict_whole` / `predict_slide` (`mode`), the scores resized
    (bilinear) to `size` when it differs from the image's."""
    if mode == "whole":
        scores = predict_whole(apply_fn, variables, image, num_classes, flip)
    else:
        scores = predict_slide(apply_fn, variables, image, crop, stride, num_classes, flip,
                               crop_batch)
    if scores.shape[1:3] != tuple(size):
        scores = resize_bilinear(scores, tuple(size))
    return jnp.argmax(scores, axis=-1)


@functools.lru_cache(maxsize=None)
def _image_step(apply_fn: ApplyFn, num_classes: int, mode: str, crop: tuple[int, int] | None,
                stride: tuple[int, int] | None, flip: bool, ignore_index: int,
                crop_batch: int | None) -> Callable[..., jax.Array]:
    """Jitted `(counts, variables, image [H,W,3], label [h,w]) -> counts`; one compile per shape."""

    def step(counts, variables, image_HxWx3, label_HxW):
        pred = predict_labels(apply_fn, variables, image_HxWx3[None], num_classes, label_HxW.shape,
                              mode, crop, stride, flip, crop_batch)
        return add_counts(counts, confusion_matrix(pred, label_HxW[None], num_classes, ignore_index))

    return jax.jit(step, donate_argnums=0)


def local_copy(tree: Any) -> Any:
    """This process's copy of (replicated) variables as host arrays."""
    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(x)
    return jax.tree_util.tree_map(local, tree)


def _allgather_sum(conf: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Sums of the int64 matrices and image counts of all processes (int32 low/high parts)."""
    if jax.process_count() == 1:
        return conf, n
    split = np.stack([conf & _LOW_MASK, conf >> _LOW_BITS]).astype(np.int32)
    gathered = multihost_utils.process_allgather(split)
    total = multihost_utils.process_allgather(np.asarray(n, np.int32))
    return counts_to_matrix(gathered), int(np.sum(total))


def accumulate_confusion(model: nn.Module | ApplyFn, variables: Any,
                         dataset: Iterable[Mapping[str, Any]], num_classes: int, *,
                         mode: str = "whole", crop: int | Sequence[int] | None = None,
                         stride: int | Sequence[int] | None = None, flip: bool = False,
                         ignore_index: int = IGNORE_INDEX, crop_batch: int | None = None,
                         devices: Sequence[jax.Device] | None = None,
                         max_images: int | None = None, log_every: int = 0) -> tuple[np.ndarray, int]:
    """The int64 confusion matrix [K, K] of a dataset and the number of images, over all processes.

    `dataset` yields this process's images one at a time, {'image': uint8 [H, W, 3], 'label': int
    [h, w]} (e.g. `eval_data.make_eval_dataset` sharded by process). Every process must call this
    (it gathers at the end). `model` is an `MS3Encoder` with `num_classes` set, or an `ApplyFn`.
    `devices`: local devices to deal images to round-robin (default: the first local device); each
    (image shape, device) pair compiles once (docs/choices.md, "Inference: MMSeg's EncoderDecoder").
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop is None or stride is None):
        raise ValueError("mode='slide' needs crop and stride")
    apply_fn = logits_fn(model) if isinstance(model, nn.Module) else model
    step = _image_step(apply_fn, int(num_classes), mode,
                       None if crop is None else _pair(crop), None if stride is None else _pair(stride),
                       bool(flip), int(ignore_index), crop_batch or None)
    devices = list(devices) if devices else jax.local_devices()[:1]
    host_vars = local_copy(variables)
    dev_vars = [jax.device_put(host_vars, d) for d in devices]
    counts = [jax.device_put(np.zeros((2, num_classes, num_classes), np.int32), d) for d in devices]
    n, t0 = 0, time.perf_counter()
    for example in dataset:
        if max_images is not None and n >= max_images:
            break
        i = n % len(devices)
        image = jax.device_put(np.asarray(example["image"]), devices[i])
        label = jax.device_put(np.asarray(example["label"]).astype(np.int32), devices[i])
        counts[i] = step(counts[i], dev_vars[i], image, label)
        n += 1
        if log_every and n % log_every == 0:
            logging.info("evaluated %d images (%.2f images/s)", n, n / (time.perf_counter() - t0))
    conf = counts_to_matrix(np.stack(jax.device_get(counts)))
    return _allgather_sum(conf, n)


def evaluate(model: nn.Module | ApplyFn, variables: Any, dataset: Iterable[Mapping[str, Any]],
             num_classes: int, mode: str = "whole", **kwargs: Any) -> dict[str, Any]:
    """`segmentation_metrics` (percent) of `model` on `dataset`, plus `num_images` (all processes).
    Keyword arguments are those of `accumulate_confusion` (crop, stride, flip, ignore_index, ...)."""
    conf, n = accumulate_confusion(model, variables, dataset, num_classes, mode=mode, **kwargs)
    return {**segmentation_metrics(conf), "num_images": n}
