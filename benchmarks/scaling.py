r"""Cost of the MS3-specific part of the step as the label space |Y| grows.

  python benchmarks/scaling.py                                  # |Y| = 21..3000 at 8 x 56 x 56, + the step
  python benchmarks/scaling.py --batch 2 --size 64 --classes 21,342 --reps 2   # quick check
  python benchmarks/scaling.py --devices 8 --classes 342 --no_step   # collectives, 8 fake devices
  MS3_HOST_MALLOC=reuse python benchmarks/scaling.py            # the host allocator `main` takes

The MS3-specific part, alone: Eq. 6 mask from S; the pairing losses (Eq. 7, 8: language with T,
visual with V, multi-label positives on) and their gradients w.r.t. the pixel embeddings; the
pixel accuracy metric; the bank enqueue of the momentum embeddings; Eq. 4 (V from the bank);
Eq. 5 (segment-mean similarity, S update) and the new Eq. 6 mask -- the same calls, in the same
order, as `pretrain.make_train_step`. Inputs: random unit embeddings [B, H/4, W/4, 512], labels of
a few classes per image, a bank of `configs/pretrain.py`'s size (K=256 slots, P=32, bf16), and
the whole bank, V and S donated as in the real step. Time (median of interleaved reps) and the
compiled memory (XLA memory analysis) per |Y|, against the full MS3 step measured in the same
process (`--no_step` to skip). With `--devices N` (fake CPU devices) the part is also compiled
with the batch sharded over N devices and its cross-device collectives are listed.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dataset_of_class(k: int) -> Any:
    """|Y| classes split over 3 'datasets' in the proportions of VOC / ADE20K / COCO-Stuff."""
    import numpy as np

    sizes = np.array([21, 150, 171], float)
    cuts = np.round(np.cumsum(sizes / sizes.sum()) * k).astype(int)
    d = np.searchsorted(cuts, np.arange(k), side="right")
    return np.minimum(d, 2).astype(np.int32)


def make_inputs(k: int, batch: int, hw: int, dim: int, slots: int, seed: int = 0) -> dict[str, Any]:
    """Unit embeddings, labels (6 classes of one dataset per image, 10 % ignore), T, a half-full
    bank, a valid V and an S with a few relations."""
    import jax.numpy as jnp
    import numpy as np

    from ms3_jax.method import memory_bank, relations

    rng = np.random.default_rng(seed)
    ds = dataset_of_class(k)

    def unit(shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    labels = np.empty((batch, hw, hw), np.int32)
    g = max(hw // 8, 1)
    for b in range(batch):
        own = np.flatnonzero(ds == b % 3)
        classes = rng.choice(own, size=min(6, own.size), replace=False)
        coarse = rng.choice(np.append(classes, -1), size=(-(-hw // g),) * 2,
                            p=[0.9 / classes.size] * classes.size + [0.1])
        labels[b] = np.kron(coarse, np.ones((g, g), np.int32))[:hw, :hw]
    bank = memory_bank.init_bank(k, slots, dim, jnp.bfloat16)
    half_full = np.arange(slots)[None, :, None] < slots // 2  # unfilled slots hold zeros
    bank = bank.replace(feats=jnp.asarray(np.where(half_full, unit((k, slots, dim)), 0.0),
                                          jnp.bfloat16),
                        count=jnp.full((k,), slots // 2, jnp.int32),
                        ptr=jnp.full((k,), slots // 2, jnp.int32))
    sim = rng.uniform(0, 0.3, (k, k)).astype(np.float32)
    sim[np.arange(k), np.arange(k)] = 0.29
    return dict(
        carry=(bank, jnp.asarray(unit((k, dim))), jnp.ones((k,), bool), jnp.asarray(sim),
               jnp.ones((k,), bool)),
        pixels=tuple(jnp.asarray(unit((batch, hw, hw, dim))) for _ in range(3)) + (jnp.asarray(labels),),
        consts=(jnp.asarray(unit((k, dim))), relations.other_dataset_matrix(ds)),
    )


def make_part(config: Any):
    """The MS3-specific computations of one step (see the module docstring), pure."""
    import jax
    import jax.numpy as jnp

    from ms3_jax.method import losses, memory_bank, relations

    lc, per_class, m = config.loss, config.bank.per_class, config.relations.momentum
    product = jnp.dtype(config.model.dtype)  # as pretrain.make_train_step

    def part(carry, pixels, consts, rng):
        bank, v, v_valid, sim, seen = carry
        i_l, i_v, i_hat, y = pixels
        text, other = consts
        positives = relations.multilabel_mask(sim, other, seen)

        def loss_fn(i_l, i_v):
            loss_l, pred = losses.pairing_loss_and_prediction(
                i_l, text, y, positives, None, lc.tau, chunk=lc.chunk, product_dtype=product)
            loss_v = lc.alpha * losses.pairing_loss_fast(i_v, v, y, positives, v_valid, lc.tau,
                                                         chunk=lc.chunk, product_dtype=product)
            return loss_l + loss_v, pred

        (loss, pred), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(i_l, i_v)
        acc = losses.prediction_accuracy(pred, y, text.shape[0])
        bank = memory_bank.enqueue(bank, i_hat, y, rng, per_class)
        v, v_valid = memory_bank.visual_embeddings(bank, v, v_valid)
        batch_sim, count = relations.segment_similarity(jax.lax.stop_gradient(i_v), y, text,
                                                        text.shape[0], chunk=lc.chunk)
        new_sim = relations.update_similarity(sim, batch_sim, count, m, seen)
        seen = relations.update_seen(seen, count)
        n_rel = jnp.sum(relations.multilabel_mask(new_sim, other, seen))
        return (bank, v, v_valid, new_sim, seen), (loss, grads, acc, n_rel)

    return part


def mib(x: float) -> str:
    return f"{x / 2 ** 20:9.1f}"


def collectives(hlo_text: str) -> list[str]:
    """Cross-device ops in compiled HLO text: 'all-gather f32[...]' etc."""
    out = []
    for line in hlo_text.splitlines():
        mt = re.search(r"=\s*(\S+)\s+(all-gather|all-reduce|all-to-all|collective-permute|"
                       r"reduce-scatter)(-start)?\(", line)
        if mt:
            out.append(f"{mt.group(2)} {mt.group(1)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", default="21,171,342,1000,3000")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224, help="image size; maps are size/4")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no_step", action="store_true", help="skip the full MS3 step measurement")
    ap.add_argument("--devices", type=int, default=1, help="> 1: also list collectives of the "
                    "part sharded over this many fake CPU devices")
    args = ap.parse_args()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    if REPO not in sys.path:  # after PYTHONPATH, so a checkout there can be compared
        sys.path.append(REPO)
    from ms3_jax.engine import host_memory

    host_malloc = host_memory.configure_from_env()  # MS3_HOST_MALLOC, as `ms3_jax.main` does
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from configs.pretrain import get_config
    from ms3_jax.engine import sharding

    cfg = get_config()
    hw, dim, slots = args.size // 4, cfg.model.emb_dim, cfg.bank.slots
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {args.batch} x {hw} x {hw} pixels, C={dim}, bank "
          f"K={slots} slots x P={cfg.bank.per_class} per step ({cfg.bank.dtype}), "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()}\n# {host_malloc}", flush=True)
    part = make_part(cfg)
    classes = [int(c) for c in args.classes.split(",")]
    fns, data, rows = {}, {}, {}
    dev1 = jax.devices()[:1]
    for k in classes:
        data[k] = jax.device_put(make_inputs(k, args.batch, hw, dim, slots), dev1[0])
        jitted = jax.jit(part, donate_argnums=0)
        t = time.perf_counter()
        compiled = jitted.lower(data[k]["carry"], data[k]["pixels"], data[k]["consts"],
                                jax.random.PRNGKey(0)).compile()
        mem = compiled.memory_analysis()
        rows[k] = dict(compile_s=time.perf_counter() - t, temp=mem.temp_size_in_bytes,
                       args=mem.argument_size_in_bytes, out=mem.output_size_in_bytes,
                       alias=mem.alias_size_in_bytes, times=[],
                       bank=k * slots * dim * np.dtype(cfg.bank.dtype).itemsize,
                       v=k * dim * 4, s=k * k * 4)
        fns[k] = compiled
        data[k]["carry"], _ = compiled(data[k]["carry"], data[k]["pixels"], data[k]["consts"],
                                       jax.random.PRNGKey(1))  # warm-up
        if args.devices > 1:
            mesh = sharding.data_mesh(jax.devices()[:args.devices])
            rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
            sh = jax.jit(part, in_shardings=(rep, bat, rep, rep),  # grads w.r.t. I stay sharded
                         out_shardings=(rep, (rep, (bat, bat), rep, rep)))
            spec = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                          (data[k]["carry"], data[k]["pixels"], data[k]["consts"]))
            hlo = sh.lower(*spec, jax.random.PRNGKey(0)).compile().as_text()
            ops = collectives(hlo)
            print(f"|Y|={k}: {len(ops)} collectives over {args.devices} devices: "
                  + "; ".join(sorted(set(ops), key=ops.index)), flush=True)
    step = None
    if not args.no_step:
        sys.path.insert(0, os.path.join(REPO, "benchmarks"))
        from train_step import JaxWorker

        step = JaxWorker("ms3", None, args.batch, args.size)
        print(f"MS3 step (|Y|=342, batch {args.batch} at {args.size}, config dtype) compiled in "
              f"{step.compile_s:.1f} s", flush=True)
    step_times = []
    for r in range(args.reps):
        if step is not None:
            step_times.append(step.step())
        for k in classes:
            d = data[k]
            t = time.perf_counter()
            d["carry"], out = fns[k](d["carry"], d["pixels"], d["consts"], jax.random.PRNGKey(r + 2))
            jax.block_until_ready((d["carry"], out))
            rows[k]["times"].append(time.perf_counter() - t)
    t_step = statistics.median(step_times) if step_times else float("nan")
    print(f"\nfull MS3 step (|Y|=342): {t_step:.3f} s (median of {len(step_times)}), "
          f"load {os.getloadavg()}")
    print(f"{'|Y|':>6}{'part s':>9}{'% step':>8}{'compile s':>10}{'temp MiB':>10}{'args MiB':>10}"
          f"{'bank MiB':>10}{'V MiB':>8}{'S MiB':>8}")
    for k in classes:
        r = rows[k]
        t = statistics.median(r["times"])
        print(f"{k:6d}{t:9.3f}{100 * t / t_step:8.1f}{r['compile_s']:10.1f}{mib(r['temp'])}"
              f"{mib(r['args'])}{mib(r['bank'])}{r['v'] / 2 ** 20:8.2f}{r['s'] / 2 ** 20:8.2f}")
    print("% step: the part's median time over the full step's (one |Y|=342 step; the step's own "
          "MS3 part grows with |Y| as the column shows). temp: XLA scratch of the part; args "
          "includes the donated bank / V / S.")


if __name__ == "__main__":
    main()
