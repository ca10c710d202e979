"""Optimisers and learning-rate schedules of the three stages (paper 4.1; MMSegmentation's for
fine-tuning)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def warmup_cosine(peak: float, warmup_steps: int, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `peak` (at most `num_steps` - 1 steps), then cosine decay to 0."""
    warmup = min(warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1), 0.0)


def lr_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """lr = base_lr * batch / lr_batch (linear scaling; 0.8 per 128 images), warm-up, cosine to 0."""
    peak = config.optim.base_lr * config.batch_size / config.optim.lr_batch
    return warmup_cosine(peak, config.optim.warmup_steps, num_steps)


def poly_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """MMSeg `PolyLR`: (lr - min_lr) * (1 - step / num_steps) ** power + min_lr; with
    `optim.warmup_steps` (MMSeg's ViT recipes: `LinearLR` from 1e-6 x lr over 1500 iterations)
    that factor ramps linearly to 1 first."""
    poly = optax.polynomial_schedule(optim.lr, optim.min_lr, optim.power, max(num_steps, 1))
    warmup = min(optim.get("warmup_steps", 0), max(num_steps - 1, 0))
    if not warmup:
        return poly
    return lambda step: poly(step) * jnp.minimum(1e-6 + (1 - 1e-6) * step / warmup, 1.0)


def weight_decay_mask(params: Any) -> Any:
    """Weight decay on conv / dense kernels only, not on BN scales or biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def sgd(schedule: optax.Schedule, momentum: float, weight_decay: float,
        decay_mask: Any = weight_decay_mask) -> optax.GradientTransformation:
    """torch-style SGD: weight decay added to the gradient before momentum (`decay_mask` None:
    every parameter)."""
    return optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                       optax.sgd(schedule, momentum=momentum))


OPTIMIZERS = ("sgd", "adamw")  # `optim.optimizer`


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Pretraining (and stage 1's DeepLab image encoder), `lr_schedule` either way:
    `optim.optimizer` 'sgd' (paper 4.1: momentum 0.9, weight decay 4e-5 on kernels) or 'adamw'
    (the DeiT-B row of Tab. 7, footnote 2: torch's AdamW, betas (0.9, 0.999), eps 1e-8, decay
    decoupled, on kernels only: not on biases, norms, `pos_embed`, `cls_token`, as DeiT)."""
    o = config.optim
    kind = o.get("optimizer", "sgd")
    if kind not in OPTIMIZERS:
        raise ValueError(f"optim.optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    if kind == "adamw":
        return optax.adamw(lr_schedule(config, num_steps), b1=0.9, b2=0.999, eps=1e-8,
                           weight_decay=o.weight_decay, mask=weight_decay_mask)
    return sgd(lr_schedule(config, num_steps), o.momentum, o.weight_decay)
