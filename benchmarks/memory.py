r"""Compiled per-device memory of the MS3 pretraining step in the paper setting.

  python benchmarks/memory.py                        # 16 images / device at 224, |Y| = 342, bf16
  python benchmarks/memory.py --batch 2 --size 64    # quick check
  python benchmarks/memory.py --devices 8 --batch 128   # global batch 128 sharded over 8 fake devices

Compiles `pretrain.Trainer`'s jitted step on abstract inputs (`jax.ShapeDtypeStruct`s from
`jax.eval_shape`, nothing is allocated or run) for `configs/pretrain.py` (DeepLab-v3+ R50 OS 8,
two 512-d heads, momentum encoder, bank K = 256 slots of 512-d bf16 per class, compute dtype
bfloat16) and prints XLA's memory analysis: arguments (the state, donated, and the batch),
outputs, temporaries, and the peak estimate args + temp + out - aliased. It is the CPU
compiler's buffer assignment: it approximates, not equals, what the GPU compiler would assign
(different fusions, no cuDNN workspace, and the CPU backend may keep bf16 convolutions' operands
in float32), so leave headroom against a 16 GB V100.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V100_BYTES = 16 * 2 ** 30


def gib(x: float) -> str:
    return f"{x / 2 ** 30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16, help="global batch (per device x devices)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--devices", type=int, default=1, help="> 1: fake CPU devices, batch sharded")
    ap.add_argument("--kind", default="ms3", choices=("ms3", "ce_single_head"))
    ap.add_argument("--dtype", default="", help="override model.dtype (default: the config's)")
    args = ap.parse_args()
    if args.devices > 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}")
    if REPO not in sys.path:  # after PYTHONPATH, so a checkout there can be compared
        sys.path.append(REPO)
    import jax
    import numpy as np

    from configs.pretrain import get_config
    from ms3_jax.data.label_space import LabelSpace
    from ms3_jax.stages import pretrain

    cfg = get_config()
    cfg.batch_size = args.batch
    cfg.loss.kind = args.kind
    if args.dtype:
        cfg.model.dtype = args.dtype
    ls = LabelSpace.from_datasets(list(cfg.data.datasets))
    k, c = ls.num_classes, cfg.model.emb_dim
    text = np.zeros((k, c), np.float32) if args.kind == "ms3" else None
    trainer = pretrain.Trainer(cfg, ls, text, num_steps=10_000, devices=jax.devices()[:args.devices])
    state = jax.eval_shape(lambda rng: trainer.init_state(rng), jax.random.PRNGKey(0))
    s, b = args.size, args.batch
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), np.uint8),
             "label": jax.ShapeDtypeStruct((b, s, s), np.int32),
             "dataset_id": jax.ShapeDtypeStruct((b,), np.int32)}
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {args.kind}, global batch {b} at {s} over "
          f"{args.devices} device(s) ({b // args.devices} per device), |Y| = {k}, "
          f"model.dtype {cfg.model.dtype}", flush=True)
    t = time.perf_counter()
    compiled = trainer._step.lower(state, batch, trainer.consts).compile()
    print(f"compiled in {time.perf_counter() - t:.1f} s")
    m = compiled.memory_analysis()

    def tree_bytes(tree) -> int:
        return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))

    sizes = {"params": tree_bytes(state.params), "momentum encoder": tree_bytes(state.ema_params),
             "optimizer state": tree_bytes(state.opt_state),
             "bank (|Y| x K x C, " + str(state.bank.feats.dtype) + ")": tree_bytes(state.bank),
             "V (|Y| x C)": tree_bytes(state.visual_emb), "S (|Y| x |Y|)": tree_bytes(state.sim),
             "whole state": tree_bytes(state)}
    for name, n in sizes.items():
        print(f"  {name:<28} {n / 2 ** 20:10.2f} MiB")
    peak = (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
            - m.alias_size_in_bytes)
    print("XLA memory analysis (per device):")
    for name in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes"):
        print(f"  {name:<30} {gib(getattr(m, name))}")
    print(f"  peak estimate (args + temp + out - alias) {gib(peak)} = "
          f"{100 * peak / V100_BYTES:.0f} % of a 16 GB V100 "
          f"({'fits' if peak < 0.8 * V100_BYTES else 'TOO CLOSE / does not fit'} with 20 % headroom)")


if __name__ == "__main__":
    main()
