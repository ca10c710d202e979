"""Evaluation during pretraining: each dataset's validation split segmented by the embeddings.

Per dataset and head: nearest class embedding among the dataset's own classes (T rows for the
language head, V rows for the visual head: Eq. 1 / 2 at test time); CE baselines (Tab. 4) use
their logits restricted to those classes. docs/choices.md, "Evaluation during pretraining".
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ms3_jax.data import eval_data
from ms3_jax.data.label_space import LabelSpace
from ms3_jax.evaluation import evaluate, visualize
from ms3_jax.method.labels import IGNORE_LABEL


@functools.lru_cache(maxsize=None)
def head_logits_fn(model: nn.Module, head: str) -> evaluate.ApplyFn:
    """`apply_fn({'model': variables, 'classes': E_KxC}, images)` -> [B, h, w, K]: cosines of the
    `head` embeddings with the rows E ('language' / 'visual'), or the `logits` columns E (int
    indices) of a CE head. Cached, so evaluation compiles once per image shape."""
    def apply_fn(variables, images):
        out = model.apply(variables["model"], images, train=False)
        if head == "logits":
            return jnp.take(out["logits"], variables["classes"], axis=-1)
        return jnp.einsum("bhwc,kc->bhwk", out[head], variables["classes"])
    return apply_fn


def evaluate_pretraining(model: nn.Module, variables: Any, class_embeddings: dict[str, Any],
                         label_space: LabelSpace, data_dir: str | None, *,
                         short_side: int | None = None, max_images: int = 0,
                         split: str = "validation") -> dict[str, dict[str, Any]]:
    """{'<dataset>/<head>': metrics} for every dataset of `label_space` and every head in
    `class_embeddings` ({'language': T [K, C], 'visual': V [K, C]} or {'logits': None}). All
    processes must call it (their shares of the images are gathered)."""
    results = {}
    class_embeddings = evaluate.local_copy(class_embeddings)  # T / V: replicated over processes
    for d, name in enumerate(label_space.dataset_names):
        rows = np.arange(label_space.offsets[d], label_space.offsets[d + 1])
        local = LabelSpace.from_datasets([name])  # labels as d's own ids 0..K_d-1
        images = eval_data.make_eval_dataset(
            name, label_space=local, data_dir=data_dir, split=split, short_side=short_side,
            shard_index=jax.process_index(), shard_count=jax.process_count())
        for head, emb_KxC in class_embeddings.items():
            classes = rows if emb_KxC is None else np.asarray(emb_KxC, np.float32)[rows]
            metrics = evaluate.evaluate(
                head_logits_fn(model, head), {"model": variables, "classes": classes}, images,
                len(rows), ignore_index=IGNORE_LABEL, max_images=max_images or None)
            results[f"{name}/{head}"] = {**metrics, "class_names": list(local.class_names[0])}
    return results


# What each head's prediction is, in the panels' titles.
HEAD_TITLES = {"language": "language head (nearest T, class names)",
               "visual": "visual head (nearest V, class prototypes)",
               "logits": "classifier head (CE logits)"}


def example_panels(model: nn.Module, variables: Any, class_embeddings: dict[str, Any],
                   label_space: LabelSpace, data_dir: str | None, *,
                   short_side: int | None = None, index: int = 0, split: str = "validation",
                   min_height: int = visualize.PANEL_MIN_HEIGHT) -> dict[str, np.ndarray]:
    """{'<dataset>/<head>': uint8 [H, W, 3]}: `split` image `index` of each dataset, captioned
    "image | ground truth | prediction" under a title naming the dataset and the head, the label
    maps as colour overlays with one legend of class names (`visualize.panel`: ignored pixels
    dark grey, '(ignored)'), enlarged (nearest) to at least `min_height` px tall. Host side,
    one image per dataset and head."""
    panels = {}
    # This process alone may call this: host copies of the (replicated) arrays.
    variables, class_embeddings = evaluate.local_copy((variables, class_embeddings))
    for d, name in enumerate(label_space.dataset_names):
        rows = np.arange(label_space.offsets[d], label_space.offsets[d + 1])
        local = LabelSpace.from_datasets([name])
        example = eval_data.make_eval_dataset(name, label_space=local, data_dir=data_dir,
                                              split=split, short_side=short_side)[index]
        image, label = np.asarray(example["image"]), np.asarray(example["label"])
        names = list(local.class_names[0])
        for head, emb_KxC in class_embeddings.items():
            classes = rows if emb_KxC is None else np.asarray(emb_KxC, np.float32)[rows]
            scores = _predict(head_logits_fn(model, head), len(rows))(
                {"model": variables, "classes": classes}, image[None])
            pred = np.asarray(jnp.argmax(scores[0], -1))
            title = (f"{name} / {HEAD_TITLES.get(head, head)}: {split} image {index}, "
                     f"{image.shape[0]}x{image.shape[1]} px")
            panels[f"{name}/{head}"] = visualize.panel(
                image, [("ground truth", label), ("prediction", pred)],
                names, title=title, min_height=min_height)
    return panels


@functools.lru_cache(maxsize=None)
def _predict(apply_fn: evaluate.ApplyFn, num_classes: int):
    return jax.jit(functools.partial(evaluate.predict_whole, apply_fn, num_classes=num_classes))


def summary_line(step: int, results: dict[str, dict[str, Any]]) -> str:
    """One console line: mIoU (aAcc) per dataset and head."""
    parts = [f"{key} mIoU {m['mIoU']:.1f} (aAcc {m['aAcc']:.1f})" for key, m in results.items()]
    return f"eval at step {step} | " + " | ".join(parts)
