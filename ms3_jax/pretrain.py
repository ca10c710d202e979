"""MS3 pretraining (stage 2): the sharded train step and the loop around it.

One step (DESIGN.md "Data flow"): the online encoder F gives I_l, I_v; the losses are
L~ = L~_l + alpha L~_v (Eq. 7-9; Eq. 1-3 without multi-label); the momentum encoder F-hat
(updated first, as MoCo) embeds the batch into the memory bank; V follows from the bank (Eq. 4);
the cross-modal similarity S is an EMA of its batch estimate (Eq. 5); the multi-label mask of the
next step comes from S (Eq. 6). `loss.kind` also selects the CE baselines of Tab. 4, and the
switches of Tab. 4 / 6 pick which terms exist -- chosen once, outside the step.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ms3_jax import (checkpointing, loop, losses, memory_bank, nonfinite, pseudo_labels, relations,
                     sharding)
from ms3_jax.data.label_space import LabelSpace
from ms3_jax.models.deeplab import MS3Encoder, encoder_from_config
from ms3_jax.train_state import TrainState, ema_update, init_train_state

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LOSS_KINDS = ("ms3", "ce_single_head", "ce_multi_head")


def downsample_labels(labels_BxHxW: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """Nearest-neighbour resize of label maps (torch `interpolate(mode='nearest')` indexing)."""
    h, w = labels_BxHxW.shape[1:3]
    rows = (np.arange(hw[0]) * h) // hw[0]
    cols = (np.arange(hw[1]) * w) // hw[1]
    return labels_BxHxW[:, rows][:, :, cols]


def lr_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """lr = base_lr * batch / lr_batch (linear scaling; 0.8 per 128 images), warm-up, cosine to 0."""
    peak = config.optim.base_lr * config.batch_size / config.optim.lr_batch
    warmup = min(config.optim.warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1), 0.0)


def weight_decay_mask(params: Any) -> Any:
    """Weight decay on conv / dense kernels only, not on BN scales or biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """SGD with momentum 0.9 and decoupled-from-BN weight decay 4e-5 (paper 4.1), torch-style
    (decay added to the gradient before momentum)."""
    return optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay, weight_decay_mask),
        optax.sgd(lr_schedule(config, num_steps), momentum=config.optim.momentum),
    )


def check_config(config: ml_collections.ConfigDict, num_devices: int,
                 num_processes: int | None = None) -> None:
    """Fail before any long work on settings that cannot run (processes default: this job's)."""
    if config.loss.kind not in LOSS_KINDS:
        raise ValueError(f"loss.kind must be one of {LOSS_KINDS}, got {config.loss.kind!r}")
    if config.loss.kind == "ms3" and not (config.loss.use_language or config.loss.use_visual):
        raise ValueError("loss.kind='ms3' needs loss.use_language or loss.use_visual")
    if config.model.output_stride not in (8, 16, 32):
        raise ValueError(f"model.output_stride must be 8, 16 or 32, got {config.model.output_stride}")
    sharding.check_global_batch(config.batch_size, num_devices,
                                jax.process_count() if num_processes is None else num_processes)
    if config.bank.per_class > config.bank.slots:
        raise ValueError(f"bank.per_class (P={config.bank.per_class}) must be <= bank.slots "
                         f"(K={config.bank.slots}): one step would overwrite its own entries")
    if config.relations.pixel_head not in ("visual", "language"):
        raise ValueError(f"relations.pixel_head must be 'visual' or 'language', got "
                         f"{config.relations.pixel_head!r}")
    if config.relations.pixel_head == "visual" and not config.loss.use_visual and config.loss.multilabel:
        raise ValueError("relations.pixel_head='visual' needs loss.use_visual (the visual head is "
                         "untrained otherwise); set relations.pixel_head='language'")
    nonfinite.mode_of(config)
    if uses_unlabeled(config):
        lc = config.loss
        if not (lc.kind == "ms3" and lc.use_language and lc.use_visual):
            raise ValueError(f"data.unlabeled.source={config.data.unlabeled.source!r} needs "
                             f"loss.kind='ms3' with loss.use_language and loss.use_visual (the "
                             f"App. D pseudo-labels need T and V), got loss.kind={lc.kind!r}, "
                             f"use_language={lc.use_language}, use_visual={lc.use_visual}")
        if not 0.0 < config.data.unlabeled.ratio < 1.0:
            raise ValueError(f"data.unlabeled.ratio must be in (0, 1), got "
                             f"{config.data.unlabeled.ratio!r}")
        if not 0.0 <= config.pseudo.threshold <= 1.0:
            raise ValueError(f"pseudo.threshold (a softmax probability) must be in [0, 1], got "
                             f"{config.pseudo.threshold!r}")


def uses_unlabeled(config: ml_collections.ConfigDict) -> bool:
    """Whether unlabeled images are mixed in (`data.unlabeled.source` set; paper App. D)."""
    unlabeled = config.data.get("unlabeled")
    return bool(unlabeled and unlabeled.get("source"))


def build_model(config: ml_collections.ConfigDict, num_classes: int, platform: str) -> MS3Encoder:
    """The encoder of `loss.kind` for devices of `platform` (`model.kernels`)."""
    if config.loss.kind == "ms3":
        return encoder_from_config(config.model, platform, heads=("language", "visual"),
                                   num_classes=None)
    return encoder_from_config(config.model, platform, heads=(), num_classes=num_classes)


def make_train_step(config: ml_collections.ConfigDict, model: MS3Encoder,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[..., tuple[TrainState, Metrics]]:
    """`train_step(state, batch, consts) -> (state, metrics)`, pure; the loss is chosen here, once.

    consts: `text` T [|Y|, C], `other_dataset` [|Y|, |Y|] bool, `dataset_of_class` [|Y|].
    With `data.unlabeled` (App. D) the -2 pixels of unlabeled images get pseudo-labels from this
    forward pass (`pseudo_labels.label_unlabeled_pixels`); metrics then add `pseudo_fraction`
    and `pseudo_agreement`.
    """
    lc = config.loss
    kind, ms3 = lc.kind, lc.kind == "ms3"
    use_lang, use_vis = ms3 and lc.use_language, ms3 and lc.use_visual
    multilabel = ms3 and lc.multilabel
    track_relations = ms3  # S is cheap; kept for the report even when the mask is off
    ema_model = model.clone(heads=("visual",)) if use_vis else None
    momentum, sim_momentum = config.ema_momentum, config.relations.momentum
    warmup, per_class, chunk = config.relations.warmup_steps, config.bank.per_class, lc.chunk
    pixel_head = config.relations.pixel_head
    # The losses' [pixels x |Y| x C] products take the compute dtype's operands (float32 sums).
    product_dtype = jnp.dtype(config.model.dtype)
    # App. D: pixels of unlabeled images (label -2) get multimodal pseudo-labels; they enter the
    # losses, enter the bank only with pseudo.enter_bank, and never S (Eq. 5 estimates relations
    # between ground-truth classes) nor acc_language.
    pseudo = uses_unlabeled(config)
    threshold = float(config.pseudo.threshold) if pseudo else 0.0
    enter_bank = pseudo and bool(config.pseudo.enter_bank)

    def loss_fn(params, state: TrainState, batch: Batch, consts, rng):
        out, mutated = model.apply({"params": params, "batch_stats": state.batch_stats},
                                   batch["image"], train=True, mutable=["batch_stats"],
                                   rngs={"dropout": rng})
        y = downsample_labels(batch["label"], out["decoder"].shape[1:3])
        y_fit, extra = y, {}  # y_fit: the labels the losses fit (y plus pseudo-labels)
        if pseudo:
            y_fit, extra = pseudo_labels.label_unlabeled_pixels(
                y, out["language"], out["visual"], consts["text"], state.visual_emb,
                state.visual_valid, threshold=threshold, tau=lc.tau, chunk=chunk)
        terms: dict[str, jax.Array] = {}
        pred = None  # nearest-class prediction for acc_language, from the loss's own logits
        if kind == "ce_single_head":
            terms["loss_ce"] = losses.ce_single_head_loss(out["logits"], y)
        elif kind == "ce_multi_head":
            terms["loss_ce"] = losses.ce_multi_head_loss(out["logits"], y, batch["dataset_id"],
                                                         consts["dataset_of_class"])
        else:
            positives = None
            if multilabel:
                mask = relations.multilabel_mask(state.sim, consts["other_dataset"], state.sim_seen)
                positives = mask & (state.step >= warmup)
            if use_lang:
                terms["loss_language"], pred = losses.pairing_loss_and_prediction(
                    out["language"], consts["text"], y_fit, positives, None, lc.tau, chunk=chunk,
                    product_dtype=product_dtype)
            if use_vis:
                terms["loss_visual"] = lc.alpha * losses.pairing_loss(
                    out["visual"], state.visual_emb, y_fit, positives, state.visual_valid, lc.tau,
                    chunk=chunk, product_dtype=product_dtype)
        total = sum(terms.values())
        return total, (terms, extra, out, y, y_fit, pred, mutated["batch_stats"])

    def train_step(state: TrainState, batch: Batch, consts: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        rng_drop, rng_bank = jax.random.split(rng)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (terms, extra, out, y, y_fit, pred, batch_stats)), grads = grad_fn(
            state.params, state, batch, consts, rng_drop)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
            ema_params=ema_update(state.ema_params, params, momentum),
            ema_batch_stats=ema_update(state.ema_batch_stats, batch_stats, momentum))
        metrics: Metrics = {"loss": loss, "lr": schedule(state.step), **terms, **extra}
        if use_vis:
            # Keys from the freshly updated momentum encoder, batch-statistics BN (MoCo).
            ema_out, _ = ema_model.apply({"params": new.ema_params, "batch_stats": new.ema_batch_stats},
                                         batch["image"], train=True, mutable=["batch_stats"])
            bank = memory_bank.enqueue(new.bank, ema_out["visual"], y_fit if enter_bank else y,
                                       rng_bank, per_class)
            v, v_valid = memory_bank.visual_embeddings(bank, state.visual_emb, state.visual_valid)
            new = new.replace(bank=bank, visual_emb=v, visual_valid=v_valid)
            metrics["visual_classes"] = jnp.sum(v_valid)
        if track_relations:
            emb = jax.lax.stop_gradient(out[pixel_head])
            batch_sim, count = relations.segment_similarity(emb, y, consts["text"],
                                                            consts["text"].shape[0], chunk=chunk)
            sim = relations.update_similarity(new.sim, batch_sim, count, sim_momentum, new.sim_seen)
            seen = relations.update_seen(new.sim_seen, count)
            new = new.replace(sim=sim, sim_seen=seen)
            mask = relations.multilabel_mask(sim, consts["other_dataset"], seen)
            metrics["relations"] = jnp.sum(mask & (new.step >= warmup)) if multilabel else jnp.sum(mask)
        if use_lang:
            metrics["acc_language"] = losses.prediction_accuracy(pred, y, consts["text"].shape[0])
        elif ms3 and not use_vis:
            metrics["acc_language"] = losses.pixel_accuracy(out["language"], consts["text"], y)
        return new, metrics

    return train_step


class Trainer:
    """Owns the mesh, the shardings and the jitted step; keeps the loop below small."""

    def __init__(self, config: ml_collections.ConfigDict, label_space: LabelSpace,
                 text_KxC: np.ndarray | None, num_steps: int, devices: list | None = None):
        devices = devices if devices is not None else jax.devices()
        check_config(config, len(devices))
        self.config, self.label_space = config, label_space
        self.mesh = sharding.data_mesh(devices)
        self.replicated = NamedSharding(self.mesh, P())
        self.data_sharding = NamedSharding(self.mesh, P("data"))
        k = label_space.num_classes
        if text_KxC is None:  # CE baselines do not use T; a placeholder keeps one step signature
            text_KxC = np.zeros((k, config.model.emb_dim), np.float32)
        if text_KxC.shape != (k, config.model.emb_dim):
            raise ValueError(f"text embeddings have shape {text_KxC.shape}, expected "
                             f"[{k}, model.emb_dim={config.model.emb_dim}]")
        consts = {"text": jnp.asarray(text_KxC, jnp.float32),
                  "other_dataset": relations.other_dataset_matrix(label_space.dataset_of_class),
                  "dataset_of_class": jnp.asarray(label_space.dataset_of_class)}
        self.consts = jax.device_put(consts, self.replicated)
        self.model = build_model(config, k, sharding.platform_of(devices))
        self.num_steps = num_steps
        self.tx = make_optimizer(config, num_steps)
        step = make_train_step(config, self.model, self.tx, lr_schedule(config, num_steps))
        self._step = jax.jit(nonfinite.guard(step, nonfinite.mode_of(config)),
                             in_shardings=(self.replicated, self.data_sharding, self.replicated),
                             out_shardings=(self.replicated, self.replicated), donate_argnums=0)

    def init_state(self, rng: jax.Array, image_size: int) -> TrainState:
        """The state, created directly with its (replicated) sharding.

        `model.dtype='float64'` (numerical tests, under `jax.enable_x64`) makes every floating
        leaf float64, so runs on different device layouts can be compared without float32
        reassociation noise."""
        cfg = self.config
        float64 = cfg.model.dtype == "float64"

        def init(rng):
            init_rng, state_rng = jax.random.split(rng)
            images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
            variables = self.model.init(init_rng, images)
            if float64:
                variables = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), variables)
            state = init_train_state(variables, self.tx, self.label_space.num_classes,
                                     cfg.model.emb_dim, cfg.bank.slots, jnp.dtype(cfg.bank.dtype),
                                     state_rng)
            if float64:
                state = jax.tree_util.tree_map(
                    lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                    state)
            return state

        return jax.jit(init, out_shardings=self.replicated)(rng)

    def global_batch(self, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's share of the batch -> global arrays sharded over 'data'."""
        keys = ("image", "label", "dataset_id")
        return {k: jax.make_array_from_process_local_data(self.data_sharding, np.asarray(local[k]))
                for k in keys}

    def step(self, state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, Metrics]:
        return self._step(state, batch, self.consts)


def resolve_text_embeddings(config: ml_collections.ConfigDict, label_space: LabelSpace) -> np.ndarray | None:
    """T from `text.embeddings` (stage 1's npz) or, when empty, CLIP with the hand template."""
    from ms3_jax import text_embeddings

    if config.loss.kind != "ms3":
        return None
    if config.text.embeddings:
        return text_embeddings.load_text_embeddings(config.text.embeddings, label_space)
    if not config.text.clip:
        raise ValueError("set text.embeddings (a stage-1 text_embeddings.npz) or text.clip "
                         "(a CLIP checkpoint for the hand template)")
    logging.info("text.embeddings unset: T from %s with the template %r", config.text.clip,
                 config.text.template)
    return text_embeddings.template_text_embeddings(config.text.clip, label_space, config.text.template)


def make_pipeline(config: ml_collections.ConfigDict, label_space: LabelSpace):
    from ms3_jax.data import pipeline

    dc = config.data
    return pipeline.TrainPipeline(
        dc.datasets, data_dir=dc.data_dir or None, global_batch_size=config.batch_size,
        label_space=label_space,
        augment=pipeline.AugmentConfig(crop_size=dc.crop_size, **dict(dc.get("augment") or {})),
        weights=dict(dc.weights) if dc.get("weights") else None, seed=config.seed,
        worker_count=dc.worker_count, skip_unreadable=bool(dc.get("skip_unreadable", False)),
        **(dict(unlabeled=dc.unlabeled.source, unlabeled_split=dc.unlabeled.split,
                unlabeled_ratio=dc.unlabeled.ratio) if uses_unlabeled(config) else {}))


def num_train_steps(config: ml_collections.ConfigDict, dataset_sizes: tuple[int, ...]) -> int:
    """`num_steps` if set, else `num_epochs` passes over the union of the training sets."""
    if config.get("num_steps"):
        return int(config.num_steps)
    return max(1, int(config.num_epochs * sum(dataset_sizes) // config.batch_size))


def write_relations_report(workdir: str, state: TrainState, label_space: LabelSpace,
                           other_dataset: jax.Array) -> str:
    """Tab. 8-style report of the final multi-label mapping -> W/relations.txt and .json."""
    sim, seen = np.asarray(jax.device_get(state.sim)), np.asarray(jax.device_get(state.sim_seen))
    mask = np.asarray(relations.multilabel_mask(sim, np.asarray(other_dataset), seen))
    ds_of = [label_space.dataset_names[d] for d in label_space.dataset_of_class]
    report = relations.relations_report(mask, sim, list(label_space.names), ds_of)
    with open(os.path.join(workdir, "relations.txt"), "w") as f:
        f.write(report + "\n")
    pairs = [{"from": label_space.display_names[a], "to": label_space.display_names[b],
              "similarity": float(sim[a, b]), "self_similarity": float(sim[a, a])}
             for a, b in zip(*np.nonzero(mask))]
    with open(os.path.join(workdir, "relations.json"), "w") as f:
        json.dump(pairs, f, indent=1)
    return report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at: int | None = None) -> list[dict[str, float]]:
    """Pretrain into `workdir`, resuming from its latest checkpoint; returns the logged metrics.

    `stop_at` ends this run after that step (with a checkpoint), as a preemption would.
    """
    is_main = jax.process_index() == 0
    check_config(config, jax.device_count())  # bad settings fail here, before any long work
    label_space = LabelSpace.from_datasets(list(config.data.datasets))
    if config.data.get("synthetic"):
        from ms3_jax.data import synthetic
        synthetic.prepare_synthetic(config.data.data_dir, **config.data.synthetic)
    pipe = make_pipeline(config, label_space)
    if pipe.unlabeled_source is not None:
        logging.info("unlabeled images (App. D): %d from %r, ratio %.3g of each batch",
                     len(pipe.unlabeled_source), pipe.unlabeled, pipe.unlabeled_ratio)
    num_steps = num_train_steps(config, pipe.dataset_sizes)
    text = resolve_text_embeddings(config, label_space)
    trainer = Trainer(config, label_space, text, num_steps)
    if is_main:
        checkpointing.write_config(workdir, config)
    mngr = checkpointing.checkpoint_manager(workdir, config.keep_checkpoints)
    iterator = pipe.make_iterator()
    state = trainer.init_state(jax.random.PRNGKey(config.seed), config.data.crop_size)
    if config.model.get("init_from"):
        state = _init_backbone_from(state, config.model.init_from, trainer)
    state, start = loop.restore_latest(mngr, state, iterator, workdir)
    writer = loop.summary_writer(workdir)
    end = num_steps if stop_at is None else min(num_steps, stop_at)
    history: list[dict[str, float]] = []
    state = loop.run(trainer, state, iterator, config, start=start, end=end, num_steps=num_steps,
                     mngr=mngr, writer=writer, history=history)
    if writer is not None:
        writer.close()
    if is_main and config.loss.kind == "ms3" and end == num_steps:
        report = write_relations_report(workdir, state, label_space, trainer.consts["other_dataset"])
        logging.info("\n%s", report)
    return history


def _init_backbone_from(state: TrainState, path: str, trainer: Trainer) -> TrainState:
    """Backbone (online and momentum) from a torchvision / MMSeg ResNet file (`model.init_from`)."""
    from ms3_jax import export

    loaded = jax.device_put(export.load_backbone_file(path, trainer.model), trainer.replicated)
    params = {**state.params, "backbone": loaded["params"]}
    stats = {**state.batch_stats, "backbone": loaded["batch_stats"]}
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # own buffers: the state is donated
    logging.info("backbone initialised from %s", path)
    return state.replace(params=params, batch_stats=stats, ema_params=copy(params),
                         ema_batch_stats=copy(stats), opt_state=trainer.tx.init(params))
