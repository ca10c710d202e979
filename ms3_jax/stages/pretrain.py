"""MS3 pretraining (stage 2): the sharded train step and the loop around it.

One step (Eq. 4-9; Eq. 1-3 without multi-label): docs/design.md, "Data flow of one pretraining
step". `loss.kind` also selects the CE baselines of Tab. 4; the switches of Tab. 4 / 6 pick which
terms exist, once, outside the step.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from ms3_jax.data.label_space import LabelSpace
from ms3_jax.engine import loop, optim, sharding, training
from ms3_jax.evaluation import pretrain_eval
from ms3_jax.method import (adapted_text, chunking, labels, losses, memory_bank, pseudo_labels,
                            relations, text_embeddings)
from ms3_jax.method.train_state import TrainState, ema_update, init_train_state
from ms3_jax.models import clip_text
from ms3_jax.models.deeplab import MS3Encoder, encoder_from_config

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
LOSS_KINDS = ("ms3", "ce_single_head", "ce_multi_head")
RESULTS_FILE = "results.json"  # the evaluations during pretraining (pretrain_eval.py)


def check_config(config: ml_collections.ConfigDict, num_devices: int,
                 num_processes: int | None = None) -> None:
    """Fail before any long work on settings that cannot run (processes default: this job's)."""
    training.check_config(config, num_devices, num_processes)
    if config.loss.kind not in LOSS_KINDS:
        raise ValueError(f"loss.kind must be one of {LOSS_KINDS}, got {config.loss.kind!r}")
    if config.loss.kind == "ms3" and not enabled_terms(config):
        raise ValueError("loss.kind='ms3' needs " + " or ".join(f"loss.{t.switch}" for t in LOSS_TERMS))
    if config.bank.per_class > config.bank.slots:
        raise ValueError(f"bank.per_class (P={config.bank.per_class}) must be <= bank.slots "
                         f"(S={config.bank.slots}): one step would overwrite its own entries")
    heads = {t.head: t for t in LOSS_TERMS}
    head = config.relations.pixel_head
    if head not in heads:
        raise ValueError(f"relations.pixel_head must be one of {tuple(heads)}, got {head!r}")
    if config.loss.kind == "ms3" and config.loss.multilabel and heads[head] not in enabled_terms(config):
        others = [t.head for t in enabled_terms(config)]
        raise ValueError(f"relations.pixel_head={head!r} needs loss.{heads[head].switch} (that head "
                         f"is untrained otherwise); set relations.pixel_head={others[0]!r}")
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


def check_text_source(config: ml_collections.ConfigDict) -> None:
    """`text.embeddings` names T for MS3: stage 1's npz, or TEMPLATE (asked for, not a fallback)."""
    if config.loss.kind == "ms3" and not config.text.embeddings:
        raise ValueError(
            "text.embeddings is unset: MS3 pretraining pairs pixels with stage 1's adapted class "
            "embeddings (Sec. 3.2). Run stage 1 first (python -m ms3_jax.main "
            "--config=configs/text_adapt.py --workdir=W1) and set "
            "--config.text.embeddings=W1/text_embeddings.npz, or set "
            f"--config.text.embeddings={text_embeddings.TEMPLATE} for CLIP's hand template (Tab. 4's original-CLIP rows)")
    if config.loss.kind == "ms3" and config.text.embeddings == text_embeddings.TEMPLATE and not config.text.clip:
        raise ValueError(f"text.embeddings={text_embeddings.TEMPLATE!r} needs text.clip (a CLIP checkpoint)")


def uses_unlabeled(config: ml_collections.ConfigDict) -> bool:
    """Whether unlabeled images are mixed in (`data.unlabeled.source` set; paper App. D)."""
    unlabeled = config.data.get("unlabeled")
    return bool(unlabeled and unlabeled.get("source"))


def build_model(config: ml_collections.ConfigDict, num_classes: int, platform: str) -> MS3Encoder:
    """The encoder of `loss.kind` for devices of `platform` (`model.kernels`)."""
    ms3 = config.loss.kind == "ms3"
    return encoder_from_config(config.model, platform, heads=("language", "visual") if ms3 else (),
                               num_classes=None if ms3 else num_classes)


@struct.dataclass
class Forward:
    """What the loss's forward pass hands to the rest of the step (the `has_aux` of its grad)."""

    terms: dict[str, jax.Array]  # the loss terms: loss_language, loss_visual (Eq. 7-9) or loss_ce
    pseudo: dict[str, jax.Array]  # App. D metrics (pseudo_fraction, pseudo_agreement) or {}
    out: dict[str, jax.Array]  # the encoder's outputs
    labels: jax.Array  # y at the embeddings' resolution [B, H/4, W/4]
    labels_fit: jax.Array  # the labels the losses fit: y plus App. D pseudo-labels
    prediction: jax.Array | None  # nearest-T class from the loss's own logits (acc_language)
    batch_stats: Any


def positives(state: TrainState, consts: Mapping[str, jax.Array], warmup: int,
              top_k: int = 0) -> jax.Array:
    """Ỹ of Eq. 6 from the running S (the mapping of the previous steps), off before `warmup`."""
    mask = relations.multilabel_mask(state.sim, consts["other_dataset"], state.sim_seen, top_k)
    return mask & (state.step >= warmup)


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """A pairing term of Eq. 7-9: the pixel embeddings of encoder head `head` against the class
    embeddings `target(state, consts) -> (E [|Y|, C], valid [|Y|] or None)` (stop-gradient);
    on with `config.loss[switch]`, weighted by `config.loss[weight]` (None: 1). `loss(emb, E,
    valid, y, positives, tau, chunk, product_dtype) -> (value, nearest-class prediction or None)`."""

    name: str
    head: str
    switch: str
    weight: str | None
    target: Callable[[TrainState, Mapping[str, jax.Array]], tuple[jax.Array, jax.Array | None]]
    loss: Callable[..., tuple[jax.Array, jax.Array | None]]


def _language_loss(emb, text, valid, y, pos, tau, chunk, product_dtype):
    return losses.pairing_loss_and_prediction(emb, text, y, pos, valid, tau, chunk=chunk,
                                              product_dtype=product_dtype)


def _visual_loss(emb, visual, valid, y, pos, tau, chunk, product_dtype):
    return losses.pairing_loss_fast(emb, visual, y, pos, valid, tau, chunk=chunk,
                                    product_dtype=product_dtype), None


# L~ = L~_l + alpha L~_v (Eq. 7-9): a new term of this kind is one entry plus its config fields.
LOSS_TERMS = (
    LossTerm("language", "language", "use_language", None,
             lambda state, consts: (consts["text"], None), _language_loss),
    LossTerm("visual", "visual", "use_visual", "alpha",
             lambda state, consts: (state.visual_emb, state.visual_valid), _visual_loss),
)


def enabled_terms(config: ml_collections.ConfigDict) -> tuple[LossTerm, ...]:
    """The `LOSS_TERMS` switched on (none for the CE baselines)."""
    return tuple(t for t in LOSS_TERMS if config.loss.kind == "ms3" and config.loss[t.switch])


def make_loss_terms(config: ml_collections.ConfigDict,
                    data_shards: int = 1) -> Callable[..., tuple[dict, jax.Array | None]]:
    """`terms(out, y, batch, state, consts) -> (loss terms, prediction)` of `loss.kind` and the
    Tab. 4 / 6 switches, chosen here once: the enabled `LOSS_TERMS` (Eq. 7-9; Eq. 1-3 without
    the multi-label mask) or a CE baseline. `data_shards`: devices the batch is split over."""
    lc = config.loss
    chunk = chunking.batch_chunk(lc.chunk, data_shards)
    product_dtype = jnp.dtype(config.model.dtype)  # [pixels x |Y| x C] operands; float32 sums
    warmup, top_k = config.relations.warmup_steps, config.relations.get("top_k", 0)
    if lc.kind == "ce_single_head":
        return lambda out, y, batch, state, consts: (
            {"loss_ce": losses.ce_single_head_loss(out["logits"], y)}, None)
    if lc.kind == "ce_multi_head":
        return lambda out, y, batch, state, consts: (
            {"loss_ce": losses.ce_multi_head_loss(out["logits"], y, batch["dataset_id"],
                                                  consts["dataset_of_class"])}, None)
    terms_on = enabled_terms(config)

    def ms3_terms(out, y, batch, state, consts):
        pos = positives(state, consts, warmup, top_k) if lc.multilabel else None
        terms, pred = {}, None
        for term in terms_on:
            target, valid = term.target(state, consts)
            value, prediction = term.loss(out[term.head], jax.lax.stop_gradient(target), valid, y,
                                          pos, lc.tau, chunk, product_dtype)
            terms[f"loss_{term.name}"] = value if term.weight is None else lc[term.weight] * value
            pred = prediction if prediction is not None else pred
        return terms, pred

    return ms3_terms


def update_memory(state: TrainState, keys_visual: jax.Array | None, bank_labels: jax.Array,
                  emb_relations: jax.Array, y: jax.Array, consts: Mapping[str, jax.Array],
                  rng: jax.Array, config: ml_collections.ConfigDict,
                  data_shards: int = 1) -> tuple[TrainState, Metrics]:
    """The memory of MS3 after a parameter update: the momentum encoder's visual keys enqueued
    into the per-class bank and V from it (Eq. 4; `keys_visual` None: no visual branch), the
    running cross-modal similarity S (Eq. 5) from `emb_relations` (stop-gradient pixel
    embeddings) and the number of pairs of the multi-label mapping Ỹ it now gives (Eq. 6)."""
    metrics: Metrics = {}
    if keys_visual is not None:
        bank = memory_bank.enqueue(state.bank, keys_visual, bank_labels, rng, config.bank.per_class)
        v, v_valid = memory_bank.visual_embeddings(bank, state.visual_emb, state.visual_valid)
        state = state.replace(bank=bank, visual_emb=v, visual_valid=v_valid)
        metrics["visual_classes"] = jnp.sum(v_valid)
    text = consts["text"]
    batch_sim, count = relations.segment_similarity(
        emb_relations, y, text, text.shape[0],
        chunk=chunking.batch_chunk(config.loss.chunk, data_shards))
    sim = relations.update_similarity(state.sim, batch_sim, count, config.relations.momentum,
                                      state.sim_seen)
    seen = relations.update_seen(state.sim_seen, count)
    state = state.replace(sim=sim, sim_seen=seen)
    warmup = config.relations.warmup_steps if config.loss.multilabel else 0
    metrics["relations"] = jnp.sum(positives(state, consts, warmup,
                                             config.relations.get("top_k", 0)))
    return state, metrics


def make_train_step(config: ml_collections.ConfigDict, model: MS3Encoder,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule, data_shards: int = 1,
                    platform: str = "cpu") -> Callable[..., tuple[TrainState, Metrics]]:
    """`train_step(state, batch, consts) -> (state, metrics)`, pure; the loss is chosen here, once.
    `data_shards`: devices the batch is split over (`loss.chunk` is per device); `platform`: of
    the devices the step is compiled for (`sharding.platform_of`).

    consts: `text` T [|Y|, C], `other_dataset` [|Y|, |Y|] bool, `dataset_of_class` [|Y|],
    `name_id` [|Y|] int32 (class -> id of its name; App. D agreement is per name).
    Order (MoCo): loss and gradients of the online encoder F; parameter and EMA updates; the
    updated momentum encoder F-hat embeds the batch for the bank; `update_memory` (Eq. 4-6).
    With `data.unlabeled` (App. D) -2 pixels get pseudo-labels from this forward pass
    (`pseudo_labels.label_unlabeled_pixels`; metrics `pseudo_fraction`, `pseudo_agreement`).
    """
    lc = config.loss
    ms3 = lc.kind == "ms3"
    use_vis = ms3 and lc.use_visual
    ema_model = model.clone(heads=("visual",)) if use_vis else None
    # MS3 with the heads at the ASPP reads no stride-4 decoder map: skip computing it (its
    # variables, never trained -- `deeplab.untrained_subtrees` -- keep their values).
    decoder = not (ms3 and model.heads_at == "aspp" and model.num_classes is None)
    loss_terms = make_loss_terms(config, data_shards)
    chunk = chunking.batch_chunk(config.loss.chunk, data_shards)
    # On GPUs the EMA parameters are written before the momentum encoder reads them: fused into
    # its weight casts, XLA:GPU cannot write them in place (a copy per parameter); XLA:TPU fuses
    # them well (docs/choices.md, "The EMA apart on GPUs").
    ema_apart = jax.lax.optimization_barrier if platform == "gpu" else (lambda tree: tree)
    # App. D: pixels of unlabeled images (label -2) get multimodal pseudo-labels; they enter the
    # losses, enter the bank only with pseudo.enter_bank, and never S (Eq. 5 estimates relations
    # between ground-truth classes) nor acc_language.
    pseudo = uses_unlabeled(config)
    threshold = float(config.pseudo.threshold) if pseudo else 0.0
    enter_bank = pseudo and bool(config.pseudo.enter_bank)

    def loss_fn(params, state: TrainState, batch: Batch, consts, rng):
        out, mutated = model.apply({"params": params, "batch_stats": state.batch_stats},
                                   batch["image"], train=True, decoder=decoder,
                                   mutable=["batch_stats"], rngs={"dropout": rng})
        grid = next(out[k] for k in ("language", "visual", "logits") if k in out).shape[1:3]
        y = labels.downsample_labels(batch["label"], grid)
        y_fit, pseudo_metrics = y, {}
        if pseudo:
            y_fit, pseudo_metrics = pseudo_labels.label_unlabeled_pixels(
                y, out["language"], out["visual"], consts["text"], state.visual_emb,
                state.visual_valid, consts["name_id"], threshold=threshold, tau=lc.tau,
                chunk=chunk)
        with jax.named_scope("losses"):
            terms, pred = loss_terms(out, y_fit, batch, state, consts)
        return sum(terms.values()), Forward(terms, pseudo_metrics, out, y, y_fit, pred,
                                            mutated["batch_stats"])

    def train_step(state: TrainState, batch: Batch, consts: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        rng_drop, rng_bank = jax.random.split(rng)
        (loss, fwd), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, batch, consts, rng_drop)
        # the parameters' own layout (row-major), not cuDNN's filter layout: docs/choices.md,
        # "Gradients in the parameters' layout"
        grads = jax.tree_util.tree_map(sharding.row_major, grads)
        with jax.named_scope("optimizer"):  # names for benchmarks/accelerators.py --breakdown
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            momentum = config.ema_momentum
            new = state.replace(
                step=state.step + 1, params=params, batch_stats=fwd.batch_stats, opt_state=opt_state,
                ema_params=ema_update(state.ema_params, params, momentum),
                ema_batch_stats=ema_update(state.ema_batch_stats, fwd.batch_stats, momentum))
        metrics: Metrics = {"loss": loss, "lr": schedule(state.step), **fwd.terms, **fwd.pseudo}
        if ms3:
            keys = None
            if use_vis:  # keys of the updated momentum encoder, batch-statistics BN (MoCo)
                with jax.named_scope("ema_apart"):  # benchmarks/accelerators.py STEP_BARRIER_SCOPES
                    ema_params = ema_apart(new.ema_params)
                with jax.named_scope("momentum_encoder"):
                    keys = ema_model.apply(
                        {"params": ema_params, "batch_stats": new.ema_batch_stats},
                        batch["image"], train=True, decoder=decoder,
                        mutable=["batch_stats"])[0]["visual"]
            emb = jax.lax.stop_gradient(fwd.out[config.relations.pixel_head])
            with jax.named_scope("memory"):
                new, memory_metrics = update_memory(
                    new, keys, fwd.labels_fit if enter_bank else fwd.labels, emb, fwd.labels,
                    consts, rng_bank, config, data_shards)
            metrics.update(memory_metrics)
        if fwd.prediction is not None:  # the language term's nearest-T class (Eq. 1)
            metrics["acc_language"] = losses.prediction_accuracy(fwd.prediction, fwd.labels,
                                                                 consts["text"].shape[0])
        return new, metrics

    return train_step


class Trainer(training.Trainer):
    """The pretraining stage on the training base: its model, optimizer, constants and step."""

    def __init__(self, config: ml_collections.ConfigDict, label_space: LabelSpace,
                 text_KxC: np.ndarray | None, num_steps: int, devices: list | None = None,
                 pipeline: Any = None, held_out: Mapping[str, np.ndarray] | None = None):
        super().__init__(config, devices, ("image", "label", "dataset_id"))
        self.label_space, self.pipeline, self.held_out = label_space, pipeline, dict(held_out or {})
        k = label_space.num_classes
        if text_KxC is None:  # CE baselines do not use T; a placeholder keeps one step signature
            text_KxC = np.zeros((k, config.model.emb_dim), np.float32)
        if text_KxC.shape != (k, config.model.emb_dim):
            raise ValueError(f"text embeddings have shape {text_KxC.shape}, expected "
                             f"[{k}, model.emb_dim={config.model.emb_dim}]")
        self.model = build_model(config, k, self.platform)
        self.num_steps = num_steps
        self.tx = optim.make_optimizer(config, num_steps)
        self.compile_step(
            make_train_step(config, self.model, self.tx, optim.lr_schedule(config, num_steps),
                            self.mesh.size, self.platform),
            {"text": jnp.asarray(text_KxC, jnp.float32),
             "other_dataset": relations.other_dataset_matrix(label_space.dataset_of_class),
             "dataset_of_class": jnp.asarray(label_space.dataset_of_class),
             "name_id": jnp.asarray(labels.distinct_names(label_space.names)[1])})

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, devices: list | None = None) -> "Trainer":
        """Checks `config` (before any long work), then builds the data stream, T and the step."""
        check_config(config, len(jax.devices() if devices is None else devices))
        check_text_source(config)
        label_space = LabelSpace.from_datasets(list(config.data.datasets))
        pipe = training.union_pipeline(config, label_space)
        if pipe.unlabeled_source is not None:
            logging.info("unlabeled images (App. D): %d from %r, ratio %.3g of each batch",
                         len(pipe.unlabeled_source), pipe.unlabeled, pipe.unlabeled_ratio)
        num_steps = training.num_train_steps(config, pipe.dataset_sizes)
        trainer = cls(config, label_space, resolve_text_embeddings(config, label_space), num_steps,
                      devices, pipe)
        trainer.held_out = held_out_text_embeddings(config)
        return trainer

    def init_state(self, rng: jax.Array, resuming: bool = False) -> TrainState:
        """The state, created directly with its (replicated) sharding; the backbone from
        `model.init_from` unless `resuming`.

        `model.dtype='float64'` (under `jax.enable_x64`) makes every floating leaf float64
        (docs/choices.md, "8 devices == 1 device, tested in float64")."""
        cfg = self.config
        float64 = cfg.model.dtype == "float64"

        def init(rng):
            init_rng, state_rng = jax.random.split(rng)
            images = jnp.zeros((1, cfg.data.crop_size, cfg.data.crop_size, 3), jnp.uint8)
            variables = self.model.init(init_rng, images)
            state = init_train_state(variables, self.tx, self.label_space.num_classes,
                                     cfg.model.emb_dim, cfg.bank.slots, jnp.dtype(cfg.bank.dtype),
                                     state_rng)
            if float64:
                state = jax.tree_util.tree_map(
                    lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                    state)
            return state

        state = jax.jit(init, out_shardings=self.replicated)(rng)
        if cfg.model.get("init_from") and not resuming:
            state = init_backbone_from(state, cfg.model.init_from, self)
        return state

    def evaluate(self, step: int, state: TrainState, workdir: str, writer: Any | None) -> None:
        every = self.config.get("eval_every", 0)
        if every and (step % every == 0 or step == self.num_steps):
            run_evaluation(self.config, self, state, step, workdir, writer, self.held_out)

    def finish(self, state: TrainState, history: list[dict[str, float]], end: int, workdir: str,
               writer: Any | None) -> list[dict[str, float]]:
        """The Tab. 8-style relations report of a finished MS3 run; returns the logged metrics."""
        if jax.process_index() == 0 and self.config.loss.kind == "ms3" and end == self.num_steps:
            report = write_relations_report(workdir, state, self.label_space,
                                            self.consts["other_dataset"],
                                            self.config.relations.get("top_k", 0))
            logging.info("%s (Eq. 6); the table (paper Tab. 8 form) is in %s",
                         report.splitlines()[0], os.path.join(workdir, "relations.txt"))
            if writer is not None:
                writer.add_text("relations", "    " + report.replace("\n", "\n    "), end)
        return history


def resolve_text_embeddings(config: ml_collections.ConfigDict, label_space: LabelSpace) -> np.ndarray | None:
    """T from `text.embeddings`: stage 1's npz, or TEMPLATE for `text.clip` with the hand
    template (the "original CLIP" rows of Tab. 4, an ablation: asked for, never a fallback)."""
    if config.loss.kind != "ms3":
        return None
    source = config.text.embeddings
    if source != text_embeddings.TEMPLATE:
        return text_embeddings.load_text_embeddings(source, label_space)
    logging.info("T from %s with the hand template %r (text.embeddings=%r)", config.text.clip,
                 config.text.template, text_embeddings.TEMPLATE)
    return text_embeddings.template_text_embeddings(config.text.clip, label_space, config.text.template)


def held_out_text_embeddings(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """{dataset: T [K_d, C]} for `eval.held_out`: datasets outside pretraining, evaluated with the
    language head by their own class names. T comes from the source of the pretraining T: stage
    1's adapted text model (the `text_model/` next to `text.embeddings`) re-embeds any names;
    TEMPLATE: `text.clip` with the hand template."""
    held_out = tuple((config.get("eval") or {}).get("held_out") or ())
    if not held_out or not config.get("eval_every"):
        return {}
    if overlap := [d for d in held_out if d in config.data.datasets]:
        raise ValueError(f"eval.held_out={held_out}: {overlap} are pretraining datasets "
                         "(data.datasets), not held out")
    if config.loss.kind != "ms3" or not config.loss.use_language:
        raise ValueError("eval.held_out segments by nearest T: it needs loss.kind='ms3' with "
                         "loss.use_language")
    spaces = {d: LabelSpace.from_datasets([d]) for d in held_out}  # unknown names fail here
    if config.text.embeddings == text_embeddings.TEMPLATE:
        return {d: text_embeddings.template_text_embeddings(config.text.clip, ls, config.text.template)
                for d, ls in spaces.items()}
    text_dir = os.path.dirname(os.path.abspath(config.text.embeddings))
    try:
        module, params, tokenizer, ctx = adapted_text.load_adapted_text(text_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"eval.held_out={held_out} embeds their class names with stage 1's "
                                f"text model next to text.embeddings: {e}") from e
    return {d: np.asarray(clip_text.encode_classes(module, params, tokenizer, list(ls.names), ctx=ctx))
            for d, ls in spaces.items()}


def write_relations_report(workdir: str, state: TrainState, label_space: LabelSpace,
                           other_dataset: jax.Array, top_k: int = 0) -> str:
    """Tab. 8-style report of the final multi-label mapping -> W/relations.txt (a summary line,
    '#' lines on how to read it, one line per mapped class: `relations.relations_report`) and
    W/relations.json (one record per directed pair)."""
    sim, seen = np.asarray(jax.device_get(state.sim)), np.asarray(jax.device_get(state.sim_seen))
    mask = np.asarray(relations.multilabel_mask(sim, np.asarray(other_dataset), seen, top_k))
    ds_of = [label_space.dataset_names[d] for d in label_space.dataset_of_class]
    report = relations.relations_report(mask, sim, list(label_space.names), ds_of, top_k)
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
    """Pretrain into `workdir`, resuming from its latest checkpoint; returns the logged metrics
    (`training.run`: `stop_at` ends the run after that step, as a preemption would)."""
    return training.run(Trainer.from_config(config), workdir, stop_at)


def run_evaluation(config: ml_collections.ConfigDict, trainer: Trainer, state: TrainState,
                   step: int, workdir: str, writer: Any | None,
                   held_out: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """`pretrain_eval` on every dataset's validation split at `step` (and on each held-out
    dataset's, language head, `held_out_text_embeddings`): one console line, TensorBoard
    `eval/<dataset>/<head>/<metric>`, and the history in W/results.json."""
    lc = config.loss
    if lc.kind != "ms3":
        heads = {"logits": None}
    else:
        heads = {**({"language": trainer.consts["text"]} if lc.use_language else {}),
                 **({"visual": state.visual_emb} if lc.use_visual else {})}
    ec = config.get("eval") or {}
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    # (label space, heads) per evaluated group: the pretraining datasets, then each held-out one.
    groups = [(trainer.label_space, heads)] + [
        (LabelSpace.from_datasets([d]), {"language": t_KxC}) for d, t_KxC in (held_out or {}).items()]
    results = {}
    if jax.process_index() == 0:
        logging.info("step %d: evaluating %s on their validation splits (up to %s images each; "
                     "the first evaluation compiles)", step,
                     ", ".join(n for space, _ in groups for n in space.dataset_names),
                     ec.get("max_images") or "all")
    for space, group_heads in groups:
        results.update(pretrain_eval.evaluate_pretraining(
            trainer.model, variables, group_heads, space, config.data.data_dir or None,
            short_side=ec.get("short_side"), max_images=ec.get("max_images", 0)))
    entry = {"step": step, **{k: {m: float(v[m]) for m in ("mIoU", "aAcc", "mAcc")}
                              for k, v in results.items()}}
    if jax.process_index() == 0:
        logging.info("%s", pretrain_eval.summary_line(step, results))
        if writer is not None:
            for key, m in results.items():
                for name in ("mIoU", "aAcc", "mAcc"):
                    writer.add_scalar(f"eval/{key}/{name}", m[name], step)
                for cls, iou in zip(m["class_names"], m["IoU"]):
                    if not np.isnan(iou):
                        writer.add_scalar(loop.tag("eval_IoU", key, cls), iou, step)
            for space, group_heads in groups:
                for key, panel in pretrain_eval.example_panels(
                        trainer.model, variables, group_heads, space, config.data.data_dir or None,
                        short_side=ec.get("short_side")).items():
                    writer.add_image(f"examples/{key}", panel, step, dataformats="HWC")
            writer.flush()
        path = os.path.join(workdir, RESULTS_FILE)
        history = []
        if os.path.exists(path):
            with open(path) as f:
                history = [e for e in json.load(f)["eval"] if e["step"] < step]
        per_class = {k: dict(zip(v["class_names"], [None if np.isnan(x) else float(x)
                                                    for x in v["IoU"]])) for k, v in results.items()}
        with open(path, "w") as f:
            json.dump({"eval": history + [entry], "per_class_IoU": per_class}, f, indent=1)
    return entry


def init_backbone_from(state: TrainState, path: str, trainer: Trainer) -> TrainState:
    """Backbone (online and momentum) from a torchvision / MMSeg ResNet file (`model.init_from`)."""
    loaded = trainer.backbone_from_file(path, trainer.model)
    # over the fresh backbone: what no PyTorch backbone holds (a DeiT's neck) stays fresh
    params = {**state.params, "backbone": {**state.params["backbone"], **loaded["params"]}}
    stats = state.batch_stats if "batch_stats" not in loaded else {
        **state.batch_stats, "backbone": loaded["batch_stats"]}
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # own buffers: the state is donated
    return state.replace(params=params, batch_stats=stats, ema_params=copy(params),
                         ema_batch_stats=copy(stats), opt_state=trainer.tx.init(params))
