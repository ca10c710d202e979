r"""Stage 1 (paper Sec. 3.2) speed and memory on this host, its image encoders side by side.

  python benchmarks/stage1.py                          # ViT-B/16, ViT-B/32, DeepLab R50 at 224, batch 8
  python benchmarks/stage1.py --batch 2 --reps 2 --variants clip16   # quick (~3 min)

One stage-1 train step (text_adapt.make_train_step, configs/text_adapt.py at the paper's sizes)
per variant, on one device of this host, random weights of the real shapes (no checkpoint
needed): the image encoder (`clip16` / `clip32`: CLIP's ViT-B/16 or /32 through AdamW; `deeplab`:
the R50 DeepLab-v3+ language head through SGD), and every step the 13 context tokens through the
frozen ViT-B text tower for all 280 distinct names of VOC + ADE20K + COCO-Stuff (prompts padded to
`accelerators.STAGE1_PROMPT_LEN` tokens), Eq. 1 at the encoder's grid. Compute dtype: model.dtype
(bfloat16) for the image encoder, text.dtype (float32) for the text tower.

Columns: compile s; step s (median over --reps after one warm-up step); images/s; the text side
alone (context -> T -> gradient to the context, the part that does not depend on the batch) in s
and XLA's GFLOP of it; XLA's GFLOP per step; memory_analysis() of the step (arg / temp GiB); the process's peak RSS after
the variant. Accelerators: benchmarks/accelerators.py --steps stage1 (compile, HBM, kernels).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ms3_jax.data.label_space import LabelSpace  # noqa: E402
from ms3_jax.method.labels import distinct_names  # noqa: E402
from ms3_jax.models import clip_text, clip_vision  # noqa: E402
from ms3_jax.models.deeplab import encoder_from_config  # noqa: E402
from ms3_jax.stages import text_adapt

_spec = importlib.util.spec_from_file_location("ms3_bench_accel", os.path.join(REPO, "benchmarks", "accelerators.py"))
accelerators = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(accelerators)
GiB = 2 ** 30
VARIANTS = {"clip16": ("clip", 16), "clip32": ("clip", 32), "deeplab": ("deeplab", None)}


def build(variant: str, batch: int, size: int):
    """(jitted step, state, batch, consts, jitted text-side function) on one CPU device."""
    from configs.text_adapt import get_config
    encoder, patch = VARIANTS[variant]
    cfg = get_config()
    cfg.encoder, cfg.batch_size = encoder, batch
    names = LabelSpace.from_datasets(list(cfg.data.datasets)).names
    distinct, gather = distinct_names(names)
    text = clip_text.CLIPTextTower(clip_text.CLIPTextConfig(), dtype=jnp.dtype(cfg.text.dtype))
    rng = jax.random.PRNGKey(0)
    if encoder == "clip":
        model = clip_vision.CLIPVisionTower(clip_vision.CLIPVisionConfig(patch_size=patch),
                                            dtype=jnp.dtype(cfg.model.dtype))
        embed = text_adapt.clip_embed(clip_vision.PixelEncoder(model))
        image_vars = model.init(rng, jnp.zeros((1, size, size, 3)))
    else:
        model = encoder_from_config(cfg.model, "cpu", heads=("language",), num_classes=None)
        embed = text_adapt.deeplab_embed(model)
        image_vars = model.init(rng, jnp.zeros((1, size, size, 3), jnp.uint8))
    tx = text_adapt.make_optimizer(cfg, 10_000, train_text_tower=False)
    step = text_adapt.make_train_step(cfg, embed, text, tx, text_adapt.image_lr_schedule(cfg, 10_000),
                                      text_adapt.text_lr_schedule(cfg, cfg.text.lr, 10_000), False)
    text_params = text.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    length = accelerators.STAGE1_PROMPT_LEN
    ids = np.random.default_rng(0).integers(0, 49406, (len(distinct), length)).astype(np.int32)
    consts = {"ids": jnp.asarray(ids), "eos": jnp.full((len(distinct),), length - 1, jnp.int32),
              "gather": jnp.asarray(gather), "text": text_params}
    params = {"image": image_vars["params"], "ctx": 0.02 * jax.random.normal(rng, (13, 512))}
    state = text_adapt.TextAdaptState(step=jnp.zeros((), jnp.int32), params=params,
                                      batch_stats=image_vars.get("batch_stats", {}),
                                      opt_state=tx.init(params), rng=rng)
    images = np.random.default_rng(1).integers(0, 256, (batch, size, size, 3), np.uint8)
    labels = np.random.default_rng(2).integers(0, len(names), (batch, size, size)).astype(np.int32)

    def text_side(ctx, consts):  # T of all distinct names and the gradient to the context
        def loss(ctx):
            t = text.apply({"params": consts["text"]}, consts["ids"], consts["eos"], ctx,
                           method=clip_text.CLIPTextTower.encode_prompts)
            return jnp.sum(t ** 2)
        return jax.grad(loss)(ctx)

    return (jax.jit(step, donate_argnums=0), state, {"image": jnp.asarray(images), "label": jnp.asarray(labels)},
            consts, jax.jit(text_side))


def timed(fn, reps: int) -> float:
    fn()  # warm-up (compiled already)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="clip16,clip32,deeplab")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} stage 1 on {jax.devices()[0].device_kind} "
          f"({os.cpu_count()} cores), batch {a.batch} @{a.size}, median of {a.reps}", flush=True)
    print("| variant | compile s | step s | images/s | text side s | text GFLOP | GFLOP | arg GiB "
          "| temp GiB | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for variant in a.variants.split(","):
        step, state, batch, consts, text_side = build(variant, a.batch, a.size)
        t = time.perf_counter()
        compiled = step.lower(state, batch, consts).compile()
        compile_s = time.perf_counter() - t
        m = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, list) else cost) or {}
        holder = [state]

        def run():
            holder[0], metrics = step(holder[0], batch, consts)
            jax.block_until_ready(metrics["loss"])

        step_s = timed(run, a.reps)
        ctx = holder[0].params["ctx"]
        text_cost = text_side.lower(ctx, consts).compile().cost_analysis()
        text_cost = (text_cost[0] if isinstance(text_cost, list) else text_cost) or {}
        jax.block_until_ready(text_side(ctx, consts))
        text_s = timed(lambda: jax.block_until_ready(text_side(ctx, consts)), a.reps)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
        print(f"| {variant} | {compile_s:.0f} | {step_s:.2f} | {a.batch / step_s:.2f} | {text_s:.2f} "
              f"| {text_cost.get('flops', 0) / 1e9:.0f} | {cost.get('flops', 0) / 1e9:.0f} | {m.argument_size_in_bytes / GiB:.2f} "
              f"| {m.temp_size_in_bytes / GiB:.2f} | {rss:.1f} |", flush=True)


if __name__ == "__main__":
    main()
