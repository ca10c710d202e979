r"""Time the pretraining steps on a real chip: one command on a GPU / TPU host.

  python benchmarks/device_time.py                      # ms3, ce, stage1 on one chip
  python benchmarks/device_time.py --steps ms3 --timed 30
  python benchmarks/device_time.py --devices 8 --json device_time.json   # 8 chips, 16 images each

On a GPU or TPU host (decided from `jax.devices()`, never the default backend) it compiles and
RUNS on one chip (`--devices N`: N chips, the batch over 'data', the state replicated and donated,
as `pretrain.Trainer` does) the paper's steps, built exactly as benchmarks/accelerators.py builds
them (`lower_step` / `lower_stage1` on the real devices, then `.compile()`):
  ms3     configs/pretrain.py: DeepLab-v3+ / ResNet-50, bfloat16, 16 images per chip at 224,
          |Y| = 342, both heads, bank, relations, momentum encoder, SGD;
  ce      the same with loss.kind='ce_single_head';
  stage1  configs/text_adapt.py with CLIP's ViT-B/16 image encoder and the frozen ViT-B text
          tower, 16 images per chip at 224.
A fresh state of the real shapes (the lowered step's own avals) with random weights and zero
optimiser state (`random_tree`; no checkpoint, no init to compile), random uint8 images, random
blocky labels of each image's dataset, random unit T; the frozen text tower's weights random too.
3 warm-up + 10 timed steps per kind are seconds of chip time; the three compiles take most of
the wall time (each phase's end is printed). A step kind that fails (e.g. out of memory) is a
row with its error; the others still run.
On a CPU host it runs the tiny models (the configs' `tiny`, batch 4 at 64 px) so that it stays
tested (tests/test_device_time.py); `--model paper|tiny` overrides the choice.

Prints a line per phase (elapsed seconds, so progress shows), then a header (device kind, count,
JAX version, the command to paste into benchmarks/RESULTS.md with the table) and a markdown table:
  compile s        trace + lower + compile of the step on this host
  ms/step          median over --timed steps after --warmup steps, each step (new state and
                   metrics) synchronised with `jax.block_until_ready`; the new state is fed back
  images/s per chip   per-chip batch / (ms/step)
  roofline ms      benchmarks/roofline.py's estimate for this chip: max(FLOPs / peak bf16 FLOP/s,
                   bytes moved / HBM bandwidth). FLOPs: `compiled.cost_analysis()` (per device);
                   where it has none (GPU): XLA's cost analysis of the unoptimised HLO / devices.
                   Bytes: accelerators.hlo_stats(optimised HLO)['moved'] (per device).
  measured / roofline   ms/step / roofline ms ('-' on a chip without known peaks, e.g. a CPU)
`--json FILE` writes the header and the rows (all of the above, the step times, FLOPs, bytes).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
import traceback
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

importlib.import_module("ms3_jax")  # chooses JAX's platforms (ms3_jax.platforms) before JAX loads
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

STEP_KINDS = ("ms3", "ce", "stage1")
PAPER = {"batch": 16, "stage1_batch": 16, "size": 224}  # as RESULTS.md's roofline table
TINY = {"batch": 4, "stage1_batch": 4, "size": 64}


def _load(name: str):
    """benchmarks/<name>.py as a module; the environment variables it sets on import (accelerators
    defaults JAX_PLATFORMS=cpu for its compile-only runs) are undone: this script runs on chips."""
    saved = dict(os.environ)
    spec = importlib.util.spec_from_file_location(f"ms3_bench_{name}",
                                                  os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    try:
        spec.loader.exec_module(module)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return module


accelerators = _load("accelerators")
roofline = _load("roofline")


class Progress:
    def __init__(self, out=sys.stdout):
        self.t0, self.out = time.perf_counter(), out

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", file=self.out, flush=True)


# ------------------------------------------------------------------ state
def key_name(k) -> str:
    for attr in ("name", "key", "idx"):  # GetAttrKey (struct fields), DictKey, SequenceKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def random_tree(abstract, sharding, seed: int, all_params: bool = False):
    """Arrays of `abstract`'s shapes and dtypes on `sharding`, as a fresh state has them: under
    `params` / `ema_params` (everything with `all_params`) kernels and embeddings N(0, 1 /
    fan_in) (fan_in: the product of all but the last dimension; 1-d and scalars N(0, 0.02^2)),
    `scale` 1, `bias` 0, the momentum copy equal to the online weights; BatchNorm `var` 1;
    everything else (optimiser moments and counts, bank, V, S, step, rng) zeros / False. No
    init is compiled: on a CPU that would double the compile time."""
    def leaf(path, x):
        keys = [key_name(k) for k in path]
        is_param = all_params or (keys and keys[0] in ("params", "ema_params"))
        rest = keys if all_params else keys[1:]  # ema_params gets the same values as params
        if not jnp.issubdtype(x.dtype, jnp.floating):
            v = np.zeros(x.shape, x.dtype)
        elif is_param and keys[-1] not in ("scale", "bias"):
            rng = np.random.default_rng([seed, zlib.crc32("/".join(rest).encode())])
            std = 1 / np.sqrt(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 0.02
            v = std * rng.standard_normal(x.shape, np.float32)
        else:
            one = (is_param and keys[-1] == "scale") or (not is_param and keys[-1] == "var")
            v = np.full(x.shape, 1.0 if one else 0.0)
        return jax.device_put(np.asarray(v).astype(x.dtype), sharding)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


# ------------------------------------------------------------------ inputs
def label_space(cfg):
    from ms3_jax.data.label_space import LabelSpace
    return LabelSpace.from_datasets(list(cfg.data.datasets))


def random_labels(rng, ls, batch: int, size: int, with_dataset_id: bool) -> dict:
    """Images and blocky labels (8 px cells) of a random dataset per image, 2 ignored rows."""
    dataset_id = rng.integers(0, ls.num_datasets, batch).astype(np.int32)
    cells = -(-size // 8)
    labels = np.stack([rng.integers(ls.offsets[d], ls.offsets[d + 1], (cells, cells))
                       for d in dataset_id]).astype(np.int32)
    labels = np.repeat(np.repeat(labels, 8, axis=1), 8, axis=2)[:, :size, :size]
    labels[:, :2] = -1
    out = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8), "label": labels}
    return {**out, "dataset_id": dataset_id} if with_dataset_id else out


def pretrain_consts(rng, ls, text_shape) -> dict:
    from ms3_jax.method import relations
    t = rng.standard_normal(text_shape)
    return {"text": (t / np.linalg.norm(t, axis=1, keepdims=True)).astype(np.float32),
            "other_dataset": np.asarray(relations.other_dataset_matrix(ls.dataset_of_class)),
            "dataset_of_class": np.asarray(ls.dataset_of_class, np.int32)}


def stage1_consts(rng, ls, avals) -> dict:
    """ids / eos / gather of the prompts (random token ids < 256, EOS last); `text` separately."""
    from ms3_jax.method import labels
    u, length = avals["ids"].shape
    gather = np.asarray(labels.distinct_names(ls.names)[1], np.int32)
    if gather.shape != avals["gather"].shape:
        gather = np.arange(avals["gather"].shape[0], dtype=np.int32) % u
    return {"ids": rng.integers(0, 256, (u, length)).astype(np.int32),
            "eos": np.full((u,), length - 1, np.int32), "gather": gather}


# ------------------------------------------------------------------ cost and roofline
def step_flops(compiled, lowered, num_devices: int) -> tuple[float | None, str]:
    """(FLOPs per device, where from): cost_analysis(); else the unoptimised HLO's / devices."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    if cost.get("flops", 0) > 0:
        return float(cost["flops"]), "cost_analysis"
    flops = accelerators.hlo_flops(lowered)  # None: no FLOPs, no roofline; the timing stands
    return (flops / num_devices, "unoptimised HLO") if flops else (None, "none")


def params_fingerprint(params) -> np.ndarray:
    """Per float leaf the sum of its values (on the host: nothing to compile)."""
    leaves = [x for x in jax.tree_util.tree_leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
    return np.array([np.asarray(x, np.float64).sum() for x in jax.device_get(leaves)])


# ------------------------------------------------------------------ one step kind
def time_step(kind: str, devices: list, tiny: bool, batch: int, size: int, patch: int,
              warmup: int, timed: int, log: Progress, seed: int = 0) -> dict:
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ms3_jax.engine import sharding
    row = {"step": kind, "batch_per_chip": batch, "size": size, "devices": len(devices),
           "model": "tiny" if tiny else "paper"}
    rng = np.random.default_rng(seed)
    cfg = accelerators.make_config(tiny, kind, "auto")
    t = time.perf_counter()
    lowered, _ = (accelerators.lower_stage1(cfg, devices, batch, size, patch) if kind == "stage1"
                  else accelerators.lower_step(cfg, devices, batch, size))
    row["lower_s"] = time.perf_counter() - t
    log(f"{kind}: traced + lowered in {row['lower_s']:.1f} s")
    t = time.perf_counter()
    compiled = lowered.compile()
    row["compile_only_s"] = time.perf_counter() - t
    row["compile_s"] = row["lower_s"] + row["compile_only_s"]
    log(f"{kind}: compiled in {row['compile_only_s']:.1f} s")

    t = time.perf_counter()
    (state_aval, batch_aval, consts_aval), _ = lowered.in_avals
    mesh = sharding.data_mesh(devices)
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = random_tree(state_aval, rep, seed)
    ls = label_space(cfg)
    host_batch = random_labels(rng, ls, batch * len(devices), size, "dataset_id" in batch_aval)
    if kind == "stage1":
        consts = stage1_consts(rng, ls, consts_aval)
        text_params = random_tree(consts_aval["text"], rep, seed + 1, all_params=True)
    else:
        consts = pretrain_consts(rng, ls, consts_aval["text"].shape)
    for name, x in {**host_batch, **consts}.items():  # the helpers' shapes and dtypes, or fail here
        want = (batch_aval if name in host_batch else consts_aval)[name]
        if x.shape != want.shape or x.dtype != want.dtype:
            raise ValueError(f"{kind}: input {name} is {x.dtype}{list(x.shape)}, the lowered step "
                             f"takes {want.dtype}{list(want.shape)}")
    step_batch = {k: jax.device_put(v, data) for k, v in host_batch.items()}
    consts = {k: jax.device_put(v, rep) for k, v in consts.items()}
    if kind == "stage1":
        consts["text"] = text_params
    before, step0 = params_fingerprint(state.params), int(state.step)
    jax.block_until_ready((state, step_batch, consts))
    log(f"{kind}: random state and inputs on {len(devices)} device(s) in "
        f"{time.perf_counter() - t:.1f} s")

    times, finite, metrics = [], [], {}
    for i in range(warmup + timed):
        t = time.perf_counter()
        state, metrics = compiled(state, step_batch, consts)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
        finite.append(float(metrics["finite"]))
        if i + 1 == warmup:
            log(f"{kind}: {warmup} warm-up step(s) in {sum(times):.1f} s")
    log(f"{kind}: {timed} timed step(s) in {sum(times[warmup:]):.1f} s")
    step_s = statistics.median(times[warmup:])
    row.update(step_times_ms=[1e3 * s for s in times[warmup:]], warmup_times_ms=[1e3 * s for s in times[:warmup]],
               ms_per_step=1e3 * step_s, images_per_s_per_chip=batch / step_s,
               state_step_before=step0, state_step_after=int(state.step),
               params_changed=bool(np.any(params_fingerprint(state.params) != before)),
               all_finite=all(f == 1.0 for f in finite), loss=float(metrics["loss"]))

    row["flops"], row["flops_source"] = step_flops(compiled, lowered, len(devices))
    text = compiled.as_text()
    row["bytes_moved"] = accelerators.hlo_stats(text)["moved"] if text else None
    chip = roofline.chip_of(devices[0].device_kind)
    row["chip"] = chip
    if chip and row["flops"] and row["bytes_moved"]:
        est = roofline.estimate(row["flops"], row["bytes_moved"], chip, batch)
        row.update(roofline_ms=1e3 * est.step_s, flop_ms=1e3 * est.flop_s, byte_ms=1e3 * est.byte_s,
                   ratio=row["ms_per_step"] / (1e3 * est.step_s))
    else:
        row.update(roofline_ms=None, ratio=None)
    return {**row, "status": "ok"}


# ------------------------------------------------------------------ report
COLUMNS = ("step", "compile s", "ms/step", "images/s per chip", "roofline ms", "measured / roofline")


def table_row(r: dict) -> str:
    if r["status"] != "ok":
        return f"| {r['step']} | {r['status'].replace('|', '/')} | - | - | - | - |"
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    return (f"| {r['step']} | {r['compile_s']:.1f} | {r['ms_per_step']:.1f} | "
            f"{r['images_per_s_per_chip']:.1f} | {f(r['roofline_ms'], '.3g')} | {f(r['ratio'], '.2f')} |")


def report(header: dict, rows: list[dict]) -> str:
    lines = [f"# {header['date']} {header['devices']} x {header['device_kind']} ({header['platform']}), "
             f"jax {header['jax']}, {header['model']} models, per chip: batch {header['batch']} "
             f"(stage1 {header['stage1_batch']}) at {header['size']} px, median of {header['timed']} "
             f"steps after {header['warmup']} warm-up",
             f"# paste into benchmarks/RESULTS.md with this table: `{header['command']}`"]
    if header["chip"]:
        lines.append("# roofline " + roofline.peaks_line([header["chip"]]))
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS), *map(table_row, rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Runs the timing; returns {'header': ..., 'rows': [...]} (also `--json`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default=",".join(STEP_KINDS), help="comma-separated: ms3, ce, stage1")
    ap.add_argument("--devices", type=int, default=1, help="chips to run on (the first N)")
    ap.add_argument("--model", default="auto", choices=["auto", "paper", "tiny"],
                    help="auto: paper on GPU / TPU, tiny on CPU")
    ap.add_argument("--batch", type=int, help=f"ms3 / ce images per chip (paper {PAPER['batch']}, tiny {TINY['batch']})")
    ap.add_argument("--stage1-batch", type=int, help=f"stage1 images per chip (paper {PAPER['stage1_batch']})")
    ap.add_argument("--size", type=int, help=f"crop (paper {PAPER['size']}, tiny {TINY['size']})")
    ap.add_argument("--stage1-patch", type=int, default=16, help="stage1 ViT-B/16 or /32 (paper model)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timed", type=int, default=10)
    ap.add_argument("--json", help="write the header and rows here")
    a = ap.parse_args(argv)
    kinds = [k for k in a.steps.split(",") if k]
    if bad := [k for k in kinds if k not in STEP_KINDS]:
        ap.error(f"unknown step(s) {bad}; valid: {', '.join(STEP_KINDS)}")
    if a.warmup < 0 or a.timed < 1:
        ap.error("--warmup must be >= 0 and --timed >= 1")
    available = jax.devices()
    if not 1 <= a.devices <= len(available):
        ap.error(f"--devices {a.devices}: this host has {len(available)} device(s)")
    devices = available[:a.devices]
    platform = devices[0].platform
    tiny = a.model == "tiny" or (a.model == "auto" and platform not in ("gpu", "tpu"))
    d = TINY if tiny else PAPER
    batch, stage1_batch, size = a.batch or d["batch"], a.stage1_batch or d["stage1_batch"], a.size or d["size"]
    header = {"date": time.strftime("%Y-%m-%d %H:%M"), "platform": platform,
              "device_kind": devices[0].device_kind, "devices": len(devices), "jax": jax.__version__,
              "model": "tiny" if tiny else "paper", "batch": batch, "stage1_batch": stage1_batch,
              "size": size, "warmup": a.warmup, "timed": a.timed,
              "chip": roofline.chip_of(devices[0].device_kind),
              "command": shlex.join(["python", "benchmarks/device_time.py", *argv])}
    log = Progress()
    log(f"{len(devices)} x {header['device_kind']} ({platform}), {header['model']} models, steps {kinds}")
    rows = []
    for kind in kinds:
        b = stage1_batch if kind == "stage1" else batch
        try:
            rows.append(time_step(kind, devices, tiny, b, size, a.stage1_patch, a.warmup, a.timed, log))
        except Exception as e:  # noqa: BLE001 -- a row of the table (e.g. out of memory), then the next
            traceback.print_exc()
            first = next((l for l in str(e).splitlines() if l.strip()), "")
            rows.append({"step": kind, "status": f"{type(e).__name__}: {first[:160]}"})
        log(f"{kind}: {rows[-1]['status'] if rows[-1]['status'] != 'ok' else 'done'}")
    result = {"header": header, "rows": rows}
    print("\n" + report(header, rows), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
