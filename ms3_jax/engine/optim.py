"""Optimisers and learning-rate schedules of the three stages (paper 4.1; MMSegmentation's for
fine-tuning)."""
from __future__ import annotations

from typing import Any

import jax
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
    """MMSeg `PolyLR`: (lr - min_lr) * (1 - step / num_steps) ** power + min_lr."""
    return optax.polynomial_schedule(optim.lr, optim.min_lr, optim.power, max(num_steps, 1))


def weight_decay_mask(params: Any) -> Any:
    """Weight decay on conv / dense kernels only, not on BN scales or biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def sgd(schedule: optax.Schedule, momentum: float, weight_decay: float,
        decay_mask: Any = weight_decay_mask) -> optax.GradientTransformation:
    """torch-style SGD: weight decay added to the gradient before momentum (`decay_mask` None:
    every parameter)."""
    return optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                       optax.sgd(schedule, momentum=momentum))


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Pretraining (and stage 1's image encoder): SGD, momentum 0.9, weight decay 4e-5 on kernels,
    `lr_schedule` (paper 4.1)."""
    o = config.optim
    return sgd(lr_schedule(config, num_steps), o.momentum, o.weight_decay)
