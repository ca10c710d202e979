"""Stage 1: adapt CLIP's language embeddings to the union segmentation dataset (Sec. 3.2, Fig. 2).

M learnable context vectors replace the hand template (``[W]_1 .. [W]_M [CLS].``, CoOp) and are
trained jointly with an image encoder (``encoder``: 'clip', CLIP's own image tower -- the ViT
of a Hugging Face CLIP or the ResNet of an open_clip one, Tab. 5 -- by default, or 'deeplab')
by the pixel-embedding pairing loss (Eq. 1); Tab. 1 / Tab. 5. What is trained,
how T is computed and the outputs in the workdir: docs/choices.md, "Stage 1: what is trained",
"How T is computed each step", "Stage 1 length and outputs".
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from ms3_jax.data.label_space import LabelSpace
from ms3_jax.engine import optim, training
from ms3_jax.method import adapted_text, chunking, labels, losses, text_embeddings
from ms3_jax.models import clip_text, clip_vision, open_clip_format
from ms3_jax.models.clip_resnet import CLIPResNetTower
from ms3_jax.models.clip_text import CLIPTextTower
from ms3_jax.models.clip_vision import CLIPVisionTower
from ms3_jax.models.deeplab import MS3Encoder, encoder_from_config, l2_normalize

REPORT_FILE = "similarity_report.json"
OPTIMIZERS = ("sgd", "adamw")
ENCODERS = ("clip", "deeplab")
# text.frozen_steps when unset: docs/choices.md, "No frozen-context phase with CLIP's encoder;
# 20% with DeepLab's".
DEFAULT_FROZEN_STEPS = {"clip": 0.0, "deeplab": 0.2}

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
# (params, batch_stats, uint8 images [B, H, W, 3], rng) -> (unit pixel embeddings [B, h, w, C],
# new batch_stats): the image side of Eq. 1.
EmbedFn = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


@struct.dataclass
class TextAdaptState:
    """step; trainable params {'image': encoder, 'ctx': [M, width], 'text': tower (if trained)};
    the encoder's BatchNorm statistics; optimiser state; base RNG key."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


def mean_pairwise_cosine(emb_UxC: Any) -> Any:
    """Mean cosine over all pairs of distinct rows (Tab. 1 'mean'); rows are unit vectors."""
    xp = jnp if isinstance(emb_UxC, jax.Array) else np
    n = emb_UxC.shape[0]
    sim_UxU = emb_UxC @ emb_UxC.T
    return (xp.sum(sim_UxU) - xp.trace(sim_UxU)) / max(n * (n - 1), 1)


def frozen_fraction(config: ml_collections.ConfigDict) -> float:
    """``text.frozen_steps``, or when unset the encoder's default (``DEFAULT_FROZEN_STEPS``)."""
    value = config.text.get("frozen_steps")
    return float(DEFAULT_FROZEN_STEPS[config.encoder] if value is None else value)


def text_lr_schedule(config: ml_collections.ConfigDict, peak: float, num_steps: int) -> optax.Schedule:
    """0 for the first ``frozen_fraction`` of training (the context waits for the image encoder
    to tell classes apart), then linear warm-up and cosine decay to 0."""
    start = int(round(frozen_fraction(config) * num_steps))
    cosine = optim.warmup_cosine(peak, config.optim.warmup_steps, max(num_steps - start, 1))
    if not start:
        return cosine
    return optax.join_schedules([optax.constant_schedule(0.0), cosine], [start])


def _text_optimizer(kind: str, schedule: optax.Schedule, tc: ml_collections.ConfigDict,
                    mask: Any = None) -> optax.GradientTransformation:
    if kind == "sgd":  # CoOp: SGD with momentum, cosine
        return optim.sgd(schedule, tc.momentum, tc.weight_decay, mask)
    return optax.adamw(schedule, weight_decay=tc.weight_decay, mask=mask)


def image_lr_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """The image encoder's lr: stage 2's (``optim``) for DeepLab; ``image_tower.lr`` for CLIP's
    tower; both with warm-up and cosine decay to 0."""
    if config.encoder == "deeplab":
        return optim.lr_schedule(config, num_steps)
    return optim.warmup_cosine(config.image_tower.lr, config.optim.warmup_steps, num_steps)


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int,
                   train_text_tower: bool) -> optax.GradientTransformation:
    """The image encoder: the paper's SGD for DeepLab (as stage 2), AdamW for CLIP's ViT (as
    DenseCLIP fine-tunes it); SGD or AdamW for the context (and the text tower) with their own
    lr; all with warm-up and cosine decay to 0 (optax.multi_transform)."""
    tc = config.text
    if config.encoder == "deeplab":
        image_tx = optim.make_optimizer(config, num_steps)
    else:
        image_tx = optax.adamw(image_lr_schedule(config, num_steps),
                               weight_decay=config.image_tower.weight_decay,
                               mask=optim.weight_decay_mask)
    txs = {"image": image_tx,
           "ctx": _text_optimizer(tc.optimizer, text_lr_schedule(config, tc.lr, num_steps), tc)}
    if train_text_tower:
        txs["text"] = _text_optimizer(tc.optimizer, text_lr_schedule(config, tc.tower_lr, num_steps),
                                      tc, optim.weight_decay_mask)
    part_of = lambda params: {k: jax.tree_util.tree_map(lambda _, k=k: k, v)  # noqa: E731
                             for k, v in params.items()}
    return optax.multi_transform(txs, part_of)


def deeplab_embed(model: MS3Encoder) -> EmbedFn:
    """The MS3 encoder's language head (unit norm per pixel); updates its BatchNorm statistics."""

    def embed(params, batch_stats, images, rng):
        out, mutated = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                   train=True, mutable=["batch_stats"], rngs={"dropout": rng})
        return out["language"], mutated["batch_stats"]

    return embed


def clip_embed(encoder: clip_vision.PixelEncoder) -> EmbedFn:
    """CLIP's dense embeddings (the ViT's patch tokens, or the ResNet's stride-32 map, Tab. 5),
    L2-normalised per location; pixels normalised as CLIP's processor does. The ResNet's
    BatchNorm statistics are read, never updated (the ViT has none)."""

    def embed(params, batch_stats, images, rng):
        del rng  # CLIP's towers have no dropout
        variables = {"params": params, "batch_stats": batch_stats}
        return encoder.apply(variables, images)["language"], batch_stats

    return embed


def make_train_step(config: ml_collections.ConfigDict, embed: EmbedFn,
                    text_module: CLIPTextTower, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, ctx_schedule: optax.Schedule,
                    train_text_tower: bool,
                    prompt_sharding: jax.sharding.NamedSharding | None = None,
                    ) -> Callable[..., tuple[TextAdaptState, Metrics]]:
    """``train_step(state, batch, consts) -> (state, metrics)``, pure.

    consts: ``ids`` / ``eos`` (prompt layout of the distinct names, [U, L] / [U]), ``gather``
    ([|Y|] union class -> distinct name) and, with a frozen tower, ``text`` (its params).
    ``prompt_sharding`` (the batch's, over 'data'): each device encodes its share of the U prompts
    through the text tower and T is gathered (the same T; the text side's FLOPs / devices).
    """
    tau = config.loss.tau
    chunk = chunking.batch_chunk(config.loss.chunk,
                                 1 if prompt_sharding is None else prompt_sharding.mesh.size)
    share = (lambda x: x) if prompt_sharding is None else (
        lambda x: jax.lax.with_sharding_constraint(x, prompt_sharding))
    gathered = (lambda x: x) if prompt_sharding is None else (
        lambda x: jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(prompt_sharding.mesh, jax.sharding.PartitionSpec())))

    def class_embeddings(params, consts) -> jax.Array:
        """T of the distinct names [U, C], L2-normalised; differentiable in ctx (and the tower)."""
        text_params = params["text"] if train_text_tower else consts["text"]
        t_UxC = text_module.apply({"params": text_params}, share(consts["ids"]), share(consts["eos"]),
                                  params["ctx"], method=CLIPTextTower.encode_prompts)
        return gathered(l2_normalize(share(t_UxC)))

    def loss_fn(params, batch_stats, batch: Batch, consts, rng):
        emb_BxhxwxC, batch_stats = embed(params["image"], batch_stats, batch["image"], rng)
        t_UxC = class_embeddings(params, consts)
        text_KxC = t_UxC[consts["gather"]]
        # Labels at the embeddings' grid (the patch grid for CLIP's ViT).
        y = labels.downsample_labels(batch["label"], emb_BxhxwxC.shape[1:3])
        # Eq. 1 with T not stopped: its gradient reaches the context (and the tower).
        loss = losses.pairing_loss(emb_BxhxwxC, text_KxC, y, tau=tau, chunk=chunk)
        return loss, (emb_BxhxwxC, y, text_KxC, t_UxC, batch_stats)

    def train_step(state: TextAdaptState, batch: Batch, consts: Mapping[str, Any]):
        rng = jax.random.fold_in(state.rng, state.step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (lang, y, text_KxC, t_UxC, batch_stats)), grads = grad_fn(
            state.params, state.batch_stats, batch, consts, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics: Metrics = {
            "loss": loss, "lr": schedule(state.step), "lr_ctx": ctx_schedule(state.step),
            "acc_language": losses.pixel_accuracy(jax.lax.stop_gradient(lang), text_KxC, y,
                                                  chunk=chunk, ignore_label=labels.IGNORE_LABEL),
            "mean_cos": mean_pairwise_cosine(jax.lax.stop_gradient(t_UxC)),
            "ctx_grad_norm": optax.tree.norm(grads["ctx"]),
        }
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state)
        return new, metrics

    return train_step


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Fail before any long work on settings that cannot run."""
    training.check_config(config, num_devices)
    tc = config.text
    if tc.optimizer not in OPTIMIZERS:
        raise ValueError(f"text.optimizer must be one of {OPTIMIZERS}, got {tc.optimizer!r}")
    if tc.num_ctx < 1:
        raise ValueError(f"text.num_ctx must be >= 1, got {tc.num_ctx}")
    if config.encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {config.encoder!r}")
    if not 0.0 <= frozen_fraction(config) < 1.0:
        raise ValueError(f"text.frozen_steps must be a fraction in [0, 1), got {tc.frozen_steps}")
    if config.encoder == "clip" and config.model.get("init_from"):
        raise ValueError("model.init_from initialises the DeepLab encoder; with encoder='clip' the "
                         "image tower comes from text.clip (use --config.encoder=deeplab)")


def check_emb_dim(config: ml_collections.ConfigDict, text_module: CLIPTextTower, clip: str) -> None:
    """The language head's pixel embeddings are paired with CLIP's text embeddings (Eq. 1); stage 2
    pairs them too, so ``model.emb_dim`` must match with either encoder."""
    proj = text_module.config.proj_dim
    if config.model.emb_dim != proj:
        raise ValueError(
            f"model.emb_dim={config.model.emb_dim} does not match the projection dim {proj} of the "
            f"CLIP text tower {clip}: the language head's pixel embeddings are paired with the text "
            f"embeddings (Eq. 1), so set model.emb_dim={proj} (--config.model.emb_dim={proj})")


@dataclasses.dataclass(frozen=True)
class ImageTower:
    """CLIP's vision tower as stage 1's image encoder (``encoder='clip'``): the pixel encoder
    (tower + the checkpoint's pixel statistics) and its pretrained variables."""

    encoder: clip_vision.PixelEncoder
    variables: Any

    @property
    def module(self) -> CLIPVisionTower | CLIPResNetTower:
        return self.encoder.tower


def _read_image_tower(config: ml_collections.ConfigDict, clip: str
                      ) -> tuple[Any, Any, tuple[float, ...], tuple[float, ...]]:
    """(module, variables, mean, std): a Hugging Face ViT or an open_clip ResNet (Tab. 5)."""
    dtype = jnp.dtype(config.model.dtype)
    if open_clip_format.looks_like_open_clip(clip):
        dense = config.get("image_tower", {}).get("dense", "value")
        loaded = open_clip_format.load_open_clip(clip, dtype, dense=dense)
        return loaded.tower, loaded.variables, loaded.mean, loaded.std
    module, variables = clip_vision.load_clip_vision(clip, dtype)
    mean, std = clip_vision.pixel_statistics(clip)
    return module, variables, mean, std


def load_image_tower(config: ml_collections.ConfigDict, clip: str) -> ImageTower:
    """CLIP's image tower from the stage's CLIP checkpoint (the ViT of a Hugging Face CLIP, or
    the ResNet of an open_clip one), its error naming the config field."""
    try:
        module, variables, mean, std = _read_image_tower(config, clip)
    except (OSError, ValueError) as e:
        raise type(e)(f"encoder='clip' needs CLIP's vision tower, but text.clip={clip!r} has "
                      f"none usable: {e} (a text-only checkpoint works with --config.encoder=deeplab)"
                      ) from e
    encoder = clip_vision.PixelEncoder(module, tuple(mean), tuple(std))
    if config.data.crop_size % encoder.output_stride:
        what = "output stride" if isinstance(module, CLIPResNetTower) else "patch size"
        raise ValueError(f"data.crop_size={config.data.crop_size} is not a multiple of the "
                         f"{what} {encoder.output_stride} of {clip}'s vision tower")
    if module.config.proj_dim != config.model.emb_dim:
        raise ValueError(f"the vision tower of {clip} projects to {module.config.proj_dim}, not "
                         f"model.emb_dim={config.model.emb_dim}")
    return ImageTower(encoder, variables)


class Trainer(training.Trainer):
    """Stage 1 on the training base: the prompt constants, the image encoder and the step."""

    def __init__(self, config: ml_collections.ConfigDict, label_space: LabelSpace,
                 text_module: CLIPTextTower, text_params: Any, tokenizer: Any, num_steps: int,
                 devices: list | None = None, image_tower: ImageTower | None = None,
                 pipeline: Any = None, clip: str = ""):
        super().__init__(config, devices, ("image", "label"))
        self.label_space, self.pipeline, self.clip = label_space, pipeline, clip
        self.text_module, self.tokenizer = text_module, tokenizer
        self.initial_text_params, self.initial_ctx = text_params, None
        self.train_text_tower = bool(config.text.train_text_tower)
        self.names, self.gather = labels.distinct_names(label_space.names)
        layout = clip_text.build_prompt_layout(tokenizer, self.names, config.text.num_ctx,
                                               text_module.config.max_len)
        consts = {"ids": jnp.asarray(layout.ids_UxL), "eos": jnp.asarray(layout.eos_index_U),
                  "gather": jnp.asarray(self.gather)}
        if not self.train_text_tower:
            consts["text"] = text_params
        if (config.encoder == "clip") != (image_tower is not None):
            raise ValueError(f"encoder={config.encoder!r} "
                             + ("needs CLIP's image tower" if image_tower is None else
                                "takes no CLIP image tower"))
        self.image_tower = image_tower
        if image_tower is not None:
            self.model = image_tower.module
            embed = clip_embed(image_tower.encoder)
        else:
            self.model = encoder_from_config(config.model, self.platform, heads=("language",),
                                             num_classes=None)
            embed = deeplab_embed(self.model)
        self.num_steps = num_steps
        self.tx = make_optimizer(config, num_steps, self.train_text_tower)
        self.compile_step(make_train_step(config, embed, text_module, self.tx,
                                          image_lr_schedule(config, num_steps),
                                          text_lr_schedule(config, config.text.lr, num_steps),
                                          self.train_text_tower,
                                          self.data_sharding if self.mesh.size > 1 else None), consts)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, devices: list | None = None) -> "Trainer":
        """Checks `config` (before any long work), then loads CLIP and builds the data stream and
        the step."""
        check_config(config, len(jax.devices() if devices is None else devices))
        label_space = LabelSpace.from_datasets(list(config.data.datasets))
        clip = resolve_clip(config)
        text_module, text_params, tokenizer = load_clip(clip, jnp.dtype(config.text.dtype))
        check_emb_dim(config, text_module, clip)
        image_tower = load_image_tower(config, clip) if config.encoder == "clip" else None
        pipe = training.union_pipeline(config, label_space)
        num_steps = training.num_train_steps(config, pipe.dataset_sizes)
        trainer = cls(config, label_space, text_module, text_params, tokenizer, num_steps, devices,
                      image_tower, pipe, clip)
        encoder = ("CLIP's %s (labels at its %dx%d grid)"
                   % ((type(image_tower.module).__name__,)
                      + (config.data.crop_size // image_tower.encoder.output_stride,) * 2)
                   if image_tower else "the DeepLab encoder's language head")
        logging.info("stage 1: adapting %d context vectors of %s with %s on %s (|Y| = %d, %d "
                     "distinct names), text tower %s, context frozen for the first %d of %d steps",
                     config.text.num_ctx, clip, encoder, list(config.data.datasets),
                     label_space.num_classes, len(trainer.names),
                     "trained" if trainer.train_text_tower else "frozen",
                     round(frozen_fraction(config) * num_steps), num_steps)
        return trainer

    def init_state(self, rng: jax.Array, resuming: bool = False) -> TextAdaptState:
        """The state, created directly with its (replicated) sharding: the context from
        ``text.ctx_init`` (or random), the image encoder from CLIP, fresh, or ``model.init_from``
        (unless ``resuming``)."""
        config = self.config
        self.initial_ctx = clip_text.init_context(jax.random.fold_in(rng, 1), self.initial_text_params,
                                                  self.tokenizer, config.text.num_ctx,
                                                  config.text.ctx_init or None)

        def init(rng, ctx_MxD, text_params, image_variables):
            init_rng, state_rng = jax.random.split(rng)
            if image_variables is None:  # DeepLab: a fresh encoder
                size = config.data.crop_size
                images = jnp.zeros((1, size, size, 3), jnp.uint8)
                image_variables = self.model.init(init_rng, images)
            params = {"image": image_variables["params"], "ctx": ctx_MxD}
            if self.train_text_tower:
                params["text"] = text_params
            return TextAdaptState(step=jnp.zeros((), jnp.int32), params=params,
                                  batch_stats=image_variables.get("batch_stats", {}),
                                  opt_state=self.tx.init(params), rng=state_rng)

        text_params = self.initial_text_params if self.train_text_tower else None
        image_variables = None if self.image_tower is None else self.image_tower.variables
        # docs/choices.md, "Init compile at optimisation level 0"
        options = {"xla_backend_optimization_level": 0} if self.platform == "cpu" else None
        state = jax.jit(init, out_shardings=self.replicated, compiler_options=options)(
            rng, self.initial_ctx, text_params, image_variables)
        if config.model.get("init_from") and not resuming:
            state = _init_backbone_from(state, config.model.init_from, self)
        return state

    def evaluate(self, step: int, state: TextAdaptState, workdir: str, writer: Any | None) -> None:
        """Stage 1 evaluates at its end only (`finish`: Tab. 1)."""

    def finish(self, state: TextAdaptState, history: list[dict[str, float]], end: int,
               workdir: str, writer: Any | None) -> list[dict[str, float]]:
        """At the last step: text_embeddings.npz, text_model/ and the Tab. 1 report (module
        docstring); returns the logged metrics."""
        if end == self.num_steps:
            report = _write_outputs(workdir, self, state, self.clip, self.initial_text_params,
                                    self.initial_ctx)
            if writer is not None and report:
                table = format_similarity_table(report)
                writer.add_text("tab1_similarity", "    " + table.replace("\n", "\n    "), end)
        return history

    def text_params(self, state: TextAdaptState) -> Any:
        return state.params["text"] if self.train_text_tower else self.consts["text"]


def resolve_clip(config: ml_collections.ConfigDict) -> str:
    """The CLIP checkpoint to adapt: ``text.tiny_clip_dir`` if set (a tiny *random* stand-in that
    ``python -m ms3_jax.main`` writes first, `demo.tiny_clip.write_for_config`), else ``text.clip``
    (hub id or directory)."""
    tc = config.text
    if tc.get("tiny_clip_dir"):
        return os.path.abspath(tc.tiny_clip_dir)
    if not tc.clip:
        raise ValueError("stage 1 needs a CLIP checkpoint: set text.clip (a hub id such as "
                         "'openai/clip-vit-base-patch32' or a local directory) or text.tiny_clip_dir")
    return os.path.abspath(tc.clip) if os.path.exists(tc.clip) else tc.clip


def load_clip(clip: str, dtype: Any = jnp.float32) -> tuple[CLIPTextTower, Any, Any]:
    """The text tower (module, params, tokenizer) of a Hugging Face CLIP (``load_clip_text``) or
    an open_clip CLIP ResNet (Tab. 5), the error prefixed by the config field and a warning for
    stand-ins."""
    open_clip = open_clip_format.looks_like_open_clip(clip)
    try:
        if open_clip:
            loaded_rn = open_clip_format.load_open_clip(clip, text_dtype=dtype)
            loaded = loaded_rn.text_module, loaded_rn.text_params, loaded_rn.tokenizer
        else:
            loaded = clip_text.load_clip_text(clip, dtype)
    except (OSError, ValueError) as e:
        try:
            wrapped = type(e)(f"text.clip={clip!r} could not be loaded: {e}")
        except Exception:  # an exception type with another signature: keep it as it is
            raise e from None
        raise wrapped from e
    if (open_clip_format.is_random_standin(clip) if open_clip
            else os.path.isdir(clip) and clip_text.is_random_standin(clip)):
        logging.warning("CLIP %s is a tiny RANDOM stand-in (no pretrained weights): the adapted "
                        "embeddings demonstrate the code path, not language knowledge", clip)
    return loaded


def similarity_report(names: Sequence[str], embeddings: Mapping[str, np.ndarray],
                      pairs: Sequence[Sequence[str]], template: str) -> dict[str, Any]:
    """Tab. 1: cosine of the given class pairs and the mean over all pairs of distinct names.

    ``embeddings``: [U, C] unit rows of ``names`` per method, e.g. 'template' (the hand template),
    'initial' (the context at initialisation) and 'adapted'.
    """
    embeddings = {k: np.asarray(v) for k, v in embeddings.items()}
    key = lambda n: " ".join(n.lower().split())  # noqa: E731
    index = {key(n): i for i, n in enumerate(names)}
    rows = []
    for a, b in pairs:
        if missing := [n for n in (a, b) if key(n) not in index]:
            rows.append({"pair": [a, b], "skipped": f"{', '.join(map(repr, missing))} not in the "
                                                    "union label space"})
            continue
        i, j = index[key(a)], index[key(b)]
        rows.append({"pair": [a, b], **{k: float(e[i] @ e[j]) for k, e in embeddings.items()}})
    return {"template": template, "num_names": len(names), "pairs": rows,
            "mean": {k: float(mean_pairwise_cosine(e)) for k, e in embeddings.items()}}


_ROW_LABELS = {"template": "CLIP {template!r}", "initial": "CLIP + context at init",
               "adapted": "CLIP + M_I (adapted)"}


def format_similarity_table(report: Mapping[str, Any]) -> str:
    """The report as paper Tab. 1 (rows: template, context at init, adapted; last column: mean)."""
    shown = [r for r in report["pairs"] if "skipped" not in r]
    heads = [f"'{r['pair'][0]}' vs. '{r['pair'][1]}'" for r in shown] + ["mean"]
    widths = [max(len(h), 6) for h in heads]
    methods = list(report["mean"])
    row_labels = [_ROW_LABELS.get(m, m).format(template=report["template"]) for m in methods]
    label_w = max(map(len, row_labels))
    lines = [f"Tab. 1 -- cosine similarity of language embeddings ({report['num_names']} distinct "
             "class names)",
             " " * label_w + "  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    for method, label in zip(methods, row_labels):
        values = [r[method] for r in shown] + [report["mean"][method]]
        lines.append(label.ljust(label_w) + "  "
                     + "  ".join(f"{v:.2f}".rjust(w) for v, w in zip(values, widths)))
    lines += [f"(skipped {r['pair'][0]!r} vs. {r['pair'][1]!r}: {r['skipped']})"
              for r in report["pairs"] if "skipped" in r]
    return "\n".join(lines)


def _init_backbone_from(state: TextAdaptState, path: str, trainer: Trainer) -> TextAdaptState:
    """Image-encoder backbone from a torchvision / MMSeg ResNet file (``model.init_from``)."""
    loaded = trainer.backbone_from_file(path, trainer.model)
    image = state.params["image"]  # what no PyTorch backbone holds (a DeiT's neck) stays fresh
    params = {**state.params, "image": {**image, "backbone": {**image["backbone"],
                                                              **loaded["params"]}}}
    stats = state.batch_stats if "batch_stats" not in loaded else {
        **state.batch_stats, "backbone": loaded["batch_stats"]}
    return state.replace(params=params, batch_stats=stats, opt_state=trainer.tx.init(params))


def _write_outputs(workdir: str, trainer: Trainer, state: TextAdaptState, clip: str,
                   initial_text_params: Any, initial_ctx_MxD: jax.Array) -> dict[str, Any]:
    """T -> npz, the adapted text model, and the Tab. 1 report (template vs adapted)."""
    config, ls = trainer.config, trainer.label_space
    module, tokenizer = trainer.text_module, trainer.tokenizer
    ctx_MxD = jax.device_get(state.params["ctx"])
    text_params = jax.device_get(trainer.text_params(state))
    adapted_UxC = np.asarray(clip_text.encode_classes(module, text_params, tokenizer, trainer.names,
                                                      ctx=ctx_MxD))
    adapted_text.save_adapted_text(
        os.path.join(workdir, adapted_text.TEXT_MODEL_DIR), module, text_params, tokenizer, ctx_MxD,
        clip, trainer.image_tower.encoder if trainer.image_tower else None,
        ctx_init=config.text.ctx_init, train_text_tower=trainer.train_text_tower,
        encoder=config.encoder)
    if jax.process_index() != 0:
        return {}
    text_embeddings.save_text_embeddings(os.path.join(workdir, text_embeddings.FILE_NAME), ls,
                                         adapted_UxC[trainer.gather], source="adapted")
    encode = lambda ctx: np.asarray(clip_text.encode_classes(  # noqa: E731
        module, initial_text_params, tokenizer, trainer.names, ctx, config.text.template))
    embeddings = {"template": encode(None), "initial": encode(initial_ctx_MxD),
                  "adapted": adapted_UxC}
    report = similarity_report(trainer.names, embeddings, config.text.report_pairs,
                               config.text.template)
    with open(os.path.join(workdir, REPORT_FILE), "w") as f:
        json.dump(report, f, indent=1)
    print(format_similarity_table(report), flush=True)
    return report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_at: int | None = None) -> list[dict[str, float]]:
    """Stage 1 into ``workdir``, resuming from its latest checkpoint; returns the logged metrics
    (`training.run`: ``stop_at`` ends the run after that step, as a preemption would)."""
    return training.run(Trainer.from_config(config), workdir, stop_at)
