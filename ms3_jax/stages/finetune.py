"""Fine-tuning for segmentation (paper 4.1-4.2): standard (Tab. 2) and frozen-backbone (Tab. 3).

DeepLab-v3+ / ResNet-50 with a fresh classifier, trained as MMSegmentation does; init
(`config.init.kind` / `init.what`) gives the rows of Tab. 2; `frozen_backbone` is Tab. 3. mIoU
on the validation split every `eval_every` steps and at the end -> `W/results.json`. `aux_head`
adds MMSeg's auxiliary FCN head on layer3 to training (Tab. 7), never to inference.
docs/choices.md, "Fine-tuning recipe: MMSegmentation's DeepLab-v3+ defaults", "Initialisation
(Tab. 2 rows): backbone only by default", "Frozen backbone (Tab. 3)".
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding

from ms3_jax.data import augment, eval_data, pipeline
from ms3_jax.data.label_space import LabelSpace
from ms3_jax.engine import checkpointing, loop, optim, training
from ms3_jax.evaluation import evaluate
from ms3_jax.files import safe
from ms3_jax.models.deeplab import (MS3Encoder, encoder_from_config, resize_bilinear,
                                    untrained_subtrees)

INIT_KINDS = ("ms3", "torchvision", "scratch")
INIT_WHAT = {"backbone": ("backbone",), "segmentor": ("backbone", "decode_head")}
RESULTS_FILE = "results.json"
Metrics = dict[str, jax.Array]


@struct.dataclass
class FinetuneState:
    """Everything that changes while fine-tuning; `params` / `batch_stats` are `MS3Encoder`'s, so
    `checkpointing.encoder_variables` and `export` read a fine-tuning workdir too."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def segmentation_loss(logits_BxhxwxK: jax.Array, labels_BxHxW: jax.Array,
                      ignore_index: int = evaluate.IGNORE_INDEX,
                      avg_non_ignore: bool = False) -> jax.Array:
    """MMSeg's decode loss: logits upsampled (bilinear, align_corners=False) to the labels, pixel
    cross-entropy; labels equal to `ignore_index` or outside [0, K) count zero. The sum is divided
    by all pixels (MMSeg's default `avg_non_ignore=False`) or by the labelled ones."""
    logits = resize_bilinear(logits_BxhxwxK.astype(jnp.float32), labels_BxHxW.shape[1:3])
    k = logits.shape[-1]
    labels = labels_BxHxW.astype(jnp.int32)
    valid = (labels != ignore_index) & (labels >= 0) & (labels < k)
    y = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[..., None], axis=-1)[..., 0]
    count = jnp.sum(valid) if avg_non_ignore else labels.size
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)


def segmentor_loss(out: Mapping[str, jax.Array], labels_BxHxW: jax.Array,
                   ignore_index: int = evaluate.IGNORE_INDEX, avg_non_ignore: bool = False,
                   aux_weight: float = 0.4) -> tuple[jax.Array, Metrics]:
    """MMSeg's decode loss on `out['logits']`, plus `aux_weight` times the same loss on
    `out['aux_logits']` when the encoder has the auxiliary head (Tab. 7: weight 0.4); the terms
    apart as metrics."""
    decode = segmentation_loss(out["logits"], labels_BxHxW, ignore_index, avg_non_ignore)
    if "aux_logits" not in out:
        return decode, {}
    aux = segmentation_loss(out["aux_logits"], labels_BxHxW, ignore_index, avg_non_ignore)
    return decode + aux_weight * aux, {"loss_decode": decode, "loss_aux": aux}


def backbone_labels(params: Mapping[str, Any]) -> dict[str, Any]:
    """'frozen' for every leaf under `backbone`, 'train' elsewhere (for `optax.multi_transform`)."""
    return {k: jax.tree_util.tree_map(lambda _, k=k: "frozen" if k == "backbone" else "train", v)
            for k, v in params.items()}


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
    """torch-style SGD (decay added to the gradient before momentum), or AdamW
    (`optim.optimizer='adamw'`, the `:deit` configs); MMSeg decays every parameter
    (`optim.decay_all`), else kernels only (`optim.weight_decay_mask`). Frozen backbone:
    `set_to_zero` for its parameters (no decay, no momentum state)."""
    o = config.optim
    mask = None if o.decay_all else optim.weight_decay_mask
    if o.get("optimizer", "sgd") == "adamw":
        tx = optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=o.weight_decay,
                         mask=mask)
    else:
        tx = optim.sgd(schedule, o.momentum, o.weight_decay, mask)
    if not config.frozen_backbone:
        return tx
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, backbone_labels)


def _eval_mode_backbone(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
    """`nn.intercept_methods` hook: the encoder's backbone (any architecture) runs with `train=False`
    (BN on running statistics, nothing written) and its features carry no gradient."""
    if context.module.path == ("backbone",) and context.method_name == "__call__":
        kwargs = {k: v for k, v in kwargs.items() if k != "train"}
        return jax.lax.stop_gradient(next_fun(*args[:1], train=False, **kwargs))
    return next_fun(*args, **kwargs)


def build_model(config: ml_collections.ConfigDict, num_classes: int, platform: str,
                training: bool = False) -> MS3Encoder:
    """The segmentor; for `training` with the auxiliary head when `config.aux_head` (Tab. 7).
    Inference (evaluation, `predict`, `export`) builds it without: the head's params, if any,
    sit unused in the variables."""
    return encoder_from_config(config.model, platform, heads=(), num_classes=num_classes,
                               dropout_rate=config.model.get("dropout_rate", 0.1),
                               aux_head=training and bool(config.get("aux_head", False)))


def make_train_step(config: ml_collections.ConfigDict, model: MS3Encoder,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[..., tuple[FinetuneState, Metrics]]:
    """`train_step(state, batch) -> (state, metrics)`, pure; frozen or not is decided here, once."""
    frozen = bool(config.frozen_backbone)
    ignore_index, avg_non_ignore = config.loss.ignore_index, config.loss.avg_non_ignore
    aux_weight = config.loss.get("aux_weight", 0.4)

    def loss_fn(params, batch_stats, batch, rng):
        with nn.intercept_methods(_eval_mode_backbone) if frozen else contextlib.nullcontext():
            out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                       train=True, mutable=["batch_stats"], rngs={"dropout": rng})
        loss, terms = segmentor_loss(out, batch["label"], ignore_index, avg_non_ignore, aux_weight)
        return loss, (mutated["batch_stats"], terms)

    def train_step(state: FinetuneState, batch: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        (loss, (batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if frozen:  # p + 0 is p except for -0.0: carry the frozen leaves over untouched
            params = {**params, "backbone": state.params["backbone"]}
            batch_stats = {**batch_stats, "backbone": state.batch_stats["backbone"]}
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
        return new, {"loss": loss, "lr": schedule(state.step), "grad_norm": optax.tree.norm(grads),
                     **terms}

    return train_step


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Fail before any long work on settings that cannot run."""
    training.check_config(config, num_devices)
    kind = config.init.kind
    if kind not in INIT_KINDS:
        raise ValueError(f"init.kind must be one of {INIT_KINDS}, got {kind!r}")
    if kind != "scratch" and not config.init.path:
        what = "an MS3 pretraining workdir" if kind == "ms3" else "a PyTorch ResNet checkpoint"
        raise ValueError(f"init.kind={kind!r} needs init.path ({what})")
    what = config.init.get("what", "backbone")
    if what not in INIT_WHAT:
        raise ValueError(f"init.what must be one of {tuple(INIT_WHAT)}, got {what!r}")
    if what == "segmentor" and kind != "ms3":
        raise ValueError(f"init.what='segmentor' (backbone + decode head) needs init.kind='ms3'; "
                         f"init.kind={kind!r} has a backbone only")
    if kind == "torchvision" and config.frozen_backbone and config.model.get("backbone") == "deit":
        raise ValueError("frozen_backbone with a DeiT from a PyTorch file (init.kind="
                         "'torchvision'): the file has no neck, which would stay random and frozen; "
                         "start from an MS3 workdir (init.kind='ms3') or do not freeze")
    if kind == "scratch" and config.frozen_backbone:
        logging.warning("frozen_backbone with init.kind='scratch' trains the head on a random backbone")
    if config.num_steps <= 0:
        raise ValueError(f"num_steps must be positive, got {config.num_steps}")
    if min(config.log_every, config.checkpoint_every) <= 0 or config.eval_every < 0:
        raise ValueError("log_every and checkpoint_every must be positive, eval_every >= 0 "
                         "(0: evaluate at the end only)")
    if config.eval.mode not in ("whole", "slide"):
        raise ValueError(f"eval.mode must be 'whole' or 'slide', got {config.eval.mode!r}")
    if config.eval.mode == "slide" and not (config.eval.crop and config.eval.stride):
        raise ValueError("eval.mode='slide' needs eval.crop and eval.stride")


class Trainer(training.Trainer):
    """Fine-tuning on the training base: the segmentor, its optimizer and step."""

    def __init__(self, config: ml_collections.ConfigDict, num_classes: int, devices: list | None = None,
                 pipeline: Any = None, eval_dataset: Any = None):
        super().__init__(config, devices, ("image", "label"))
        self.num_classes, self.pipeline, self.eval_dataset = num_classes, pipeline, eval_dataset
        self.label_space: LabelSpace | None = None
        self.history: list[dict[str, Any]] = []  # evaluations of this run
        self.metrics: dict[str, Any] | None = None  # the last one
        self.model = build_model(config, num_classes, self.platform, training=True)
        self.eval_model = build_model(config, num_classes, self.platform)  # no auxiliary head
        self.num_steps = int(config.num_steps)
        self.schedule = optim.poly_schedule(config.optim, self.num_steps)
        self.tx = make_optimizer(config, self.schedule)
        self.compile_step(make_train_step(config, self.model, self.tx, self.schedule))
        # docs/choices.md, "Init compile at optimisation level 0"; shapes are image-size free
        options = {"xla_backend_optimization_level": 0} if self.platform == "cpu" else None
        self._init = jax.jit(lambda rng: self.model.init(rng, jnp.zeros((1, 64, 64, 3), jnp.uint8)),
                             out_shardings=self.replicated, compiler_options=options)
        self._opt_init = jax.jit(self.tx.init, out_shardings=self.replicated)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, devices: list | None = None) -> "Trainer":
        """Checks `config` (before any long work), then builds the data streams and the step."""
        check_config(config, len(jax.devices() if devices is None else devices))
        label_space = LabelSpace.from_datasets([config.data.dataset])
        pipe = make_pipeline(config, label_space)
        trainer = cls(config, label_space.num_classes, devices, pipe,
                      make_eval_dataset(config, label_space))
        trainer.label_space = label_space
        return trainer

    def init_variables(self, rng: jax.Array) -> dict[str, Any]:
        """Random `{'params', 'batch_stats'}`, replicated."""
        return self._init(rng)

    def init_state(self, rng: jax.Array, resuming: bool = False) -> FinetuneState:
        """Random variables with `config.init`'s pretrained parts over them (a cheap random
        state when `resuming`: a checkpoint follows)."""
        init_rng, state_rng = jax.random.split(rng)
        variables = (self.init_variables(init_rng) if resuming
                     else initial_variables(self.config, self, init_rng))
        return self.create_state(variables, state_rng)

    def evaluate(self, step: int, state: FinetuneState, workdir: str, writer: Any | None) -> None:
        """mIoU on the validation split every `eval_every` steps and at the last."""
        every = self.config.eval_every
        if (every and step % every == 0) or step == self.num_steps:
            self.metrics = self._evaluate_now(step, state, workdir, writer)

    def _evaluate_now(self, step: int, state: FinetuneState, workdir: str,
                      writer: Any | None) -> dict[str, Any]:
        config, names = self.config, self.label_space.class_names[0]
        t0 = time.perf_counter()
        if jax.process_index() == 0:
            logging.info("step %d: evaluating on %s/%s (up to %s images; the first evaluation "
                         "compiles)", step, config.data.dataset, config.eval.split,
                         config.eval.max_images or "all")
        m = run_evaluation(config, self, state, self.eval_dataset)
        self.history.append({"step": step, **{k: _json_float(m[k]) for k in ("mIoU", "aAcc", "mAcc")}})
        if jax.process_index() == 0:
            logging.info("eval at step %d on %s/%s (%d images, %.0f s): mIoU %.2f, aAcc %.2f, "
                         "mAcc %.2f; per class in TensorBoard (eval_IoU/) and, at the end, %s",
                         step, config.data.dataset, config.eval.split, m["num_images"],
                         time.perf_counter() - t0, m["mIoU"], m["aAcc"], m["mAcc"],
                         os.path.join(workdir, RESULTS_FILE))
            for k in ("mIoU", "aAcc", "mAcc"):
                writer.add_scalar(f"eval/{k}", m[k], step)
            for name, iou in zip(names, m["IoU"]):
                if not np.isnan(iou):
                    writer.add_scalar(loop.tag("eval_IoU", name), iou, step)
            writer.add_text("eval_table", "    " + evaluate.format_table(m, names).replace(
                "\n", "\n    "), step)
            writer.flush()
        return m

    def finish(self, state: FinetuneState, history: list[dict[str, float]], end: int,
               workdir: str, writer: Any | None) -> dict[str, Any] | None:
        """The final results (also in `W/results.json`), or None when the run ended early."""
        if end < self.num_steps:
            return None
        if self.metrics is None:  # resumed a finished run: evaluate its final weights
            self.metrics = self._evaluate_now(self.num_steps, state, workdir, writer)
        config, m = self.config, self.metrics
        results = results_dict(config, self.label_space, self.num_steps, m, self.history)
        if jax.process_index() == 0:
            with safe.atomic_output(os.path.join(workdir, RESULTS_FILE), "w") as f:
                json.dump(results, f, indent=1)
            start = config.init.kind + (f" from {config.init.path}" if config.init.get("path") else "")
            logging.info("%s: mIoU %.2f (aAcc %.2f, mAcc %.2f; initialised: %s) -> %s",
                         config.data.dataset, m["mIoU"], m["aAcc"], m["mAcc"], start,
                         os.path.join(workdir, RESULTS_FILE))
        return results

    def create_state(self, variables: Mapping[str, Any], rng: jax.Array) -> FinetuneState:
        params, batch_stats = variables["params"], variables.get("batch_stats", {})
        return FinetuneState(step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated),
                             params=params, batch_stats=batch_stats, opt_state=self._opt_init(params),
                             rng=jax.device_put(rng, self.replicated))


# Initialisation (Tab. 2 rows).

def _shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}


def _replace_parts(variables: Mapping[str, Any], loaded: Mapping[str, Mapping[str, Any]],
                   sharding: NamedSharding, source: str) -> dict[str, Any]:
    """`variables` with the top-level modules in `loaded` ({'params': {name: tree}, ...})
    replaced; every structure or shape mismatch is listed in one error."""
    out = {c: dict(v) for c, v in variables.items()}
    problems = []
    for collection, parts in loaded.items():
        for name, tree in parts.items():
            want, got = _shapes(variables[collection][name]), _shapes(tree)
            if want != got:
                diff = sorted(set(want.items()) ^ set(got.items()))[:8]
                problems.append(f"{collection}/{name}: model vs file differ at {diff}")
                continue
            out[collection][name] = jax.device_put(
                jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree), sharding)
    if problems:
        raise ValueError(f"{source} does not fit the model (check config.model against the "
                         "pretraining config):\n  " + "\n  ".join(problems))
    return out


def initial_variables(config: ml_collections.ConfigDict, trainer: Trainer,
                      rng: jax.Array) -> dict[str, Any]:
    """Random variables with the pretrained parts of `config.init` loaded over them (replicated)."""
    variables = trainer.init_variables(rng)
    kind, path = config.init.kind, config.init.path
    if kind == "scratch":
        return variables
    if kind == "torchvision":
        loaded = trainer.backbone_from_file(path, trainer.model)
        # over the fresh backbone: what no PyTorch backbone holds (a DeiT's neck) stays fresh
        parts = {c: {"backbone": {**variables[c]["backbone"], **loaded[c]}} for c in loaded}
    else:
        step, state = checkpointing.restore_state(path, config.init.get("step") or None)
        enc = checkpointing.encoder_variables(state, ema=config.init.ema)
        what = INIT_WHAT[config.init.get("what", "backbone")]
        parts = {c: {p: enc[c][p] for p in what} for c in ("params", "batch_stats")}
        # What the pretraining never trained stays at its fresh initialisation (`heads_at='aspp'`).
        untrained = untrained_subtrees(checkpointing.read_config(path)) if "decode_head" in what else ()
        fresh = [p for p in untrained if p[0] in what]
        for p in fresh:
            parts = {c: _graft(parts[c], variables[c], p) for c in parts}
        source = f"{path} (step {step}{', momentum encoder' if config.init.ema else ''})"
        if fresh:
            names = ", ".join(p[-1] for p in fresh)
            logging.warning("backbone and the ASPP of decode_head initialised from %s; the decoder "
                            "(%s) left at its fresh initialisation: the pretraining had "
                            "model.heads_at='aspp', which trains no decoder", source, names)
        else:
            logging.info("%s initialised from %s", " and ".join(what), source)
    return _replace_parts(variables, parts, trainer.replicated, path)


def _graft(tree: Mapping[str, Any], source: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """`tree` with its subtree at `path` taken from `source` (neither modified; a path that
    `tree` does not have, e.g. a module without `batch_stats`, changes nothing)."""
    if not path:
        return source
    if path[0] not in tree:
        return tree
    return {**tree, path[0]: _graft(tree[path[0]], source[path[0]], path[1:])}


def make_pipeline(config: ml_collections.ConfigDict, label_space: LabelSpace):
    """The augmented training stream of the one dataset (labels = its local ids)."""
    dc = config.data
    augment_cfg = augment.AugmentConfig(crop_size=dc.crop_size, **dc.augment.to_dict())
    return pipeline.TrainPipeline([dc.dataset], data_dir=dc.data_dir or None,
                                  global_batch_size=config.batch_size, label_space=label_space,
                                  augment=augment_cfg, seed=config.seed,
                                  loader=pipeline.LoaderOptions(worker_count=dc.worker_count),
                                  skip_unreadable=bool(dc.get("skip_unreadable", False)))


def make_eval_dataset(config: ml_collections.ConfigDict, label_space: LabelSpace):
    """This process's share of the validation images (whole, short side resized)."""
    return eval_data.make_eval_dataset(
        config.data.dataset, label_space=label_space, data_dir=config.data.data_dir or None,
        split=config.eval.split, short_side=config.eval.short_side or None,
        shard_index=jax.process_index(), shard_count=jax.process_count())


def run_evaluation(config: ml_collections.ConfigDict, trainer: Trainer, state: FinetuneState,
                   dataset: Any) -> dict[str, Any]:
    """mIoU etc. (percent) of the current weights on the validation split, all processes."""
    ec = config.eval
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return evaluate.evaluate(
        trainer.eval_model, variables, dataset, trainer.num_classes, mode=ec.mode,
        crop=ec.crop, stride=ec.stride, flip=ec.flip, ignore_index=config.loss.ignore_index,
        devices=jax.local_devices()[:ec.num_devices or None], max_images=ec.max_images or None,
        log_every=500)


def _json_float(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def results_dict(config: ml_collections.ConfigDict, label_space: LabelSpace, step: int,
                 metrics: Mapping[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """What goes to `W/results.json` (percent; NaN -> null for classes absent from the split)."""
    return {
        "dataset": config.data.dataset, "split": config.eval.split, "step": step,
        "init": config.init.to_dict(), "frozen_backbone": bool(config.frozen_backbone),
        "eval_mode": config.eval.mode, "flip": bool(config.eval.flip),
        "num_images": int(metrics["num_images"]),
        **{k: _json_float(metrics[k]) for k in ("mIoU", "aAcc", "mAcc")},
        "per_class": {n: {"IoU": _json_float(i), "Acc": _json_float(a)}
                      for n, i, a in zip(label_space.class_names[0], metrics["IoU"], metrics["Acc"])},
        "evaluations": history,
    }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at: int | None = None) -> dict[str, Any] | None:
    """Fine-tune into `workdir` (resuming from its latest checkpoint) and evaluate; returns the
    final results (also in `W/results.json`), or None when `stop_at` ends the run early (with a
    checkpoint, as a preemption would)."""
    return training.run(Trainer.from_config(config), workdir, stop_at)
